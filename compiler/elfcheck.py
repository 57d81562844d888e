"""Static checks of a compiled shared library against its profile (pyelftools).

Every library is checked, executed or not: ELF class and machine match the profile's ISA,
armv7 libraries use the hard-float ABI (VFP register arguments), and the library needs no
shared object a device would not have. For ISAs that cannot be executed here (armv7 without
the runner) this is the evidence the report carries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compiler.errors import BuildFailedError

_MACHINES = {"x86_64": ("EM_X86_64", 64), "aarch64": ("EM_AARCH64", 64), "armv7": ("EM_ARM", 32)}
EF_ARM_ABI_FLOAT_HARD = 0x400
# What a TVM library may link against on a device: the C runtime and nothing else.
ALLOWED_NEEDED = frozenset(
    {
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "libstdc++.so.6",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "ld-linux-aarch64.so.1",
        "ld-linux-armhf.so.3",
        "ld-linux-x86-64.so.2",
    }
)


@dataclass(frozen=True)
class ElfFacts:
    """What the ELF headers say about a library."""

    machine: str
    elf_class: int
    needed: list[str] = field(default_factory=list)
    float_abi: str | None = None
    cpu_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for report.json."""
        return asdict(self)


def read_elf(path: Path) -> ElfFacts:
    """Read machine, class, DT_NEEDED, ARM float ABI and CPU name.

    Raises:
        BuildFailedError: the file is not an ELF shared object.
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with path.open("rb") as fh:
            elf = ELFFile(fh)
            needed: list[str] = []
            dynamic: Any = elf.get_section_by_name(".dynamic")
            if dynamic is not None:
                needed = [t.needed for t in dynamic.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
            float_abi = cpu = None
            if elf["e_machine"] == "EM_ARM":
                float_abi = "hard" if elf["e_flags"] & EF_ARM_ABI_FLOAT_HARD else "soft"
                attrs: Any = elf.get_section_by_name(".ARM.attributes")
                if attrs is not None:
                    for sub in attrs.iter_subsections():
                        for subsub in sub.iter_subsubsections():
                            for attr in subsub.iter_attributes():
                                if attr.tag == "TAG_CPU_NAME":
                                    cpu = str(attr.value)
                                if attr.tag == "TAG_ABI_VFP_ARGS" and attr.value != 1:
                                    float_abi = "soft"
            return ElfFacts(str(elf["e_machine"]), int(elf.elfclass), needed, float_abi, cpu)
    except (ELFError, OSError) as err:
        raise BuildFailedError(f"{path.name} is not a valid ELF shared library: {err}") from err


def check_elf(facts: ElfFacts, isa: str) -> list[str]:
    """Problems of a library for ``isa`` (pure; empty list when it fits)."""
    problems = []
    machine, elf_class = _MACHINES[isa]
    if facts.machine != machine or facts.elf_class != elf_class:
        problems.append(
            f"library is {facts.machine} ELF{facts.elf_class}; {isa} needs {machine} ELF{elf_class}"
        )
    if isa == "armv7" and facts.float_abi != "hard":
        problems.append(f"library uses the {facts.float_abi}-float ABI; armhf needs hard-float")
    extra = sorted(set(facts.needed) - ALLOWED_NEEDED)
    if extra:
        problems.append(f"library needs shared objects a device may lack: {', '.join(extra)}")
    return problems

"""Agent test fixtures: compiled, signed artifacts shared by the agent tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from compiler.pipeline import CompileRequest, compile_model
from compiler.settings import CompilerSettings
from compiler.signing import generate_keys
from tests.agent.bundles import make_bundle
from tests.compiler import models


@dataclass(frozen=True)
class Artifacts:
    """Compiled, signed bundles shared by the tests of this module."""

    key: Path
    public: Path
    v1: Path
    v2: Path
    big: Path
    onnx: Path
    other_key_bundle: Path
    wrong_profile: Path


def _big_onnx(path: Path) -> Path:
    import torch

    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 2048),
        torch.nn.ReLU(),
        torch.nn.Linear(2048, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    ).eval()
    torch.onnx.export(
        model,
        (torch.randn(1, 32),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamo=False,
        opset_version=17,
    )
    return path


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    d = tmp_path_factory.mktemp("artifacts")
    keys = generate_keys(d / "keys")
    other = generate_keys(d / "other-keys")
    settings = CompilerSettings(config_dir=d / "cfg", cache_dir=d / "cache")
    onnx = models.export_onnx("mlp", d / "mlp.onnx")
    big_onnx = _big_onnx(d / "big.onnx")
    out = {}
    for label, model, name, version in (
        ("v1", onnx, "mlp", "1"),
        ("v2", onnx, "mlp", "2"),
        ("big", big_onnx, "big", "1"),
    ):
        out[label] = compile_model(
            CompileRequest(
                model=model,
                profile="generic/x86_64",
                output=d / label,
                model_name=name,
                model_version=version,
                runtime="tvm",
                trials=0,
                signing_key=keys.private,
                samples=2,
            ),
            settings=settings,
        ).output
    return Artifacts(
        key=keys.private,
        public=keys.public,
        v1=out["v1"],
        v2=out["v2"],
        big=out["big"],
        onnx=onnx,
        other_key_bundle=make_bundle(d / "other", other.private, name="mlp", version="9"),
        wrong_profile=make_bundle(
            d / "arm", keys.private, name="mlp", version="5", profile="raspberry-pi/4b-aarch64"
        ),
    )

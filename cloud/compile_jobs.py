"""Compile jobs: a registered model version → one signed artifact per hardware profile → fleet.

:func:`run_compile` is the library call a cloud worker makes for a ``compile`` job:

1. check everything that would fail every profile before any slow work: the profiles (each
   must be known; the message names the choices), the ONNX file, the signing key (missing →
   the message names the path and ``edgeloop keys generate``);
2. per profile, in order: :func:`compiler.pipeline.compile_model` into
   ``out_dir/<profile with '/' as '__'>/`` with the registry's model name and version (so the
   fleet's ``/models`` route groups the artifacts), then hand the bundle to an
   :class:`ArtifactUploader`. A profile that fails (accuracy gate, unsupported operator, a
   refused upload) is recorded in its :class:`CompileOutcome` with the reason, and the others
   go on; if *every* profile fails the job fails (:class:`~cloud.errors.JobFailedError`
   naming each reason);
3. ``should_stop`` is polled between the compiler's steps and between profiles
   (:class:`~cloud.errors.JobCanceledError`); ``on_progress(fraction, message)`` reports.

Retries are idempotent: beside each bundle a ``<slug>.request.json`` records the fingerprint
of what was asked (ONNX sha256, name, version, profile, shapes, trials, runtime, calibration
data, signing key id, edgeloop version). A retried job whose bundle still verifies and
matches reuses it, so the fleet sees the same artifact id again, and uploading an artifact
the store already holds is success (the store is content-addressed; the fleet API answers
200).

Uploaders (injected): :class:`FleetApiUploader` posts to a running fleet API through
:class:`fleet.sdk.FleetClient`; :class:`LocalStoreUploader` puts into a
:class:`fleet.store.ArtifactStore` directory. Their failures become cloud errors carrying the
fleet's own reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

import edgeloop
from cloud.errors import (
    CloudError,
    ConflictError,
    InvalidRequestError,
    JobCanceledError,
    JobFailedError,
    NotFoundError,
)

if TYPE_CHECKING:
    from compiler.execution import HostFacts
    from compiler.pipeline import CompileResult
    from compiler.profiles import ProfileRegistry
    from compiler.settings import CompilerSettings
    from fleet.sdk import FleetClient
    from fleet.store import ArtifactStore

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]
REQUEST_SUFFIX = ".request.json"
# compile_model announces about this many steps per profile (load, reference, build,
# execute, sign); the upload is the last share of a profile's progress.
_COMPILER_STEPS = 5
_UPLOAD_SHARE = 0.1


class CompileInput(BaseModel):
    """What to compile: one registered model version for a list of hardware profiles.

    ``model_version`` is sent as text because the artifact manifest (and so the fleet) names
    versions as strings; the registry's integer version ``3`` becomes ``"3"``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(min_length=1, max_length=128)
    model_version: str = Field(min_length=1, max_length=64)
    onnx: Path = Field(description="The version's exported ONNX model.")
    profiles: list[str] = Field(min_length=1, description="Hardware profile names, in order.")
    input_shapes: dict[str, list[int]] = Field(
        default_factory=dict, description="Static shape per model input, e.g. input: [1, 64]."
    )
    trials: int | None = Field(
        default=None, ge=0, description="MetaSchedule trials (default: each profile's)."
    )
    runtime: Literal["auto", "tvm", "onnxruntime"] = "auto"
    calibration_data: Path | None = Field(
        default=None, description=".npz of real inputs for the accuracy gate (else random)."
    )

    @field_validator("model_version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("profiles")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        repeated = sorted({p for p in value if value.count(p) > 1})
        if repeated:
            raise ValueError(f"profile(s) listed more than once: {', '.join(repeated)}")
        return value

    @field_validator("input_shapes")
    @classmethod
    def _positive(cls, value: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, shape in value.items():
            if not shape or any(d < 1 for d in shape):
                raise ValueError(
                    f"input {name!r} has shape {shape}; give one or more positive dimensions"
                )
        return value


class CompileOutcome(BaseModel):
    """What happened to one profile of a compile job (JSON-ready for the job's result).

    ``error`` is None on success. A profile that compiled but whose upload failed has an
    ``artifact_id`` and ``bundle`` with ``uploaded`` false and ``error`` saying why.
    """

    model_config = ConfigDict(extra="forbid")

    profile: str
    artifact_id: str | None = None
    bundle: Path | None = None
    tuning_db_digest: str | None = Field(
        default=None,
        description="sha256 of the tuning records applied (the manifest's tuning."
        "database_digest); None when no record applied (untuned).",
    )
    report: dict[str, Any] = Field(default_factory=dict, description="Summary of report.json.")
    uploaded: bool = False
    destination: str | None = Field(default=None, description="Where it was uploaded.")
    reused: bool = Field(default=False, description="An earlier attempt's bundle was reused.")
    error: str | None = None
    error_kind: str | None = Field(default=None, description="Exception class of the error.")

    @property
    def ok(self) -> bool:
        """Compiled and uploaded."""
        return self.error is None


# ---------------------------------------------------------------- uploaders


@dataclass(frozen=True)
class UploadResult:
    """An artifact the fleet store now holds."""

    artifact_id: str
    destination: str


class ArtifactUploader(Protocol):
    """Hands a sealed bundle directory to the fleet's artifact store (idempotently)."""

    @property
    def destination(self) -> str:
        """Where artifacts go, for messages (a URL or a directory)."""
        ...

    def upload(self, bundle_dir: Path) -> UploadResult:
        """Store the bundle; storing one that is already there is success.

        Raises:
            CloudError: a subclass carrying the store's reason.
        """
        ...


class FleetApiUploader:
    """Uploads through the fleet API (``POST /artifacts``, needs the ``deploy`` scope).

    Args:
        client: a :class:`fleet.sdk.FleetClient`; see :meth:`connect` to make one.
    """

    def __init__(self, client: FleetClient) -> None:
        self.client = client

    @classmethod
    def connect(cls, url: str, api_key: str, *, timeout: float = 120.0) -> FleetApiUploader:
        """An uploader with its own client of the fleet API at ``url``.

        Raises:
            InvalidRequestError: no URL or no API key.
        """
        if not url:
            raise InvalidRequestError(
                "no fleet API URL; set EDGELOOP_CLOUD_FLEET_URL (e.g. http://127.0.0.1:8080)"
            )
        if not api_key:
            raise InvalidRequestError(
                f"no API key for the fleet API at {url}; set EDGELOOP_CLOUD_FLEET_API_KEY to "
                "a key with the 'deploy' scope"
            )
        from fleet.sdk import FleetClient

        return cls(FleetClient(url, api_key, timeout=timeout))

    @property
    def destination(self) -> str:
        """The fleet API's URL."""
        return f"fleet API {self.client.base_url}"

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()

    def __enter__(self) -> FleetApiUploader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upload(self, bundle_dir: Path) -> UploadResult:
        """POST the bundle's transfer tar; 201 (new) and 200 (already there) are success.

        Raises:
            InvalidRequestError: the fleet refused the artifact (e.g. it does not verify with
                the fleet's public key); the message carries the fleet's reason.
            CloudError: the fleet API is unreachable or refused the key.
        """
        from fleet import sdk

        try:
            artifact = self.client.upload_artifact(bundle_dir)
        except sdk.FleetAPIError as err:
            raise _fleet_error(err, self.client.base_url, bundle_dir) from err
        except OSError as err:
            raise CloudError(f"cannot read bundle {str(bundle_dir)!r} to upload: {err}") from err
        return UploadResult(artifact.artifact_id, self.destination)


def _fleet_error(err: Exception, url: str, bundle_dir: Path) -> CloudError:
    from fleet import sdk

    detail = err.detail if isinstance(err, sdk.FleetAPIError) else str(err)
    what = f"the fleet API at {url} refused artifact {bundle_dir.name!r}"
    if isinstance(err, sdk.FleetConnectionError):
        return CloudError(f"cannot upload to the fleet API at {url}: {detail}")
    if isinstance(err, sdk.FleetAuthError):
        return CloudError(f"{what}: HTTP 401: {detail} (check EDGELOOP_CLOUD_FLEET_API_KEY)")
    if isinstance(err, sdk.FleetPermissionError):
        return CloudError(f"{what}: HTTP 403: {detail} (the key needs the 'deploy' scope)")
    if isinstance(err, sdk.FleetInvalidArtifactError):
        return InvalidRequestError(
            f"{what}: {detail} (is the fleet's public key the pair of the cloud's signing key?)"
        )
    if isinstance(err, sdk.FleetNotFoundError):
        return NotFoundError(f"{what}: HTTP 404: {detail}")
    if isinstance(err, sdk.FleetConflictError):
        return ConflictError(f"{what}: HTTP 409: {detail}")
    if isinstance(err, (sdk.FleetValidationError, sdk.FleetRequestError)):
        return InvalidRequestError(f"{what}: HTTP {err.status}: {detail}")
    return CloudError(f"{what}: {err}")


class LocalStoreUploader:
    """Puts bundles into a local :class:`fleet.store.ArtifactStore` directory.

    Args:
        store: the store (it verifies each bundle with the fleet's public key).
    """

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    @classmethod
    def open(cls, root: Path, public_key: Path) -> LocalStoreUploader:
        """An uploader over the store at ``root`` verifying with the PEM ``public_key``.

        Raises:
            InvalidRequestError: the public key is missing or not an ed25519 key.
        """
        from compiler.errors import InvalidInputError
        from compiler.signing import load_public_key
        from fleet.store import ArtifactStore

        try:
            key = load_public_key(public_key)
        except InvalidInputError as err:
            raise InvalidRequestError(f"fleet store public key: {err}") from err
        return cls(ArtifactStore(root, key))

    @property
    def destination(self) -> str:
        """The store's directory."""
        return f"artifact store {self.store.root}"

    def close(self) -> None:
        """Close the store's open files."""
        self.store.close()

    def __enter__(self) -> LocalStoreUploader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upload(self, bundle_dir: Path) -> UploadResult:
        """Verify and store the bundle (the existing entry if it is already stored).

        Raises:
            InvalidRequestError: the bundle does not verify with the store's key.
            ConflictError: a damaged entry with the same id is in the store.
            CloudError: any other store failure.
        """
        from fleet import store as store_mod

        try:
            stored = self.store.put_bundle(bundle_dir)
        except store_mod.InvalidArtifactError as err:
            raise InvalidRequestError(
                f"{self.destination} refused artifact {bundle_dir.name!r}: {err}"
            ) from err
        except store_mod.ArtifactConflictError as err:
            raise ConflictError(str(err)) from err
        except (store_mod.StoreError, OSError) as err:
            raise CloudError(
                f"{self.destination} failed to store {bundle_dir.name!r}: {err}"
            ) from err
        return UploadResult(stored.artifact_id, self.destination)


# ---------------------------------------------------------------- the job


def profile_slug(profile: str) -> str:
    """Directory name of a profile's bundle (``vendor/board`` → ``vendor__board``)."""
    return profile.replace("/", "__")


def summarize_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a compiler report.json a registry and lineage show (pure)."""
    verification = report.get("verification") or {}
    accuracy = {
        name: {
            k: values.get(k)
            for k in ("max_abs_error", "max_rel_error", "cosine", "top1_agreement")
            if k in values
        }
        for name, values in (report.get("accuracy") or {}).items()
    }
    latency = {
        runtime: values["median_ms"]
        for runtime, values in (report.get("latency") or {}).items()
        if isinstance(values, dict) and "median_ms" in values
    }
    tuning = report.get("tuning") or {}
    return {
        "runtime": (report.get("runtime") or {}).get("chosen"),
        "verified": bool(verification.get("executed")),
        "verified_where": verification.get("where"),
        "emulated": verification.get("emulated"),
        "not_verified_reason": None if verification.get("executed") else verification.get("reason"),
        "accuracy": accuracy or None,
        "latency_median_ms": latency,
        "tuning_records_applied": tuning.get("records_applied", 0),
        "tuning_new_trials": tuning.get("new_trials", 0),
        "artifact_bytes": (report.get("resources") or {}).get("artifact_bytes"),
    }


def failure_summary(outcomes: list[CompileOutcome]) -> str | None:
    """One line per failed profile, or None when every profile succeeded (pure)."""
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return None
    return "; ".join(f"{o.profile}: {o.error}" for o in failed)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def request_fingerprint(
    version: CompileInput,
    profile: str,
    *,
    onnx_sha256: str,
    calibration_sha256: str | None,
    signing_key_id: str,
) -> dict[str, Any]:
    """What decides a profile's bundle: equal fingerprints may reuse the bundle (pure)."""
    return {
        "schema_version": 1,
        "model_name": version.model_name,
        "model_version": version.model_version,
        "onnx_sha256": onnx_sha256,
        "profile": profile,
        "input_shapes": {k: list(v) for k, v in sorted(version.input_shapes.items())},
        "trials": version.trials,
        "runtime": version.runtime,
        "calibration_sha256": calibration_sha256,
        "signing_key_id": signing_key_id,
        "edgeloop": edgeloop.__version__,
    }


@dataclass(frozen=True)
class _Built:
    artifact_id: str
    tuning_digest: str | None


def run_compile(
    version: CompileInput,
    *,
    settings: CompilerSettings,
    tuning_db: Path,
    signing_key: Path,
    out_dir: Path,
    uploader: ArtifactUploader,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    registry: ProfileRegistry | None = None,
    host: HostFacts | None = None,
) -> list[CompileOutcome]:
    """Compile ``version`` for each of its profiles and upload every artifact that passed.

    Args:
        version: the model version and the profiles to build.
        settings: compiler settings (profile directories, cache with the qemu sysroot).
        tuning_db: the persistent MetaSchedule database shared by all compiles.
        signing_key: the ed25519 private key (PEM) that signs the artifacts.
        out_dir: the job's directory; bundles go to ``out_dir/<profile slug>/``.
        uploader: where artifacts go (:class:`FleetApiUploader`, :class:`LocalStoreUploader`).
        on_progress: called with (fraction 0..1, message) as the job advances.
        should_stop: polled between steps; true → :class:`JobCanceledError`.
        registry: the profile registry (default: from ``settings``).
        host: facts about this machine (default: detected once).

    Returns:
        One outcome per profile, in the order given; at least one succeeded.

    Raises:
        InvalidRequestError: an unknown profile or runtime, a missing ONNX file or
            calibration file, or a missing/invalid signing key (nothing was compiled).
        JobCanceledError: ``should_stop`` returned true (bundles already uploaded stay).
        JobFailedError: every profile failed; the message names each reason.
    """
    from compiler import execution
    from compiler.errors import CompilerError, InvalidInputError
    from compiler.profiles import ProfileRegistry
    from compiler.signing import key_id, load_private_key

    progress = on_progress or (lambda _fraction, _message: None)
    stop = should_stop or (lambda: False)
    registry = registry or ProfileRegistry(settings.profile_roots())
    _check_profiles(registry, version)
    if not version.onnx.is_file():
        raise InvalidRequestError(
            f"model file {str(version.onnx)!r} of {version.model_name} v{version.model_version} "
            "does not exist; the version's ONNX export is missing"
        )
    if version.calibration_data is not None and not version.calibration_data.is_file():
        raise InvalidRequestError(
            f"calibration data {str(version.calibration_data)!r} does not exist"
        )
    if not signing_key.is_file():
        raise InvalidRequestError(
            f"signing key {str(signing_key)!r} does not exist; create one with "
            "'edgeloop keys generate' (or point EDGELOOP_CLOUD_SIGNING_KEY at an ed25519 key)"
        )
    try:
        private_key = load_private_key(signing_key)
    except InvalidInputError as err:
        raise InvalidRequestError(f"signing key: {err}") from err
    public_key = private_key.public_key()
    onnx_sha256 = _sha256(version.onnx)
    calibration_sha256 = (
        _sha256(version.calibration_data) if version.calibration_data is not None else None
    )
    host = host or execution.detect_host(cache_dir=settings.cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    total = len(version.profiles)
    outcomes: list[CompileOutcome] = []
    for index, profile in enumerate(version.profiles):
        _check_stop(stop, outcomes, total)
        base = index / total
        progress(base, f"[{index + 1}/{total}] {profile}: compiling")
        fingerprint = request_fingerprint(
            version,
            profile,
            onnx_sha256=onnx_sha256,
            calibration_sha256=calibration_sha256,
            signing_key_id=key_id(public_key),
        )
        steps = 0

        def step(message: str, *, _base: float = base, _profile: str = profile) -> None:
            nonlocal steps
            _check_stop(stop, outcomes, total)
            steps += 1
            share = min(steps / (_COMPILER_STEPS + 1), 1.0) * (1.0 - _UPLOAD_SHARE)
            progress(_base + share / total, f"{_profile}: {message}")

        outcome = CompileOutcome(profile=profile, bundle=out_dir / profile_slug(profile))
        try:
            result = _compile_or_reuse(
                version,
                profile,
                fingerprint=fingerprint,
                out_dir=out_dir,
                settings=settings,
                tuning_db=tuning_db,
                signing_key=signing_key,
                public_key=public_key,
                registry=registry,
                host=host,
                step=step,
            )
        except CloudError:
            raise
        except CompilerError as err:
            _failed(outcome, err)
            outcome.bundle = None
        except Exception as err:  # a crash inside TVM must not sink the other profiles
            log.exception("compiling %s for %s crashed", version.model_name, profile)
            _failed(outcome, err, prefix="unexpected error: ")
            outcome.bundle = None
        else:
            built, report, reused = result
            outcome.artifact_id = built.artifact_id
            outcome.tuning_db_digest = built.tuning_digest
            outcome.report = summarize_report(report)
            outcome.reused = reused
            progress(
                base + (1.0 - _UPLOAD_SHARE) / total,
                f"{profile}: uploading to {uploader.destination}",
            )
            try:
                uploaded = uploader.upload(out_dir / profile_slug(profile))
            except CloudError as err:
                _failed(outcome, err, prefix="upload failed: ")
            else:
                if uploaded.artifact_id != outcome.artifact_id:
                    outcome.error = (
                        f"upload failed: {uploaded.destination} stored artifact "
                        f"{uploaded.artifact_id}, not the compiled {outcome.artifact_id}"
                    )
                    outcome.error_kind = "CloudError"
                else:
                    outcome.uploaded = True
                    outcome.destination = uploaded.destination
        outcomes.append(outcome)
        status = "ok" if outcome.ok else f"FAILED: {outcome.error}"
        progress((index + 1) / total, f"[{index + 1}/{total}] {profile}: {status}")
    if not any(o.ok for o in outcomes):
        raise JobFailedError(
            f"compiling {version.model_name} v{version.model_version} failed for every "
            f"profile: {failure_summary(outcomes)}"
        )
    return outcomes


def _failed(outcome: CompileOutcome, err: Exception, *, prefix: str = "") -> None:
    outcome.error = f"{prefix}{err}"
    outcome.error_kind = type(err).__name__


def _check_stop(stop: Callable[[], bool], outcomes: list[CompileOutcome], total: int) -> None:
    if stop():
        done = [o.profile for o in outcomes if o.ok]
        kept = f"; already uploaded: {', '.join(done)}" if done else ""
        raise JobCanceledError(
            f"compile canceled after {len(outcomes)} of {total} profile(s){kept}"
        )


def _check_profiles(registry: ProfileRegistry, version: CompileInput) -> None:
    from compiler.errors import CompilerError
    from compiler.pipeline import resolve_profile

    for name in version.profiles:
        try:
            resolve_profile(registry, name, version.runtime)
        except CompilerError as err:
            message = str(err).replace("--runtime", "runtime")
            raise InvalidRequestError(message) from err


def _compile_or_reuse(
    version: CompileInput,
    profile: str,
    *,
    fingerprint: dict[str, Any],
    out_dir: Path,
    settings: CompilerSettings,
    tuning_db: Path,
    signing_key: Path,
    public_key: Any,
    registry: ProfileRegistry,
    host: HostFacts,
    step: Callable[[str], None],
) -> tuple[_Built, dict[str, Any], bool]:
    from compiler.bundle import verify_bundle
    from compiler.errors import ArtifactError
    from compiler.pipeline import CompileRequest, compile_model

    bundle_dir = out_dir / profile_slug(profile)
    request_file = out_dir / f"{profile_slug(profile)}{REQUEST_SUFFIX}"
    if bundle_dir.is_dir() and _read_json(request_file) == fingerprint:
        try:
            verified = verify_bundle(bundle_dir, public_key)
        except ArtifactError as err:
            log.warning("not reusing %s: %s", bundle_dir, err)
        else:
            step(f"reusing the bundle of an earlier attempt ({verified.artifact_id[:12]})")
            built = _Built(verified.artifact_id, verified.manifest.tuning.database_digest)
            return built, verified.report(), True
    request_file.unlink(missing_ok=True)
    request = CompileRequest(
        model=version.onnx,
        profile=profile,
        output=bundle_dir,
        model_name=version.model_name,
        model_version=version.model_version,
        trials=version.trials,
        tuning_db=tuning_db,
        runtime=version.runtime,
        input_shapes={k: list(v) for k, v in version.input_shapes.items()},
        calibration_data=version.calibration_data,
        signing_key=signing_key,
        force=True,
    )
    result: CompileResult = compile_model(
        request, settings=settings, registry=registry, host=host, step=step
    )
    request_file.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    built = _Built(result.artifact_id, result.manifest.tuning.database_digest)
    return built, result.report, False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


__all__ = [
    "ArtifactUploader",
    "CompileInput",
    "CompileOutcome",
    "FleetApiUploader",
    "LocalStoreUploader",
    "UploadResult",
    "failure_summary",
    "profile_slug",
    "request_fingerprint",
    "run_compile",
    "summarize_report",
]

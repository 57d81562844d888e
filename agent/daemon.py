"""The agent daemon: jobs over MQTT, verified download, atomic activation, local serving.

Threads: the MQTT network thread (``agent.mqtt``) only enqueues; this module's worker
thread takes events off the queue and does all the work; HTTP inference runs on the
server's own threads. The worker never blocks longer than a verification or a model load.

Deployment of one job (docs/protocol.md):

1. ``IN_PROGRESS/downloading``: resumable chunked pull (``agent.download``).
2. ``IN_PROGRESS/verifying``: whole-file sha256, safe unpack, bundle signature with the
   device's trusted fleet key, every file hash, nothing extra, the job's signature, artifact
   id, profile, anti-rollback. No byte of the library is loaded before this passes.
3. ``IN_PROGRESS/activating``: load in the inactive slot, self-test, switch the ``active``
   link (the commit point), swap serving.
4. ``IN_PROGRESS/health_check``: one inference through the serving path; a failure restores
   the previous version on disk and in serving.
5. ``SUCCEEDED``. Any failure is ``FAILED`` with the reason; the previous model keeps
   serving throughout.
"""

from __future__ import annotations

import base64
import logging
import os
import platform
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import edgeloop
from agent import protocol
from agent.capture import Hook, HookError, Sample, load_hook
from agent.config import AgentSettings
from agent.dataloop import DataLoop
from agent.download import Download, DownloadError
from agent.jobs import JobLog, JobRecord, transition
from agent.metrics import AgentMetrics
from agent.mqtt import Connected, Event, Inbound, MqttLink
from agent.protocol import JobNotify, JobState, ProtocolError
from agent.runtimes import LoadedModel as Servable
from agent.slots import InstalledVersion, ModelStore, SlotError, is_downgrade
from compiler.bundle import unpack_bundle, verify_bundle
from compiler.errors import CompilerError
from compiler.manifest import SIGNATURE_FILE, ArtifactManifest
from compiler.signing import load_public_key

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job step failed; the message is the reason reported to the fleet."""


class Serving(Protocol):
    """What the daemon needs from the inference server's model repository."""

    def set_model(
        self, name: str, version: str, artifact_id: str, runtime: str, model: Servable
    ) -> None:
        """Make ``model`` the primary of ``name`` (in-flight requests finish on the old one)."""
        ...

    def remove_model(self, name: str) -> None:
        """Stop serving ``name``."""
        ...

    def infer(self, name: str, inputs: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """Run a request through the serving path (for the health check)."""
        ...

    def set_secondary(
        self,
        name: str,
        *,
        role: str,
        version: str,
        artifact_id: str,
        model: Servable,
        fraction: float = 0.0,
    ) -> None:
        """Serve ``model`` as the A/B candidate or the shadow of ``name``."""
        ...

    def clear_secondary(self, name: str, *, role: str) -> None:
        """Stop serving the candidate or shadow of ``name``."""
        ...

    def loaded(self) -> list[protocol.LoadedModel]:
        """Models being served, for heartbeats."""
        ...

    def shadow(self) -> dict[str, protocol.ShadowSummary]:
        """Per-model shadow agreement, for heartbeats."""
        ...

    def latency(self) -> dict[str, protocol.LatencySummary]:
        """Per-model latency since the last call, for heartbeats."""
        ...


Loader = Callable[[Path, ArtifactManifest], Servable]


@dataclass
class _Active:
    record: JobRecord
    download: Download | None = None
    last_progress: float = 0.0
    last_decile: int = 0
    bad_frames: int = 0
    file_attempts: int = 0
    last_error: str | None = None
    started: float = field(default_factory=time.monotonic)


def _synthetic_inputs(manifest: ArtifactManifest, seed: int = 0) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in manifest.inputs:
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            arrays.append(rng.standard_normal(spec.shape).astype(dtype))
        else:
            arrays.append(rng.integers(0, 10, size=spec.shape).astype(dtype))
    return arrays


class Agent:
    """One device's agent."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        serving: Serving,
        loader: Loader,
        runtimes: list[str],
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.serving = serving
        self.loader = loader
        self.runtimes = runtimes
        self.metrics = metrics or AgentMetrics()
        self.device_id = settings.device_id
        state = settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore(state)
        self.jobs = JobLog(state / "jobs")
        self.downloads_dir = state / "transfers"
        self.public_key = load_public_key(settings.trusted_key)
        self.events: queue.Queue[Event] = queue.Queue(maxsize=10_000)
        self.link = MqttLink(
            settings.broker,
            device_id=self.device_id,
            agent_version=edgeloop.__version__,
            events=self.events,
            subscriptions=[
                protocol.jobs_notify(self.device_id),
                protocol.artifacts_data(self.device_id),
                protocol.desired(self.device_id),
            ],
        )
        self.chunk_size = settings.transfer.chunk_size
        self.active: _Active | None = None
        self.stats: dict[str, int] = {"dropped_messages": 0, "bad_frames": 0, "chunks": 0}
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._started = time.monotonic()
        self._last_heartbeat = 0.0
        self._lock = threading.Lock()
        self.dataloop = self._make_dataloop()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Recover disk state, load active models, connect, and start the worker."""
        for leftover in self.store.recover():
            log.info("removed leftover %s", leftover)
        self.load_active_models()
        pending = self.jobs.load_current()
        if pending is not None and not pending.state.terminal:
            log.info("resuming job %s", pending.job.job_id)
            self.active = _Active(pending)
        self.link.start()
        self.dataloop.start()
        self._worker = threading.Thread(target=self._work, name="agent-worker", daemon=True)
        self._worker.start()

    def stop(self, *, clean: bool = True) -> None:
        """Stop the worker and the link (clean: retained 'offline', no LWT)."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(10)
        if self.active is not None and self.active.download is not None:
            self.active.download.close()
        self.dataloop.stop()
        self.link.stop(clean=clean)

    def load_active_models(self) -> None:
        """Serve the active version of every model on disk (falling back to last-known-good)."""
        for name in self.store.models():
            for candidate in (self.store.active(name), self.store.last_known_good(name)):
                if candidate is None:
                    continue
                try:
                    self._serve(candidate)
                except Exception as err:  # a broken version must not keep the agent down
                    log.error("cannot load %s %s: %s", name, candidate.artifact_id[:12], err)
                    continue
                if candidate is not self.store.active(name):
                    self.store.activate(name, candidate.artifact_id)
                break
            for role, info in self.store.roles(name).items():
                version = self.store.version(name, str(info["artifact_id"]))
                if version is None:
                    continue
                try:
                    self._serve_secondary(version, role, float(info.get("fraction", 0.0)))
                except Exception as err:
                    log.error(
                        "cannot serve %s %s as %s: %s", name, version.artifact_id[:12], role, err
                    )

    def _serve_secondary(self, version: InstalledVersion, role: str, fraction: float) -> None:
        model = self.loader(version.path, version.manifest)
        model.self_test()
        m = version.manifest
        self.serving.set_secondary(
            m.model.name,
            role=role,
            version=m.model.version,
            artifact_id=version.artifact_id,
            model=model,
            fraction=fraction,
        )
        self.metrics.set_active_model(
            m.model.name,
            version=m.model.version,
            artifact_id=version.artifact_id,
            runtime=m.runtime,
            role=role,
        )

    def _serve(self, version: InstalledVersion) -> Servable:
        model = self.loader(version.path, version.manifest)
        model.self_test()
        m = version.manifest
        self.serving.set_model(m.model.name, m.model.version, version.artifact_id, m.runtime, model)
        self.metrics.set_active_model(
            m.model.name,
            version=m.model.version,
            artifact_id=version.artifact_id,
            runtime=m.runtime,
        )
        return model

    # ------------------------------------------------------------ worker

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                event = None
            try:
                if isinstance(event, Inbound):
                    self._dispatch(event)
                elif isinstance(event, Connected):
                    self._on_connected(event)
                self._tick()
            except Exception:  # the worker must survive anything a message can cause
                log.exception("unexpected error in the agent worker")

    def _dispatch(self, event: Inbound) -> None:
        try:
            _device, leaf = protocol.parse_device_topic(event.topic)
        except ProtocolError as err:
            self.stats["dropped_messages"] += 1
            log.warning("dropped message: %s", err)
            return
        if leaf == "jobs/notify":
            if not event.payload:
                return  # a cleared retained job
            try:
                job = protocol.decode(JobNotify, event.payload)
            except ProtocolError as err:
                self.stats["dropped_messages"] += 1
                log.warning("dropped job notification: %s", err)
                return
            self.on_job(job)
        elif leaf == "artifacts/data":
            self._on_frame(event.payload)
        elif leaf == "desired":
            self.on_desired(event.payload)
        else:
            self.stats["dropped_messages"] += 1
            log.warning("dropped message on unexpected topic %s", event.topic)

    def _on_connected(self, event: Connected) -> None:
        if event.max_packet is not None:
            self.chunk_size = protocol.max_chunk_size(
                event.max_packet,
                protocol.artifacts_data(self.device_id),
                self.settings.transfer.chunk_size,
            )
        self._heartbeat()
        self.dataloop.max_packet = event.max_packet
        self.dataloop.wake_drain()
        if self.active is not None:
            self._update(self.active.record, JobState.IN_PROGRESS, step="resuming")
            if self.active.download is not None:
                self.active.download.transfer.in_flight.clear()

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat >= self.settings.heartbeat_interval_s and self.link.connected:
            self._heartbeat()
        active = self.active
        if active is None:
            return
        if active.download is None:
            self._begin(active)
        if self.active is not None and self.active.download is not None and self.link.connected:
            request = self.active.download.next_request(
                now=now,
                window=self.settings.transfer.window,
                timeout=self.settings.transfer.chunk_timeout_s,
            )
            if request is not None:
                # QoS 0: a request is idempotent and re-sent on chunk timeout and on reconnect
                # (in_flight is cleared then), so QoS 1 would add nothing but a PUBACK, and
                # after a broker outage paho would replay the queued requests as stale
                # duplicates that each cost a whole chunk (docs/protocol.md).
                self.link.publish(protocol.artifacts_req(self.device_id), request.to_bytes(), qos=0)
            transfer = self.active.download.transfer
            if transfer.retries > self.settings.transfer.max_retries:
                self._end(
                    self.active.record,
                    JobState.FAILED,
                    f"download stalled: {transfer.retries} chunk requests timed out "
                    f"({transfer.done}/{transfer.count} chunks received); last error: "
                    f"{self.active.last_error or 'none'}",
                )

    # ------------------------------------------------------------ jobs

    def on_job(self, job: JobNotify) -> None:
        """A job notification arrived (possibly again)."""
        if job.cancel:
            self.on_cancel(job)
            return
        finished = self.jobs.result(job.job_id)
        if finished is not None:
            state, reason = finished
            self._publish_update(job, state, reason=reason, step=None)
            return
        if self.active is not None:
            if self.active.record.job.job_id == job.job_id:
                return
            log.info("job %s supersedes %s", job.job_id, self.active.record.job.job_id)
            self._end(self.active.record, JobState.CANCELED, f"superseded by job {job.job_id}")
        record = JobRecord(job)
        self.active = _Active(record)
        self.jobs.save_current(record)
        self._publish_update(job, JobState.QUEUED)

    def on_cancel(self, job: JobNotify) -> None:
        """The fleet withdrew ``job.job_id``: stop it unless it already ended.

        A finished job (activated, failed) is reported as it ended; the job in hand (queued
        or downloading: activation runs to its end on this thread before a cancel is read)
        ends CANCELED, its partial download removed, the active version untouched; a job
        never seen is recorded CANCELED, so a late copy of its notify does not run it.
        """
        finished = self.jobs.result(job.job_id)
        if finished is not None:
            state, reason = finished
            self._publish_update(job, state, reason=reason, step=None)
            return
        reason = "canceled by the fleet"
        if self.active is not None and self.active.record.job.job_id == job.job_id:
            self._end(self.active.record, JobState.CANCELED, reason)
            return
        self.jobs.record_result(JobRecord(job, JobState.CANCELED, reason))
        self._publish_update(job, JobState.CANCELED, reason=reason)

    def _begin(self, active: _Active) -> None:
        record = active.record
        job = record.job
        try:
            if job.kind == "retire":
                self._retire(record)
                return
            self._precheck(job)
            installed = self.store.version(job.model.name, job.artifact_id)
            if installed is not None:
                self._activate_installed(record, installed)
                return
            self._update(record, JobState.IN_PROGRESS, step="downloading")
            limit = self.settings.transfer.max_artifact_mib * 1024 * 1024
            if job.transfer.size > limit:
                raise JobFailed(
                    f"artifact of {job.transfer.size} bytes exceeds the "
                    f"{self.settings.transfer.max_artifact_mib} MiB limit of this device"
                )
            active.download = Download(
                self.downloads_dir,
                artifact_id=job.artifact_id,
                info=job.transfer,
                chunk_size=self.chunk_size,
                flush_every=self.settings.transfer.window,
            )
            if active.download.complete:
                self._complete_download(active)
        except JobFailed as err:
            self._end(record, JobState.FAILED, str(err))

    def _precheck(self, job: JobNotify) -> None:
        self._check_admissible(
            name=job.model.name,
            version=job.model.version,
            profile=job.profile,
            may_downgrade=job.kind == "rollback" or job.role != "primary",
            downgrade_hint="only a rollback job may install it",
        )

    def _check_admissible(
        self,
        *,
        name: str,
        version: str,
        profile: str,
        runtime: str | None = None,
        may_downgrade: bool,
        downgrade_hint: str,
    ) -> None:
        """The checks every install path shares: profile, anti-rollback, runtime."""
        if profile != self.settings.profile:
            raise JobFailed(
                f"artifact is built for profile {profile!r}; this device is "
                f"{self.settings.profile!r}"
            )
        current = self.store.active(name)
        if (
            current is not None
            and not may_downgrade
            and is_downgrade(current.manifest.model.version, version)
        ):
            raise JobFailed(
                f"version {version} of {name} is older than the installed "
                f"{current.manifest.model.version}; {downgrade_hint}"
            )
        if runtime is not None and runtime not in self.runtimes:
            raise JobFailed(
                f"runtime {runtime!r} is not available on this device "
                f"(available: {', '.join(self.runtimes) or 'none'})"
            )

    def _on_frame(self, payload: bytes) -> None:
        try:
            frame = protocol.decode_frame(payload)
        except ProtocolError as err:
            self.stats["bad_frames"] += 1
            log.warning("dropped chunk frame: %s", err)
            return
        active = self.active
        if (
            active is None
            or active.download is None
            or frame.artifact_id != active.record.job.artifact_id
        ):
            return  # a late frame of an old transfer
        if frame.error:
            self._end(active.record, JobState.FAILED, f"artifact server refused: {frame.reason}")
            return
        try:
            if active.download.accept(frame):
                self.stats["chunks"] += 1
                self.metrics.transfer_chunk(len(frame.payload))
            else:
                self.metrics.transfer_chunk(len(frame.payload), outcome="duplicate")
        except DownloadError as err:
            self.stats["bad_frames"] += 1
            self.metrics.transfer_chunk(len(frame.payload), outcome="rejected")
            active.bad_frames += 1
            active.last_error = str(err)
            log.warning("dropped chunk: %s", err)
            if active.bad_frames > self.settings.transfer.max_bad_frames:
                self._end(
                    active.record,
                    JobState.FAILED,
                    f"artifact transfer is corrupt: {active.bad_frames} chunks rejected; "
                    f"last: {err}",
                )
            return
        now = time.monotonic()
        t = active.download.transfer
        decile = t.done * 10 // t.count
        if now - active.last_progress > 1.0 or decile != active.last_decile:
            active.last_progress = now
            active.last_decile = decile
            self._update(
                active.record, JobState.IN_PROGRESS, step="downloading", chunks=(t.done, t.count)
            )
        if active.download.complete:
            self._complete_download(active)

    def _complete_download(self, active: _Active) -> None:
        assert active.download is not None
        record = active.record
        try:
            tar = active.download.finish()
        except DownloadError as err:
            active.file_attempts += 1
            active.last_error = str(err)
            log.warning("%s", err)
            if active.file_attempts >= self.settings.transfer.max_file_attempts:
                self._end(
                    record,
                    JobState.FAILED,
                    f"artifact transfer is corrupt after {active.file_attempts} downloads: {err}",
                )
            return
        try:
            installed = self._verify_and_install(record, tar)
        except JobFailed as err:
            active.download.discard()
            self._end(record, JobState.FAILED, str(err))
            return
        active.download.discard()
        self._activate_installed(record, installed)

    def _verify_and_install(self, record: JobRecord, tar: Path) -> InstalledVersion:
        job = record.job
        self._update(record, JobState.IN_PROGRESS, step="verifying")
        staging = self.store.new_staging_dir("verify")
        shutil.rmtree(staging)
        try:
            unpack_bundle(tar, staging)
            verified = verify_bundle(staging, self.public_key)
            self._check_verified(job, verified.manifest, verified.artifact_id, staging)
            return self.store.install(staging, verified.manifest, verified.artifact_id)
        except CompilerError as err:
            raise JobFailed(f"verification failed: {err}") from err
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _check_verified(
        self, job: JobNotify, manifest: ArtifactManifest, artifact_id: str, root: Path
    ) -> None:
        if artifact_id != job.artifact_id:
            raise JobFailed(
                f"downloaded artifact is {artifact_id}, the job names {job.artifact_id}"
            )
        signature = base64.b64encode((root / SIGNATURE_FILE).read_bytes()).decode()
        if signature != job.signature:
            raise JobFailed("the job's signature differs from the bundle's manifest signature")
        if (manifest.model.name, manifest.model.version) != (job.model.name, job.model.version):
            raise JobFailed(
                f"artifact is {manifest.model.name} {manifest.model.version}; the job names "
                f"{job.model.name} {job.model.version}"
            )
        self._check_admissible(
            name=manifest.model.name,
            version=manifest.model.version,
            profile=manifest.profile,
            runtime=manifest.runtime,
            may_downgrade=job.kind == "rollback" or job.role != "primary",
            downgrade_hint="only a rollback job may install it",
        )

    def _retire(self, record: JobRecord) -> None:
        job = record.job
        if job.role == "primary":
            raise JobFailed("only a candidate or shadow can be retired; deploy another primary")
        current = self.store.roles(job.model.name).get(job.role)
        if current is None or current["artifact_id"] != job.artifact_id:
            raise JobFailed(f"{job.artifact_id[:12]} is not the {job.role} of {job.model.name}")
        self.store.set_role(job.model.name, job.role, None)
        self.serving.clear_secondary(job.model.name, role=job.role)
        self.metrics.clear_active_model(job.model.name, role=job.role)
        self._end(record, JobState.SUCCEEDED, None)

    def _activate_secondary(self, record: JobRecord, installed: InstalledVersion) -> None:
        job = record.job
        try:
            if self.store.active(job.model.name) is None:
                raise JobFailed(
                    f"{job.model.name} has no primary version to serve a {job.role} beside"
                )
            self._update(record, JobState.IN_PROGRESS, step="activating")
            try:
                self._serve_secondary(installed, job.role, job.traffic_fraction)
            except Exception as err:
                raise JobFailed(f"the {job.role} failed to load or self-test: {err}") from err
            self.store.set_role(
                job.model.name, job.role, installed.artifact_id, job.traffic_fraction
            )
        except (JobFailed, SlotError) as err:
            self._end(record, JobState.FAILED, str(err))
            return
        self._end(record, JobState.SUCCEEDED, None)

    def _activate_installed(self, record: JobRecord, installed: InstalledVersion) -> None:
        job = record.job
        if job.role != "primary":
            self._activate_secondary(record, installed)
            return
        name = job.model.name
        current = self.store.active(name)
        if current is not None and current.artifact_id == installed.artifact_id:
            done = JobState.ROLLED_BACK if job.kind == "rollback" else JobState.SUCCEEDED
            self._end(record, done, "already active")
            return
        try:
            if installed.manifest.runtime not in self.runtimes:
                raise JobFailed(f"runtime {installed.manifest.runtime!r} is not available")
            self._update(record, JobState.IN_PROGRESS, step="activating")
            try:
                model = self.loader(installed.path, installed.manifest)
                model.self_test()
            except Exception as err:
                raise JobFailed(f"the new version failed to load or self-test: {err}") from err
            previous = self.store.activate(name, installed.artifact_id)
            m = installed.manifest
            self.serving.set_model(name, m.model.version, installed.artifact_id, m.runtime, model)
            self.metrics.set_active_model(
                name, version=m.model.version, artifact_id=installed.artifact_id, runtime=m.runtime
            )
            self._update(record, JobState.IN_PROGRESS, step="health_check")
            try:
                outputs = self.serving.infer(name, _synthetic_inputs(m, seed=1))
                if not all(np.all(np.isfinite(o)) for o in outputs if o.dtype.kind == "f"):
                    raise ValueError("non-finite outputs")
            except Exception as err:
                self.store.restore(name, previous)
                if previous is not None:
                    self._serve(previous)
                else:
                    self.serving.remove_model(name)
                raise JobFailed(f"health check failed, previous version restored: {err}") from err
        except (JobFailed, SlotError) as err:
            self._end(record, JobState.FAILED, str(err))
            return
        for role, info in self.store.roles(name).items():
            if info["artifact_id"] == installed.artifact_id:  # a promoted candidate/shadow
                self.store.set_role(name, role, None)
                self.metrics.clear_active_model(name, role=role)
        self.store.prune(name, self.settings.keep_versions)
        done = JobState.ROLLED_BACK if job.kind == "rollback" else JobState.SUCCEEDED
        self._end(record, done, None)

    # ------------------------------------------------------------ reporting

    def _update(
        self,
        record: JobRecord,
        state: JobState,
        *,
        step: str | None = None,
        chunks: tuple[int, int] | None = None,
    ) -> None:
        record.state = transition(record.state, state)
        self.jobs.save_current(record)
        self._publish_update(record.job, state, step=step, chunks=chunks)

    def _end(self, record: JobRecord, state: JobState, reason: str | None) -> None:
        record.state = transition(record.state, state) if record.state != state else state
        record.reason = reason
        self.jobs.finish(record)
        if reason and state is JobState.FAILED:
            log.warning("job %s failed: %s", record.job.job_id, reason)
        self._publish_update(record.job, state, reason=reason)
        if self.active is not None and self.active.record is record:
            if self.active.download is not None:
                self.active.download.discard()
            self.active = None

    def _publish_update(
        self,
        job: JobNotify,
        state: JobState,
        *,
        reason: str | None = None,
        step: str | None = None,
        chunks: tuple[int, int] | None = None,
    ) -> None:
        self.metrics.job_state(state.value)
        update = protocol.JobUpdate(
            job_id=job.job_id,
            device_id=self.device_id,
            artifact_id=job.artifact_id,
            state=state,
            step=step,
            reason=reason,
            chunks_done=chunks[0] if chunks else None,
            chunks_total=chunks[1] if chunks else None,
        )
        # Progress (QUEUED, IN_PROGRESS) at QoS 0: informational, superseded by the next one,
        # and half the packets of a QoS 1 exchange for the fleet and the broker; the end of a
        # job (and its repeat for a job already finished) at QoS 1, so it is never lost.
        self.link.publish(
            protocol.jobs_update(self.device_id), update.to_bytes(), qos=1 if state.terminal else 0
        )

    def heartbeat_payload(self) -> protocol.Heartbeat:
        """The heartbeat as it would be sent now."""
        disk = shutil.disk_usage(self.settings.state_dir)
        return protocol.Heartbeat(
            device_id=self.device_id,
            agent_version=edgeloop.__version__,
            uptime_s=round(time.monotonic() - self._started, 3),
            models=self.serving.loaded(),
            runtimes=self.runtimes,
            hardware=protocol.HardwareFacts(
                arch=platform.machine(),
                profile=self.settings.profile,
                cpu_features=sorted(_cpu_features())[:64],
                cpu_count=os.cpu_count() or 1,
                accelerators=["cuda"] if Path("/dev/nvidia0").exists() else [],
                memory_free_mib=_memory_available_mib(),
                disk_free_mib=disk.free // (1024 * 1024),
            ),
            inference=self.serving.latency(),
            shadow=self.serving.shadow(),
        )

    def _heartbeat(self) -> None:
        self._last_heartbeat = time.monotonic()
        self.link.publish(
            protocol.heartbeat(self.device_id), self.heartbeat_payload().to_bytes(), qos=0
        )

    # ------------------------------------------------------------ data loop (agent.dataloop)

    def _make_dataloop(self) -> DataLoop:
        capture = self.settings.capture
        hook: Hook | None = None
        if capture.redaction_hook is not None:
            try:
                hook = load_hook(capture.redaction_hook)
            except HookError as err:
                # Never send what the hook should have redacted: drop every selected sample.
                log.error("%s; every selected sample is dropped as hook_error", err)
                hook = _refuse_all
        return DataLoop(
            device_id=self.device_id,
            state_dir=self.settings.state_dir,
            spool_path=capture.spool_path or self.settings.state_dir / "capture" / "spool.db",
            max_spool_bytes=capture.max_spool_bytes,
            queue_size=capture.queue_size,
            publisher=self.link,
            metrics=self.metrics,
            hook=hook,
            drain_timeout_s=capture.drain_timeout_s,
            drain_pause_s=capture.drain_pause_s,
        )

    def on_desired(self, payload: bytes) -> None:
        """The retained desired state arrived: apply its capture policy, or refuse it and keep
        the policy in force (the reason is logged and counted)."""
        if not payload:
            return  # a cleared retained message: keep what is applied
        try:
            desired = protocol.decode(
                protocol.DesiredState, payload, max_bytes=protocol.MAX_DESIRED_PAYLOAD
            )
        except ProtocolError as err:
            self.stats["refused_desired"] = self.stats.get("refused_desired", 0) + 1
            log.warning("refused desired state, keeping the applied one: %s", err)
            return
        refused = self.dataloop.apply(desired)
        if refused is not None:
            self.stats["refused_desired"] = self.stats.get("refused_desired", 0) + 1
            log.warning("refused desired state, keeping the applied one: %s", refused)

    # ------------------------------------------------------------ offline operations

    def install_local(self, path: Path) -> InstalledVersion:
        """Air-gap install of a bundle directory or transfer tar with the same checks."""
        staging = self.store.new_staging_dir("local")
        shutil.rmtree(staging)
        try:
            if path.is_dir():
                shutil.copytree(path, staging)
            else:
                unpack_bundle(path, staging)
            verified = verify_bundle(staging, self.public_key)
            m = verified.manifest
            self._check_admissible(
                name=m.model.name,
                version=m.model.version,
                profile=m.profile,
                runtime=m.runtime,
                may_downgrade=False,
                downgrade_hint="use 'edgeloop-agent rollback'",
            )
            installed = self.store.install(staging, m, verified.artifact_id)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        model = self.loader(installed.path, installed.manifest)
        model.self_test()
        self.store.activate(installed.name, installed.artifact_id)
        return installed


def _refuse_all(sample: Sample) -> Sample | None:
    raise HookError("the configured redaction hook could not be loaded")


def _cpu_features() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return set(value.split())
    except OSError:
        pass
    return set()


def _memory_available_mib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


def install_signal_handlers(agent: Agent, done: threading.Event) -> None:
    """SIGTERM/SIGINT stop the agent cleanly; SIGHUP reloads models from disk."""

    def _stop(signum: int, _frame: object) -> None:
        done.set()

    def _reload(signum: int, _frame: object) -> None:
        agent.load_active_models()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _reload)

"""The per-device job state machine (pure) and the on-disk job log.

States follow AWS IoT Jobs: QUEUED → IN_PROGRESS → SUCCEEDED | FAILED | CANCELED |
ROLLED_BACK. ``transition`` is the only way a state changes; the daemon persists the
current job and every terminal result, so a job id seen again (a retained notify after a
restart) is answered with its result and never run twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from agent.protocol import JobNotify, JobState


class TransitionError(ValueError):
    """A state change the machine does not allow."""


def transition(current: JobState, new: JobState) -> JobState:
    """Return ``new`` if ``current → new`` is allowed, else raise TransitionError."""
    if new not in current.allowed_next():
        raise TransitionError(f"job state {current.value} cannot become {new.value}")
    return new


@dataclass
class JobRecord:
    """A job and where it stands."""

    job: JobNotify
    state: JobState = JobState.QUEUED
    reason: str | None = None


class JobLog:
    """``<state>/jobs/current.json`` and ``<state>/jobs/done/<job_id>.json``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.done_dir = directory / "done"
        self.done_dir.mkdir(parents=True, exist_ok=True)

    def _write(self, path: Path, data: dict[str, object]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def save_current(self, record: JobRecord) -> None:
        """Persist the job in progress."""
        self._write(
            self.dir / "current.json",
            {
                "job": record.job.model_dump(mode="json"),
                "state": record.state.value,
                "reason": record.reason,
            },
        )

    def load_current(self) -> JobRecord | None:
        """The job that was in progress when the agent stopped, if any."""
        path = self.dir / "current.json"
        try:
            data = json.loads(path.read_text())
            return JobRecord(
                JobNotify.model_validate(data["job"]), JobState(data["state"]), data.get("reason")
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            return None

    def finish(self, record: JobRecord) -> None:
        """Record a terminal result and clear the current job."""
        self._write(
            self.done_dir / f"{_safe(record.job.job_id)}.json",
            {
                "job_id": record.job.job_id,
                "artifact_id": record.job.artifact_id,
                "state": record.state.value,
                "reason": record.reason,
            },
        )
        (self.dir / "current.json").unlink(missing_ok=True)

    def record_result(self, record: JobRecord) -> None:
        """Record a terminal result of a job that never became current (e.g. canceled before
        it arrived); the current job, if any, stays."""
        self._write(
            self.done_dir / f"{_safe(record.job.job_id)}.json",
            {
                "job_id": record.job.job_id,
                "artifact_id": record.job.artifact_id,
                "state": record.state.value,
                "reason": record.reason,
            },
        )

    def result(self, job_id: str) -> tuple[JobState, str | None] | None:
        """The terminal state of a finished job id, if it finished."""
        try:
            data = json.loads((self.done_dir / f"{_safe(job_id)}.json").read_text())
            return JobState(data["state"]), data.get("reason")
        except (FileNotFoundError, ValueError, KeyError):
            return None


def _safe(job_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)[:128]

"""The executor's incremental state dump equals the full one at every step of a rollout."""

from __future__ import annotations

from fleet import deployments
from fleet.rollout import RolloutState, cancel, step

from .test_rollout import IP, S, plan, report_all


def _check(dumper: deployments.StateDumper, state: RolloutState) -> None:
    assert dumper.dump(state) == deployments.dump_state(state)
    assert deployments.load_state(dumper.dump(state)) == state


def test_incremental_dump_matches_the_full_dump_through_a_rollout() -> None:
    dumper = deployments.StateDumper()
    state = plan(20, canary=2, waves=["50%", "100%"])
    _check(dumper, state)
    state, _ = step(state, now=0.0)  # the canary starts
    _check(dumper, state)
    canary = state.canary_devices
    state = report_all(state, canary, IP, now=1.0)
    _check(dumper, state)
    state = report_all(state, canary, S, now=2.0)
    _check(dumper, state)
    state, _ = step(state, now=3.0)  # the first wave starts
    _check(dumper, state)
    wave = [d for d, job in state.devices.items() if job.deploy is not None and d not in canary]
    assert wave
    state = report_all(state, wave[:3], S, now=4.0)
    _check(dumper, state)
    state, _ = cancel(state, now=5.0)
    _check(dumper, state)
    # A fresh dumper (another executor, or after a reload) dumps the same.
    assert deployments.StateDumper().dump(state) == dumper.dump(state)


def test_dumper_says_when_nothing_changed() -> None:
    dumper = deployments.StateDumper()
    state = plan(5, canary=1)
    dumper.dump(state)
    assert not dumper.unchanged  # the first dump has nothing to compare with
    dumper.dump(state)
    assert dumper.unchanged
    state, _ = step(state, now=0.0)  # a job starts: one device and the phase change
    dumper.dump(state)
    assert not dumper.unchanged
    dumper.dump(state)
    assert dumper.unchanged
    canary = state.canary_devices
    dumper.dump(report_all(state, canary, IP, now=1.0))
    assert not dumper.unchanged

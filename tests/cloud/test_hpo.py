"""Optuna tuning: search-space errors, two worker processes on one study (SQLite and
PostgreSQL) running exactly n_trials, and the median pruner stopping a bad trial."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud.datasets import ArrayDataset, load_dataset, split_dataset
from cloud.errors import NotFoundError, SpecError
from cloud.training import HpoSpec, best_trial_summary, create_study, parse_hpo_spec, run_hpo_worker

BASE: dict[str, Any] = {"architecture": "mlp", "hparams": {"hidden": 32}, "epochs": 2}


def subset(n: int = 400) -> ArrayDataset:
    _, sub = split_dataset(load_dataset("builtin:digits"), test_fraction=n / 1797, seed=0)
    return sub


def _worker(url: str, study: str, spec_json: str, data: str, out_root: str) -> int:
    """One tuning worker in its own (spawned) process."""
    spec = HpoSpec.model_validate_json(spec_json)
    return run_hpo_worker(url, study, spec, load_dataset(data), Path(out_root))


@pytest.mark.parametrize(
    ("space", "match"),
    [
        ({}, r"search_space: Dictionary should have at least 1 item"),
        (
            {"lr": {"type": "float", "low": 0.1, "high": 1}},
            r"search space names 'lr'.*allowed: learning_rate, weight_decay, "
            r"batch_size, optimizer, epochs, dropout, hidden, hidden_sizes, layers",
        ),
        (
            {"learning_rate": {"type": "float", "low": 0.1, "high": 0.01}},
            r"need low < high, got low=0\.1, high=0\.01",
        ),
        (
            {"learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}},
            r"log-scaled parameter needs low > 0",
        ),
        (
            {"hidden": {"type": "int", "low": 1.5, "high": 8}},
            r"an int parameter needs an integer low",
        ),
        (
            {"hidden": {"type": "int", "low": 0, "high": 8}},
            r"search space 'hidden': value 0 is refused: .*'hidden' must be in \[1, 65536\]",
        ),
        (
            {"batch_size": {"type": "float", "low": 8, "high": 64}},
            r"'batch_size' is an integer field",
        ),
        (
            {"optimizer": {"type": "categorical", "choices": ["adam", "lion"]}},
            r"value 'lion' is refused.*'adam' or 'sgd'",
        ),
        ({"optimizer": {"type": "categorical", "choices": []}}, r"non-empty 'choices'"),
        (
            {"dropout": {"type": "float", "low": 0, "high": 0.5, "choices": [1]}},
            r"takes low/high, not 'choices'",
        ),
    ],
)
def test_invalid_search_space(space: dict[str, Any], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_hpo_spec({"base": BASE, "search_space": space, "n_trials": 2})


def test_invalid_enqueue_and_base() -> None:
    space = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}
    with pytest.raises(
        SpecError, match=r"enqueue\[0\] names \['hidden'\], not in the search space"
    ):
        parse_hpo_spec(
            {"base": BASE, "search_space": space, "n_trials": 2, "enqueue": [{"hidden": 3}]}
        )
    with pytest.raises(SpecError, match=r"unknown architecture 'vit'"):
        parse_hpo_spec(
            {"base": {**BASE, "architecture": "vit"}, "search_space": space, "n_trials": 1}
        )


def _spec(n_trials: int, workers: int) -> HpoSpec:
    return parse_hpo_spec(
        {
            "base": BASE,
            "search_space": {
                "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                "hidden": {"type": "int", "low": 16, "high": 64, "step": 16},
                "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
            },
            "n_trials": n_trials,
            "workers": workers,
            "pruner": "none",
        }
    )


def _two_workers(url: str, tmp_path: Path, n_trials: int) -> None:
    spec = _spec(n_trials, 2)
    create_study(url, "s1", spec)
    create_study(url, "s1", spec)  # idempotent: no second batch of trials
    ds = subset()
    data = tmp_path / "digits.npz"  # workers load it without importing scikit-learn
    np.savez(data, x=ds.x, y=ds.y, classes=np.array(ds.classes))
    ctx = multiprocessing.get_context("spawn")
    args = (url, "s1", spec.model_dump_json(), str(data), str(tmp_path / "trials"))
    with ctx.Pool(2) as pool:
        ran = pool.starmap(_worker, [args, args])
    assert sum(ran) == n_trials, ran
    summary = best_trial_summary(url, "s1")
    assert summary["n_trials"] == n_trials == summary["n_complete"]
    assert summary["n_waiting"] == summary["n_running"] == 0
    assert set(summary["params"]) == {"learning_rate", "hidden", "optimizer"}
    assert Path(summary["out_dir"]) == tmp_path / "trials" / f"trial-{summary['number']}"
    assert (Path(summary["out_dir"]) / "model.onnx").is_file()
    assert 0 < summary["value"] == summary["metrics"]["test_accuracy"] <= 1
    dirs = sorted(p.name for p in (tmp_path / "trials").iterdir())
    assert dirs == sorted(f"trial-{i}" for i in range(n_trials))
    # a worker started after the study is done finds nothing to do
    assert run_hpo_worker(url, "s1", spec, ds, tmp_path / "trials") == 0


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(tmp_path: Path) -> None:
    _two_workers(f"sqlite:///{tmp_path / 'cloud.db'}", tmp_path, n_trials=5)


@pytest.mark.slow
def test_two_processes_share_one_postgres_study(tmp_path: Path, cloud_postgres_url: str) -> None:
    _two_workers(cloud_postgres_url, tmp_path, n_trials=4)
    # Optuna's tables live in their own schema, away from the service's tables
    import psycopg
    from sqlalchemy.engine import make_url

    plain = make_url(cloud_postgres_url).set(drivername="postgresql")
    with psycopg.connect(plain.render_as_string(hide_password=False)) as conn:
        rows = conn.execute(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'trials'"
        ).fetchall()
    assert rows == [("optuna",)]


def test_median_pruner_prunes_a_bad_trial(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cloud.db'}"
    spec = parse_hpo_spec(
        {
            "base": {**BASE, "epochs": 3},
            "search_space": {
                "learning_rate": {"type": "float", "low": 1e-7, "high": 1e-1, "log": True}
            },
            "n_trials": 3,
            "pruner": "median",
            "pruner_startup_trials": 2,
            # two good settings, then one that cannot learn in 3 epochs
            "enqueue": [{"learning_rate": 1e-2}, {"learning_rate": 1e-2}, {"learning_rate": 1e-7}],
        }
    )
    create_study(url, "prune", spec)
    lines: list[str] = []
    assert run_hpo_worker(url, "prune", spec, subset(), tmp_path / "t", log=lines.append) == 3
    summary = best_trial_summary(url, "prune")
    assert (summary["n_complete"], summary["n_pruned"], summary["n_trials"]) == (2, 1, 3)
    assert summary["params"]["learning_rate"] == 1e-2
    pruned = [line for line in lines if line.startswith("trial 2 pruned: epoch ")]
    assert pruned and "below the median" in pruned[0], lines
    assert not any(line.startswith("trial 2: epoch 3/3") for line in lines)  # stopped early
    assert not (tmp_path / "t" / "trial-2").exists()


def test_missing_study(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cloud.db'}"
    with pytest.raises(NotFoundError, match=r"no tuning study named 'ghost'"):
        best_trial_summary(url, "ghost")
    with pytest.raises(NotFoundError, match=r"no tuning study named 'ghost'"):
        run_hpo_worker(url, "ghost", _spec(1, 1), subset(), tmp_path)


def test_a_trial_of_a_dead_worker_is_failed_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from cloud.training import hpo

    monkeypatch.setattr(hpo, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(hpo, "GRACE_PERIOD_S", 1)
    url = f"sqlite:///{tmp_path / 'cloud.db'}"
    spec = _spec(2, 2)
    create_study(url, "dead", spec)
    # a worker claims trial 0, beats once, and dies
    study = hpo._load_study(url, "dead", spec)
    claimed = hpo._claim_waiting(study)
    assert claimed is not None
    study._storage.record_heartbeat(claimed)
    time.sleep(2.5)
    assert run_hpo_worker(url, "dead", spec, subset(), tmp_path / "t") == 2
    summary = best_trial_summary(url, "dead")
    assert (summary["n_complete"], summary["n_failed"], summary["n_running"]) == (2, 1, 0)

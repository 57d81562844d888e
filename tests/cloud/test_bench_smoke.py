"""The data loop's benchmarks run end to end at a toy size, so that they do not rot.

They check that each bench's ``main`` completes and that its statistics and row counts are
right; they assert nothing about timings (the benches are not timed tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import drift, ingest
from tests.cloud.cloud_service import postgres_or_skip
from tests.fleet.api.conftest import POSTGRES_ADMIN_URL


def test_drift_bench_runs_and_its_statistics_agree(tmp_path: Path) -> None:
    out = tmp_path / "drift.json"
    assert (
        drift.main(
            ["--n", "1000", "--n", "2000", "--repeat", "1", "--no-evidently", "--json", str(out)]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert [r["n"] for r in report["rows"]] == [1000, 2000]
    assert report["evidently_skipped"] == "--no-evidently"
    assert set(report["scaling"]) == {"ours_s", "ours_window_s", "scipy_s"}
    for row in report["rows"]:
        check = row["check"]
        # the binned KS is evaluated at the bin edges only: a lower bound of the exact one
        assert 0 < check["ours_ks_binned_max"] <= check["scipy_ks_max"] + 1e-9
        # the drifted half of the features (0-4) and only those
        assert check["drifted_features_ours"] == [0, 1, 2, 3, 4]


def test_drift_bench_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        drift.main(["--repeat", "0"])
    assert exc.value.code == 2
    assert "--repeat must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_drift_bench_runs_evidently() -> None:
    pytest.importorskip("evidently")
    if drift.evidently_missing():
        pytest.skip(drift.evidently_missing() or "")
    row = drift.run_size(1000, repeat=1, evidently=True, methods=False)
    assert row["evidently_s"] > 0


@pytest.mark.mqtt
def test_ingest_bench_stores_every_sample_and_drops_its_database(tmp_path: Path) -> None:
    postgres_or_skip().close()
    out = tmp_path / "ingest.json"
    argv = ["--samples", "48", "--batch-samples", "16", "--messages-per-write", "2"]
    argv += ["--repeat", "1", "--mqtt", "--postgres-url", POSTGRES_ADMIN_URL, "--json", str(out)]
    assert ingest.main(argv) == 0  # it raises if a table holds another number of rows
    report = json.loads(out.read_text())
    assert set(report["samples_per_s"]) == {
        "ours",
        "ours_overlap",
        "ours_db_only",
        "raw_copy",
        "raw_copy_rows_only",
        "prepare_only",
        "ours_mqtt",
    }
    assert report["ratio_ours_vs_raw_copy"] > 0
    import psycopg

    database = report["settings"]["database"]
    assert database.startswith("edgeloop_bench_ingest_")
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (database,))
        assert left.fetchone() == (0,)

"""Benchmark: samples/s through our ingestion into PostgreSQL against a raw ``COPY``.

In one run, on a throwaway PostgreSQL database (``--postgres-url``'s server, migrated with
``cloud.db.upgrade``, dropped at the end) and a temporary blob directory:

* **ours**: ``cloud.dataloop.ingest.IngestStore.write`` as the ``Ingestor`` calls it, on
  encoded ``SampleBatch`` payloads (``--batch-samples`` samples per message, as the agent
  publishes them; ``--messages-per-write`` messages per batch, the ``Ingestor``'s default):
  ``prepare`` parses and validates the payloads (the msgspec mirror of the wire models;
  pydantic for whatever it refuses), checks and base64-decodes every tensor, hashes it and
  packs the batch's tensors into one buffer; ``commit`` stores the rows in one transaction
  (one psycopg ``COPY`` into ``cloud_samples`` in a savepoint) and writes the pack as one
  content-addressed blob file (fsynced, with its directory) before committing. Payloads are
  encoded before the clock starts. Before each repeat the process's heap, with the repeat's
  payloads and rows, is frozen (``ingest.freeze_startup_heap``, what the service does when
  it starts), for every path alike: the bench's own data would otherwise slow the garbage
  collector's full passes.
* **ours with overlap**: the same with ``pipelined(prepare)`` one batch ahead in a helper
  thread and ``commit`` in this one (``Ingestor(overlap=True)``).
* **ours, database part only**: ``ingest.insert_ignore`` on the rows ``prepare`` built, one
  transaction per batch: no parsing, no pack file.
* **raw COPY**: the same rows *and the same tensor bytes* (each row's tensors concatenated,
  as a ``bytea`` column) with one psycopg ``COPY ... FROM STDIN`` per batch, one transaction
  each, into ``bench_raw_samples``, created ``LIKE cloud_samples INCLUDING ALL`` (the same
  columns, unique constraint and indexes) plus that column. The JSON columns are
  ``json.dumps``-ed on the way, as any writer must. This is the baseline of the ratio: the
  same payload bytes reach durable storage either way.
* **raw COPY, rows only**: the same without the tensor bytes (a stricter baseline that
  stores less than ours does); its ratio is printed too.
* **prepare only**: ``IngestStore.prepare`` of every batch (no files, no database), to show
  where our time goes.
* with ``--mqtt``, also **ours over MQTT**: a private Mosquitto (``fleet.broker.
  MosquittoProcess``, the fleet's ACL), the ``Ingestor`` consumer (shared subscription,
  manual PUBACK after commit) and one device client publishing every payload at QoS 1; the
  time from the first publish until the consumer has inserted every sample.

The tables are emptied between repeats and every repeat sends new samples (new ids, new
tensors), so nothing is skipped as a duplicate. Ratio = ours samples/s / raw COPY samples/s
(issue target >= 0.5), from the median of ``--repeat`` runs. It asserts nothing about
timings: a benchmark, not a test. Usage::

    python -m bench.ingest                      # 20,000 samples
    python -m bench.ingest --quick              # 5,000 samples
    python -m bench.ingest --samples 50000 --mqtt --repeat 5 --json out.json
    python -m bench.ingest --quick --blob-parent /dev/shm   # blobs on tmpfs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from agent import protocol  # noqa: E402
from agent.capture import encode_tensor  # noqa: E402
from agent.protocol import CapturedSample, SampleBatch  # noqa: E402

if TYPE_CHECKING:
    from cloud.dataloop.ingest import PreparedBatch

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
DEVICE = "bench-dev"
PASSWORDS = {"fleet": "fleet-pw", DEVICE: "dev-pw"}
RAW_TABLE = "bench_raw_samples"

Message = tuple[str, bytes]


def make_payloads(
    n_samples: int, *, batch_samples: int, input_size: int, classes: int, seed: int
) -> list[Message]:
    """``n_samples`` captured samples as encoded ``SampleBatch`` messages (topic, payload)."""
    rng = np.random.default_rng(seed)
    topic = protocol.capture_samples(DEVICE)
    now = datetime.now(UTC)
    messages = []
    for start in range(0, n_samples, batch_samples):
        samples = []
        for _ in range(min(batch_samples, n_samples - start)):
            x = rng.standard_normal((1, input_size)).astype(np.float32)
            y = rng.standard_normal((1, classes)).astype(np.float32)
            samples.append(
                CapturedSample(
                    sample_id=rng.bytes(16).hex(),
                    device_id=DEVICE,
                    model="bench",
                    version="1",
                    artifact_id="ab" * 32,
                    ts=now,
                    reason="random",
                    top1=int(y.argmax()),
                    confidence=0.5,
                    entropy=0.5,
                    inputs=[encode_tensor(x, "x")],
                    outputs=[encode_tensor(y, "y")],
                )
            )
        batch = SampleBatch(device_id=DEVICE, samples=samples)
        messages.append((topic, batch.model_dump_json().encode()))
    return messages


def chunks(items: Sequence[Message], size: int) -> Iterator[Sequence[Message]]:
    """``items`` in consecutive slices of ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---------------------------------------------------------------- database


@contextmanager
def throwaway_database(admin_url: str) -> Iterator[str]:
    """A new, migrated PostgreSQL database on ``admin_url``'s server, dropped at the end."""
    import psycopg
    from sqlalchemy.engine import make_url

    from cloud import db

    plain = make_url(admin_url).set(drivername="postgresql")
    admin = psycopg.connect(
        plain.render_as_string(hide_password=False), autocommit=True, connect_timeout=5
    )
    name = f"edgeloop_bench_ingest_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = plain.set(database=name).render_as_string(hide_password=False)
        db.upgrade(url)
        yield url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _psycopg_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def reset(url: str, blob_dir: Path) -> None:
    """Empty both sample tables and the blob directory."""
    import psycopg

    with psycopg.connect(_psycopg_url(url), autocommit=True) as conn:
        conn.execute(f'TRUNCATE cloud_samples, "{RAW_TABLE}"')
    shutil.rmtree(blob_dir, ignore_errors=True)


def prepare_all(messages: Sequence[Message], per_write: int) -> list[PreparedBatch]:
    """What ``IngestStore.prepare`` makes of ``messages``, ``per_write`` at a time: the rows
    ours stores (tensor references into each batch's pack) and the raw tensor bytes."""
    from cloud.dataloop.ingest import IngestStore

    return [IngestStore.prepare(part) for part in chunks(messages, per_write)]


JSON_COLUMNS = ("inputs", "outputs")


def copy_raw(url: str, batches: Sequence[PreparedBatch], *, tensors: bool) -> float:
    """Seconds to ``COPY`` the rows of ``batches`` into the raw table, one transaction per
    batch (JSON columns serialized with ``json.dumps`` on the way, as any writer must); with
    ``tensors``, each row also carries its tensors' bytes in the ``tensors`` column."""
    import psycopg

    columns = list(next(iter(batches[0].samples.values())).row)
    cols = ", ".join(f'"{c}"' for c in (*columns, *(["tensors"] if tensors else [])))
    with psycopg.connect(_psycopg_url(url)) as conn:
        start = time.perf_counter()
        for batch in batches:
            with (
                conn.cursor() as cur,
                cur.copy(f'COPY "{RAW_TABLE}" ({cols}) FROM STDIN') as copy,
            ):
                for sample in batch.samples.values():
                    row = sample.row
                    values = [json.dumps(row[c]) if c in JSON_COLUMNS else row[c] for c in columns]
                    if tensors:
                        values.append(b"".join(sample.tensors))
                    copy.write_row(values)
            conn.commit()
        return time.perf_counter() - start


def insert_rows(url: str, batches: Sequence[PreparedBatch]) -> float:
    """Seconds for our batch insert alone (``ingest.insert_ignore``) of the rows of
    ``batches``, one transaction per batch."""
    from sqlmodel import Session

    from cloud import db
    from cloud.dataloop.ingest import insert_ignore
    from cloud.dataloop.models import Sample

    engine = db.make_engine(url)
    table = Sample.__table__  # type: ignore[attr-defined]
    try:
        start = time.perf_counter()
        for batch in batches:
            with Session(engine) as session:
                insert_ignore(session, table, [s.row for s in batch.samples.values()], "sample_id")
                session.commit()
        return time.perf_counter() - start
    finally:
        engine.dispose()


def truncate(url: str, table: str) -> None:
    """Empty ``table``."""
    import psycopg

    with psycopg.connect(_psycopg_url(url), autocommit=True) as conn:
        conn.execute(f'TRUNCATE "{table}"')


def _expect_rows(url: str, table: str, n: int) -> None:
    stored = count_rows(url, table)
    if stored != n:
        raise RuntimeError(f"{table} holds {stored} rows after the run, expected {n}")


def count_rows(url: str, table: str) -> int:
    """Rows in ``table``."""
    import psycopg

    with psycopg.connect(_psycopg_url(url)) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
        return int(row[0]) if row else 0


# ---------------------------------------------------------------- our paths


def ingest_direct(
    url: str, blob_dir: Path, messages: Sequence[Message], per_write: int, *, overlap: bool
) -> float:
    """Seconds for ``IngestStore`` to store ``messages``, ``per_write`` at a time: with
    ``overlap`` as the ``Ingestor`` does it (``pipelined(prepare)`` + ``commit``), else
    ``write`` (prepare, then commit) per batch."""
    from cloud import db
    from cloud.dataloop.ingest import IngestResult, IngestStore, pipelined

    engine = db.make_engine(url)
    try:
        store = IngestStore(engine, blob_dir)
        total = IngestResult()
        start = time.perf_counter()
        if overlap:
            for _, prepared in pipelined(chunks(messages, per_write), store.prepare):
                total.merge(store.commit(prepared))
        else:
            for part in chunks(messages, per_write):
                total.merge(store.write(part))
        elapsed = time.perf_counter() - start
    finally:
        engine.dispose()
    if total.malformed or total.samples_duplicate:
        raise RuntimeError(f"bench data not stored as new samples: {total}")
    return elapsed


def prepare_only(messages: Sequence[Message], per_write: int) -> float:
    """Seconds to ``prepare`` every batch (parse, validate, decode, hash, pack; no I/O)."""
    from cloud.dataloop.ingest import IngestStore

    start = time.perf_counter()
    for part in chunks(messages, per_write):
        IngestStore.prepare(part)
    return time.perf_counter() - start


def ingest_mqtt(
    url: str, blob_dir: Path, messages: Sequence[Message], per_write: int, n_samples: int
) -> float:
    """Seconds from the first QoS 1 publish until the ``Ingestor`` stored every sample."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from cloud import db
    from cloud.dataloop.ingest import Ingestor, IngestStore
    from fleet.broker import MosquittoProcess
    from fleet.responder import BrokerConfig

    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-broker-") as tmp:
        broker = MosquittoProcess(Path(tmp), users=dict(PASSWORDS))
        broker.start()
        engine = db.make_engine(url)
        ingestor = Ingestor(
            IngestStore(engine, blob_dir),
            broker=BrokerConfig(
                host="127.0.0.1", port=broker.port, username="fleet", password=PASSWORDS["fleet"]
            ),
            batch_size=per_write,
            batch_wait_s=0.05,
        )
        device = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"bench-{DEVICE}",
            protocol=mqtt.MQTTv5,
        )
        device.username_pw_set(DEVICE, PASSWORDS[DEVICE])
        device.max_inflight_messages_set(100)
        try:
            ingestor.start(timeout=10)
            device.connect("127.0.0.1", broker.port)
            device.loop_start()
            deadline = time.monotonic() + 10
            while not device.is_connected():
                if time.monotonic() > deadline:
                    raise RuntimeError("the bench device did not connect to the broker")
                time.sleep(0.01)
            start = time.perf_counter()
            infos = [device.publish(topic, payload, qos=1) for topic, payload in messages]
            for info in infos:
                info.wait_for_publish(30)
            deadline = time.monotonic() + 120
            while ingestor.stats["samples_inserted"] < n_samples:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ingestor stats after 120 s: {ingestor.stats}")
                time.sleep(0.005)
            elapsed = time.perf_counter() - start
            if ingestor.stats["malformed"] or ingestor.stats["dropped"]:
                raise RuntimeError(f"ingestor lost messages: {ingestor.stats}")
            return elapsed
        finally:
            device.loop_stop()
            device.disconnect()
            ingestor.stop()
            engine.dispose()
            broker.stop()


# ---------------------------------------------------------------- main


def run(
    *,
    admin_url: str,
    n_samples: int,
    batch_samples: int,
    per_write: int,
    input_size: int,
    repeat: int,
    mqtt: bool,
    blob_parent: Path | None = None,
) -> dict[str, Any]:
    """Every path ``repeat`` times on fresh samples; median seconds and samples/s."""
    times: dict[str, list[float]] = {
        "ours": [],
        "ours_overlap": [],
        "ours_db_only": [],
        "raw_copy": [],
        "raw_copy_rows_only": [],
        "prepare_only": [],
    }
    if mqtt:
        times["ours_mqtt"] = []
    with (
        throwaway_database(admin_url) as url,
        tempfile.TemporaryDirectory(prefix="edgeloop-bench-blobs-", dir=blob_parent) as tmp,
    ):
        import psycopg

        with psycopg.connect(_psycopg_url(url), autocommit=True) as conn:
            conn.execute(f'CREATE TABLE "{RAW_TABLE}" (LIKE cloud_samples INCLUDING ALL)')
            conn.execute(f'ALTER TABLE "{RAW_TABLE}" ADD COLUMN tensors bytea')
        blob_dir = Path(tmp) / "blobs"
        from cloud.dataloop.ingest import freeze_startup_heap

        for i in range(repeat):
            print(f"repeat {i + 1}/{repeat} ...", file=sys.stderr)
            messages = make_payloads(
                n_samples, batch_samples=batch_samples, input_size=input_size, classes=10, seed=i
            )
            batches = prepare_all(messages, per_write)
            # What the service does once started (Ingestor.serve_forever): the startup heap
            # out of the garbage collector's full passes. Here it also takes the bench's own
            # data (payloads, the raw COPY's rows), which a service does not hold, out of them.
            freeze_startup_heap()
            reset(url, blob_dir)
            times["prepare_only"].append(prepare_only(messages, per_write))
            times["ours"].append(ingest_direct(url, blob_dir, messages, per_write, overlap=False))
            _expect_rows(url, "cloud_samples", n_samples)
            times["raw_copy"].append(copy_raw(url, batches, tensors=True))
            _expect_rows(url, RAW_TABLE, n_samples)
            reset(url, blob_dir)
            times["ours_overlap"].append(
                ingest_direct(url, blob_dir, messages, per_write, overlap=True)
            )
            _expect_rows(url, "cloud_samples", n_samples)
            times["raw_copy_rows_only"].append(copy_raw(url, batches, tensors=False))
            _expect_rows(url, RAW_TABLE, n_samples)
            truncate(url, "cloud_samples")
            times["ours_db_only"].append(insert_rows(url, batches))
            _expect_rows(url, "cloud_samples", n_samples)
            if mqtt:
                reset(url, blob_dir)
                times["ours_mqtt"].append(
                    ingest_mqtt(url, blob_dir, messages, per_write, n_samples)
                )
                _expect_rows(url, "cloud_samples", n_samples)
            del messages, batches
            gc.unfreeze()
        database = url.rsplit("/", 1)[-1]
    median = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: n_samples / v for k, v in median.items()}
    report: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg": [round(v, 2) for v in os.getloadavg()],
        },
        "settings": {
            "samples": n_samples,
            "batch_samples": batch_samples,
            "messages_per_write": per_write,
            "input_size": input_size,
            "repeat": repeat,
            "blob_dir": str(blob_parent or tempfile.gettempdir()),
            "database": database,
        },
        "seconds": times,
        "samples_per_s": rate,
        "ratio_ours_vs_raw_copy": rate["ours"] / rate["raw_copy"],
        # paired: ours and raw COPY ran seconds apart in each repeat, so the load of a shared
        # machine drifts less between them than between repeats
        "ratio_ours_vs_raw_copy_paired": statistics.median(
            r / o for o, r in zip(times["ours"], times["raw_copy"], strict=True)
        ),
        "ratio_ours_vs_raw_copy_per_repeat": [
            r / o for o, r in zip(times["ours"], times["raw_copy"], strict=True)
        ],
        "ratio_ours_vs_raw_copy_rows_only": rate["ours"] / rate["raw_copy_rows_only"],
        "ratio_ours_overlap_vs_raw_copy": rate["ours_overlap"] / rate["raw_copy"],
        "ratio_ours_db_only_vs_raw_copy": rate["ours_db_only"] / rate["raw_copy"],
    }
    if mqtt:
        report["ratio_ours_mqtt_vs_raw_copy"] = rate["ours_mqtt"] / rate["raw_copy"]
    return report


def print_report(report: dict[str, Any]) -> None:
    """Samples/s per path and the ratios."""
    s = report["settings"]
    print(
        f"\nIngest into PostgreSQL: {s['samples']:,} samples ({s['batch_samples']} per "
        f"SampleBatch, {s['messages_per_write']} messages per write, float32 input "
        f"{s['input_size']} + output 10), median of {s['repeat']} "
        f"({report['machine']['cpus']} CPUs, load at start {report['machine']['loadavg']})"
    )
    for name, rate in report["samples_per_s"].items():
        seconds = statistics.median(report["seconds"][name])
        print(f"  {name:<18} {rate:>10,.0f} samples/s  ({seconds:.3f} s)")
    print(
        "ratio ours / raw COPY (rows + tensor bytes): "
        f"{report['ratio_ours_vs_raw_copy']:.3f} (target >= 0.5)"
    )
    per_repeat = ", ".join(f"{r:.2f}" for r in report["ratio_ours_vs_raw_copy_per_repeat"])
    print(
        f"  per repeat: {per_repeat}; median of those: "
        f"{report['ratio_ours_vs_raw_copy_paired']:.3f}"
    )
    print(
        "ratio ours / raw COPY of the rows only (stricter): "
        f"{report['ratio_ours_vs_raw_copy_rows_only']:.3f}"
    )
    print(
        "ratio ours with overlap (Ingestor(overlap=True)) / raw COPY: "
        f"{report['ratio_ours_overlap_vs_raw_copy']:.3f}"
    )
    print(
        "ratio ours, database part only (insert_ignore) / raw COPY: "
        f"{report['ratio_ours_db_only_vs_raw_copy']:.3f}"
    )
    if "ratio_ours_mqtt_vs_raw_copy" in report:
        print(
            f"ratio ours over MQTT / raw COPY: {report['ratio_ours_mqtt_vs_raw_copy']:.3f} "
            "(target >= 0.5)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the rates and ratios, write ``--json`` if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="5,000 samples")
    parser.add_argument("--samples", type=int, default=None, help="samples (default 20,000)")
    parser.add_argument("--batch-samples", type=int, default=32, help="samples per SampleBatch")
    parser.add_argument("--messages-per-write", type=int, default=200, help="messages per write")
    parser.add_argument("--input-size", type=int, default=64, help="float32 input elements")
    parser.add_argument("--repeat", type=int, default=3, help="runs (median)")
    parser.add_argument("--mqtt", action="store_true", help="also through Mosquitto")
    parser.add_argument(
        "--blob-parent",
        type=Path,
        default=None,
        help="where the temporary blob directory goes (default: the system's temp dir)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("EDGELOOP_BENCH_POSTGRES_URL", DEFAULT_POSTGRES),
        help="an admin connection; the bench creates and drops its own database",
    )
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args(argv)
    n_samples = args.samples if args.samples is not None else (5_000 if args.quick else 20_000)
    for name, value in (
        ("--samples", n_samples),
        ("--batch-samples", args.batch_samples),
        ("--messages-per-write", args.messages_per_write),
        ("--input-size", args.input_size),
        ("--repeat", args.repeat),
    ):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if args.batch_samples > 1000:
        parser.error(f"--batch-samples must be <= 1000 (CapturePolicy), got {args.batch_samples}")
    report = run(
        admin_url=args.postgres_url,
        n_samples=n_samples,
        batch_samples=args.batch_samples,
        per_write=args.messages_per_write,
        input_size=args.input_size,
        repeat=args.repeat,
        mqtt=args.mqtt,
        blob_parent=args.blob_parent,
    )
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ingestion over a real Mosquitto into SQLite and PostgreSQL: rows stored once when re-sent,
malformed payloads counted, shared subscriptions split the load, tensors served back."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlmodel import Session, select

from agent import protocol
from agent.capture import decode_tensor
from cloud import db
from cloud.dataloop.ingest import (
    BlobStore,
    Ingestor,
    IngestStore,
    _Message,
    insert_ignore,
    parse_message,
    pipelined,
    subscriptions,
)
from cloud.dataloop.models import Sample, Sketch
from fleet.responder import BrokerConfig, BrokerError
from tests.cloud.cloud_service import api_client, database, make_settings
from tests.cloud.dataloop_helpers import (
    N_FEATURES,
    PASSWORDS,
    WEIGHTS,
    Device,
    make_baseline,
    mosquitto,
    sample_batch,
    sketch,
    training_inputs,
    wait_until,
)

pytestmark = pytest.mark.mqtt


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


def fleet_broker(port: int, **kwargs: object) -> BrokerConfig:
    return BrokerConfig(
        host="127.0.0.1", port=port, username="fleet", password=PASSWORDS["fleet"], **kwargs
    )  # type: ignore[arg-type]


# ---------------------------------------------------------------- pure parsing


def test_parse_message_takes_the_device_from_the_topic() -> None:
    batch = sample_batch("dev-a", 2)
    parsed = parse_message(protocol.capture_samples("dev-a"), batch.to_bytes())
    assert isinstance(parsed, protocol.SampleBatch) and len(parsed.samples) == 2
    with pytest.raises(protocol.ProtocolError, match=r"names device\(s\) \['dev-a'\], not 'dev-b'"):
        parse_message(protocol.capture_samples("dev-b"), batch.to_bytes())
    sk = sketch("dev-a", make_baseline(), training_inputs(10))
    assert isinstance(parse_message(protocol.capture_sketch("dev-a"), sk.to_bytes()), type(sk))
    with pytest.raises(protocol.ProtocolError, match="not 'dev-b'"):
        parse_message(protocol.capture_sketch("dev-b"), sk.to_bytes())
    with pytest.raises(protocol.ProtocolError, match="not a capture topic"):
        parse_message(protocol.heartbeat("dev-a"), b"{}")
    with pytest.raises(protocol.ProtocolError, match="not JSON"):
        parse_message(protocol.capture_sketch("dev-a"), b"\xff")


def test_subscriptions_are_shared() -> None:
    assert subscriptions("g1") == (
        "$share/g1/edgeloop/v1/devices/+/capture/samples",
        "$share/g1/edgeloop/v1/devices/+/capture/sketch",
    )


def test_blob_store_is_content_addressed(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    digest = blobs.put(b"abc")
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert blobs.put(b"abc") == digest
    assert blobs.get(digest) == b"abc"
    assert blobs.path(digest) == tmp_path / "ba" / digest
    with pytest.raises(ValueError, match="not 64 lowercase hex"):
        blobs.path("../etc/passwd")


# ---------------------------------------------------------------- the msgspec mirror


MIRRORS = {"Tensor": "WireTensor", "CapturedSample": "WireSample", "SampleBatch": "WireBatch"}


def _canonical(schema: Any) -> Any:
    """A JSON schema without what only documents it (titles, defaults, formats), with
    ``const`` as a one-value ``enum``, sorted enums and the mirrors' names as the contract's."""
    if isinstance(schema, list):
        return [_canonical(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("title", "description", "default", "format"):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "enum":
            out["enum"] = sorted(value)
        elif key == "$ref":
            name = value.rsplit("/", 1)[-1]
            out["$ref"] = {v: k for k, v in MIRRORS.items()}.get(name, name)
        else:
            out[key] = _canonical(value)
    if "enum" in out:
        out.pop("type", None)
    return out


def test_the_msgspec_mirror_has_the_contracts_fields_and_constraints() -> None:
    """Fields, required fields, types, patterns, lengths and literals of the wire models and
    of their msgspec mirror (ingestion's fast path) are the same: a change to the contract in
    agent/protocol.py that the mirror misses fails here."""
    import msgspec

    from cloud.dataloop.ingest import WireBatch

    contract = protocol.SampleBatch.model_json_schema()
    contract_defs = {**contract.pop("$defs"), "SampleBatch": contract}
    _, mirror_defs = msgspec.json.schema_components([WireBatch])
    for name, mirror in MIRRORS.items():
        want, got = _canonical(contract_defs[name]), _canonical(mirror_defs[mirror])
        assert sorted(got["required"]) == sorted(want["required"]), name
        assert got["additionalProperties"] is want["additionalProperties"] is False, name
        assert got["properties"] == want["properties"], name


def _mutated(path: str, value: Any) -> bytes:
    data = json.loads(sample_batch("dev-a", 2).to_bytes())
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return json.dumps(data).encode()


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("device_id", "dev-a"),  # valid as it is
        ("schema_version", 1.0),
        ("schema_version", True),
        ("schema_version", 2),
        ("extra", 1),
        ("samples", []),
        ("sent_at", None),
        ("dropped", {"budget": "3"}),
        ("samples.0.sample_id", "0" * 31),
        ("samples.0.sample_id", "G" * 32),
        ("samples.0.reason", "bored"),
        ("samples.0.role", "boss"),
        ("samples.0.ts", 1_700_000_000),
        ("samples.0.ts", "yesterday"),
        ("samples.0.top1", "2"),
        ("samples.0.confidence", "0.5"),
        ("samples.0.model", "m" * 129),
        ("samples.0.device_id", "dev-b"),
        ("samples.0.inputs.0.dtype", "complex64"),
        ("samples.0.inputs.0.name", "n" * 129),
        ("samples.0.inputs.0.schema_version", 1.0),
        ("samples.0.inputs.0.shape", ["1", "4"]),
        ("samples.0.outputs", _DELETE),
        ("samples.1.extra", None),
    ],
)
def test_fast_decoding_accepts_and_refuses_as_the_contract(path: str, value: Any) -> None:
    """``decode_message`` (msgspec first) and ``parse_message`` (pydantic) agree on every
    payload: the same samples, or the same error."""
    from cloud.dataloop.ingest import decode_message

    topic = protocol.capture_samples("dev-a")
    payload = _mutated(path, value)
    try:
        want: Any = parse_message(topic, payload)
    except protocol.ProtocolError as err:
        with pytest.raises(protocol.ProtocolError) as got:
            decode_message(topic, payload)
        assert str(got.value) == str(err)
        return
    got_batch = decode_message(topic, payload)
    fields = ("sample_id", "device_id", "model", "ts", "reason", "role", "top1", "confidence")
    for mine, theirs in zip(got_batch.samples, want.samples, strict=True):
        assert [getattr(mine, f) for f in fields] == [getattr(theirs, f) for f in fields]
        pairs = zip((*mine.inputs, *mine.outputs), (*theirs.inputs, *theirs.outputs), strict=True)
        for a, b in pairs:
            assert (a.name, a.dtype, list(a.shape), a.data) == (b.name, b.dtype, b.shape, b.data)


# ---------------------------------------------------------------- database


def test_insert_ignore_counts_inserted_rows(db_url: str, tmp_path: Path) -> None:
    store = IngestStore(db.make_engine(db_url), tmp_path / "blobs")
    batch = sample_batch("dev-a", 3)
    topic = protocol.capture_samples("dev-a")
    first = store.write([(topic, batch.to_bytes())])
    assert (first.samples_inserted, first.samples_duplicate) == (3, 0)
    # the same batch again plus a copy in the same write: nothing new
    again = store.write([(topic, batch.to_bytes()), (topic, batch.to_bytes())])
    assert (again.samples_inserted, again.samples_duplicate) == (0, 6)
    with Session(store.engine) as session:
        rows = session.exec(select(Sample)).all()
        assert sorted(r.sample_id for r in rows) == sorted(s.sample_id for s in batch.samples)
        assert insert_ignore(session, Sample.__table__, [], "sample_id") == 0  # type: ignore[attr-defined]
    store.engine.dispose()


def test_bad_tensor_drops_that_sample_only(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db.upgrade(url)
    store = IngestStore(db.make_engine(url), tmp_path / "blobs")
    batch = sample_batch("dev-a", 2)
    bad = batch.samples[0].inputs[0].model_copy(update={"data": base64.b64encode(b"xyz").decode()})
    broken = batch.samples[0].model_copy(update={"inputs": [bad]})
    payload = batch.model_copy(update={"samples": [broken, batch.samples[1]]}).to_bytes()
    result = store.write([(protocol.capture_samples("dev-a"), payload)])
    assert (result.samples_inserted, result.malformed) == (1, 1)
    store.engine.dispose()


def _write_old_layout(store: IngestStore, batch: protocol.SampleBatch) -> None:
    """Store ``batch`` as the first layout did: one blob per tensor, refs without a pack."""
    rows = []
    for sample in batch.samples:
        prepared = IngestStore._sample(sample, sample.ts)
        for ref, data in zip(
            (*prepared.row["inputs"], *prepared.row["outputs"]), prepared.tensors, strict=True
        ):
            assert store.blobs.put(data) == ref["sha256"]
            del ref["pack"], ref["offset"]
        rows.append(prepared.row)
    with Session(store.engine) as session:
        assert insert_ignore(session, Sample.__table__, rows, "sample_id") == len(rows)  # type: ignore[attr-defined]
        session.commit()


def test_tensors_of_a_write_share_one_pack_and_read_back(db_url: str, tmp_path: Path) -> None:
    """One pack per write (duplicates not packed again); old one-file-per-tensor rows still
    read back through labeling and the API; a damaged pack is detected, never served."""
    from cloud.dataloop.labeling import read_tensor

    blob_dir = tmp_path / "blobs" / "samples"  # where the API looks
    store = IngestStore(db.make_engine(db_url), blob_dir)
    topic = protocol.capture_samples("dev-a")
    old, first, second = (sample_batch("dev-a", 3, seed=s) for s in (1, 2, 3))
    _write_old_layout(store, old)
    assert len([p for p in blob_dir.rglob("*") if p.is_file()]) == 6
    result = store.write([(topic, first.to_bytes()), (topic, second.to_bytes())])
    assert (result.samples_inserted, result.samples_duplicate) == (6, 0)
    files = {p for p in blob_dir.rglob("*") if p.is_file()}
    assert len(files) == 7  # 6 old files + 1 pack for the whole write
    # a re-delivery mixed with new samples: only the new ones are packed
    third = sample_batch("dev-a", 2, seed=4)
    again = store.write([(topic, first.to_bytes()), (topic, third.to_bytes())])
    assert (again.samples_inserted, again.samples_duplicate) == (2, 3)
    new_pack = {p for p in blob_dir.rglob("*") if p.is_file()} - files
    assert len(new_pack) == 1
    assert next(iter(new_pack)).stat().st_size == 2 * 4 * (N_FEATURES + WEIGHTS.shape[1])
    with Session(store.engine) as session:
        rows = {r.sample_id: r for r in session.exec(select(Sample)).all()}
    assert len(rows) == 11
    for wire in (*old.samples, *first.samples, *second.samples, *third.samples):
        row = rows[wire.sample_id]
        assert (row.inputs[0].get("pack") is None) == (wire in old.samples)
        assert np.array_equal(read_tensor(blob_dir, row.inputs[0]), decode_tensor(wire.inputs[0]))
        assert np.array_equal(read_tensor(blob_dir, row.outputs[0]), decode_tensor(wire.outputs[0]))
    settings = make_settings(tmp_path, db_url, blob_dir=blob_dir.parent, migrate_on_start=False)
    with api_client(settings) as client:
        for wire in (old.samples[0], first.samples[1]):
            detail = client.get(f"/samples/{wire.sample_id}")
            assert detail.status_code == 200, detail.text
            assert detail.json()["inputs"][0]["data"] == wire.inputs[0].data
        # damage the pack: the API refuses with the reason instead of serving wrong bytes
        ref = rows[third.samples[1].sample_id].inputs[0]
        pack = store.blobs.path(ref["pack"])
        data = bytearray(pack.read_bytes())
        data[ref["offset"]] ^= 0xFF
        pack.write_bytes(bytes(data))
        damaged = client.get(f"/samples/{third.samples[1].sample_id}")
        assert damaged.status_code >= 400 and "does not match its sha256" in damaged.text
    with pytest.raises(ValueError, match="does not match its sha256"):
        read_tensor(blob_dir, ref)
    pack.write_bytes(bytes(data[: ref["offset"] + 1]))
    with pytest.raises(ValueError, match="holds 1 of the 16 bytes"):
        read_tensor(blob_dir, ref)
    store.engine.dispose()


def test_copy_meeting_a_concurrent_duplicate_falls_back_to_on_conflict(
    db_url: str, tmp_path: Path
) -> None:
    """A sample inserted by another consumer between the existence check and the COPY (and a
    duplicate inside the rows) still ends up stored once, the rest inserted."""
    store = IngestStore(db.make_engine(db_url), tmp_path / "blobs")
    batch = sample_batch("dev-a", 4, seed=9)
    prepared = [IngestStore._sample(s, s.ts).row for s in batch.samples]
    with Session(store.engine) as session:
        assert insert_ignore(session, Sample.__table__, prepared[:1], "sample_id") == 1  # type: ignore[attr-defined]
        session.commit()
    with Session(store.engine) as session:
        rows = [*prepared, prepared[2]]  # the first exists already, the third is twice here
        assert insert_ignore(session, Sample.__table__, rows, "sample_id") == 3  # type: ignore[attr-defined]
        session.commit()
        stored = sorted(r.sample_id for r in session.exec(select(Sample)).all())
    assert stored == sorted(s.sample_id for s in batch.samples)
    store.engine.dispose()


def test_pipelined_prepares_ahead_and_raises_in_order() -> None:
    import threading

    threads: list[str] = []

    def prepare(n: int) -> int:
        threads.append(threading.current_thread().name)
        if n == 3:
            raise RuntimeError("bad batch 3")
        return n * 10

    got = []
    with pytest.raises(RuntimeError, match="bad batch 3"):
        for n, prepared in pipelined(iter(range(5)), prepare):
            got.append((n, prepared))
    assert got == [(0, 0), (1, 10), (2, 20)]
    assert set(threads) == {"ingest-prepare"}
    assert list(pipelined(iter(range(3)), lambda n: -n, depth=2)) == [(0, 0), (1, -1), (2, -2)]
    # a consumer that stops early does not leave the helper thread blocked
    for n, _ in pipelined(iter(range(100)), prepare):
        if n == 1:
            break
    assert "ingest-prepare" not in {t.name for t in threading.enumerate()}


# ---------------------------------------------------------------- over MQTT


def test_consumer_stores_once_and_counts_malformed(db_url: str, tmp_path: Path) -> None:
    blob_dir = tmp_path / "blobs"
    engine = db.make_engine(db_url)
    with mosquitto(tmp_path) as broker:
        ingestor = Ingestor(
            IngestStore(engine, blob_dir / "samples"),
            broker=fleet_broker(broker.port),
            group="test",
            batch_size=50,
            batch_wait_s=0.1,
        )
        ingestor.start(timeout=10)
        device = Device(broker.port, "dev-a")
        try:
            batch = sample_batch("dev-a", 5)
            window = sketch("dev-a", make_baseline(), training_inputs(40))
            device.send(batch)
            device.send(window)
            device.send(batch)  # re-sent after a lost PUBACK
            device.send(window)
            samples_topic = protocol.capture_samples("dev-a")
            device.publish(samples_topic, b"not json")
            device.publish(samples_topic, b'{"schema_version": 99}')
            device.publish(samples_topic, sample_batch("dev-b", 1).to_bytes())  # spoofed id
            device.publish(protocol.capture_sketch("dev-a"), b'{"schema_version": 1}')
            wait_until(lambda: ingestor.stats["messages"] >= 8, "8 messages consumed")
        finally:
            device.close()
            ingestor.stop()
    stats = ingestor.stats
    assert stats["samples_inserted"] == 5 and stats["samples_duplicate"] == 5
    assert stats["sketches_inserted"] == 1 and stats["sketches_duplicate"] == 1
    assert stats["malformed"] == 4
    with Session(engine) as session:
        samples = session.exec(select(Sample)).all()
        sketches = session.exec(select(Sketch)).all()
    assert len(samples) == 5 and len(sketches) == 1
    assert sketches[0].status == "pending" and sketches[0].n_samples == 40
    assert sketches[0].counts == window.counts.model_dump()
    # the tensors are in the blob store, byte for byte
    original = {s.sample_id: s for s in batch.samples}
    blobs = BlobStore(blob_dir / "samples")
    for row in samples:
        ref = row.inputs[0]
        want = decode_tensor(original[row.sample_id].inputs[0])
        got = np.frombuffer(blobs.tensor(ref), dtype=ref["dtype"]).reshape(ref["shape"])
        assert np.array_equal(got, want)
        assert row.device_id == "dev-a" and row.artifact_id == "ab" * 32
    # and the API serves them
    settings = make_settings(tmp_path, db_url, blob_dir=blob_dir, migrate_on_start=False)
    with api_client(settings) as client:
        listed = client.get("/samples", params={"device": "dev-a", "limit": 2})
        assert listed.status_code == 200
        assert listed.json()["count"] == 5 and len(listed.json()["data"]) == 2
        assert client.get("/samples", params={"device": "dev-b"}).json()["count"] == 0
        assert client.get("/samples", params={"reason": "random"}).json()["count"] == 5
        bad_reason = client.get("/samples", params={"reason": "bored"})
        assert bad_reason.status_code == 422 and "every_nth" in bad_reason.text
        one = batch.samples[0]
        detail = client.get(f"/samples/{one.sample_id}").json()
        assert detail["inputs"][0]["data"] == one.inputs[0].data
        assert detail["outputs"][0]["shape"] == one.outputs[0].shape
        missing = client.get("/samples/" + "0" * 32)
        assert missing.status_code == 404 and "GET /samples" in missing.json()["detail"]
        assert client.get("/samples/xyz").status_code == 422
    engine.dispose()


def test_shared_subscription_splits_messages(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    with mosquitto(tmp_path) as broker:
        consumers = [
            Ingestor(
                IngestStore(engine, tmp_path / "blobs"),
                broker=fleet_broker(broker.port),
                group="shared",
                batch_size=5,
                batch_wait_s=0.05,
                overlap=overlap,  # both worker loops: in turn, and prepared one batch ahead
            )
            for overlap in (False, True)
        ]
        for consumer in consumers:
            consumer.start(timeout=10)
        devices = [Device(broker.port, d) for d in ("dev-a", "dev-b", "dev-c")]
        try:
            for i in range(10):
                for j, device in enumerate(devices):
                    device.send(sample_batch(device.device_id, 1, seed=100 + 10 * i + j))
            wait_until(
                lambda: sum(c.stats["messages"] for c in consumers) >= 30, "30 messages consumed"
            )
        finally:
            for device in devices:
                device.close()
            for consumer in consumers:
                consumer.stop()
    counts = [c.stats["messages"] for c in consumers]
    assert sum(counts) == 30, counts  # each message went to one consumer only
    assert all(n > 0 for n in counts), counts  # and both got some
    assert sum(c.stats["samples_inserted"] for c in consumers) == 30
    with Session(engine) as session:
        assert len(session.exec(select(Sample)).all()) == 30
    engine.dispose()


def test_wrong_broker_password_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    with mosquitto(tmp_path) as broker:
        ingestor = Ingestor(
            IngestStore(engine, tmp_path / "blobs"),
            broker=BrokerConfig(host="127.0.0.1", port=broker.port, username="fleet", password="x"),
        )
        with pytest.raises(BrokerError, match="refused the connection as 'fleet'"):
            ingestor.start(timeout=10)
    engine.dispose()


def test_cli_refuses_to_start_without_a_password(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgeloop.cli import cli

    result = CliRunner().invoke(
        cli, ["dataloop", "ingest", "--database-url", f"sqlite:///{tmp_path / 'c.db'}"]
    )
    assert result.exit_code == 2
    assert "EDGELOOP_DATALOOP_BROKER_PASSWORD" in result.output


def test_ingest_command_consumes_until_sigterm(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tests.cloud.cloud_service import REPO

    url = f"sqlite:///{tmp_path / 'c.db'}"
    log = tmp_path / "ingest.log"
    with mosquitto(tmp_path) as broker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
        env.update(
            EDGELOOP_CLOUD_DATABASE_URL=url,
            EDGELOOP_CLOUD_STATE_DIR=str(tmp_path / "state"),
            EDGELOOP_DATALOOP_BROKER_PORT=str(broker.port),
            EDGELOOP_DATALOOP_BROKER_PASSWORD=PASSWORDS["fleet"],
            EDGELOOP_DATALOOP_BATCH_WAIT_S="0.05",
            PYTHONPATH=str(REPO),
        )
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from edgeloop.cli import main; main()",
                    "dataloop",
                    "ingest",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
            try:
                wait_until(lambda: "ingest consumer ready" in log.read_text(), "ready", 60)
                device = Device(broker.port, "dev-a")
                try:
                    device.send(sample_batch("dev-a", 2))
                    engine = db.make_engine(url)

                    def stored() -> bool:
                        with Session(engine) as session:
                            return len(session.exec(select(Sample)).all()) == 2

                    wait_until(stored, "2 samples stored by the command")
                    engine.dispose()
                finally:
                    device.close()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0, log.read_text()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    output = log.read_text()
    assert '"samples_inserted": 2' in output, output
    blob_dir = tmp_path / "state" / "blobs" / "samples"
    packs = [p for p in blob_dir.rglob("*") if p.is_file()]
    assert len(packs) == 1  # the two samples' four tensors, packed into one blob
    assert packs[0].stat().st_size == 2 * 4 * (N_FEATURES + WEIGHTS.shape[1])


def test_monitor_command_scores_pending(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgeloop.cli import cli
    from tests.cloud.dataloop_helpers import register_model

    url = f"sqlite:///{tmp_path / 'c.db'}"
    db.upgrade(url)
    baseline, _ = register_model(url, tmp_path)
    store = IngestStore(db.make_engine(url), tmp_path / "blobs")
    window = sketch("dev-a", baseline, training_inputs(200, seed=3))
    store.write([(protocol.capture_sketch("dev-a"), window.to_bytes())])
    store.engine.dispose()
    runner = CliRunner()
    result = runner.invoke(cli, ["dataloop", "monitor", "--database-url", url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"scored": 1, "skipped": 0, "alerts": 0}
    again = runner.invoke(cli, ["dataloop", "monitor", "--database-url", url, "--json"])
    assert json.loads(again.stdout) == {"scored": 0, "skipped": 0, "alerts": 0}


def test_a_message_the_database_refuses_does_not_block_its_batch(
    db_url: str, tmp_path: Path
) -> None:
    engine = db.make_engine(db_url)
    ingestor = Ingestor(
        IngestStore(engine, tmp_path / "blobs"),
        broker=fleet_broker(1),  # never connected: _write is called directly
    )
    good = sample_batch("dev-a", 1, seed=5)
    nul = sample_batch("dev-a", 1, seed=6)
    nul = nul.model_copy(update={"samples": [nul.samples[0].model_copy(update={"model": "a\0b"})]})
    topic = protocol.capture_samples("dev-a")
    batch = [
        _Message(topic, good.to_bytes(), 1, 1),
        _Message(topic, nul.to_bytes(), 2, 1),
        _Message(topic, b"junk", 3, 1),
    ]
    result = ingestor._write(batch)
    assert result is not None
    if engine.dialect.name == "postgresql":  # text cannot hold NUL: refused, isolated
        assert (result.samples_inserted, result.malformed) == (1, 2)
    else:
        assert (result.samples_inserted, result.malformed) == (2, 1)
    with Session(engine) as session:
        ids = {s.sample_id for s in session.exec(select(Sample)).all()}
    assert good.samples[0].sample_id in ids
    engine.dispose()


def test_overlong_fields_are_malformed() -> None:
    batch = sample_batch("dev-a", 1)
    long = batch.model_copy(
        update={"samples": [batch.samples[0].model_copy(update={"model": "m" * 129})]}
    )
    with pytest.raises(protocol.ProtocolError, match="model of 129 characters exceeds 128"):
        parse_message(protocol.capture_samples("dev-a"), long.to_bytes())

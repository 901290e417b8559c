"""Files through the diode, end to end: real daemons, real UDP through the fault relay,
mosquitto, and the folders on both sides."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import structlog

from diode.config import validate
from diode.config.files import FilesOutput
from diode.config.link import LinkSettings
from diode.decoder import Delivered
from diode.encoder import Encoder
from diode.files import FileChunk, FileHoles, FileManifest, chunk_size_for
from diode.keys import SigningKey
from diode.loopback import free_port
from diode.wire import symbol_size
from receiver.app import Receiver
from receiver.files import FileReceiver
from receiver.link import kernel_drops
from tests.e2e import Subscriber, wait_until
from tests.files_plant import LANE, STREAM, FilePlant, drop_file
from tests.support.mosquitto import Mosquitto
from tests.support.relay import Faults

FILES_TOPIC = "diode/test/$files"
MTIME = 1_700_000_000_123_456_789


@pytest.fixture
def subscriber(mosquitto: Mosquitto) -> AsyncIterator[Subscriber]:
    sub = Subscriber(mosquitto.port, FILES_TOPIC)
    yield sub
    sub.close()


async def _plant(plant: FilePlant) -> FilePlant:
    await plant.start_plc()
    await plant.start_relay()
    await plant.start_rx()
    await plant.start_tx()
    return plant


def _results(sub: Subscriber) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for message in sub.on(FILES_TOPIC):
        out.setdefault(message["name"], []).append(message)
    return out


def _chunk_size(plant: FilePlant) -> int:
    assert plant.tx is not None
    assert plant.tx.files is not None
    return plant.tx.files.chunk_size


async def test_files_of_every_size_arrive_whole_through_loss_and_bursts(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    plant = FilePlant(
        tmp_path,
        mosquitto.port,
        faults=Faults(loss=0.05, burst_every_s=0.5, burst_len=10, seed=7),
        files_overrides={"recursive": True},
    )
    try:
        await _plant(plant)
        chunk = _chunk_size(plant)
        symbol = symbol_size(1472)
        rng = __import__("random").Random(5)
        contents = {
            "empty.bin": b"",
            "one byte.bin": b"\x42",
            "one symbol.bin": rng.randbytes(symbol),
            "one block.bin": rng.randbytes(chunk),
            "one block and a byte.bin": rng.randbytes(chunk + 1),
            "ünïcødé 報告 ✓.csv": b"temp;level\n21.5;3.2\n" * 100,
            "sub dir/nested file.txt": b"nested\n" * 1000,
            "ten MB.dat": rng.randbytes(10 * 1024 * 1024),
        }
        for name, data in contents.items():
            drop_file(plant.ot, name, data, MTIME)

        await wait_until(lambda: len(_results(subscriber)) == len(contents), within=120)
        results = _results(subscriber)
        for name, data in contents.items():
            (announced,) = results[name]
            assert announced["result"] == "ok", announced
            assert announced["size"] == len(data)
            assert announced["sha256"] == hashlib.sha256(data).hexdigest()
            received = plant.it / name
            assert received.read_bytes() == data, name
            assert received.stat().st_mtime_ns == MTIME
        assert plant.relay is not None
        assert plant.relay.stats.dropped > 0  # the loss and bursts did happen
        assert plant.rx is not None
        counters = plant.rx.counters()
        assert counters["files_ok"] == len(contents)
        assert counters.get("records_lost", 0) == 0  # everything within the FEC budget
        assert counters["file_chunks_written"] == sum(
            -(-len(d) // chunk) for d in contents.values()
        )
        # Nothing else is left in the target folder: no part files, no chunk maps.
        left = sorted(p.relative_to(plant.it).as_posix() for p in plant.it.rglob("*"))
        assert left == sorted({*contents, "sub dir"})
    finally:
        await plant.close()


async def test_the_file_lane_on_its_own_port_arrives_on_its_own_socket(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    # [file_lane] port and [receiver] file_port: the lane's datagrams go straight to the
    # receiver's second socket; the relay in front of the link port sees tag datagrams only.
    plant = FilePlant(tmp_path, mosquitto.port, file_port=free_port(socket.SOCK_DGRAM))
    try:
        await _plant(plant)
        assert plant.rx is not None
        assert plant.rx.file_sock is not None
        assert plant.rx.file_sock.getsockname()[1] == plant.file_port
        data = __import__("random").Random(3).randbytes(300_000)
        drop_file(plant.ot, "report.csv", data, MTIME)
        await wait_until(lambda: "report.csv" in _results(subscriber), within=60)
        (announced,) = _results(subscriber)["report.csv"]
        assert announced["result"] == "ok"
        assert (plant.it / "report.csv").read_bytes() == data
        assert plant.relay is not None
        streams = {int.from_bytes(d[4:8], "big") for d in plant.relay.capture}
        assert streams == {STREAM}  # tag datagrams only on the link port
        assert kernel_drops(plant.rx.file_sock) == 0
    finally:
        await plant.close()


# -- authentic but hostile, and forged --------------------------------------------------


def _lane_datagrams(
    key: SigningKey, records: list[FileManifest | FileChunk], later: int = 0
) -> list[bytes]:
    """What a transmitter holding ``key`` would send on the file lane (one block per record).

    Its epoch is now (the receiver refuses a first epoch far older than its clock);
    ``later`` ms more for a later transmitter run.
    """
    epoch = time.time_ns() // 1_000_000 + later
    encoder = Encoder(link=LinkSettings(), key=key, stream_id=LANE, epoch=epoch)
    for record in records:
        encoder.add(record, 0.0)
        encoder.flush()
    return [d for block in encoder.take() for d in block.datagrams]


def _file_records(name: str, data: bytes) -> list[FileManifest | FileChunk]:
    chunk = chunk_size_for(
        Encoder(link=LinkSettings(), key=SigningKey.generate(), stream_id=0, epoch=1).capacity
    )
    manifest = FileManifest.of(
        name=name,
        size=len(data),
        mtime_ns=MTIME,
        sha256=hashlib.sha256(data).digest(),
        chunk_size=chunk,
    )
    chunks: list[FileManifest | FileChunk] = [
        FileChunk(file_id=manifest.file_id, index=i, data=data[i * chunk : (i + 1) * chunk])
        for i in range(manifest.chunks)
    ]
    return [manifest, *chunks]


def _send(port: int, datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            sock.sendto(datagram, ("127.0.0.1", port))


def _everything_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


HOSTILE = [
    "../escape.txt",
    "/tmp/absolute.txt",
    "CON",
    "bell\x07.txt",
    "sub/../../up.txt",
    ".hidden",
]


async def test_hostile_names_are_refused_and_counted_and_nothing_is_written(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    plant = FilePlant(tmp_path, mosquitto.port)
    try:
        rx = await plant.start_rx()
        records = [
            r for name in [*HOSTILE, "fine name.txt"] for r in _file_records(name, b"payload\n")
        ]
        _send(plant.rx_port, _lane_datagrams(plant.lane_key(), records))
        await wait_until(lambda: len(_results(subscriber)) == len(HOSTILE) + 1)
        results = _results(subscriber)
        for name in HOSTILE:
            (announced,) = results[name]
            assert announced["result"] == "refused"
            assert announced["reason"] == "bad_name"
        assert results["fine name.txt"][0]["result"] == "ok"
        assert rx.counters()["files_refused"] == len(HOSTILE)
        assert _everything_under(plant.it) == ["fine name.txt"]
        assert not (tmp_path / "escape.txt").exists()
        assert not (tmp_path / "up.txt").exists()
        assert not os.path.exists("/tmp/absolute.txt")  # noqa: ASYNC240
    finally:
        await plant.close()


async def test_forged_manifests_and_chunks_are_rejected_counted_and_write_nothing(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    plant = FilePlant(tmp_path, mosquitto.port)
    try:
        rx = await plant.start_rx()
        records = _file_records("forged.txt", b"not from OT\n" * 5000)
        # A key the receiver does not know.
        _send(plant.rx_port, _lane_datagrams(SigningKey.generate(), records))
        # Another key posing as the lane's: the key id is the lane's, the signature is not.
        # (A test-only forgery: the frozen key is given a key id that is not its own.)
        impostor = SigningKey.generate()
        object.__setattr__(impostor, "key_id", plant.lane_key().key_id)
        _send(plant.rx_port, _lane_datagrams(impostor, records))
        await wait_until(
            lambda: (
                rx.counters().get("rejected_bad_signature", 0) >= len(records)
                and rx.counters().get("rejected_unknown_key", 0) > 0
            )
        )
        # A genuine file afterwards still goes through: the forgeries cost nothing lasting.
        _send(
            plant.rx_port, _lane_datagrams(plant.lane_key(), _file_records("genuine.txt", b"ok\n"))
        )
        await wait_until(lambda: "genuine.txt" in _results(subscriber))
        counters = rx.counters()
        assert "forged.txt" not in _results(subscriber)
        assert counters.get("file_chunks_written", 0) == 1
        assert counters.get("files_ok", 0) == 1
        assert _everything_under(plant.it) == ["genuine.txt"]
    finally:
        await plant.close()


# -- loss beyond the FEC budget, repetition, expiry ------------------------------------------


async def test_a_file_hit_beyond_fec_is_reported_incomplete_and_a_repetition_completes_it(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    plant = FilePlant(
        tmp_path,
        mosquitto.port,
        faults=Faults(loss=0.6, seed=3),
        lane_overrides={"share": 0.05},  # 10 Mb/s: each round of the file takes about 1.5 s
        files_overrides={"repeat": 4},
    )
    try:
        await _plant(plant)
        data = __import__("random").Random(9).randbytes(1_000_000)
        drop_file(plant.ot, "batch report.csv", data, MTIME)
        target = plant.it / "batch report.csv"
        seen_missing: list[bool] = []

        def reported_incomplete() -> bool:
            results = _results(subscriber).get("batch report.csv", [])
            if results and results[0]["result"] == "incomplete":
                seen_missing.append(target.exists())
                return True
            return False

        await wait_until(reported_incomplete, within=60, step=0.01)
        assert plant.relay is not None
        plant.relay.faults.loss = 0.0  # the loss ends: a later round gets through
        first = _results(subscriber)["batch report.csv"][0]
        assert first["chunks_missing"] > 0
        assert first["missing_chunks"]
        assert seen_missing == [False]  # never renamed into place while incomplete
        await wait_until(
            lambda: _results(subscriber)["batch report.csv"][-1]["result"] == "ok", within=60
        )
        assert target.read_bytes() == data
        assert plant.rx is not None
        assert plant.rx.counters().get("records_lost", 0) > 0  # the lane counted the lost chunks
    finally:
        await plant.close()


async def test_loss_beyond_fec_leaves_a_file_incomplete_and_the_carousel_completes_it(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    plant = FilePlant(
        tmp_path,
        mosquitto.port,
        faults=Faults(loss=0.6, seed=4),
        lane_overrides={"share": 0.05},
        # Sent once; then again on the carousel while no new file waits.
        files_overrides={"carousel_s": 3600, "after_send": "delete"},
    )
    try:
        await _plant(plant)
        data = __import__("random").Random(10).randbytes(600_000)
        source = drop_file(plant.ot, "alarm log.csv", data, MTIME)
        target = plant.it / "alarm log.csv"

        def results(name: str) -> list[str]:
            return [r["result"] for r in _results(subscriber).get(name, [])]

        await wait_until(lambda: results("alarm log.csv")[:1] == ["incomplete"], within=60)
        assert not target.exists()  # never renamed into place while incomplete
        assert plant.relay is not None
        plant.relay.faults.loss = 0.0  # the loss ends: the next carousel round gets through
        assert source.exists()  # on the carousel: after_send waits for it to leave
        # A new file goes before the carousel's next round.
        drop_file(plant.ot, "new.csv", b"fresh\n", MTIME)
        await wait_until(lambda: results("new.csv") == ["ok"], within=30)
        await wait_until(lambda: results("alarm log.csv")[-1:] == ["ok"], within=60)
        assert target.read_bytes() == data
        assert plant.tx is not None
        assert plant.tx.files is not None
        # (the round is counted once its final manifest is out, after its last chunk)
        files = plant.tx.files
        await wait_until(lambda: files.counters["files_carousel_rounds"] >= 1, within=30)
        assert files.counters["files_sent"] == 2  # each file sent once as new
    finally:
        await plant.close()


async def test_an_incomplete_file_expires_reported_with_what_was_missing(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    plant = FilePlant(tmp_path, mosquitto.port, target_overrides={"expire_s": 1.0})
    try:
        rx = await plant.start_rx()
        records = _file_records("partial.bin", b"\x01" * 200_000)  # 5 chunks
        del records[2:4]  # chunks 1 and 2 never arrive
        _send(plant.rx_port, _lane_datagrams(plant.lane_key(), records))
        await wait_until(lambda: "partial.bin" in _results(subscriber), within=10)
        (expired,) = _results(subscriber)["partial.bin"]
        assert expired["result"] == "expired"
        assert expired["missing_chunks"] == [[1, 2]]
        assert expired["chunks_missing"] == 2
        assert rx.counters()["files_expired"] == 1
        assert _everything_under(plant.it) == []  # the part file and its map are gone
    finally:
        await plant.close()


async def test_an_existing_file_is_never_overwritten_unless_configured(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    plant = FilePlant(tmp_path, mosquitto.port)
    try:
        await plant.start_rx()
        plant.it.mkdir(parents=True, exist_ok=True)
        (plant.it / "recipe.txt").write_bytes(b"IT's own copy")
        _send(plant.rx_port, _lane_datagrams(plant.lane_key(), _file_records("recipe.txt", b"new")))
        await wait_until(lambda: "recipe.txt" in _results(subscriber))
        assert _results(subscriber)["recipe.txt"][0]["result"] == "exists"
        assert (plant.it / "recipe.txt").read_bytes() == b"IT's own copy"
        await plant.stop("rx")
        plant.target_overrides = {"overwrite": True}
        await plant.start_rx()
        # A later transmitter run (a later epoch): the receiver remembers the first one.
        again = _lane_datagrams(plant.lane_key(), _file_records("recipe.txt", b"new"), later=60_000)
        _send(plant.rx_port, again)
        await wait_until(lambda: len(_results(subscriber).get("recipe.txt", [])) == 2)
        assert _results(subscriber)["recipe.txt"][1]["result"] == "ok"
        assert (plant.it / "recipe.txt").read_bytes() == b"new"
    finally:
        await plant.close()


# -- restarts ------------------------------------------------------------------------------


def _written(plant: FilePlant) -> int:
    return plant.rx.counters().get("file_chunks_written", 0) if plant.rx else 0


async def test_receiver_restarted_mid_file_resumes_and_completes(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    plant = FilePlant(
        tmp_path,
        mosquitto.port,
        lane_overrides={"share": 0.05},  # 10 Mb/s: 4 MB take about 6 s a round
        files_overrides={"repeat": 2},
    )
    try:
        await _plant(plant)
        data = __import__("random").Random(11).randbytes(4_000_000)
        drop_file(plant.ot, "historian export.csv", data, MTIME)
        chunks = -(-len(data) // _chunk_size(plant))
        await wait_until(lambda: _written(plant) >= 20, within=60, step=0.01)
        before = _written(plant)
        await plant.stop("rx")
        assert any(p.name.endswith(".map") for p in plant.it.iterdir())
        await asyncio.sleep(0.5)  # chunks sent now are lost to this receiver
        await plant.start_rx()
        assert plant.rx is not None
        assert plant.rx.counters()["files_resumed"] == 1

        def finished() -> list[str]:
            return [r["result"] for r in _results(subscriber).get("historian export.csv", [])]

        # The first round ends with the chunks sent while it was down missing; the second
        # round fills them.
        await wait_until(lambda: finished()[-1:] == ["ok"], within=60)
        assert finished() == ["incomplete", "ok"]
        assert (plant.it / "historian export.csv").read_bytes() == data
        # The restarted receiver only needed what the first one had not written.
        assert _written(plant) == chunks - before
    finally:
        await plant.close()


async def test_transmitter_restarted_mid_file_sends_it_again_and_the_receiver_merges(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    plant = FilePlant(
        tmp_path,
        mosquitto.port,
        lane_overrides={"share": 0.05},
        files_overrides={"after_send": "delete"},
    )
    try:
        await _plant(plant)
        data = __import__("random").Random(12).randbytes(4_000_000)
        source = drop_file(plant.ot, "camera still.png", data, MTIME)
        await wait_until(lambda: _written(plant) >= 20, within=60, step=0.01)
        assert plant.tx is not None
        first_epoch = plant.tx.epoch
        await plant.stop("tx")
        assert source.exists()  # not sent whole: not deleted
        await plant.start_tx()
        assert plant.tx.epoch > first_epoch
        await wait_until(lambda: "camera still.png" in _results(subscriber), within=60)
        (announced,) = _results(subscriber)["camera still.png"]
        assert announced["result"] == "ok"
        assert (plant.it / "camera still.png").read_bytes() == data
        assert plant.rx is not None
        assert plant.rx.counters()["file_chunks_duplicate"] >= 20  # merged, not restarted
        await wait_until(lambda: not source.exists())  # deleted once sent whole
    finally:
        await plant.close()


# -- the receiver's disk ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs as the target folder, and a read-only one inside it (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    target = tmp_path / "it-files"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], check=True)
    (target / "readonly").mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target / "readonly")], check=True
    )
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target / "readonly")], check=False)
        subprocess.run(["umount", "-l", str(target)], check=False)


async def test_disk_full_and_read_only_are_reported_and_telemetry_goes_on(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber, small_disk: Path
) -> None:
    plant = FilePlant(tmp_path, mosquitto.port)
    try:
        await _plant(plant)
        assert plant.rx is not None
        rx = plant.rx
        drop_file(plant.ot, "too big.bin", b"\x07" * 3_000_000)
        await wait_until(lambda: "too big.bin" in _results(subscriber), within=30)
        (full,) = _results(subscriber)["too big.bin"]
        assert full["result"] == "error"
        assert full["error"] == "ENOSPC"
        drop_file(plant.ot, "readonly/denied.txt", b"x")
        plant_files = plant.tx.files if plant.tx else None
        assert plant_files is not None
        # (the watched folder is not recursive: hand the file over as a watcher would)
        plant_files.send_now(plant_files.watchers[0].watch, plant.ot / "readonly" / "denied.txt")
        await wait_until(lambda: "readonly/denied.txt" in _results(subscriber), within=30)
        (denied,) = _results(subscriber)["readonly/denied.txt"]
        assert denied["result"] == "error"
        assert denied["error"] == "EROFS"
        samples = rx.router.streams[11].counters["samples_published"]
        drop_file(plant.ot, "small.txt", b"fits\n")
        await wait_until(lambda: "small.txt" in _results(subscriber), within=30)
        assert _results(subscriber)["small.txt"][0]["result"] == "ok"
        assert rx.counters()["files_error"] == 2
        await wait_until(lambda: rx.router.streams[11].counters["samples_published"] > samples)
        assert [n for n in os.listdir(small_disk) if n.startswith(".")] == []
    finally:
        await plant.close()


# -- large files -----------------------------------------------------------------------------


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(1 << 20):
            digest.update(data)
    return digest.hexdigest()


async def test_a_2_gib_sparse_file_arrives_whole_and_sparse(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    # Its holes cross as FileHoles records (a run of zero chunks in one record), its
    # data as chunks: 2 GiB in the time a few chunks take, and sparse on the IT side.
    plant = FilePlant(tmp_path, mosquitto.port)
    try:
        await _plant(plant)
        size = 2 * 1024**3 + 17
        source = plant.ot / ".sparse.tmp"
        plant.ot.mkdir(parents=True, exist_ok=True)
        with source.open("wb") as f:
            f.truncate(size)
            for offset in (0, 20_000_000, 1024**3 + 5, size - 1000):
                f.seek(offset)
                f.write(os.urandom(1000))
        digest = await asyncio.to_thread(_sha256_of, source)
        source.replace(plant.ot / "sparse.img")
        await wait_until(
            lambda: any(r["result"] == "ok" for r in _results(subscriber).get("sparse.img", [])),
            within=180,
        )
        received = plant.it / "sparse.img"
        assert received.stat().st_size == size
        assert await asyncio.to_thread(_sha256_of, received) == digest
        assert received.stat().st_blocks * 512 < 10 * 1024 * 1024  # its holes stayed holes
        assert plant.rx is not None
        counters = plant.rx.counters()
        assert counters["file_chunks_written"] <= 8  # the chunks with data, no more
        assert counters["file_chunks_holes"] > 40_000
    finally:
        await plant.close()


async def test_offsets_past_4_gib_land_where_they_belong(tmp_path: Path) -> None:
    announced: list[dict[str, Any]] = []
    target = tmp_path / "it"
    receiver = FileReceiver(
        {LANE: validate(FilesOutput, {"directory": str(target), "expire_s": 1.0}, "rx.toml")},
        lambda _stream, result: announced.append(result),
    )
    chunk = 45_435
    size = 5 * 1024**3 + 123  # 5 GiB and a bit: 118 161 chunks
    manifest = FileManifest.of(
        name="huge.bin", size=size, mtime_ns=MTIME, sha256=b"\x00" * 32, chunk_size=chunk
    )
    last = manifest.chunks - 1
    tail = b"\xab" * manifest.chunk_length(last)
    middle = (4 * 1024**3) // chunk + 1  # the first chunk wholly past 4 GiB
    records = [
        manifest,
        FileChunk(file_id=manifest.file_id, index=middle, data=b"\xcd" * chunk),
        FileChunk(file_id=manifest.file_id, index=last, data=tail),
    ]
    receiver.handle(
        [Delivered(stream_id=LANE, epoch=1, seq=0, first_record=0, records=records, rebuilt=False)],
        0.0,
    )
    (part,) = [p for p in target.iterdir() if not p.name.endswith(".map")]
    assert part.stat().st_size == size
    assert part.stat().st_blocks * 512 < 10 * 1024 * 1024  # sparse: two chunks on disk
    with part.open("rb") as f:
        f.seek(middle * chunk)
        assert f.read(chunk) == b"\xcd" * chunk
        f.seek(last * chunk)
        assert f.read() == tail
    receiver.tick(2.0)
    (expired,) = announced
    assert expired["result"] == "expired"
    assert expired["chunks_missing"] == manifest.chunks - 2
    assert expired["missing_chunks"][:2] == [[0, middle - 1], [middle + 1, last - 1]]
    assert list(target.iterdir()) == []


def _deliver(receiver: FileReceiver, records: list[Any], seq: int) -> None:
    delivered = Delivered(
        stream_id=LANE, epoch=1, seq=seq, first_record=0, records=records, rebuilt=False
    )
    receiver.handle([delivered], 0.0)


@pytest.mark.parametrize("wrong", [False, True], ids=["exact", "a wrong byte"])
@pytest.mark.parametrize("order", ["in order", "reversed", "a gap filled later", "holes"])
async def test_the_running_hash_checks_what_arrived_in_any_order(
    tmp_path: Path, order: str, wrong: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks in order are hashed as they come (nothing is read back at the end); any
    other order stops the running hash where it is and the rest is read back. Either
    way only the exact file is renamed into place, and a wrong byte is bad_sha256."""
    chunk, count = 10_000, 9
    data = bytearray(os.urandom(chunk * count - 123))
    if order == "holes":
        data[chunk : 4 * chunk] = bytes(3 * chunk)  # chunks 1-3 are zeros
    announced: list[dict[str, Any]] = []
    target = tmp_path / "it"
    receiver = FileReceiver(
        {LANE: validate(FilesOutput, {"directory": str(target)}, "rx.toml")},
        lambda _stream, result: announced.append(result),
    )
    read_back: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        read_back.append(offset)
        return real_pread(fd, n, offset)

    monkeypatch.setattr("receiver.files.os.pread", counting_pread)
    manifest = FileManifest.of(
        name="f.bin",
        size=len(data),
        mtime_ns=MTIME,
        sha256=hashlib.sha256(data).digest(),
        chunk_size=chunk,
    )
    sent = bytearray(data)
    if wrong:
        sent[5 * chunk + 7] ^= 1  # authentic, but not the file's bytes
    pieces: list[Any] = [
        FileChunk(file_id=manifest.file_id, index=i, data=bytes(sent[i * chunk : (i + 1) * chunk]))
        for i in range(count)
    ]
    if order == "reversed":
        pieces.reverse()
    elif order == "a gap filled later":
        pieces = pieces[:2] + pieces[3:] + pieces[2:3]
    elif order == "holes":
        pieces[1:4] = [FileHoles(file_id=manifest.file_id, first=1, count=3)]
    _deliver(receiver, [manifest], 0)
    for seq, piece in enumerate(pieces, 1):
        _deliver(receiver, [piece], seq)
    await receiver.wait_idle()
    receiver.close()
    (result,) = announced
    assert result["result"] == ("bad_sha256" if wrong else "ok"), result
    placed = target / "f.bin"
    assert placed.exists() != wrong
    if not wrong:
        assert placed.read_bytes() == data
    if order in ("in order", "holes"):
        assert read_back == []  # all hashed on the way in
    else:
        assert read_back, "the rest is read back from the part"


async def test_after_a_disk_full_error_the_next_round_tries_again(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber, small_disk: Path
) -> None:
    plant = FilePlant(
        tmp_path,
        mosquitto.port,
        lane_overrides={"share": 0.005},  # 1 Mb/s: each round of 300 kB takes seconds
        files_overrides={"repeat": 2},
    )
    try:
        blocker = small_disk / "blocker"
        blocker.write_bytes(b"\x00" * 900_000)  # of the tmpfs's 1 MiB
        await _plant(plant)
        data = os.urandom(300_000)
        drop_file(plant.ot, "alarm log.csv", data, MTIME)

        def results() -> list[str]:
            return [r["result"] for r in _results(subscriber).get("alarm log.csv", [])]

        await wait_until(lambda: results() == ["error"], within=30, step=0.01)
        blocker.unlink()  # room again before the second round
        await wait_until(lambda: results()[-1:] == ["ok"], within=60)
        assert results() == ["error", "ok"]  # one error per round, not one per manifest
        assert (small_disk / "alarm log.csv").read_bytes() == data
    finally:
        await plant.close()


def test_an_overflowing_file_socket_is_counted_and_warned_about_once_a_minute() -> None:
    """The receiver cannot slow the lane down: when its file socket overflows, it counts
    the kernel's drops and says which setting on the transmitter fixes it, at most once
    a minute (a lane that stays too fast must not flood the log)."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel's minimum
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    counters: Counter[str] = Counter()
    fake = cast(
        Any,
        SimpleNamespace(
            file_sock=rx,
            decoder=SimpleNamespace(counters=counters),
            _file_drops_logged_at=float("-inf"),
        ),
    )

    def overflow() -> None:
        for _ in range(100):  # never read: all but the first few are dropped
            tx.sendto(b"x" * 1000, rx.getsockname())

    try:
        overflow()
        with structlog.testing.capture_logs() as first:
            Receiver._watch_file_drops(fake, 100.0)
        dropped = counters["file_kernel_drops"]
        assert dropped > 50
        (warning,) = first
        assert warning["datagrams"] == dropped
        assert "rate_mbps" in warning["fix"]
        overflow()
        with structlog.testing.capture_logs() as within_the_minute:
            Receiver._watch_file_drops(fake, 130.0)
        assert counters["file_kernel_drops"] > dropped  # counted, not said again
        assert within_the_minute == []
        with structlog.testing.capture_logs() as quiet:
            Receiver._watch_file_drops(fake, 200.0)  # no new drop: nothing to say
        assert quiet == []
        overflow()
        with structlog.testing.capture_logs() as later:
            Receiver._watch_file_drops(fake, 201.0)
        assert len(later) == 1
    finally:
        rx.close()
        tx.close()

"""Files through the diode, end to end: real daemons, real UDP through the fault relay,
mosquitto, and the folders on both sides."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from diode.encoder import Encoder
from diode.files import MANIFEST_EVERY, FileChunk, FileManifest, chunk_size_for
from diode.keys import SigningKey
from diode.wire import symbol_size
from tests.e2e import Subscriber, wait_until
from tests.files_plant import LANE, FilePlant, drop_file
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
            "ünïcødé 報告 ✓.csv": "temp;level\n21.5;3.2\n".encode() * 100,
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

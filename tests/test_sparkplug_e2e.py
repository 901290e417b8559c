"""Sparkplug B end to end: PLC simulator -> transmitter -> UDP -> receiver -> mosquitto -> host.

The host (tests/support/sparkplug_host.py) decodes with its own protobuf
reader, not the library the receiver encodes with, and records every broken
Sparkplug session rule (births before data, seq continuity, aliases, bdSeq).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from receiver.sparkplug import REBIRTH
from tests.e2e import STREAM, Plant, float_registers, sockets_die_with, wait_until
from tests.support import sparkplug_host as spb
from tests.support.mosquitto import Mosquitto

NODE = "spBv1.0/diode/{}/diode-rx"
NCMD = "spBv1.0/diode/NCMD/diode-rx"
DCMD = "spBv1.0/diode/DCMD/diode-rx/plc1"


def sparkplug_output(**sparkplug: Any) -> dict[str, Any]:
    return {"payload": "sparkplug", "qos": 0, "link_timeout_s": 1.0, "sparkplug": sparkplug}


@pytest.fixture
async def plant(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[Plant]:
    plant = Plant(tmp_path, mosquitto.port)
    plant.output_overrides = sparkplug_output()
    await plant.start_plc()
    try:
        yield plant
    finally:
        await plant.close()


@pytest.fixture
def host(mosquitto: Mosquitto) -> Iterator[spb.SparkplugHost]:
    h = spb.SparkplugHost(mosquitto.port, host_id="scada")
    assert h.subscribed.wait(5), "subscribed before the receiver starts, or it misses the NBIRTH"
    yield h
    h.close()


def set_count(plant: Plant, value: int) -> None:
    assert plant.plc is not None
    plant.plc.set_registers(1, "holding_register", 10, [value >> 16, value & 0xFFFF])


async def start(plant: Plant) -> None:
    await plant.start_relay()
    await plant.start_rx()
    await plant.start_tx()


def counter(plant: Plant, name: str) -> int:
    assert plant.rx is not None
    return plant.rx.counters()[f"sparkplug_{STREAM}_{name}"]


def bd_seq(event: spb.Event) -> int:
    return next(m.value for m in event.payload.metrics if m.name == "bdSeq")


async def test_values_and_datatypes_are_the_plcs_and_births_come_first(
    plant: Plant, host: spb.SparkplugHost
) -> None:
    assert plant.plc is not None
    plant.plc.set_registers(1, "holding_register", 0, float_registers(2.25))
    set_count(plant, 70_000)
    plant.plc.set_bits(1, "coil", 0, [True])
    await start(plant)
    await wait_until(lambda: host.value("plc1", "pump") is True)
    level, count, pump = (host.metric("plc1", n) for n in ("level", "count", "pump"))
    assert level is not None
    assert count is not None
    assert pump is not None
    assert (level.datatype, level.value) == (spb.FLOAT, 2.25)
    assert (count.datatype, count.value) == (spb.UINT32, 70_000)
    assert (pump.datatype, pump.value) == (spb.BOOLEAN, True)
    assert count.properties["readOnly"] is True
    set_count(plant, 70_001)
    await wait_until(lambda: host.value("plc1", "count") == 70_001)
    ddata = host.of("DDATA", "plc1")
    assert ddata, "the change came as DDATA"
    assert all(m.name is None and m.alias is not None for e in ddata for m in e.payload.metrics)
    kinds = [e.kind for e in host.events]
    assert kinds.index("NBIRTH") < kinds.index("DBIRTH") < kinds.index("DDATA")
    assert host.violations == []


async def test_seq_is_continuous_over_hundreds_of_messages_with_its_wrap(
    plant: Plant, host: spb.SparkplugHost
) -> None:
    plant.tx_overrides = {"heartbeat_interval_s": 0.2}
    await start(plant)
    await wait_until(lambda: host.metric("plc1", "count") is not None)
    value = 0
    deadline = time.monotonic() + 120
    while len(host.of("DDATA")) < 320 and time.monotonic() < deadline:
        value += 1
        set_count(plant, value)
        await asyncio.sleep(0.01)
    ddata = host.of("DDATA")
    assert len(ddata) >= 320
    assert sum(1 for e in ddata if e.payload.seq == 0) >= 1, "seq wrapped past 255"
    assert host.violations == []
    await wait_until(lambda: host.value("plc1", "count") == value)


async def test_bd_seq_matches_across_will_nbirth_and_ndeath_and_survives_a_restart(
    plant: Plant, host: spb.SparkplugHost
) -> None:
    await start(plant)
    await wait_until(lambda: host.of("DBIRTH"))
    first = bd_seq(host.of("NBIRTH")[0])
    # The connection dies without a DISCONNECT: the broker publishes the will.
    assert plant.rx is not None
    node = plant.rx.sparkplug[STREAM]
    assert node._client is not None
    sock = node._client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    await wait_until(lambda: host.ndeath_bd_seqs and len(host.of("NBIRTH")) >= 2)
    assert host.ndeath_bd_seqs[0] == first, "the will carries the NBIRTH's bdSeq"
    second = bd_seq(host.of("NBIRTH")[1])
    assert second == (first + 1) % 256
    # A clean stop publishes the NDEATH itself, with the current bdSeq.
    await plant.stop("rx")
    await wait_until(lambda: len(host.ndeath_bd_seqs) >= 2)
    assert host.ndeath_bd_seqs[1] == second
    # bdSeq was persisted under state_dir: a restarted receiver keeps counting.
    await plant.start_rx()
    await wait_until(lambda: len(host.of("NBIRTH")) >= 3)
    assert bd_seq(host.of("NBIRTH")[2]) == (second + 1) % 256
    assert host.violations == []


async def test_rebirth_is_answered_within_a_second_and_writes_are_refused(
    plant: Plant, host: spb.SparkplugHost
) -> None:
    set_count(plant, 42)
    await start(plant)
    await wait_until(lambda: host.value("plc1", "count") == 42)
    before = bd_seq(host.of("NBIRTH")[-1])
    births = len(host.of("NBIRTH"))
    asked = time.monotonic()
    host.send(NCMD, spb.command(REBIRTH, spb.BOOLEAN, True))
    await wait_until(lambda: len(host.of("NBIRTH")) > births and len(host.of("DBIRTH")) > births)
    nbirth = host.of("NBIRTH")[-1]
    assert nbirth.at - asked < 1.0
    assert bd_seq(nbirth) == before, "a rebirth keeps the session's bdSeq"
    assert host.value("plc1", "count") == 42, "answered from the last-value cache"
    # A write: refused, counted, and the PLC never sees it.
    assert plant.plc is not None
    writes_before = plant.plc.requests(function_code=16) + plant.plc.requests(function_code=6)
    host.send(DCMD, spb.command("count", spb.UINT32, 5))
    await wait_until(lambda: counter(plant, "commands_refused") == 1)
    await asyncio.sleep(0.5)
    assert host.value("plc1", "count") == 42
    writes = plant.plc.requests(function_code=16) + plant.plc.requests(function_code=6)
    assert writes == writes_before == 0
    assert host.violations == []


async def test_link_down_gives_ddeath_within_the_link_timeout_and_its_return_a_dbirth(
    plant: Plant, host: spb.SparkplugHost
) -> None:
    await start(plant)
    await wait_until(lambda: host.of("DBIRTH"))
    assert plant.relay is not None
    cut = time.monotonic()
    plant.relay.faults.loss = 1.0
    await wait_until(lambda: host.of("DDEATH", "plc1"))
    # link_timeout_s = 1.0; the receiver looks every 0.5 s, heartbeats come every 0.2 s
    assert host.of("DDEATH", "plc1")[0].at - cut <= 1.0 + 0.5 + 0.5
    births = len(host.of("DBIRTH", "plc1"))
    plant.relay.faults.loss = 0.0
    await wait_until(lambda: len(host.of("DBIRTH", "plc1")) > births)
    assert not host.of("NDEATH"), "the node itself never left the broker"
    assert host.violations == []


async def test_a_plc_the_transmitter_cannot_read_is_a_dead_device_until_it_answers(
    plant: Plant, host: spb.SparkplugHost
) -> None:
    await start(plant)
    await wait_until(lambda: host.of("DBIRTH"))
    assert plant.plc is not None
    plant.plc.dead.add(1)
    await wait_until(lambda: host.of("DDEATH", "plc1"))
    births = len(host.of("DBIRTH", "plc1"))
    plant.plc.dead.discard(1)
    await wait_until(lambda: len(host.of("DBIRTH", "plc1")) > births)
    assert host.violations == []


async def test_values_of_a_broker_outage_arrive_afterwards_as_history(
    plant: Plant, host: spb.SparkplugHost, mosquitto: Mosquitto
) -> None:
    set_count(plant, 1)
    await start(plant)
    await wait_until(lambda: host.value("plc1", "count") == 1)
    mosquitto.stop()
    for value in (2, 3, 4):
        set_count(plant, value)
        await asyncio.sleep(0.4)
    # The broker keeps no session across its restart: a host must be subscribed again
    # before the receiver reconnects. Both run on this event loop, so starting the
    # broker and subscribing without awaiting keeps the receiver out until then.
    mosquitto.start()
    after = spb.SparkplugHost(mosquitto.port)
    try:
        assert after.subscribed.wait(5)  # blocks the loop on purpose, see above
        await wait_until(lambda: after.value("plc1", "count") == 4, within=40)
        await wait_until(lambda: {m.value for _, m in after.historical} >= {2, 3, 4})
        history = [m.value for name, m in after.historical if name == "count"]
        assert history == sorted(history), "in order"
        assert all(m.is_historical for _, m in after.historical)
        assert after.violations == []
    finally:
        after.close()


async def test_values_kept_during_an_outage_survive_a_receiver_restart(
    plant: Plant, mosquitto: Mosquitto
) -> None:
    set_count(plant, 1)
    await start(plant)
    await wait_until(lambda: counter(plant, "node_births") == 1)
    mosquitto.stop()
    for value in (2, 3):
        set_count(plant, value)
        await asyncio.sleep(0.4)
    await wait_until(lambda: counter(plant, "history_depth") >= 2)
    old = plant.rx
    assert old is not None
    plant.kill("rx")  # no shutdown path: what it kept is on disk or nowhere
    await asyncio.sleep(0.2)
    sockets_die_with(old)
    await plant.start_rx()
    mosquitto.start()
    after = spb.SparkplugHost(mosquitto.port)  # see the outage test: subscribed first
    try:
        assert after.subscribed.wait(5)
        await wait_until(lambda: {2, 3} <= {m.value for n, m in after.historical if n == "count"})
        assert after.violations == []
    finally:
        after.close()


async def test_a_primary_host_is_waited_for_and_its_return_gives_a_rebirth(
    plant: Plant, host: spb.SparkplugHost
) -> None:
    plant.output_overrides = sparkplug_output(primary_host_id="scada")
    set_count(plant, 5)
    await start(plant)
    await asyncio.sleep(2.0)
    assert host.of("NBIRTH") == [], "no NBIRTH before the primary host is online"
    host.state(online=True)
    await wait_until(lambda: host.value("plc1", "count") == 5)
    first = bd_seq(host.of("NBIRTH")[0])
    # 3.0: the primary host offline -> NDEATH and a new session that waits for it.
    host.state(online=False)
    await wait_until(lambda: host.ndeath_bd_seqs == [first])
    await asyncio.sleep(0.3)
    set_count(plant, 6)
    await asyncio.sleep(0.5)
    assert len(host.of("NBIRTH")) == 1, "no birth while the host is offline"
    host.state(online=True)
    await wait_until(lambda: len(host.of("NBIRTH")) >= 2)
    assert bd_seq(host.of("NBIRTH")[1]) == (first + 1) % 256
    await wait_until(lambda: host.value("plc1", "count") == 6)
    await wait_until(lambda: any(m.value == 6 for _, m in host.historical))
    assert host.violations == []

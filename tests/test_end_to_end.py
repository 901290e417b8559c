"""PLC to MQTT through both daemons: a real pymodbus server, UDP, mosquitto, a subscriber."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e import Plant, Subscriber, float_registers, wait_until
from tests.support.mosquitto import Mosquitto
from tests.support.relay import Faults

LEVEL = "diode/test/plc1/level"
COUNT = "diode/test/plc1/count"
STATUS = "diode/test/$status"


@pytest.fixture
async def plant(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[Plant]:
    plant = Plant(tmp_path, mosquitto.port)
    await plant.start_plc()
    try:
        yield plant
    finally:
        await plant.close()


@pytest.fixture
def subscriber(mosquitto: Mosquitto) -> AsyncIterator[Subscriber]:
    sub = Subscriber(mosquitto.port)
    yield sub
    sub.close()


def set_count(plant: Plant, value: int) -> None:
    assert plant.plc is not None
    plant.plc.set_registers(1, "holding_register", 10, [value >> 16, value & 0xFFFF])


async def test_values_arrive_on_their_topics_with_their_payloads(
    plant: Plant, subscriber: Subscriber
) -> None:
    assert plant.plc is not None
    plant.plc.set_registers(1, "holding_register", 0, float_registers(2.25))
    set_count(plant, 70_000)
    await plant.start_relay()
    await plant.start_rx()
    await plant.start_tx()
    await wait_until(lambda: subscriber.on(LEVEL) and subscriber.on(COUNT))
    level = subscriber.on(LEVEL)[-1]
    assert level["value"] == 2.25
    assert level["quality"] == "good"
    assert level["ts"].endswith("Z")
    assert subscriber.on(COUNT)[-1]["value"] == 70_000
    await wait_until(lambda: any(s.get("link") == "up" for s in subscriber.on(STATUS)))


async def test_every_change_arrives_in_order_through_loss_and_bursts(
    plant: Plant, subscriber: Subscriber
) -> None:
    plant.faults = Faults(loss=0.05, burst_every_s=2.0, burst_len=10, seed=3)
    await plant.start_relay()
    await plant.start_rx()
    await plant.start_tx()
    sent = list(range(1, 121))
    for value in sent:
        set_count(plant, value)
        await asyncio.sleep(0.06)  # a little more than one poll interval
    await wait_until(lambda: any(m["value"] == sent[-1] for m in subscriber.on(COUNT)))
    seen = [m["value"] for m in subscriber.on(COUNT) if m["quality"] == "good"]
    # Every value the poller saw is published once, in order (the poller may miss
    # a value the test overwrote within one poll interval, never reorder it).
    assert seen == sorted(set(seen))
    assert plant.relay is not None
    assert plant.relay.stats.dropped > 0
    assert plant.rx is not None
    assert plant.rx.decoder.counters["records_lost"] == 0
    assert plant.rx.decoder.counters["blocks_rebuilt"] > 0


async def test_forged_and_replayed_datagrams_publish_nothing(
    plant: Plant, subscriber: Subscriber
) -> None:
    await plant.start_relay()
    await plant.start_rx()
    await plant.start_tx()
    set_count(plant, 5)
    await wait_until(lambda: any(m["value"] == 5 for m in subscriber.on(COUNT)))
    assert plant.relay is not None
    assert plant.rx is not None
    capture = list(plant.relay.capture)
    await plant.stop("tx")
    await asyncio.sleep(0.5)
    published = len(subscriber.on(COUNT))
    # Replay the whole capture, then datagrams from another transmitter's key
    # that claim this stream.
    for datagram in capture:
        plant.relay.send(datagram)
    from diode.encoder import Encoder
    from diode.keys import SigningKey
    from diode.records import Sample

    forger = Encoder(
        link=plant.tx_config().link, key=SigningKey.generate(), stream_id=11, epoch=2**62
    )
    forger.add(Sample(tag_id=2, ts_ns=0, value=666), 0.0)
    forger.flush()
    for block in forger.take():
        for datagram in block.datagrams:
            plant.relay.send(datagram)
    await asyncio.sleep(1.0)
    assert len(subscriber.on(COUNT)) == published
    assert all(m["value"] != 666 for m in subscriber.on(COUNT))
    counters = plant.rx.decoder.counters
    assert counters["rejected_unknown_key"] > 0
    assert counters["rejected_late"] + counters["rejected_replay"] >= len(capture) // 2


async def test_a_receiver_started_late_learns_every_tag_within_a_catalogue_period(
    plant: Plant, subscriber: Subscriber
) -> None:
    set_count(plant, 9)
    plant.tx_overrides = {"integrity_period_s": 1.0}
    await plant.start_relay()
    await plant.start_tx()
    await asyncio.sleep(1.5)
    await plant.start_rx()
    # The catalogue period is 1 s and the integrity refresh re-sends values each second.
    await wait_until(lambda: subscriber.on(COUNT), within=5)
    assert subscriber.on(COUNT)[-1]["value"] == 9


async def test_link_down_marks_every_tag_stale_with_its_last_value(
    plant: Plant, subscriber: Subscriber
) -> None:
    plant.output_overrides = {"link_timeout_s": 1.0}
    set_count(plant, 33)
    await plant.start_relay()
    await plant.start_rx()
    await plant.start_tx()
    await wait_until(lambda: any(m["value"] == 33 for m in subscriber.on(COUNT)))
    await plant.stop("tx")
    await wait_until(lambda: any(m["quality"] == "stale" for m in subscriber.on(COUNT)))
    stale = next(m for m in subscriber.on(COUNT) if m["quality"] == "stale")
    assert stale["value"] == 33, "the last value, never an invented one"
    await wait_until(lambda: any(s.get("link") == "down" for s in subscriber.on(STATUS)))


async def test_inventory_and_metrics(plant: Plant, subscriber: Subscriber) -> None:
    import urllib.request

    from diode.loopback import free_port

    assert plant.plc is not None
    metrics_port = free_port()
    plant.rx_overrides = {"metrics_port": metrics_port}
    await plant.start_relay()
    await plant.start_rx()
    await plant.start_tx()
    await wait_until(lambda: subscriber.on("diode/test/plc1/$inventory"))
    inventory = subscriber.on("diode/test/plc1/$inventory")[-1]
    assert inventory["protocol"] == "modbus"
    # Issue 14 item 7: the catalogue's metadata, retained beside each value.
    await wait_until(lambda: subscriber.on("diode/test/plc1/level/$meta"))
    meta = subscriber.on("diode/test/plc1/level/$meta")[-1]
    assert (meta["device"], meta["tag"], meta["value_type"]) == ("plc1", "level", "float32")
    assert meta["source"], meta  # where the transmitter reads it
    await wait_until(lambda: subscriber.on(COUNT))
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    for metric in (
        "diode_rx_datagrams_total",
        "diode_rx_blocks_whole_total",
        "diode_rx_records_delivered_total",
        "diode_rx_mqtt_connected",
        'diode_rx_link_up{stream="11"} 1.0',
        'diode_rx_samples_pending{stream="11"} 0.0',
        "diode_rx_mqtt_unencodable_total 0.0",
    ):
        assert metric in text, metric

"""What the router learns survives a restart; it releases waiting samples cheaply.

Issue 14, items 3, 4, 7 and 11: the router (receiver/router.py) over the real
MqttOutput and its SQLite spool (no broker needed: nothing here is published,
only spooled), then a second router and output on the same spool file, as a
restarted receiver would build them. Nothing is closed in between: the first
pair is dropped as a SIGKILL would leave it, with only what was committed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diode.config.mqtt import MqttBroker, StreamOutput
from diode.decoder import Delivered, EpochStarted
from diode.records import DeviceInfo, Heartbeat, Record, Sample, TagInfo, ValueType
from receiver.mqtt import MqttOutput
from receiver.router import LAST, LAST_SAVE_SLICE, Router
from receiver.spool import Spool
from tests.e2e import Plant, Subscriber, wait_until
from tests.support.mosquitto import Mosquitto

STREAM = 7
EPOCH = 1_764_000_000_000
OUT = StreamOutput.model_validate({"prefix": "diode", "site": "s", "link_timeout_s": 5.0})


def tag(i: int, **kw: Any) -> TagInfo:
    return TagInfo(tag_id=i, name=f"t{i}", device="plc1", value_type=ValueType.FLOAT64, **kw)


def sample(i: int, ts: int, value: float = 1.0) -> Sample:
    return Sample(tag_id=i, ts_ns=1_700_000_000_000_000_000 + ts, value=value)


def block(seq: int, records: Sequence[Record], *, rebuilt: bool = False) -> Delivered:
    return Delivered(
        stream_id=STREAM, epoch=EPOCH, seq=seq, first_record=0, records=list(records),
        rebuilt=rebuilt,
    )  # fmt: skip


class Receiver:
    """The receiver's router and output on one spool file, committed as app.py does."""

    def __init__(self, spool: Path) -> None:
        broker = MqttBroker.model_validate({"spool_path": spool}, strict=False)
        self.output = MqttOutput(broker)
        self.router = Router({STREAM: OUT}, self.output, store=self.output)

    def deliver(self, *events: Any, now: float = 0.0) -> None:
        self.router.handle(list(events), now)
        self.output.commit({"positions": b"x"})  # as Receiver._after: one transaction

    def spooled(self) -> list[tuple[str, dict[str, Any]]]:
        """Every message in the spool, oldest first."""
        self.output.commit()
        spool = Spool(self.output._broker.spool_path, 10**6)
        try:
            _, messages = spool.read(-(2**62), 10**6, time.time())
        finally:
            spool.close()
        return [(m.topic, json.loads(m.payload)) for _, m in messages]

    def values(self) -> list[tuple[str, Any, str]]:
        """(topic, value, quality) of every value message spooled."""
        return [
            (t, p["value"], p["quality"])
            for t, p in self.spooled()
            if not t.endswith(("$status", "$meta", "$inventory"))
        ]


async def test_waiting_samples_survive_a_kill_and_are_published_when_named(
    tmp_path: Path,
) -> None:
    """Item 3: positions covering waiting samples were committed, the samples were not."""
    first = Receiver(tmp_path / "spool.sqlite")
    first.deliver(EpochStarted(stream_id=STREAM, epoch=EPOCH, previous=None))
    first.deliver(block(0, [sample(1, 1, 10.0), sample(2, 2, 20.0), sample(1, 3, 11.0)]))
    assert first.router.status(first.router.streams[STREAM], 0.0)["pending"] == 3
    # SIGKILL: nothing closed, nothing more committed.
    second = Receiver(tmp_path / "spool.sqlite")
    assert second.router.status(second.router.streams[STREAM], 0.0)["pending"] == 3
    second.deliver(block(1, [tag(1), tag(2)]))
    assert second.values() == [
        ("diode/s/plc1/t1", 10.0, "good"),
        ("diode/s/plc1/t1", 11.0, "good"),
        ("diode/s/plc1/t2", 20.0, "good"),
    ]
    # Released: a third start finds nothing waiting any more.
    third = Receiver(tmp_path / "spool.sqlite")
    assert third.router.status(third.router.streams[STREAM], 0.0)["pending"] == 0


async def test_a_restarted_receiver_names_samples_at_once(tmp_path: Path) -> None:
    """Item 3: the catalogue learned is kept, so the first value needs no new carousel."""
    first = Receiver(tmp_path / "spool.sqlite")
    first.deliver(EpochStarted(stream_id=STREAM, epoch=EPOCH, previous=None))
    first.deliver(block(0, [tag(1), sample(1, 1, 1.0)]))
    second = Receiver(tmp_path / "spool.sqlite")
    status = second.router.status(second.router.streams[STREAM], 0.0)
    assert status["epoch"] == EPOCH  # item 4: $status shows the epoch after a restart
    assert status["tags"] == 1
    second.deliver(block(1, [sample(1, 2, 2.0)]))
    assert ("diode/s/plc1/t1", 2.0, "good") in second.values()
    assert status["pending"] == 0


async def test_a_new_epoch_forgets_the_kept_catalogue(tmp_path: Path) -> None:
    """Tag ids are per transmitter run: a kept catalogue must not name a new epoch's samples."""
    first = Receiver(tmp_path / "spool.sqlite")
    first.deliver(EpochStarted(stream_id=STREAM, epoch=EPOCH, previous=None))
    first.deliver(block(0, [tag(1), sample(1, 1, 1.0)]))
    second = Receiver(tmp_path / "spool.sqlite")
    second.deliver(EpochStarted(stream_id=STREAM, epoch=EPOCH + 1, previous=EPOCH))
    second.deliver(block(0, [sample(1, 2, 2.0)]))
    assert ("diode/s/plc1/t1", 2.0, "good") not in second.values()
    third = Receiver(tmp_path / "spool.sqlite")
    view = third.router.streams[STREAM]
    assert (view.epoch, len(view.catalogue), len(view.pending)) == (EPOCH + 1, 0, 1)


async def test_restart_with_the_link_down_turns_retained_values_stale(tmp_path: Path) -> None:
    """Item 4: no heartbeat since start is supervised like a heartbeat that stopped."""
    first = Receiver(tmp_path / "spool.sqlite")
    first.deliver(EpochStarted(stream_id=STREAM, epoch=EPOCH, previous=None))
    first.deliver(block(0, [tag(1), tag(2), Heartbeat(ts_ns=1), sample(1, 1, 1.5), sample(2, 1)]))
    first.router.save(0.0)  # a clean stop saves the last values (a kill: the last save)
    first.output.commit()
    second = Receiver(tmp_path / "spool.sqlite")
    before = len(second.values())
    second.router.tick(100.0)  # the receiver's first supervision: its start
    second.router.tick(103.0)
    assert len(second.values()) == before  # within link_timeout_s of the start: nothing yet
    second.router.tick(105.5)
    stale = second.values()[before:]
    assert sorted(stale) == [
        ("diode/s/plc1/t1", 1.5, "stale"),
        ("diode/s/plc1/t2", 1.0, "stale"),
    ]
    status = second.router.status(second.router.streams[STREAM], 106.0)
    assert (status["link"], status["epoch"]) == ("down", EPOCH)
    second.router.tick(200.0)
    assert len(second.values()) == before + 2  # said once


async def test_a_refresh_of_a_published_sample_is_not_published_again(tmp_path: Path) -> None:
    """Item 11: the integrity refresh re-sends the last sample; it is new only after stale."""
    rx = Receiver(tmp_path / "spool.sqlite")
    rx.deliver(EpochStarted(stream_id=STREAM, epoch=EPOCH, previous=None))
    nan = sample(2, 5, math.nan)
    rx.deliver(block(0, [tag(1), tag(2), Heartbeat(ts_ns=1), sample(1, 1, 1.5), nan]), now=0.0)
    rx.deliver(block(1, [sample(1, 1, 1.5), nan, sample(1, 2, 1.5)]), now=0.1)  # the refresh
    assert rx.values() == [
        ("diode/s/plc1/t1", 1.5, "good"),
        ("diode/s/plc1/t2", "NaN", "good"),
        ("diode/s/plc1/t1", 1.5, "good"),  # same value, a new sample
    ]
    assert rx.router.streams[STREAM].counters["samples_repeated"] == 2
    rx.router.tick(0.2)
    rx.router.tick(10.0)  # link down: both stale
    rx.deliver(block(2, [Heartbeat(ts_ns=2), sample(1, 2, 1.5)]), now=10.5)  # refresh after
    assert rx.values()[-1] == ("diode/s/plc1/t1", 1.5, "good")


async def test_metadata_is_published_retained_once_per_change(tmp_path: Path) -> None:
    """Item 7: value type, unit, description and source on ``{tag topic}/$meta``."""
    rx = Receiver(tmp_path / "spool.sqlite")
    rx.deliver(EpochStarted(stream_id=STREAM, epoch=EPOCH, previous=None))
    level = tag(1, unit="m", description="tank level", source="holding_register 0")
    rx.deliver(block(0, [level, tag(2)]))
    rx.deliver(block(1, [level, tag(2)]))  # the carousel again: nothing new
    rx.deliver(block(2, [TagInfo(**{**_fields(level), "unit": "cm"})]))
    metas = [(t, p) for t, p in rx.spooled() if t.endswith("/$meta")]
    assert metas == [
        (
            "diode/s/plc1/t1/$meta",
            {"device": "plc1", "tag": "t1", "value_type": "float64", "unit": "m",
             "description": "tank level", "source": "holding_register 0"},
        ),
        (
            "diode/s/plc1/t2/$meta",
            {"device": "plc1", "tag": "t2", "value_type": "float64", "unit": "",
             "description": "", "source": ""},
        ),
        (
            "diode/s/plc1/t1/$meta",
            {"device": "plc1", "tag": "t1", "value_type": "float64", "unit": "cm",
             "description": "tank level", "source": "holding_register 0"},
        ),
    ]  # fmt: skip
    spool = Spool(tmp_path / "spool.sqlite", 100)
    _, messages = spool.read(-(2**62), 100, time.time())
    assert all(m.retain and m.qos == 1 for _, m in messages if m.topic.endswith("/$meta"))
    # A restarted receiver knows what it published: the carousel publishes nothing again.
    again = Receiver(tmp_path / "spool.sqlite")
    count = len(again.spooled())
    again.deliver(block(3, [TagInfo(**{**_fields(level), "unit": "cm"}), tag(2)]))
    assert len([t for t, _ in again.spooled()[count:] if t.endswith("$meta")]) == 0


def _fields(info: TagInfo) -> dict[str, Any]:
    return {f: getattr(info, f) for f in info.__slots__}


async def test_status_carries_rejected_datagrams_and_rebuilt_blocks(tmp_path: Path) -> None:
    """Item 11: as docs/OPERATIONS.md says."""
    broker = MqttBroker.model_validate({"spool_path": tmp_path / "spool.sqlite"}, strict=False)
    output = MqttOutput(broker)
    counters = {"rejected_bad_signature": 3, "rejected_replay": 2, "blocks_rebuilt": 9}
    router = Router({STREAM: OUT}, output, store=output, receiver_counters=lambda: counters)
    router.handle([block(0, [tag(1)], rebuilt=True), block(1, [tag(2)])], 0.0)
    status = router.status(router.streams[STREAM], 0.0)
    assert status["datagrams_rejected"] == 5
    assert status["counters"]["blocks_rebuilt"] == 1  # this stream's


class _Recorder:
    def __init__(self) -> None:
        self.samples: list[tuple[TagInfo, Sample]] = []

    def publish_samples(
        self, stream: StreamOutput, items: Sequence[tuple[TagInfo, Sample]]
    ) -> None:
        self.samples.extend(items)

    def publish_inventory(self, stream: StreamOutput, info: DeviceInfo) -> None:
        pass

    def publish_meta(self, stream: StreamOutput, info: TagInfo) -> None:
        pass

    def publish_status(self, stream: StreamOutput, status: dict[str, Any]) -> None:
        pass


def _release_time(tags: int, waiting: int) -> float:
    """Seconds the router takes to release ``waiting`` samples of ``tags`` tags at a carousel."""
    output = _Recorder()
    router = Router({STREAM: OUT}, output)
    router.handle([block(0, [sample(i % tags, i) for i in range(waiting)])], 0.0)
    carousel = block(1, [tag(i) for i in range(tags)])
    start = time.perf_counter()
    router.handle([carousel], 0.0)
    elapsed = time.perf_counter() - start
    assert len(output.samples) == waiting
    return elapsed


def test_releasing_waiting_samples_costs_what_is_released_not_tags_times_waiting() -> None:
    """Item 3: 2 000 tags x 100 000 waiting blocked the event loop 5 s.

    Compared with itself (the same samples released by 10 and by 1 000 catalogue
    entries) so a busy machine slows both alike: scanning every waiting sample
    for each entry made the second 100 times the first.
    """
    few = min(_release_time(10, 20_000) for _ in range(3))
    many = min(_release_time(1000, 20_000) for _ in range(3))
    assert many < 8 * few + 0.05, (few, many)


async def test_the_real_receiver_restarted_with_the_link_down_turns_values_stale(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Item 4, through both daemons: the receiver stops, then the transmitter; the
    receiver comes back alone and must not leave the retained values ``good``."""
    plant = Plant(tmp_path, mosquitto.port, output_overrides={"link_timeout_s": 1.0})
    subscriber = Subscriber(mosquitto.port)
    try:
        await plant.start_plc()
        await plant.start_relay()
        await plant.start_rx()
        await plant.start_tx()
        count = "diode/test/plc1/count"
        await wait_until(lambda: subscriber.on(count))
        await plant.stop("rx")
        await plant.stop("tx")
        assert all(p["quality"] == "good" for p in subscriber.on(count))
        before = len(subscriber.on("diode/test/$status"))
        await plant.start_rx()
        await wait_until(lambda: subscriber.on(count)[-1]["quality"] == "stale", within=10)
        last = subscriber.on(count)[-1]
        assert last["reason"] == "link down"
        assert last["value"] == subscriber.on(count)[-2]["value"]  # the last value, not invented
        status = subscriber.on("diode/test/$status")[before:]
        assert [s["epoch"] for s in status if s["link"] == "down"][-1] is not None
    finally:
        subscriber.close()
        await plant.close()


async def test_last_values_are_saved_a_slice_per_commit_and_all_at_a_stop(tmp_path: Path) -> None:
    """1 000 tags changed: a round writes LAST_SAVE_SLICE of them with each commit, never the
    whole round in one (it held every message of that moment); a round is at most once per
    LAST_SAVE_S; a clean stop writes what is left. A restart finds every value written."""
    rx = Receiver(tmp_path / "spool.sqlite")
    tags = 1000
    rx.deliver(EpochStarted(stream_id=STREAM, epoch=EPOCH, previous=None))
    rx.deliver(block(0, [tag(i) for i in range(tags)]))
    written: list[int] = []
    persist = rx.output.persist

    def counting(changes: Any) -> None:
        written.append(sum(1 for key in changes.put if key[1] == LAST))
        persist(changes)

    rx.output.persist = counting  # type: ignore[method-assign]  # a spy on the real store
    rx.deliver(block(1, [sample(i, 1, 2.0) for i in range(tags)]), now=10.0)
    for n in range(2, 6):
        rx.deliver(block(n, [sample(0, n, float(n))]), now=10.0 + n / 100)
    assert max(written) == LAST_SAVE_SLICE
    assert sum(written) == tags  # the round; tag 0 changed since waits for the next one
    rx.deliver(block(6, [sample(0, 6, 6.0)]), now=10.5)
    assert sum(written) == tags  # not before LAST_SAVE_S
    rx.deliver(block(7, [sample(1, 7, 7.0)]), now=11.1)
    assert sum(written) == tags + 2  # the next round: tags 0 and 1
    rx.deliver(block(8, [sample(i, 8, 8.0) for i in range(tags)]), now=12.5)
    rx.router.save(12.6)  # a clean stop: everything left, in one commit
    rx.output.commit()
    again = Receiver(tmp_path / "spool.sqlite")
    last = again.router.streams[STREAM].last
    assert len(last) == tags
    assert {s.value for s in last.values()} == {8.0}

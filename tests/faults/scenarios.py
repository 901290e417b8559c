"""One function per promise of the fault suite; each runs real parts and returns its figures.

Every function asserts exact counts (an AssertionError names the first that
failed) and returns a :class:`Result`, the row of docs/RELIABILITY.md. The
tests in tests/test_faults.py call these; ``python -m tests.faults.report``
calls them all and writes the table. Seeds are fixed and printed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faults.harness import (
    BAD_DATAGRAM_REASONS,
    Plant,
    Subscriber,
    Tally,
    persist_broker,
    rejected,
    sample_number,
    saved_position,
    settled,
    spooled,
    spooled_values,
    synthetic_sent,
    tally,
    wait_until,
)
from tests.support.mosquitto import Mosquitto
from tests.support.relay import Faults

SEED = 20260601


@dataclass
class Result:
    """One row of the figures table."""

    scenario: str
    sent: int = 0
    published: int = 0
    lost: int = 0  # samples never published (counted at the subscriber)
    reported_lost: int = 0  # records the receiver reported lost (records_lost)
    rejected: int = 0  # datagrams the receiver rejected, all reasons
    peak_rx_mb: float = 0.0
    seed: int | None = None
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"[{self.scenario}] {text}", flush=True)


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _finish(plant: Plant, sub: Subscriber, *, within: float = 60.0) -> dict[str, int]:
    """Stop the transmitter (SIGTERM: its final counters) and wait until MQTT is quiet."""
    counters = await plant.stop_tx()
    await wait_until(
        settled(lambda: (sub.count_good(), plant.rx_counters().get("mqtt_published")), 1.5),
        within=within,
        step=0.25,
        what="subscriber quiet",
    )
    return counters


# --- 1. loss and bursts -----------------------------------------------------------------

TRICKLE = [{"name": "plc", "tags": 20, "rate_hz": 50.0, "batch_ms": 100.0}]
# 10 MB/s of records: 1000-byte strings at 10k samples/s, with every part on this 2-core
# machine. (20k samples/s of 500-byte strings, the same bytes in twice the records, loses
# blocks to kernel drops here: the receiver's per-record cost; see RELIABILITY.md.)
# One MQTT message per device per block.
FLOOD_RATE = [
    {"name": "bulk", "tags": 1000, "rate_hz": 10_000.0, "batch_ms": 5.0, "string_bytes": 1000}
]


async def loss_and_bursts(
    tmp: Path, broker: Mosquitto, *, fast: bool, duration_s: float = 12.0, seed: int = SEED
) -> Result:
    """5 % random loss + a burst of 10 consecutive datagrams every 2 s: exactly once, in order."""
    name = "1. 5% loss + burst 10/2 s, " + ("10 MB/s" if fast else "trickle")
    result = Result(name, seed=seed)
    faults = Faults(loss=0.05, burst_every_s=2.0, burst_len=10, seed=seed)
    sources = FLOOD_RATE if fast else TRICKLE
    plant = Plant(
        tmp,
        broker,
        sources,
        faults=faults,
        link={"rate_mbps": 400.0} if fast else {},
        output={"payload": "batched"} if fast else {},
        tx_section={"queue_records": 2_000_000, "queue_mb": 512} if fast else {},
    )
    sub = Subscriber(broker.port)
    try:
        await plant.start_relay()
        await plant.start_rx()
        await plant.start_tx()
        started = time.monotonic()
        peak = 0
        while time.monotonic() - started < duration_s:
            await asyncio.sleep(0.5)
            peak = max(peak, plant.rx_memory())
        counters = await _finish(plant, sub, within=120.0)
        elapsed = time.monotonic() - started
        rx = plant.rx_counters()
        plant.rx_memory()
        generated = counters["poll_generated"]
        sent = synthetic_sent(sources, {sources[0]["name"]: generated})
        t = tally(sub.good(), sent)
        assert plant.relay is not None
        stats = plant.relay.stats
        result.sent, result.published, result.lost = generated, t.published, t.missing
        result.reported_lost, result.rejected = rx.get("records_lost", 0), rejected(rx)
        result.peak_rx_mb = _mb(plant.rx_peak_kb)
        lat = sub.latencies_ms()
        mb_s = generated * (sources[0].get("string_bytes") or 8) / duration_s / 1e6
        result.note(
            f"{stats.received} datagrams, {stats.dropped} dropped by the relay "
            f"({stats.bursts} bursts of 10); blocks rebuilt {rx.get('blocks_rebuilt', 0)}, "
            f"whole {rx.get('blocks_whole', 0)}, lost {rx.get('blocks_lost', 0)}"
        )
        result.note(
            f"{generated / duration_s:.0f} samples/s ({mb_s:.2f} MB/s of values) "
            f"for {duration_s:.0f} s, all delivered {elapsed:.1f} s after the start; "
            f"latency source->subscriber p50 {_percentile(lat, 0.5):.0f} ms, "
            f"p99 {_percentile(lat, 0.99):.0f} ms, max {max(lat, default=0):.0f} ms"
        )
        assert counters["samples_queued"] == generated, counters
        assert counters.get("records_dropped", 0) == 0, counters
        assert counters.get("blocks_dropped", 0) == 0, counters
        assert stats.dropped > 0, stats
        assert stats.bursts >= 2, stats
        assert t.duplicates == 0, f"{t.duplicates} values published twice"
        assert t.out_of_order == 0, f"{t.out_of_order} values out of order"
        t.assert_none_missing()
        assert t.published == generated
        assert rx.get("records_lost", 0) == 0
        result.latency_p99_ms = _percentile(lat, 0.99)  # type: ignore[attr-defined]
        return result
    finally:
        sub.close()
        await plant.close()


# --- reference decoding: what the transmitter really sent -------------------------------


@dataclass
class Reference:
    """Every block of a capture taken before the faults, decoded without loss."""

    blocks: dict[int, tuple[int, list[Any]]]  # (epoch-local) seq -> (first record, records)
    names: dict[int, tuple[str, str]]  # tag id -> (device, tag)

    def records_in(self, first_seq: int, last_seq: int) -> int:
        return sum(len(self.blocks[s][1]) for s in range(first_seq, last_seq + 1))

    def samples_in(self, first_seq: int, last_seq: int) -> set[tuple[str, str, int]]:
        from diode.records import Sample
        from tests.faults.harness import sample_number

        out = set()
        for seq in range(first_seq, last_seq + 1):
            for r in self.blocks[seq][1]:
                if isinstance(r, Sample) and (n := sample_number(r.value)) is not None:
                    out.add((*self.names[r.tag_id], n))
        return out


def reference(
    plant: Plant, capture: list[bytes], epoch: int | None = None, psk: bytes | None = None
) -> Reference:
    from diode.decoder import Decoder, Delivered
    from diode.keys import Keyring, TrustedKey, load_public_key
    from diode.records import TagInfo
    from tests.faults.harness import STREAM

    keyring = Keyring(
        [TrustedKey(stream_id=STREAM, public=load_public_key(plant.keys / "tx.pub"), psk=psk)]
    )
    decoder = Decoder(keyring)
    blocks: dict[int, tuple[int, list[Any]]] = {}
    names: dict[int, tuple[str, str]] = {}
    for i, datagram in enumerate(capture):
        decoder.receive(datagram, i * 1e-6)
    decoder.poll(1e9)
    for event in decoder.events():
        if isinstance(event, Delivered) and (epoch is None or event.epoch == epoch):
            blocks[event.seq] = (event.first_record, event.records)
            for r in event.records:
                if isinstance(r, TagInfo):
                    names[r.tag_id] = (r.device, r.name)
    return Reference(blocks, names)


COUNTER = [{"name": "plc", "tags": 50, "rate_hz": 2000.0, "batch_ms": 20.0}]


async def _counted_run(
    plant: Plant,
    sub: Subscriber,
    result: Result,
    duration_s: float,
    during: Any = None,
    finish: Callable[[Plant, Subscriber], Awaitable[dict[str, int]]] = _finish,
) -> tuple[dict[str, int], dict[str, int]]:
    """Relay, receiver, transmitter; run (or ``during``); stop (``finish``: the transmitter
    stopped, MQTT settled); the tx and rx counters, the run's figures into ``result``."""
    await plant.start_relay()
    await plant.start_rx()
    await plant.start_tx()
    if during is not None:
        await during()
    else:
        await asyncio.sleep(duration_s)
    counters = await finish(plant, sub)
    rx = plant.rx_counters()
    plant.rx_memory()
    # PLC pollers have no poll_generated: their samples are counted as queued.
    result.sent = counters.get("poll_generated", counters["samples_queued"])
    result.reported_lost, result.rejected = rx.get("records_lost", 0), rejected(rx)
    result.peak_rx_mb = _mb(plant.rx_peak_kb)
    assert counters["samples_queued"] == result.sent, counters
    return counters, rx


def _tallied(result: Result, sub: Subscriber, sources: list[dict[str, Any]]) -> Tally:
    """Per tag, what MQTT has against what the source "plc" generated (``result.sent``);
    ``result``'s published (first arrivals) and lost from it."""
    t = tally(sub.good(), synthetic_sent(sources, {"plc": result.sent}))
    result.published, result.lost = t.published - t.duplicates, t.missing
    return t


# --- 2. loss beyond the FEC budget ----------------------------------------------------------


async def heavy_loss(tmp: Path, broker: Mosquitto, *, seed: int = SEED) -> Result:
    """30 % loss: records reported lost == records in the lost blocks; MQTT misses exactly them."""
    result = Result("2. 30% loss (beyond FEC)", seed=seed)
    # repair_burst 2 instead of 16: at the default, 30 % random loss is mostly within budget.
    plant = Plant(
        tmp,
        broker,
        COUNTER,
        faults=Faults(loss=0.30, seed=seed),
        link={"fec": {"repair_burst": 2}},
        capture=True,
    )
    sub = Subscriber(broker.port)
    try:
        _, rx = await _counted_run(plant, sub, result, 8.0)
        assert plant.relay is not None
        ref = reference(plant, plant.relay.capture)
        sent = synthetic_sent(COUNTER, {"plc": result.sent})
        t = tally(sub.good(), sent)
        result.published, result.lost = t.published, t.missing
        gaps = plant.gaps()
        lost_records = sum(ref.records_in(g["first_block"], g["last_block"]) for g in gaps)
        lost_samples: set[tuple[str, str, int]] = set()
        for g in gaps:
            lost_samples |= ref.samples_in(g["first_block"], g["last_block"])
        result.note(
            f"{len(gaps)} gaps, {rx.get('blocks_lost', 0)} blocks lost of "
            f"{len(ref.blocks)}; {lost_records} records in them, of which "
            f"{len(lost_samples)} samples; receiver reported {result.reported_lost}"
        )
        assert all(g["exact"] for g in gaps)
        assert result.reported_lost > 0, "no block was lost: the scenario proves nothing"
        assert result.reported_lost == sum(g["records_lost"] for g in gaps) == lost_records
        assert t.missing_values == lost_samples, (
            f"missing on MQTT but not reported: {sorted(t.missing_values - lost_samples)[:5]}; "
            f"reported but published: {sorted(lost_samples - t.missing_values)[:5]}"
        )
        assert t.duplicates == 0
        assert t.out_of_order == 0
        return result
    finally:
        sub.close()
        await plant.close()


# --- 3. duplicates and reordering ------------------------------------------------------------


async def duplicate_reorder(tmp: Path, broker: Mosquitto, *, seed: int = SEED) -> Result:
    """10 % duplicated and 10 % reordered datagrams: every value exactly once, in order."""
    result = Result("3. 10% duplicated + 10% reordered", seed=seed)
    plant = Plant(tmp, broker, COUNTER, faults=Faults(duplicate=0.10, reorder=0.10, seed=seed))
    sub = Subscriber(broker.port)
    try:
        _, rx = await _counted_run(plant, sub, result, 8.0)
        assert plant.relay is not None
        stats = plant.relay.stats
        t = tally(sub.good(), synthetic_sent(COUNTER, {"plc": result.sent}))
        result.published, result.lost = t.published, t.missing
        result.note(
            f"relay duplicated {stats.duplicated}, reordered {stats.reordered}; receiver "
            f"rejected_duplicate {rx.get('rejected_duplicate', 0)}, "
            f"rejected_late {rx.get('rejected_late', 0)}"
        )
        assert stats.duplicated > 0
        assert stats.reordered > 0
        assert t.duplicates == 0
        assert t.out_of_order == 0
        assert t.missing == 0
        assert t.published == result.sent
        assert result.reported_lost == 0
        return result
    finally:
        sub.close()
        await plant.close()


# --- 4. corruption and garbage ----------------------------------------------------------------


async def corruption(tmp: Path, broker: Mosquitto, *, seed: int = SEED) -> Result:
    """1 % bit flips and random garbage: no wrong value; every bad datagram counted."""
    import random

    result = Result("4. 1% bit flips + garbage", seed=seed)
    # Every bad datagram is counted here by the decoder's reasons, exactly. The kernel's
    # steering cannot check a CRC: a flip that makes a datagram name a block already
    # committed sends it to a quarantine, counted `steered_*` with the real stream's late
    # copies (docs/RELIABILITY.md, "Replays stopped in the kernel"), and 1 run in 2 had
    # one such flip. So this plant reads everything itself; test_steering counts the
    # quarantines exactly.
    plant = Plant(
        tmp,
        broker,
        COUNTER,
        faults=Faults(corrupt=0.01, seed=seed),
        receiver={"steer_replays": False},
    )
    sub = Subscriber(broker.port)
    rng = random.Random(seed)
    garbage = 0

    async def inject() -> None:
        nonlocal garbage
        assert plant.relay is not None
        for _ in range(80):
            for _ in range(25):
                size = rng.choice([0, 1, 47, 48, 49, rng.randrange(1, 1500), 1472])
                plant.relay.send(rng.randbytes(size))
                garbage += 1
            await asyncio.sleep(0.1)

    try:
        _, rx = await _counted_run(plant, sub, result, 0, during=inject)
        assert plant.relay is not None
        corrupted = plant.relay.stats.corrupted
        t = tally(sub.good(), synthetic_sent(COUNTER, {"plc": result.sent}))
        result.published, result.lost = t.published, t.missing
        bad = rejected(rx, BAD_DATAGRAM_REASONS)
        result.note(
            f"{corrupted} bit-flipped + {garbage} garbage datagrams; receiver counted "
            + ", ".join(f"{r} {rx.get('rejected_' + r, 0)}" for r in BAD_DATAGRAM_REASONS)
        )
        wrong = [v for vs in sub.good().values() for v in vs if v > result.sent]
        assert not wrong
        assert t.duplicates == 0
        assert t.out_of_order == 0
        assert t.missing == 0
        assert t.published == result.sent
        assert bad == corrupted + garbage, f"{bad} counted, {corrupted + garbage} bad sent"
        return result
    finally:
        sub.close()
        await plant.close()


def exact_accounting(
    plant: Plant, sub: Subscriber, sent: dict[tuple[str, str], int], ref: Reference
) -> Any:
    """Lost records == records in the blocks the receiver reported; MQTT misses exactly those."""
    rx_gaps = [g for g in plant.gaps() if g["exact"]]
    t = tally(sub.good(), sent)
    lost_records = sum(ref.records_in(g["first_block"], g["last_block"]) for g in rx_gaps)
    lost_samples: set[tuple[str, str, int]] = set()
    for g in rx_gaps:
        lost_samples |= ref.samples_in(g["first_block"], g["last_block"])
    assert sum(g["records_lost"] for g in rx_gaps) == lost_records
    assert t.missing_values == lost_samples, (
        f"missing on MQTT, not reported: {len(t.missing_values - lost_samples)} "
        f"{sorted(t.missing_values - lost_samples)[:5]}..."
        f"{sorted(t.missing_values - lost_samples)[-5:]}; gaps {rx_gaps}; "
        f"samples in gaps {len(lost_samples)} {sorted(lost_samples)[:3]}; "
        f"reported lost, yet published: {sorted(lost_samples - t.missing_values)[:5]}"
    )
    return t, lost_records, lost_samples


def _epoch(plant: Plant) -> int:
    assert plant.tx is not None
    return int(plant.tx.events("transmitter starting")[-1]["epoch"])


async def _rejections_grow(
    plant: Plant, before: int, by: int, reasons: tuple[str, ...], *, exact: bool = True
) -> None:
    """The receiver's rejections for ``reasons`` grow by ``by`` (at least, with live traffic)."""
    await wait_until(
        lambda: rejected(plant.rx_counters(), reasons) - before >= by,
        within=15,
        step=0.2,
        what=f"{by} datagrams rejected as {reasons}",
    )
    if exact:
        await asyncio.sleep(0.5)
        assert rejected(plant.rx_counters(), reasons) - before == by


# --- 5. replay ------------------------------------------------------------------------------

# "steered_*": what the kernel sent to the quarantines (receiver/steer.py), late copies
# (with the live stream's own) and replays apart, as the decoder counts them.
STALE_REASONS = ("late", "replay", "duplicate", "steered_late", "steered_replay")
REPLAY_REASONS = ("replay", "steered_replay")


async def replay(tmp: Path, broker: Mosquitto, *, seed: int = SEED) -> Result:
    """A capture played back in the same run, after a receiver restart, after a tx restart."""
    result = Result("5. replay (same run, rx restart, tx restart)", seed=seed)
    first = [dict(COUNTER[0], name="plc")]
    second = [dict(COUNTER[0], name="plc2")]
    plant = Plant(tmp, broker, first, capture=True)
    sub = Subscriber(broker.port)
    try:
        relay = await plant.start_relay()
        await plant.start_rx()
        await plant.start_tx()
        await asyncio.sleep(2.5)
        clip = list(relay.capture)
        replayed = 0
        # (a) during the same run
        before = rejected(plant.rx_counters(), STALE_REASONS)
        for d in clip:
            relay.send(d)
        replayed += len(clip)
        # The live stream's surplus repair symbols are "late" too: at least, not exactly.
        await _rejections_grow(plant, before, len(clip), STALE_REASONS, exact=False)
        # (b) after a receiver restart (its position comes from disk)
        await plant.stop_rx()
        await plant.start_rx()
        await wait_until(lambda: plant.rx_counters().get("records_delivered", 0) > 0)
        # Wait for the catalogue carousel to name the tags again: stopping the transmitter
        # before it would leave samples pending across the epoch change (see
        # test_pending_samples_are_not_named_by_the_next_epoch).
        top = max(sub.good().get(("plc", "t0"), [0]))
        await wait_until(lambda: max(sub.good().get(("plc", "t0"), [0])) > top + 5)
        before = rejected(plant.rx_counters(), STALE_REASONS)
        for d in clip:
            relay.send(d)
        replayed += len(clip)
        # The live stream's surplus repair symbols are "late" too: at least, not exactly.
        await _rejections_grow(plant, before, len(clip), STALE_REASONS, exact=False)
        # (c) after a transmitter restart: the whole first epoch, played back
        old_epoch = _epoch(plant)
        first_run = await plant.stop_tx()
        epoch_one = list(relay.capture)
        plant.sources = second
        await plant.start_tx()
        new_epoch = _epoch(plant)
        await wait_until(lambda: sub.last_status().get("epoch") == new_epoch, what="new epoch")
        before = rejected(plant.rx_counters(), REPLAY_REASONS)
        for d in epoch_one:
            relay.send(d)
        replayed += len(epoch_one)
        # Steered in the kernel with the live stream's late copies: at least, not exactly.
        await _rejections_grow(plant, before, len(epoch_one), REPLAY_REASONS, exact=False)
        await asyncio.sleep(1.0)
        second_run = await _finish(plant, sub)
        rx = plant.rx_counters()
        plant.rx_memory()
        sent = synthetic_sent(first, {"plc": first_run["poll_generated"]})
        sent |= synthetic_sent(second, {"plc2": second_run["poll_generated"]})
        ref = reference(plant, epoch_one, epoch=old_epoch)
        t, _, _ = exact_accounting(plant, sub, sent, ref)
        result.sent = first_run["poll_generated"] + second_run["poll_generated"]
        result.published, result.lost = t.published, t.missing
        result.reported_lost, result.rejected = rx.get("records_lost", 0), rejected(rx)
        result.peak_rx_mb = _mb(plant.rx_peak_kb)
        result.note(
            f"{replayed} captured datagrams replayed in 3 rounds, every one rejected "
            f"(late/replay); values lost during the receiver restart: {t.missing}, "
            f"each inside a reported gap"
        )
        assert t.duplicates == 0
        assert t.out_of_order == 0
        assert old_epoch < new_epoch
        return result
    finally:
        sub.close()
        await plant.close()


# --- 6. forgery ------------------------------------------------------------------------------

FORGED_VALUE = 10**12


def _forged_blocks(
    plant: Plant, key: Any, epoch: int, blocks: int, first_seq: int = 0
) -> list[bytes]:
    from diode.config.link import LinkSettings
    from diode.encoder import Encoder
    from diode.records import Sample
    from tests.faults.harness import STREAM

    encoder = Encoder(link=LinkSettings(), key=key, stream_id=STREAM, epoch=epoch)
    encoder._seq = first_seq  # blocks ahead of the receiver's position in a live epoch
    out: list[bytes] = []
    for i in range(blocks):
        encoder.add(Sample(tag_id=1 + i % 50, ts_ns=time.time_ns(), value=FORGED_VALUE + i), 0.0)
        encoder.flush()
        for block in encoder.take():
            out.extend(block.datagrams)
    return out


async def forgery(tmp: Path, broker: Mosquitto, *, seed: int = SEED) -> Result:
    """Blocks signed with another key, and with the real key id but a bad signature."""
    from diode.keys import SigningKey

    result = Result("6. forgery (other key; real key id, bad signature)", seed=seed)
    plant = Plant(tmp, broker, COUNTER)
    sub = Subscriber(broker.port)

    async def attack() -> None:
        assert plant.relay is not None
        await asyncio.sleep(1.5)
        epoch = _epoch(plant)
        other = _forged_blocks(plant, SigningKey.generate(), epoch + 1, 200)
        liar = SigningKey.generate()
        # A forger knows the real key id (it is public): the signature is what fails.
        object.__setattr__(liar, "key_id", plant.signing_key().key_id)
        newer = _forged_blocks(plant, liar, epoch + 1, 200)
        before = plant.rx_counters()
        for d in other + newer:
            plant.relay.send(d)
            await asyncio.sleep(0)
        await _rejections_grow(
            plant, rejected(before, ("unknown_key",)), len(other), ("unknown_key",)
        )
        # A newer epoch is outside the window: each datagram (a whole k = 1 block) is
        # verified within the budget, or refused by it; the block's other datagrams, which
        # rebuild the same forged block, are refused by the failure memory (known_forgery).
        outside = ("bad_signature", "verify_budget", "known_forgery")
        await _rejections_grow(plant, rejected(before, outside), len(newer), outside)
        # Ahead in the live epoch, within a second or two of the real stream's position.
        seq = plant.rx_counters().get("blocks_delivered", 0)
        ahead = _forged_blocks(plant, liar, epoch, 200, first_seq=seq + 50)
        before = plant.rx_counters()
        for d in ahead:
            plant.relay.send(d)
            await asyncio.sleep(0)
        # Ahead in the window: the blocks wait for their turn (2 per seq kept, the rest
        # waiting_full), then fail their verify or find their seq delivered (late; the live
        # stream's surplus repair symbols are late too: at least, not exactly).
        inside = ("waiting_full", "bad_signature", "late")
        await _rejections_grow(plant, rejected(before, inside), len(ahead), inside, exact=False)
        result.note(
            f"{len(other)} datagrams under another key -> rejected_unknown_key; "
            f"{len(newer)} under the real key id with a bad signature in a newer epoch -> "
            f"bad_signature, verify_budget or known_forgery; {len(ahead)} ahead in the live "
            "epoch -> "
            f"waiting_full, then bad_signature or late at their turn"
        )
        await asyncio.sleep(1.0)

    try:
        _, _rx = await _counted_run(plant, sub, result, 0, during=attack)
        t = tally(sub.good(), synthetic_sent(COUNTER, {"plc": result.sent}))
        result.published, result.lost = t.published, t.missing
        forged = [v for vs in sub.good().values() for v in vs if v >= FORGED_VALUE]
        assert not forged, f"{len(forged)} forged values published"
        assert t.duplicates == 0
        assert t.out_of_order == 0
        assert t.missing == 0
        assert t.published == result.sent
        return result
    finally:
        sub.close()
        await plant.close()


# --- 7. flood: tests/faults/attack.py ------------------------------------------------------


# --- 8. broker outage and broker restart --------------------------------------------------

OUTAGE_S = 30.0


async def _reconnected(plant: Plant, reconnects: int, within: float = 60.0) -> float:
    """The receiver is connected again (its ``reconnects``-th time) and its spool is empty."""

    def done() -> bool:
        c = plant.rx_counters()
        return (
            c.get("mqtt_reconnects") == reconnects
            and c.get("mqtt_connected") == 1
            and c.get("mqtt_spool_depth") == 0
        )

    return await wait_until(done, within=within, step=0.1, what=f"reconnect {reconnects}, spool 0")


async def _spooling(plant: Plant, depth: int = 1) -> None:
    await wait_until(
        lambda: (
            (c := plant.rx_counters()).get("mqtt_connected") == 0
            and c.get("mqtt_spool_depth", 0) >= depth
        ),
        what="receiver spooling",
    )


async def broker_outage(
    tmp: Path, broker: Mosquitto, *, outage_s: float = OUTAGE_S, seed: int = SEED
) -> Result:
    """The broker away for ``outage_s``, then restarted: nothing lost, order per tag kept.

    The subscriber has a persistent session (QoS 1) and the broker persistence
    on, so the broker keeps the subscription and what it queued for it across
    its own restart. QoS 1 is at-least-once: a value may arrive twice across a
    reconnection; published counts first arrivals, duplicates are noted.
    """
    result = Result(f"8. broker outage {outage_s:.0f} s + broker restart", seed=seed)
    await asyncio.to_thread(persist_broker, broker)
    plant = Plant(tmp, broker, COUNTER)
    sub = Subscriber(broker.port, session="faults-8")
    fig: dict[str, float] = {}

    async def outages() -> None:
        await wait_until(lambda: sub.count_good() > 1000, what="values flowing")
        # (a) the broker away for outage_s: the receiver spools
        await asyncio.to_thread(broker.stop)
        down = time.monotonic()
        await _spooling(plant)
        while time.monotonic() - down < outage_s:
            await asyncio.sleep(0.5)
            plant.rx_memory()
        fig["spooled"] = plant.rx_counters()["mqtt_spool_depth"]
        await asyncio.to_thread(broker.start)
        fig["drain_s"] = await _reconnected(plant, 1)
        fig["sub_after_a"] = sub.count_good()
        # (b) a plain restart (SIGTERM, start again at once)
        await asyncio.to_thread(broker.restart)
        fig["restart_s"] = await _reconnected(plant, 2)
        await wait_until(
            lambda: sub.count_good() > fig["sub_after_a"] + 2000, what="values after restart"
        )

    try:
        _, rx = await _counted_run(plant, sub, result, 0, during=outages)
        t = _tallied(result, sub, COUNTER)
        result.note(
            f"{fig['spooled']:.0f} messages spooled during the {outage_s:.0f} s outage, "
            f"delivered {fig['drain_s']:.1f} s after the broker came back; after the restart, "
            f"reconnected and spool empty in {fig['restart_s']:.1f} s; subscriber session "
            f"resumed {sub.sessions_resumed} times; {t.duplicates} values delivered twice "
            f"(QoS 1 across a reconnection), first arrivals in order; "
            f"spool dropped {rx.get('mqtt_spool_dropped', 0)}, "
            f"expired {rx.get('mqtt_spool_expired', 0)}"
        )
        assert sub.sessions_resumed == 2, "the subscriber's session did not survive"
        assert fig["spooled"] > outage_s * 1000, "the receiver did not spool the outage"
        assert rx.get("mqtt_reconnects") == 2
        assert rx.get("mqtt_spool_dropped", 0) == 0
        assert rx.get("mqtt_spool_expired", 0) == 0
        assert t.out_of_order == 0, f"{t.out_of_order} values out of order"
        t.assert_none_missing()
        assert result.published == result.sent
        assert result.reported_lost == 0
        return result
    finally:
        sub.close()
        await plant.close()


# --- 9. receiver SIGKILL and restart --------------------------------------------------------

DEAD_S = 2.0
# The MQTT path after the router: the spool ahead of new values, the broker, the subscriber.
DELIVERY_S = 0.25


def plant_catalogue_s(plant: Plant) -> float:
    return float(plant.tx_section.get("catalogue_period_s", 1.0))


def _log_ns(timestamp: str) -> int:
    """A structlog ISO timestamp (UTC, microseconds) as wall-clock ns."""
    from datetime import datetime

    return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1e6) * 1000


def block_spans(capture: list[bytes]) -> dict[tuple[int, int], tuple[int, int]]:
    """(epoch, seq) -> indexes of its first and last datagram in a capture."""
    from diode.wire import parse_datagram

    spans: dict[tuple[int, int], tuple[int, int]] = {}
    for i, datagram in enumerate(capture):
        header, _ = parse_datagram(datagram)
        key = (header.epoch, header.seq)
        first, _ = spans.get(key, (i, i))
        spans[key] = (first, i)
    return spans


async def receiver_kill(tmp: Path, broker: Mosquitto, *, seed: int = SEED) -> Result:
    """SIGKILL the receiver while it spools (broker down), restart both.

    It resumes within one catalogue period; the one gap it reports is exactly
    the blocks that went by while it was dead (from the position it had saved
    to the first block the new process got), with their exact record count;
    every value in the spool it left is delivered.
    """
    result = Result("9. receiver SIGKILL + restart (while spooling)", seed=seed)
    await asyncio.to_thread(persist_broker, broker)
    plant = Plant(tmp, broker, COUNTER, capture=True)
    sub = Subscriber(broker.port, session="faults-9")
    spool_path = tmp / "rx-state" / "spool.sqlite"
    fig: dict[str, Any] = {}

    async def crash() -> None:
        relay = plant.relay
        assert relay is not None
        await wait_until(lambda: sub.count_good() > 1000, what="values flowing")
        await asyncio.to_thread(broker.stop)
        await _spooling(plant, depth=1000)
        fig["killed_at"] = len(relay.capture)
        plant.kill_rx()
        fig["rows"] = spooled(spool_path)
        fig["position"] = saved_position(plant)
        fig["top"] = {tag: max(ns, default=0) for tag, ns in sub.good().items()}
        await asyncio.sleep(DEAD_S)  # the fault: nobody listening for DEAD_S
        await asyncio.to_thread(broker.start)
        fig["bound_at"] = len(relay.capture)
        await plant.start_rx()
        fig["ready_ns"] = time.time_ns()
        fig["ready_at"] = len(relay.capture)
        spool_top = {}
        for device, tag, n in spooled_values(fig["rows"]):
            spool_top[device, tag] = max(n, spool_top.get((device, tag), 0))
        fig["spool_top"] = spool_top
        tags = {(d, t) for d, t in fig["top"]} | set(spool_top)
        fig["tags"] = tags

        def flowing() -> bool:
            good = sub.good()
            return all(
                max(good.get(tag, [0])) > max(fig["top"].get(tag, 0), spool_top.get(tag, 0))
                for tag in tags
            )

        await wait_until(flowing, within=15, what="new values on every tag")
        await wait_until(
            lambda: any(s.get("recent_gaps") for s in list(sub.status)),
            within=15,
            what="$status with the gap",
        )
        await asyncio.sleep(1.0)

    try:
        _, rx = await _counted_run(plant, sub, result, 0, during=crash)
        assert plant.relay is not None
        assert plant.rx is not None
        capture = plant.relay.capture
        ref = reference(plant, capture)
        sent = synthetic_sent(COUNTER, {"plc": result.sent})
        t, lost_records, lost_samples = exact_accounting(plant, sub, sent, ref)
        result.published, result.lost = t.published, t.missing
        gaps = plant.gaps()
        position = fig["position"]
        assert len(gaps) == 1, f"one gap expected: {gaps}"
        gap = gaps[0]
        first, last = gap["first_block"], gap["last_block"]
        # The gap starts where the killed receiver's saved position says it was...
        assert gap["exact"]
        assert gap["epoch"] == position.epoch
        assert first == position.next_seq
        # ... its count is exact (the reference decoding of everything sent) ...
        assert gap["records_lost"] == lost_records == ref.records_in(first, last)
        assert gap["records_lost"] == ref.blocks[last + 1][0] - position.next_record
        assert result.reported_lost == gap["records_lost"]
        # ... and its blocks are the ones that went by while nobody listened: every block
        # wholly forwarded between the kill and the new socket is in it, none forwarded
        # after the new receiver was up is.
        spans = {seq: span for (epoch, seq), span in block_spans(capture).items()}
        killed_at, bound_at, ready_at = fig["killed_at"], fig["bound_at"], fig["ready_at"]
        dead = {seq for seq, (a, b) in spans.items() if killed_at <= a and b < bound_at}
        in_gap = set(range(first, last + 1))
        assert dead <= in_gap, f"blocks sent while dead, not reported: {sorted(dead - in_gap)}"
        late = {seq for seq in in_gap if spans[seq][0] >= ready_at}
        assert not late, f"blocks sent after the restart reported lost: {sorted(late)}"
        before_kill = sorted(seq for seq in in_gap if spans[seq][0] < killed_at)
        # $status says the same
        statuses = [g for s in list(sub.status) for g in s.get("recent_gaps", [])]
        keys = ("epoch", "first_block", "last_block", "records_lost", "exact")
        assert {k: gap[k] for k in keys} in statuses, f"{gap} not in $status {statuses}"
        # The spool the killed receiver left: every value in it delivered.
        rows = fig["rows"]
        values = spooled_values(rows)
        delivered = {(d, tg, n) for (d, tg), ns in sub.good().items() for n in ns}
        assert values, "nothing was spooled at the kill"
        assert values <= delivered, f"{len(values - delivered)} spooled values never delivered"
        from_before = plant.rx.events("mqtt spool has messages from before")
        assert from_before
        assert from_before[-1]["spool_depth"] == len(rows)
        assert rx.get("mqtt_spool_depth") == 0
        # Resumed within one catalogue period: after the gap is declared (the decoder is back
        # in step), samples wait in the router for their tag's catalogue entry, at most one
        # carousel; measured to each tag's first new value on MQTT.
        top, spool_top = fig["top"], fig["spool_top"]
        firsts = []
        for tag in fig["tags"]:
            edge = max(top.get(tag, 0), spool_top.get(tag, 0))
            firsts.append(
                min(
                    s.at_ns
                    for s in sub.seen(*tag)
                    if s.quality == "good" and (sample_number(s.value) or 0) > edge
                )
            )
        declared_ns = _log_ns(gap["timestamp"])
        from_up = (max(firsts) - fig["ready_ns"]) / 1e9
        from_gap = (max(firsts) - declared_ns) / 1e9
        catalogue_s = plant_catalogue_s(plant)
        wholly_dead = sorted(seq for seq in in_gap if killed_at <= spans[seq][0] < bound_at)
        starting = sorted(seq for seq in in_gap if bound_at <= spans[seq][0] < ready_at)
        result.published = t.published - t.duplicates
        result.note(
            f"killed with {len(rows)} messages in its spool ({len(values)} values), all "
            f"delivered after the restart; dead {DEAD_S:.0f} s; one gap, blocks {first}-{last} "
            f"({last - first + 1} blocks, {gap['records_lost']} records, {len(lost_samples)} "
            f"samples), the same in the log, the counters and $status; of its blocks "
            f"{len(before_kill)} were sent before the kill (unread by the dying receiver), "
            f"{len(wholly_dead)} between the kill and the restart, {len(starting)} while the "
            f"new process started, none after it was up; every tag's first new value on MQTT "
            f"{from_gap:.2f} s after the gap was declared ({from_up:.2f} s after the receiver "
            f"was up; catalogue period {catalogue_s:.0f} s); {t.duplicates} values delivered "
            f"twice (QoS 1 across the broker restart), first arrivals in order"
        )
        assert from_gap <= catalogue_s + DELIVERY_S, f"resumed {from_gap:.2f} s after the gap"
        assert t.out_of_order == 0
        return result
    finally:
        sub.close()
        await plant.close()


# --- 10. transmitter SIGKILL and restart ----------------------------------------------------


Counts = dict[tuple[str, str], list[int]]


def split_runs(good: Counts) -> tuple[Counts, Counts]:
    """Each tag's values of the first run and of the second (counting from 1 again)."""
    first: Counts = {}
    second: Counts = {}
    for tag, values in good.items():
        cut = next((i for i in range(1, len(values)) if values[i] <= values[i - 1]), len(values))
        first[tag], second[tag] = values[:cut], values[cut:]
    return first, second


async def transmitter_kill(tmp: Path, broker: Mosquitto, *, seed: int = SEED) -> Result:
    """SIGKILL diode-tx, restart it with the same config.

    The receiver takes the new epoch; the killed run's datagrams played back are
    all rejected as ``replay``; values flow again (the restarted synthetic source
    counts from 1, on the same topics). What the killed transmitter had sent is
    published exactly (its capture, decoded); what it had not sent died with it,
    unnumbered, so there is nothing for the receiver to report.
    """
    result = Result("10. transmitter SIGKILL + restart", seed=seed)
    plant = Plant(tmp, broker, COUNTER, capture=True)
    sub = Subscriber(broker.port)
    fig: dict[str, Any] = {}

    async def crash() -> None:
        relay = plant.relay
        assert relay is not None
        assert plant.rx is not None
        await wait_until(lambda: sub.count_good() > 4000, what="values flowing")
        old_epoch = _epoch(plant)
        plant.kill_tx()
        await wait_until(settled(lambda: len(relay.capture), 0.3), what="capture complete")
        epoch_one = list(relay.capture)
        await asyncio.sleep(1.0)  # the fault: no transmitter for a second
        restarted_ns = time.time_ns()
        await plant.start_tx()
        new_epoch = _epoch(plant)
        await wait_until(lambda: sub.last_status().get("epoch") == new_epoch, what="new epoch")
        rx_epochs = plant.rx.events("transmitter epoch")
        assert rx_epochs[-1]["epoch"] == new_epoch
        assert rx_epochs[-1]["previous"] == old_epoch
        # Values flow again: every tag has a value of the second run.
        await wait_until(
            lambda: all(split_runs(sub.good())[1].get(("plc", f"t{i}")) for i in range(50)),
            what="second run's values on every tag",
        )
        before = rejected(plant.rx_counters(), REPLAY_REASONS)
        for d in epoch_one:
            relay.send(d)
        # Steered in the kernel with the live stream's late copies: at least, not exactly.
        await _rejections_grow(plant, before, len(epoch_one), REPLAY_REASONS, exact=False)
        fig.update(old=old_epoch, new=new_epoch, epoch_one=epoch_one, restarted_ns=restarted_ns)
        await asyncio.sleep(1.0)

    try:
        counters, rx = await _counted_run(plant, sub, result, 0, during=crash)
        epoch_one: list[bytes] = fig["epoch_one"]
        ref = reference(plant, epoch_one, epoch=fig["old"])
        sent_one: Counts = {}
        for device, tag, n in sorted(ref.samples_in(min(ref.blocks), max(ref.blocks))):
            sent_one.setdefault((device, tag), []).append(n)
        first, second = split_runs(sub.good())
        assert first == sent_one, "the killed run's values on MQTT differ from what it sent"
        t = tally(second, synthetic_sent(COUNTER, {"plc": counters["poll_generated"]}))
        one = sum(len(v) for v in sent_one.values())
        result.sent = one + counters["poll_generated"]
        result.published = t.published + sum(len(v) for v in first.values())
        result.lost = t.missing
        arrivals = [
            s.at_ns
            for tag in second
            for s in sub.seen(*tag)
            if s.at_ns >= fig["restarted_ns"] and s.quality == "good" and s.value == 1
        ]
        flow_s = (min(arrivals) - fig["restarted_ns"]) / 1e9
        gaps = plant.gaps()
        result.note(
            f"epoch {fig['old']} -> {fig['new']} (receiver log and $status); the killed run "
            f"sent {len(ref.blocks)} blocks, {one} values, all published exactly; its "
            f"{len(epoch_one)} datagrams played back after the restart: all rejected (replay, "
            "or steered to a quarantine in the kernel); "
            f"first value of the new run on MQTT {flow_s:.2f} s after diode-tx was started; "
            f"gaps reported {len(gaps)}"
        )
        assert fig["old"] < fig["new"]
        assert not [g for g in gaps if g["exact"]], gaps
        assert t.duplicates == 0
        assert t.out_of_order == 0
        assert t.missing == 0
        assert rx.get("records_lost", 0) == 0 or all(not g["exact"] for g in gaps)
        return result
    finally:
        sub.close()
        await plant.close()


# --- 11. PLC faults ---------------------------------------------------------------------------

POLL_S = 0.5
# Back to good once the PLC is: the reconnect backoff (at most 1 s here), a session, a poll.
RECOVER_S = 5.0
UNITS = {1: 101, 2: 202, 3: 303}  # unit id -> the value its one register holds


def _plc_config(modbus_port: int, opcua_endpoint: str) -> dict[str, Any]:
    from tests.support.opcua_server import node_id

    return {
        "modbus": {
            "devices": [
                {
                    "name": "mb",
                    "host": "127.0.0.1",
                    "port": modbus_port,
                    "poll_interval_s": POLL_S,
                    "timeout_s": 0.2,
                    "retries": 0,
                    "backoff_initial_s": 0.2,
                    "backoff_max_s": 1.0,
                    "units": [
                        {
                            "id": unit,
                            "tags": [
                                {
                                    "name": f"u{unit}",
                                    "table": "holding_register",
                                    "address": 0,
                                    "type": "uint16",
                                }
                            ],
                        }
                        for unit in UNITS
                    ],
                }
            ]
        },
        "opcua": {
            "servers": [
                {
                    "name": "ua",
                    "endpoint": opcua_endpoint,
                    "timeout_s": 1.0,
                    "reconnect_initial_s": 0.2,
                    "reconnect_max_s": 1.0,
                    "nodes": [
                        {
                            "name": "level",
                            "node_id": node_id("Level"),
                            "mode": "poll",
                            "poll_interval_s": POLL_S,
                        },
                        {"name": "temp", "node_id": node_id("Temp"), "mode": "subscribe"},
                    ],
                }
            ]
        },
    }


async def _first(
    sub: Subscriber, tag: tuple[str, str], since_ns: int, quality: str, within: float = 15.0
) -> tuple[float, Any]:
    """Seconds from ``since_ns`` to the first ``quality`` value of ``tag`` on MQTT, and it."""
    await wait_until(
        lambda: sub.first_after(*tag, since_ns, quality) is not None,
        within=within,
        what=f"{quality} {tag}",
    )
    seen = sub.first_after(*tag, since_ns, quality)
    assert seen is not None
    return (seen.at_ns - since_ns) / 1e9, seen


async def plc_faults(tmp: Path, broker: Mosquitto, *, seed: int = SEED) -> Result:
    """A Modbus unit that stops answering, one that answers exceptions, the whole Modbus
    server stopped, an OPC UA server restart: BAD within two poll intervals, then good
    values again, by themselves, when the PLC is back.
    """
    from tests.support.modbus_server import ModbusSimServer
    from tests.support.opcua_server import OpcuaTestServer

    result = Result("11. PLC faults (Modbus dead/exception/stop, OPC UA restart)", seed=seed)
    modbus = ModbusSimServer(units=list(UNITS), size=16)
    opcua = OpcuaTestServer()
    await modbus.start()
    await opcua.start()
    for unit, value in UNITS.items():
        modbus.set_registers(unit, "holding_register", 0, [value])
    await opcua.set("Level", 4.25)
    plant = Plant(tmp, broker, [], plc=_plc_config(modbus.port, opcua.endpoint))
    sub = Subscriber(broker.port)
    faults: list[tuple[str, float, str, float]] = []  # what, to BAD, reason, to good again

    async def fault(
        what: str, good: dict[tuple[str, str], Any], start: Any, stop: Any, reason: str
    ) -> None:
        """Every tag in ``good`` BAD with ``reason`` within two polls, then ``good`` again."""
        began = time.time_ns()
        await start()
        to_bad = 0.0
        for tag in good:
            took, bad = await _first(sub, tag, began, "bad")
            assert bad.reason == reason, (tag, bad)
            assert took <= 2 * POLL_S, f"{what}: {tag} BAD after {took:.2f} s"
            to_bad = max(to_bad, took)
        looking = time.time_ns()
        await stop()
        back_at = time.time_ns()  # the PLC is back: the server serves again
        to_good = 0.0
        for tag, value in good.items():
            took, back = await _first(sub, tag, looking, "good")
            assert back.value == value, (tag, back)
            to_good = max(to_good, took - (back_at - looking) / 1e9)
        assert to_good <= RECOVER_S, f"{what}: good again after {to_good:.2f} s"
        faults.append((what, to_bad, reason, max(to_good, 0.0)))

    async def dead(on: bool) -> None:
        (modbus.dead.add if on else modbus.dead.discard)(2)

    async def exception(on: bool) -> None:
        if on:
            modbus.exception[3] = 4
        else:
            del modbus.exception[3]

    async def scenario() -> None:
        for tag in [("mb", "u1"), ("mb", "u2"), ("mb", "u3"), ("ua", "level"), ("ua", "temp")]:
            await _first(sub, tag, 0, "good")
        # A unit that stops answering; the unit beside it goes on.
        healthy = time.time_ns()
        await fault(
            "Modbus unit 2 stops answering",
            {("mb", "u2"): UNITS[2]},
            lambda: dead(True),
            lambda: dead(False),
            "timeout",
        )
        modbus.set_registers(1, "holding_register", 0, [111])
        await wait_until(
            lambda: any(s.value == 111 for s in sub.seen("mb", "u1")), what="unit 1 updates"
        )
        assert all(s.quality == "good" for s in sub.seen("mb", "u1") if s.at_ns >= healthy)
        await fault(
            "Modbus unit 3 answers exception 4",
            {("mb", "u3"): UNITS[3]},
            lambda: exception(True),
            lambda: exception(False),
            "exception 4 (server device failure)",
        )
        await fault(
            "Modbus server stopped (the whole PLC)",
            {("mb", "u1"): 111, ("mb", "u2"): UNITS[2], ("mb", "u3"): UNITS[3]},
            modbus.stop,
            modbus.start,
            "disconnected",
        )
        # A restarted OPC UA server starts from its initial values (Level 1.5, Temp 20.0).
        await fault(
            "OPC UA server restart (a polled and a subscribed node)",
            {("ua", "level"): 1.5, ("ua", "temp"): 20.0},
            opcua.stop,
            opcua.start,
            "disconnected",
        )
        # The subscribed node came back too, and follows changes.
        await opcua.set("Temp", 31.5)
        await wait_until(
            lambda: any(s.value == 31.5 for s in sub.seen("ua", "temp")), what="temp updates"
        )
        await asyncio.sleep(1.0)

    try:
        counters, _rx = await _counted_run(plant, sub, result, 0, during=scenario)
        result.sent = counters["samples_queued"]
        with sub.lock:
            published = [s for seen in sub.values.values() for s in seen if s.quality != "stale"]
        result.published = len(published)
        result.lost = result.sent - result.published
        for what, to_bad, reason, to_good in faults:
            result.note(
                f"{what}: BAD ({reason}) on MQTT {to_bad:.2f} s after the fault, good again "
                f"{to_good:.2f} s after the PLC was back"
            )
        result.note(
            f"poll interval {POLL_S} s; every sample the transmitter queued (good and bad) "
            f"published once: {result.published}"
        )
        assert result.published == result.sent, f"{result.published} of {result.sent}"
        assert result.reported_lost == 0
        return result
    finally:
        sub.close()
        await plant.close()
        await modbus.stop()
        await opcua.stop()


# --- a bug scenario 9 led to: SIGKILL while the MQTT output is behind --------------------------

BUSY = [{"name": "plc", "tags": 50, "rate_hz": 20_000.0, "batch_ms": 20.0}]


async def receiver_kill_publishing(tmp: Path, broker: Mosquitto, *, seed: int = SEED) -> Result:
    """SIGKILL the receiver while the broker is up but slower than the link (per-tag QoS 1
    at 20 000 samples/s): whatever is missing on MQTT must be inside a reported gap.

    It failed while the MQTT output kept messages in memory behind a position
    already saved; messages and positions are now committed together.
    """
    result = Result("9b. receiver SIGKILL while publishing (broker up, behind)", seed=seed)
    plant = Plant(tmp, broker, BUSY, capture=True)
    sub = Subscriber(broker.port)

    async def crash() -> None:
        await wait_until(lambda: sub.count_good() > 20_000, what="values flowing")
        result.note(f"receiver counters at the kill: {plant.rx_counters()}")
        plant.kill_rx()
        await asyncio.sleep(1.0)
        await plant.start_rx()
        await wait_until(lambda: bool(plant.gaps()), what="the gap")
        await asyncio.sleep(1.0)

    try:
        await _counted_run(plant, sub, result, 0, during=crash)
        assert plant.relay is not None
        ref = reference(plant, plant.relay.capture)
        sent = synthetic_sent(BUSY, {"plc": result.sent})
        t, _, _ = exact_accounting(plant, sub, sent, ref)
        result.published, result.lost = t.published - t.duplicates, t.missing
        return result
    finally:
        sub.close()
        await plant.close()

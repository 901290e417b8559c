"""No field a user reads moves because of a forged datagram, except the rejection counters.

One test per field: a receiver core (Decoder + Router, both sans I/O) follows
a real stream, then takes every kind of forgery in tests/faults/forgeries.py
plus forged header hints (records, an epoch far ahead, a seq far ahead); the
field must read the same afterwards. The router publishes to a recorder
(nothing else is needed to read its status).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from functools import cache
from typing import Any

import pytest

from diode.config.mqtt import StreamOutput
from diode.decoder import Decoder, LinkProfile
from diode.keys import SigningKey
from diode.records import DeviceInfo, Heartbeat, Record, Sample, TagInfo, ValueType
from receiver.router import Router
from tests.core_support import (
    EPOCH,
    STREAM,
    encode_blocks,
    fixed_key,
    keyring,
    samples,
    small_link,
    with_valid_crc,
)
from tests.faults import forgeries

LINK = small_link()
PSK = bytes(range(32))


class Recorder:
    def __init__(self) -> None:
        self.samples: list[tuple[TagInfo, Sample]] = []
        self.inventory: list[DeviceInfo] = []
        self.meta: list[TagInfo] = []
        self.status: dict[str, Any] = {}

    def publish_samples(
        self, stream: StreamOutput, items: Sequence[tuple[TagInfo, Sample]]
    ) -> None:
        self.samples.extend(items)

    def publish_inventory(self, stream: StreamOutput, info: DeviceInfo) -> None:
        self.inventory.append(info)

    def publish_meta(self, stream: StreamOutput, info: TagInfo) -> None:
        self.meta.append(info)

    def publish_status(self, stream: StreamOutput, status: dict[str, Any]) -> None:
        self.status = status


def _real() -> list[Record]:
    catalogue = [
        TagInfo(tag_id=i, name=f"t{i}", device="d", value_type=ValueType.FLOAT64) for i in range(50)
    ]
    return [*catalogue, Heartbeat(ts_ns=1, counters={"sent": 1}), *samples(200)]


def _forgeries(gated: bool, capture: list[bytes]) -> list[bytes]:
    target = forgeries.Target(
        stream_id=STREAM,
        key_id=fixed_key().key_id,
        epoch=EPOCH,
        seq=0,
        datagram_size=LINK.datagram_size,
        fec=LINK.fec,
        gated=gated,
        window=40,
    )
    rng = random.Random(5)
    out: list[bytes] = []
    for maker in forgeries.MAKERS.values():
        out.extend(itertools.islice(maker(target, rng), 300))
    out.extend(capture)  # replays of every authentic datagram
    # Forged hints: a real datagram's header rewritten (CRC fixed; a gated one fails its tag).
    liar = SigningKey.generate()
    object.__setattr__(liar, "key_id", fixed_key().key_id)
    (forged,) = encode_blocks(samples(3), key=liar, link=LINK)
    for d in forged:
        out.append(with_valid_crc(d, 40, (2**32 - 1).to_bytes(4, "big")))  # records hint
        out.append(with_valid_crc(d, 16, (EPOCH + 10**9).to_bytes(8, "big")))  # epoch ahead
        out.append(with_valid_crc(d, 24, (2**40).to_bytes(8, "big")))  # seq far ahead
    for epoch in (EPOCH + 1, EPOCH + 2):  # the pair across an epoch change
        (block,) = encode_blocks(samples(3), key=liar, link=LINK, epoch=epoch)
        out.append(block[-1])
    return out


def _snapshot(decoder: Decoder, router: Router, output: Recorder) -> dict[str, Any]:
    status = router.status(router.streams[STREAM], now=100.0)
    snap: dict[str, Any] = {
        f"status.{k}": v for k, v in status.items() if k not in ("counters", "rejected")
    }
    snap.update({f"status.counters.{k}": v for k, v in status["counters"].items()})
    snap.update({f"decoder.{k}": decoder.counters[k] for k in STREAM_COUNTERS})
    position = decoder.positions().get(STREAM)
    snap["decoder.position"] = (
        None if position is None else (position.epoch, position.next_seq, position.next_record)
    )
    snap["published.samples"] = len(output.samples)
    snap["published.inventory"] = len(output.inventory)
    snap["published.meta"] = len(output.meta)
    return snap


STREAM_COUNTERS = (
    "blocks_delivered",
    "records_delivered",
    "records_lost",
    "blocks_lost",
    "blocks_rebuilt",
    "blocks_whole",
    "records_lost_estimated",
    "blocks_lost_estimated",
    "verifies_saved",  # a block of a group verified already: authentic by that verify
)


@cache
def _run(gated: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    psk = PSK if gated else None
    decoder = Decoder(
        keyring(fixed_key(), psk=psk),
        profiles={STREAM: LinkProfile.of(LINK.datagram_size, LINK.fec)},
    )
    output = Recorder()
    router = Router({STREAM: StreamOutput()}, output)
    capture = [d for b in encode_blocks(_real(), link=LINK, psk=psk, per_block=20) for d in b]
    for d in capture:
        decoder.receive(d, 1.0)
    decoder.poll(2.0)
    router.handle(decoder.events(), 2.0)
    before = _snapshot(decoder, router, output)
    intake = dict(decoder.counters)
    for i, d in enumerate(_forgeries(gated, capture)):
        decoder.receive(d, 3.0 + i * 1e-4)
    decoder.poll(50.0)
    router.handle(decoder.events(), 50.0)
    router.tick(2.5)  # the link-timeout check, at a time the heartbeat is still recent
    after = _snapshot(decoder, router, output)
    moved = {k: v - intake.get(k, 0) for k, v in decoder.counters.items() if v != intake.get(k, 0)}
    return before, after, moved


FIELDS = sorted(
    _snapshot(
        Decoder(keyring(fixed_key())), Router({STREAM: StreamOutput()}, Recorder()), Recorder()
    )
)


@pytest.mark.parametrize("gated", [False, True], ids=["no secret", "link secret"])
@pytest.mark.parametrize("field", FIELDS)
def test_a_forged_datagram_moves_no_field(field: str, gated: bool) -> None:
    before, after, _ = _run(gated)
    assert before["decoder.records_delivered"] > 0, "the real stream must have flowed"
    assert after[field] == before[field]


@pytest.mark.parametrize("gated", [False, True], ids=["no secret", "link secret"])
def test_only_intake_and_rejection_counters_moved(gated: bool) -> None:
    _, _, moved = _run(gated)
    intake = {
        "datagrams",
        "symbols",
        "assemblies_evicted",
        "assemblies_expired",
        "assemblies_passed",
        "verifies",
    }
    assert set(moved) - intake == {k for k in moved if k.startswith("rejected_")}
    assert sum(v for k, v in moved.items() if k.startswith("rejected_")) > 0
    if gated:
        assert "symbols" not in moved, "with a link secret nothing forged reaches an assembly"


@pytest.mark.parametrize("gated", [False, True], ids=["no secret", "link secret"])
def test_a_batch_is_judged_as_its_datagrams_one_by_one(gated: bool) -> None:
    """``receive_all`` (what the receiver's drain hands a read to) takes, rejects and counts
    exactly as ``receive`` datagram by datagram: the real stream with every kind of forgery
    between its datagrams, in batches of a read's size."""
    psk = PSK if gated else None
    capture = [d for b in encode_blocks(_real(), link=LINK, psk=psk, per_block=20) for d in b]
    forged = _forgeries(gated, capture[:40])
    mixed = [d for pair in itertools.zip_longest(capture, forged) for d in pair if d is not None]

    def new() -> Decoder:
        return Decoder(
            keyring(fixed_key(), psk=psk),
            profiles={STREAM: LinkProfile.of(LINK.datagram_size, LINK.fec)},
        )

    one, batched = new(), new()
    singly = [one.receive(d, 1.0) for d in mixed]
    in_batches = [
        t for i in range(0, len(mixed), 64) for t in batched.receive_all(mixed[i : i + 64], 1.0)
    ]
    assert in_batches == singly
    assert True in singly
    assert False in singly
    assert batched.counters == one.counters
    assert batched.events() == one.events()
    assert one.counters["records_delivered"] == len(_real())

"""Wire generation 3: one Ed25519 signature per group of blocks, each block verifiable alone.

A golden group of 4, the verify counted (one per group, one per forged group, ever),
and every way a block could try to ride on a group's verified signature refused:
another block's bytes in a slot, swapped digests, another slot or G, another epoch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from diode import encoder as encoder_module
from diode import fec
from diode.config.link import FecSettings, LinkSettings
from diode.decoder import Decoder
from diode.encoder import Encoder
from diode.keys import SigningKey, TrustedKey
from diode.protocol.verified import VerifiedGroups
from diode.records import Record, Sample
from diode.wire import (
    BLOCK_HEADER_SIZE,
    DIGEST_SIZE,
    GROUP_PREFIX,
    MANIFEST_HEAD,
    SIGNATURE_SIZE,
    BlockHeader,
    code_of,
    group_message,
    pack_block_datagrams,
    parse_block,
    parse_datagram,
)
from tests.core_support import (
    EPOCH,
    STREAM,
    delivered,
    encode_blocks,
    feed,
    fixed_key,
    new_decoder,
    samples,
)

VECTOR = Path(__file__).parent / "vectors" / "group-g3-v3.json"
# Small blocks (k 2 of 208-byte symbols) in groups of 4: a vector a reader can follow.
LINK = LinkSettings(
    datagram_size=256,
    fec=FecSettings(k=2, repair_ratio=0.5, repair_burst=1, group=4, group_repair_burst=1),
)
RECORDS = samples(200)


def group(
    *, epoch: int = EPOCH, key: SigningKey | None = None, start: int = 0
) -> tuple[list[list[bytes]], list[Record]]:
    """The first group of 4 an encoder sends at full rate: each block's datagrams, and the
    records the group holds."""
    encoder = Encoder(link=LINK, key=key or fixed_key(), stream_id=STREAM, epoch=epoch)
    records = samples(200, start)
    for record in records:
        encoder.add(record, 0.0)
        units = encoder.take()
        if units:
            (unit,) = units
            assert unit.blocks == 4
            blocks = [list(unit.datagrams[j :: unit.blocks]) for j in range(unit.blocks)]
            return blocks, records[: unit.records]
    raise AssertionError("no group")


def count_verifies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every Ed25519 verify the receiver runs, counted at the key."""
    calls: list[int] = []
    real = TrustedKey.verify

    def counting(self: TrustedKey, signature: bytes | memoryview, data: bytes | memoryview) -> bool:
        calls.append(1)
        return real(self, signature, data)

    monkeypatch.setattr(TrustedKey, "verify", counting)
    return calls


def rebuilt(datagrams: list[bytes]) -> bytes:
    """The block a block's datagrams carry (its k source symbols, padding cut)."""
    header, _ = parse_datagram(datagrams[0])
    symbols = {parse_datagram(d)[0].index: parse_datagram(d)[1] for d in datagrams}
    padded = fec.decode(symbols, header.k, header.n, code_of(header.generation))
    return padded[: header.block_length]


def reframed(datagrams: list[bytes], block: bytes) -> list[bytes]:
    """The datagrams of ``block`` (as long as the original) under the original's header:
    what a forger who changed bytes inside a block sends (the CRC is no obstacle)."""
    header, _ = parse_datagram(datagrams[0])
    symbol = len(parse_datagram(datagrams[0])[1])
    padded = block + bytes(header.k * symbol - len(block))
    symbols = fec.encode_block(padded, header.k, header.n, symbol, code_of(header.generation))
    return pack_block_datagrams(header, symbols)


def forged(datagrams: list[bytes], change: Callable[[bytearray, int], None]) -> list[bytes]:
    """A block with ``change(block, manifest_offset)`` applied to its bytes, reframed."""
    block = bytearray(rebuilt(datagrams))
    parsed = parse_block(block)
    change(block, len(parsed.signed))
    return reframed(datagrams, bytes(block))


def flat(blocks: list[list[bytes]]) -> list[bytes]:
    return [d for b in blocks for d in b]


# -- the golden group ----------------------------------------------------------------


def test_the_golden_group_encodes_to_the_stored_bytes() -> None:
    blocks, _ = group()
    assert flat(blocks) == [bytes.fromhex(h) for h in json.loads(VECTOR.read_text())["datagrams"]]


def test_the_golden_group_decodes_with_one_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    stored = [bytes.fromhex(h) for h in json.loads(VECTOR.read_text())["datagrams"]]
    _, records = group()
    calls = count_verifies(monkeypatch)
    decoder = new_decoder()
    assert delivered(feed(decoder, stored)) == records
    assert len(calls) == 1
    assert decoder.counters["verifies"] == 1
    assert decoder.counters["verifies_saved"] == 3
    assert decoder.counters["blocks_delivered"] == 4


def test_the_manifest_is_g_its_slot_and_the_others_digests_and_the_signature_is_shared() -> None:
    """Byte by byte, against the layout drawn in diode/wire.py (hashlib, not the codec)."""
    blocks = [rebuilt(b) for b in group()[0]]
    parts = [parse_block(b) for b in blocks]
    digests = [hashlib.sha256(p.signed).digest() for p in parts]
    header = parts[0].header
    message = (
        GROUP_PREFIX
        + hashlib.sha256(
            bytes([3])
            + STREAM.to_bytes(4, "big")
            + header.key_id
            + EPOCH.to_bytes(8, "big")
            + bytes([4])
            + b"".join(digests)
        ).digest()
    )
    assert message == group_message(header, 4, b"".join(digests))
    for i, (block, part) in enumerate(zip(blocks, parts, strict=True)):
        at = len(part.signed)
        assert block[at : at + 2] == bytes([4, i])
        others = b"".join(d for j, d in enumerate(digests) if j != i)
        assert block[at + 2 : at + 2 + 3 * DIGEST_SIZE] == others
        assert len(block) == at + 2 + 3 * DIGEST_SIZE + SIGNATURE_SIZE
        assert block[0] == 3  # the generation, in the signed header
    assert len({bytes(p.signature) for p in parts}) == 1
    fixed_key().private.public_key().verify(bytes(parts[0].signature), message)


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_a_group_in_any_order_costs_one_verify(
    order: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks, records = group()
    calls = count_verifies(monkeypatch)
    decoder = new_decoder()
    assert delivered(feed(decoder, flat([blocks[j] for j in order]))) == records
    assert len(calls) == 1


@pytest.mark.parametrize("slot", range(4))
def test_each_block_of_a_group_verifies_on_its_own(slot: int) -> None:
    """The others lost: the block still carries all it needs (its neighbours' digests)."""
    blocks, _ = group()
    decoder = new_decoder()
    assert len(delivered(feed(decoder, blocks[slot]))) > 0
    assert decoder.counters["verifies"] == 1


def test_a_block_sent_alone_is_a_group_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = Encoder(link=LINK, key=fixed_key(), stream_id=STREAM, epoch=EPOCH)
    for i, record in enumerate(samples(12)):
        encoder.add(record, float(i))  # a trickle: one block each, every one alone
        encoder.poll(float(i) + 1)
    units = encoder.take()
    assert {u.blocks for u in units} == {1}
    manifests = [rebuilt(list(u.datagrams))[-SIGNATURE_SIZE - 2 : -SIGNATURE_SIZE] for u in units]
    assert set(manifests) == {bytes([1, 0])}
    calls = count_verifies(monkeypatch)
    assert len(delivered(feed(new_decoder(), [d for u in units for d in u.datagrams]))) == 12
    assert len(calls) == len(units)


def test_a_receiver_takes_generation_2_then_the_upgraded_transmitters_generation_3() -> None:
    """Receivers upgrade first: the old transmitter's blocks, then the new one's (a restart,
    a new epoch), on one stream."""
    old = encode_blocks(samples(30), generation=2)
    assert {b[0][2] for b in old} == {3}  # the same datagram version as generation 3
    new, records = group(epoch=EPOCH + 60_000)
    decoder = new_decoder()
    events = feed(decoder, flat(old))
    events += feed(decoder, flat(new), now=20.0)
    assert delivered(events) == samples(30) + records
    assert decoder.counters["verifies"] == len(old) + 1


def test_a_new_epochs_group_needs_one_budget_token_and_one_verify() -> None:
    """With a budget of 1 verify a second: a group of a stream not followed yet, then
    the next epoch's group, each gets through on one token and one verify (its first
    block's; the others are in the window once it is authentic). Over budget, the new
    epoch's datagrams are dropped, counted, and come through when a token is back."""
    first, first_records = group()
    later, later_records = group(epoch=EPOCH + 1)
    decoder = new_decoder(verify_budget_per_s=1.0)
    events = feed(decoder, flat(first), now=0.0)
    events += feed(decoder, flat(later), now=0.5)  # half a token: every datagram dropped
    assert decoder.counters["rejected_verify_budget"] == len(flat(later))
    assert delivered(events) == first_records
    events += feed(decoder, flat(later), now=12.0)
    assert delivered(events) == first_records + later_records
    assert decoder.counters["verifies"] == 2
    assert decoder.counters["verifies_saved"] == 6


# -- what may not ride on a verified group ---------------------------------------------


def _group_then(blocks: list[list[bytes]], *extra: list[bytes]) -> Decoder:
    """A decoder that verified the group's block 0, then got ``extra`` blocks."""
    decoder = new_decoder()
    feed(decoder, blocks[0])
    assert decoder.counters["verifies"] == 1
    feed(decoder, flat(list(extra)))
    return decoder


def test_a_block_with_other_bytes_in_its_slot_is_refused_after_its_group_verified() -> None:
    """The cache holds a verified group; a block whose bytes changed (its manifest and
    signature copied from the real one) rebuilds another group and is verified, and fails."""
    blocks, _ = group()

    def payload(block: bytearray, _: int) -> None:
        block[BLOCK_HEADER_SIZE + 3] ^= 0x01

    decoder = _group_then(blocks, forged(blocks[1], payload))
    assert decoder.counters["rejected_bad_signature"] == 1
    assert decoder.counters["verifies_saved"] == 0
    assert decoder.counters["blocks_delivered"] == 1
    feed(decoder, blocks[1])  # the real block 1 is not spoiled by the forgery
    assert decoder.counters["blocks_delivered"] == 2
    assert decoder.counters["verifies_saved"] == 1


def _swap_two_digests(block: bytearray, at: int) -> None:
    first = at + MANIFEST_HEAD.size
    second = first + DIGEST_SIZE
    block[first:second], block[second : second + DIGEST_SIZE] = (
        block[second : second + DIGEST_SIZE],
        block[first:second],
    )


def _slot(slot: int) -> Callable[[bytearray, int], None]:
    def index(block: bytearray, at: int) -> None:
        block[at + 1] = slot

    return index


@pytest.mark.parametrize(
    "change",
    [_swap_two_digests, _slot(0), _slot(2), _slot(3)],
    ids=["swapped digests", "slot 0", "slot 2", "slot 3"],
)
def test_a_block_with_its_manifest_altered_is_refused(
    change: Callable[[bytearray, int], None],
) -> None:
    """Block 1 with its neighbours' digests swapped, or claiming another slot, after its
    group verified: it rebuilds another group, is verified, and fails."""
    blocks, _ = group()
    decoder = _group_then(blocks, forged(blocks[1], change))
    assert decoder.counters["rejected_bad_signature"] == 1
    assert decoder.counters["verifies_saved"] == 0
    assert decoder.counters["blocks_delivered"] == 1


@pytest.mark.parametrize("value", [3, 5, 0])
def test_a_manifest_with_another_g_is_malformed_before_any_verify(value: int) -> None:
    """G sets the manifest's length: another G (or one past 4, or 0) misses the block's."""
    blocks, _ = group()

    def size(block: bytearray, at: int) -> None:
        block[at] = value

    decoder = _group_then(blocks, forged(blocks[1], size))
    assert decoder.counters["rejected_malformed"] > 0
    assert decoder.counters["verifies"] == 1
    assert decoder.counters["blocks_delivered"] == 1


def _next_group() -> list[list[bytes]]:
    """The second group of the same encoder (the same epoch)."""
    encoder = Encoder(link=LINK, key=fixed_key(), stream_id=STREAM, epoch=EPOCH)
    units = []
    for record in RECORDS:
        encoder.add(record, 0.0)
        units += encoder.take()
    return [list(units[1].datagrams[j :: units[1].blocks]) for j in range(4)]


@pytest.mark.parametrize(
    "other", [lambda: group(epoch=EPOCH + 1)[0], _next_group], ids=["next epoch", "next group"]
)
def test_a_block_of_another_group_carrying_a_verified_groups_manifest_is_refused(
    other: Callable[[], list[list[bytes]]],
) -> None:
    """Group A verified (its signature is in the cache); block 1 of another group (of the
    next epoch, or the next group of this one), its own bytes (header, records) with A's
    block 1's manifest and signature, rebuilds another group: verified, and refused."""
    blocks, _ = group()
    real = rebuilt(blocks[1])
    tail = real[len(parse_block(real).signed) :]

    def splice(block: bytearray, at: int) -> None:
        block[at:] = tail

    decoder = _group_then(blocks, forged(other()[1], splice))
    assert decoder.counters["rejected_bad_signature"] == 1
    assert decoder.counters["verifies_saved"] == 0


def test_a_replayed_block_of_a_verified_group_is_late_and_costs_no_verify() -> None:
    blocks, _ = group()
    decoder = new_decoder()
    feed(decoder, flat(blocks))
    feed(decoder, blocks[2])
    assert decoder.counters["verifies"] == 1
    assert decoder.counters["blocks_delivered"] == 4
    assert decoder.counters["rejected_late"] > 0


def test_the_group_header_binds_stream_key_epoch_and_g() -> None:
    header = parse_block(rebuilt(group()[0][0])).header
    digests = bytes(4 * DIGEST_SIZE)
    base = group_message(header, 4, digests)
    fields = {"stream_id": STREAM + 1, "key_id": bytes(8), "epoch": EPOCH + 1}
    for name, value in fields.items():
        other = BlockHeader(**{**_fields(header), name: value})
        assert group_message(other, 4, digests) != base, name
    assert group_message(header, 3, digests) != base


def _fields(header: BlockHeader) -> dict[str, object]:
    return {name: getattr(header, name) for name in BlockHeader.__slots__}


# -- failure memory -------------------------------------------------------------------


def test_a_forged_group_costs_one_verify_ever(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four blocks rebuilding one group under a bad signature: one verify for all four,
    and none when they come again."""
    blocks, _ = group()

    def bad_signature(block: bytearray, _: int) -> None:
        block[-SIGNATURE_SIZE:] = bytes(range(SIGNATURE_SIZE))

    forgeries = [forged(b, bad_signature) for b in blocks]
    calls = count_verifies(monkeypatch)
    decoder = new_decoder()
    feed(decoder, flat(forgeries))
    feed(decoder, flat(forgeries), now=20.0)
    assert len(calls) == 1
    assert decoder.counters["rejected_bad_signature"] == 1
    # Each block twice (its sources, then its repair symbols rebuild it again), twice.
    assert decoder.counters["rejected_known_forgery"] == 4 * 2 * 2 - 1
    assert decoder.counters["blocks_delivered"] == 0


def test_an_authentic_block_whose_records_fail_does_not_take_its_group_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Block 0's first record is one this receiver cannot decode (a kind from a newer
    codec): block 0 is refused (bad_record), its group's signature stays good, and the
    three others are delivered, without a verify more."""
    real = encoder_module.encode_record

    def newer(record: Record) -> bytes:
        first = isinstance(record, Sample) and record.ts_ns == RECORDS[0].ts_ns  # type: ignore[union-attr]
        return b"\x91\x63" if first else real(record)  # [99]: no such kind here

    monkeypatch.setattr(encoder_module, "encode_record", newer)
    blocks, records = group()
    decoder = new_decoder()
    got = delivered(feed(decoder, flat(blocks)))
    assert decoder.counters["rejected_bad_record"] == 1
    assert decoder.counters["blocks_delivered"] == 3
    assert got == records[-len(got) :]
    assert decoder.counters["verifies"] == 1


# -- the cache's bound ------------------------------------------------------------------


def test_the_cache_keeps_the_newest_entries_per_stream() -> None:
    cache = VerifiedGroups(per_stream=3)
    for i in range(5):
        cache.add(STREAM, bytes([i]))
    cache.add(STREAM + 1, b"other")
    assert len(cache) == 4
    assert [cache.holds(STREAM, bytes([i])) for i in range(5)] == [False, False, True, True, True]
    assert cache.holds(STREAM + 1, b"other")
    assert not cache.holds(STREAM + 1, bytes([4]))


def test_a_long_stream_keeps_the_cache_at_its_bound_and_one_verify_per_group() -> None:
    encoder = Encoder(link=LINK, key=fixed_key(), stream_id=STREAM, epoch=EPOCH)
    units = []
    for record in samples(2000):
        encoder.add(record, 0.0)
        units += encoder.take()
    groups = [u for u in units if u.blocks == 4]
    assert len(groups) > 20
    decoder = new_decoder()
    feed(decoder, [d for u in groups for d in u.datagrams])
    assert decoder.counters["verifies"] == len(groups)
    assert decoder.counters["verifies_saved"] == 3 * len(groups)
    assert len(decoder._authenticator._verified) == VerifiedGroups().per_stream


if __name__ == "__main__":  # regenerate the vector: python -m tests.test_group_signature
    stored = {"datagrams": [d.hex() for d in flat(group()[0])]}
    VECTOR.write_text(json.dumps(stored, indent=1) + "\n")

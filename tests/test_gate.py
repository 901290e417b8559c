"""The gate: link tags (wire version 6), the link profile, and what each rejection costs."""

from __future__ import annotations

import hmac
import json
from pathlib import Path

import pytest

from diode.config.link import FecSettings, LinkSettings
from diode.decoder import Decoder, LinkProfile
from diode.records import Heartbeat, Sample
from diode.wire import (
    HEADER_SIZE,
    LINK_TAG_SIZE,
    VERSION_GATED,
    gate_key,
    link_tag_states,
    parse_datagram,
)
from tests.core_support import (
    EPOCH,
    STREAM,
    delivered,
    encode_blocks,
    feed,
    fixed_key,
    keyring,
    new_decoder,
    samples,
    small_link,
    with_valid_crc,
)

# The golden vectors of the gated version (6: Cauchy, HMAC-SHA256-128 tag), one per wire
# generation sent in it (2: a signed digest; 3: a group of 1), and those of the retired
# versions (2 and 4: keyed BLAKE2b-128 tags), which a receiver refuses.
VECTORS = {2: Path(__file__).parent / "vectors" / "block-v6.json"}
VECTORS[3] = VECTORS[2].with_name("block-g3-v6.json")
RETIRED = {v: VECTORS[2].with_name(f"block-v{v}.json") for v in (2, 4)}
PSK = bytes(range(32))
RECORDS = [
    Sample(tag_id=1, ts_ns=1_700_000_000_123_456_789, value=2.5),
    Heartbeat(ts_ns=1_700_000_001_000_000_000, counters={"sent": 12}),
]


def _gated(generation: int = 3) -> list[bytes]:
    (block,) = encode_blocks(RECORDS, psk=PSK, generation=generation)
    return block


def rejected(decoder: Decoder) -> dict[str, int]:
    return {k: v for k, v in decoder.counters.items() if k.startswith("rejected_")}


@pytest.mark.parametrize("generation", sorted(VECTORS))
def test_gated_golden_vector_encodes_to_the_stored_bytes(generation: int) -> None:
    stored = json.loads(VECTORS[generation].read_text())
    assert [d.hex() for d in _gated(generation)] == stored["datagrams"]


@pytest.mark.parametrize("generation", sorted(VECTORS))
def test_gated_golden_vector_decodes_to_the_records(generation: int) -> None:
    stored = [bytes.fromhex(h) for h in json.loads(VECTORS[generation].read_text())["datagrams"]]
    assert {d[2] for d in stored} == {VERSION_GATED}
    assert delivered(feed(new_decoder(psk=PSK), stored)) == RECORDS


def test_the_link_tag_is_hmac_sha256_of_the_datagram_truncated_to_16_bytes() -> None:
    """The tag checked independently of diode.wire: RFC 2104 from the standard library,
    under the gate key, the first 16 bytes (the receiver computes it from keyed states)."""
    key = gate_key(PSK, STREAM)
    for datagram in _gated():
        body, tag = datagram[:-LINK_TAG_SIZE], datagram[-LINK_TAG_SIZE:]
        assert tag == hmac.new(key, body, "sha256").digest()[:LINK_TAG_SIZE]


@pytest.mark.parametrize("size", [16, 32, 64, 65, 200])
def test_the_receivers_keyed_states_give_hmacs_tag_for_any_key_length(size: int) -> None:
    """The receiver's copies of keyed inner and outer hashes are RFC 2104 for a key of any
    length (longer than the 64-byte block: hashed first), as the transmitter's hmac is."""
    key, body = bytes(range(size)), b"a datagram" * 50
    inner, outer = (state.copy() for state in link_tag_states(key))
    inner.update(body)
    outer.update(inner.digest())
    assert outer.digest() == hmac.new(key, body, "sha256").digest()


@pytest.mark.parametrize("version", sorted(RETIRED))
def test_a_retired_gated_version_is_refused_as_a_bad_version_before_its_tag(
    version: int,
) -> None:
    """Versions 2 and 4 (a keyed BLAKE2b tag, authentic under the old gate key) are refused
    by the version byte: one counter, no MAC, nothing else moved."""
    stored = [bytes.fromhex(h) for h in json.loads(RETIRED[version].read_text())["datagrams"]]
    assert {d[2] for d in stored} == {version}
    decoder = new_decoder(psk=PSK)
    feed(decoder, stored)
    counts = dict(decoder.counters)
    assert counts.pop("datagrams") == len(stored)
    assert counts == {"rejected_bad_version": len(stored)}


def test_a_gated_datagram_is_version_6_and_ends_with_its_tag() -> None:
    datagrams = _gated()
    assert {d[2] for d in datagrams} == {VERSION_GATED}
    assert {len(d) for d in datagrams} == {256}
    header, symbol = parse_datagram(datagrams[0])
    assert len(symbol) == 256 - HEADER_SIZE - LINK_TAG_SIZE
    assert header.flags == 1  # a link secret also encrypts


@pytest.mark.parametrize("offset", [0, 3, 10, 30, 47, 48, 150, 239, 240, 255])
def test_any_changed_byte_fails_the_tag_before_any_other_work(offset: int) -> None:
    """A forger without the secret: even with a fixed-up CRC, one MAC and one counter."""
    datagram = bytearray(_gated()[0])
    datagram[offset] ^= 0x01
    forged = bytes(datagram)
    if HEADER_SIZE <= offset < 256 - LINK_TAG_SIZE:
        forged = with_valid_crc(forged, offset, forged[offset : offset + 1])
    decoder = new_decoder(psk=PSK)
    decoder.receive(forged, 0.0)
    counts = dict(decoder.counters)
    assert counts.pop("datagrams") == 1
    reason = "rejected_bad_magic" if offset == 0 else "rejected_bad_tag"
    assert counts == {reason: 1}, "nothing but one rejection counter moved"


def test_a_stream_with_a_secret_takes_no_ungated_datagram_and_vice_versa() -> None:
    (plain,) = encode_blocks(samples(5))
    gated = new_decoder(psk=PSK)
    feed(gated, plain)
    assert rejected(gated) == {"rejected_ungated": len(plain)}
    ungated = new_decoder()
    feed(ungated, _gated())
    assert rejected(ungated) == {"rejected_bad_version": len(_gated())}


def test_the_link_tag_key_is_not_the_secret_and_differs_per_stream() -> None:
    from diode.wire import gate_key

    assert gate_key(PSK, 1) != gate_key(PSK, 2)
    assert PSK not in (gate_key(PSK, 1), gate_key(PSK, 2))


# -- the link profile -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "link",
    [
        small_link(),
        small_link(k=4, ratio=0.0, burst=1),
        LinkSettings(),
        LinkSettings(datagram_size=512, fec=FecSettings(k=8, repair_ratio=1 / 3, repair_burst=2)),
    ],
)
def test_everything_an_encoder_sends_fits_its_profile(link: LinkSettings) -> None:
    profile = LinkProfile.of(link.datagram_size, link.fec)
    decoder = Decoder(keyring(fixed_key()), profiles={STREAM: profile})
    records = samples(400)
    blocks = encode_blocks(records, link=link, per_block=7)
    assert {len(b) for b in blocks} != {1} or link.fec.repair_for(1) == 0
    events = feed(decoder, [d for b in blocks for d in b])
    assert delivered(events) == records
    assert set(rejected(decoder)) <= {"rejected_late"}


def _with_k(datagram: bytes, *, k: int, n: int) -> bytes:
    """A consistent header of another k and n (block length to match), CRC fixed."""
    length = (k - 1) * (len(datagram) - HEADER_SIZE) + 1
    return with_valid_crc(datagram, 33, bytes([k, n, 0]) + length.to_bytes(4, "big"))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[:-1], "rejected_bad_shape"),  # one byte short
        (lambda d: d + b"\0", "rejected_bad_shape"),  # one byte long
        (lambda d: with_valid_crc(d, 34, bytes([d[34] + 1])), "rejected_bad_shape"),  # n + 1
        (lambda d: _with_k(d, k=9, n=14), "rejected_bad_shape"),  # k above the profile's 8
        (lambda d: _with_k(d, k=2, n=5), "rejected_bad_shape"),  # k = 2 takes n = 4 here
    ],
)
def test_a_datagram_of_another_shape_is_dropped_before_assembly(
    mutate: object, reason: str
) -> None:
    link = small_link()
    (block,) = encode_blocks(samples(3), link=link)
    decoder = Decoder(
        keyring(fixed_key()), profiles={STREAM: LinkProfile.of(link.datagram_size, link.fec)}
    )
    decoder.receive(mutate(block[0]), 0.0)  # type: ignore[operator]
    counts = dict(decoder.counters)
    assert counts == {"datagrams": 1, reason: 1}
    assert decoder.assembly_bytes == 0


def test_a_replay_is_ruled_out_by_the_position_before_the_link_tag_is_computed() -> None:
    """Replays of authentic datagrams pass the link tag by design, and the tag is the
    dearest check (one HMAC-SHA256 over the datagram): the stream's position, which
    can only reject, comes first. Seen from outside: a copy of a delivered block with a
    broken tag is counted late, not bad_tag (it cost no MAC)."""
    datagrams = _gated()
    decoder = new_decoder(psk=PSK)
    feed(decoder, datagrams)
    assert decoder.counters["blocks_delivered"] >= 1
    broken = bytearray(datagrams[0])
    broken[-1] ^= 0x01
    before = dict(decoder.counters)
    decoder.receive(bytes(broken), 20.0)
    moved = {k: v - before.get(k, 0) for k, v in decoder.counters.items() if v != before.get(k, 0)}
    assert moved == {"datagrams": 1, "rejected_late": 1}


def _lying(datagram: bytes, *, epoch: int | None = None, seq: int | None = None) -> bytes:
    """A forger's datagram: an authentic one with its block renamed and a tag that fails
    (the forger has no link secret)."""
    out = bytearray(datagram)
    if epoch is not None:
        out[16:24] = epoch.to_bytes(8, "big")
    if seq is not None:
        out[24:32] = seq.to_bytes(8, "big")
    out[-1] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize(
    ("claim", "reason"),
    [
        ({"seq": 0}, "rejected_late"),  # a block the stream delivered
        ({"seq": 2}, "rejected_late"),  # the last one it delivered
        ({"epoch": EPOCH - 1}, "rejected_replay"),  # an epoch older than the one followed
        ({"seq": 3}, "rejected_bad_tag"),  # the very block the stream waits for
        ({"seq": 9}, "rejected_bad_tag"),  # ahead, in the window
        ({"epoch": EPOCH + 1, "seq": 0}, "rejected_bad_tag"),  # a newer epoch (a restart)
    ],
    ids=["delivered", "last delivered", "older epoch", "next", "ahead", "newer epoch"],
)
def test_screening_the_position_before_the_tag_only_chooses_the_rejection_counter(
    claim: dict[str, int], reason: str
) -> None:
    """The position is judged before the link tag (a replay then costs no MAC), from the
    datagram's own unauthenticated fields. What an attacker gets from that: a forgery
    naming a block the stream passed is counted late (or replay) instead of bad_tag, and
    nothing else. The position is moved by authentic blocks only, so no claim, old or
    new, changes what the screen says of a real datagram: the real blocks that follow
    every such forgery are all delivered, and no counter but one rejection moves."""
    blocks = encode_blocks(samples(200), psk=PSK, per_block=20)
    assert len(blocks) >= 6
    decoder = new_decoder(psk=PSK)
    first = delivered(feed(decoder, [d for b in blocks[:3] for d in b]))
    position = decoder.positions()[STREAM]
    assert position.next_seq == 3
    before = dict(decoder.counters)
    for datagram in blocks[3]:
        decoder.receive(_lying(datagram, **claim), 20.0)
    moved = {k: v - before.get(k, 0) for k, v in decoder.counters.items() if v != before.get(k, 0)}
    assert moved == {"datagrams": len(blocks[3]), reason: len(blocks[3])}
    assert decoder.positions()[STREAM] == position
    rest = delivered(feed(decoder, [d for b in blocks[3:] for d in b], 21.0))
    assert len(first) + len(rest) == 200


if __name__ == "__main__":  # regenerate the vectors: python -m tests.test_gate
    for generation, path in VECTORS.items():
        path.write_text(
            json.dumps({"datagrams": [d.hex() for d in _gated(generation)]}, indent=1) + "\n"
        )

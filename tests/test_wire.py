"""The wire layout, byte for byte: golden vectors both ways, and every framing defect."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from diode.errors import FrameError
from diode.records import DeviceInfo, Heartbeat, Quality, Sample, TagInfo, ValueType
from diode.wire import GENERATION, HEADER_SIZE, MAGIC, VERSION_CAUCHY, parse_datagram
from tests.core_support import (
    EPOCH,
    STREAM,
    delivered,
    encode_blocks,
    feed,
    fixed_key,
    new_decoder,
    with_valid_crc,
)

# One golden vector per ungated wire generation still accepted, with its version byte:
# generation 1 in version 1 (zfec, signed whole), 2 in 3 (Cauchy, a signed digest), 3 in 3
# (Cauchy, a group of 1). A group of 4 is in tests/test_group_signature.py.
VECTORS = {1: Path(__file__).parent / "vectors" / "block-v1.json"}
VECTORS[2] = VECTORS[1].with_name("block-v3.json")
VECTORS[3] = VECTORS[1].with_name("block-g3-v3.json")
VERSION_OF = {1: 1, 2: VERSION_CAUCHY, 3: VERSION_CAUCHY}

RECORDS = [
    TagInfo(
        tag_id=1,
        name="level",
        device="tank1",
        value_type=ValueType.FLOAT32,
        unit="m",
        source="modbus://10.0.0.5:502/1/holding_register/100",
    ),
    Sample(tag_id=1, ts_ns=1_700_000_000_123_456_789, value=2.5),
    Sample(tag_id=2, ts_ns=1_700_000_000_123_456_790, value=True),
    Sample(tag_id=3, ts_ns=1_700_000_000_123_456_791, value=-(2**63)),
    Sample(tag_id=4, ts_ns=1_700_000_000_123_456_792, value=2**64 - 1),
    Sample(tag_id=5, ts_ns=1_700_000_000_123_456_793, value="PUMP-1 \u00e9"),
    Sample(tag_id=6, ts_ns=0, value=None, quality=Quality.BAD, reason="timeout"),
    Heartbeat(ts_ns=1_700_000_001_000_000_000, counters={"sent": 12, "dropped": 0}),
    DeviceInfo(device="plc1", protocol="modbus", endpoint="10.0.0.5:502", identity={"v": "1"}),
]


def _encode(generation: int = GENERATION) -> list[bytes]:
    (block,) = encode_blocks(RECORDS, generation=generation)
    return block


@pytest.mark.parametrize("generation", sorted(VECTORS))
def test_golden_vector_encodes_to_the_stored_bytes(generation: int) -> None:
    stored = json.loads(VECTORS[generation].read_text())
    assert [d.hex() for d in _encode(generation)] == stored["datagrams"]


@pytest.mark.parametrize("generation", sorted(VECTORS))
def test_golden_vector_decodes_to_the_records(generation: int) -> None:
    stored = [bytes.fromhex(h) for h in json.loads(VECTORS[generation].read_text())["datagrams"]]
    assert {d[2] for d in stored} == {VERSION_OF[generation]}
    assert delivered(feed(new_decoder(), stored)) == RECORDS


@pytest.mark.parametrize("generation", sorted(VECTORS))
def test_golden_vector_rebuilds_from_its_last_k_symbols(generation: int) -> None:
    """The repair symbols are the stored code's, not just any code's: the block
    comes back from the last k datagrams alone, all repair."""
    stored = [bytes.fromhex(h) for h in json.loads(VECTORS[generation].read_text())["datagrams"]]
    k = stored[0][33]
    assert k <= len(stored) - k, "the last k datagrams are all repair symbols"
    assert delivered(feed(new_decoder(), stored[-k:])) == RECORDS


def test_a_block_is_checked_as_the_generation_its_datagrams_say() -> None:
    """Datagrams relabelled from one generation's version to another's rebuild nothing."""
    for generation, other in ((1, 3), (2, 1), (3, 1)):
        relabelled = [with_valid_crc(d, 2, bytes([other])) for d in _encode(generation)]
        decoder = new_decoder()
        assert delivered(feed(decoder, relabelled)) == []
        assert decoder.counters["rejected_bad_block"] == 1


def test_header_fields_sit_at_their_documented_offsets() -> None:
    datagrams = _encode()
    first = datagrams[0]
    assert struct.unpack_from(">H", first, 0)[0] == MAGIC
    assert first[2] == VERSION_CAUCHY  # version
    assert first[3] == 0  # flags
    assert struct.unpack_from(">I", first, 4)[0] == STREAM
    assert first[8:16] == fixed_key().key_id
    assert struct.unpack_from(">Q", first, 16)[0] == EPOCH
    assert struct.unpack_from(">Q", first, 24)[0] == 0  # block sequence
    index, k, n, reserved = first[32:36]
    assert (index, reserved) == (0, 0)
    assert n == len(datagrams)
    assert k < n
    assert struct.unpack_from(">I", first, 40)[0] == len(RECORDS)
    assert {len(d) for d in datagrams} == {256}, "every datagram has the same size"
    assert [d[32] for d in datagrams] == list(range(n))


def test_every_datagram_is_padded_to_the_configured_size() -> None:
    (block,) = encode_blocks([Sample(tag_id=1, ts_ns=1, value=1)])
    assert {len(d) for d in block} == {256}


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[:HEADER_SIZE], "short"),
        (lambda d: b"", "short"),
        (lambda d: b"\x00\x00" + d[2:], "bad_magic"),
        (lambda d: d[:2] + b"\x05" + d[3:], "bad_version"),
        (lambda d: d[:100] + bytes([d[100] ^ 0x10]) + d[101:], "bad_checksum"),
        (lambda d: d[:10] + bytes([d[10] ^ 1]) + d[11:], "bad_checksum"),
    ],
)
def test_framing_defects_are_named(mutate: object, reason: str) -> None:
    datagram = _encode()[0]
    with pytest.raises(FrameError) as info:
        parse_datagram(mutate(datagram))  # type: ignore[operator]
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("offset", "value"),
    [(3, 0x80), (35, 1), (33, 0), (32, 255)],  # unknown flag, reserved, k=0, index >= n
)
def test_inconsistent_headers_are_malformed_even_with_a_good_crc(offset: int, value: int) -> None:
    with pytest.raises(FrameError) as info:
        parse_datagram(with_valid_crc(_encode()[0], offset, bytes([value])))
    assert info.value.reason == "malformed"


if __name__ == "__main__":  # regenerate the vectors: python -m tests.test_wire
    for generation, path in VECTORS.items():
        path.write_text(
            json.dumps({"datagrams": [d.hex() for d in _encode(generation)]}, indent=1) + "\n"
        )


def test_pack_block_datagrams_is_pack_datagram_for_each_index() -> None:
    from diode.wire import DatagramHeader, pack_block_datagrams, pack_datagram, parse_datagram

    fields = {
        "flags": 1, "stream_id": 7, "key_id": b"abcdefgh", "epoch": 2**40 + 3, "seq": 42,
        "k": 3, "n": 9, "block_length": 3000, "records": 17,
    }  # fmt: skip
    symbols = [bytes([i]) * 1424 for i in range(9)]
    block = pack_block_datagrams(DatagramHeader(index=0, **fields), symbols)
    one_by_one = [
        pack_datagram(DatagramHeader(index=i, **fields), s) for i, s in enumerate(symbols)
    ]
    assert block == one_by_one
    assert [parse_datagram(d)[0].index for d in block] == list(range(9))

"""The Modbus codec against byte patterns written out by hand, both ways."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diode.config.modbus import ByteOrder, Encoding, Half
from diode.records import ValueType
from transmitter.modbus_codec import CodecError, decode, encode, reader, scaled

A, D, B, C = ByteOrder.ABCD, ByteOrder.DCBA, ByteOrder.BADC, ByteOrder.CDAB
V = ValueType

# (type, value, {order: registers as they come off the wire})
GOLDEN: list[tuple[ValueType, int | float, dict[ByteOrder, list[int]]]] = [
    # int16 -2 = FF FE; uint16 0x1234
    (V.INT16, -2, {A: [0xFFFE], C: [0xFFFE], B: [0xFEFF], D: [0xFEFF]}),
    (V.UINT16, 0x1234, {A: [0x1234], C: [0x1234], B: [0x3412], D: [0x3412]}),
    # int32 -123456789 = F8 A4 32 EB
    (
        V.INT32,
        -123456789,
        {A: [0xF8A4, 0x32EB], C: [0x32EB, 0xF8A4], B: [0xA4F8, 0xEB32], D: [0xEB32, 0xA4F8]},
    ),
    # uint32 0xDEADBEEF = DE AD BE EF
    (
        V.UINT32,
        0xDEADBEEF,
        {A: [0xDEAD, 0xBEEF], C: [0xBEEF, 0xDEAD], B: [0xADDE, 0xEFBE], D: [0xEFBE, 0xADDE]},
    ),
    # float32 123.456 = 42 F6 E9 79
    (
        V.FLOAT32,
        struct.unpack(">f", bytes.fromhex("42f6e979"))[0],
        {A: [0x42F6, 0xE979], C: [0xE979, 0x42F6], B: [0xF642, 0x79E9], D: [0x79E9, 0xF642]},
    ),
    # int64 -1234567890123456789 = EE DD EF 0B 82 16 7E EB
    (
        V.INT64,
        -1234567890123456789,
        {
            A: [0xEEDD, 0xEF0B, 0x8216, 0x7EEB],
            C: [0x7EEB, 0x8216, 0xEF0B, 0xEEDD],
            B: [0xDDEE, 0x0BEF, 0x1682, 0xEB7E],
            D: [0xEB7E, 0x1682, 0x0BEF, 0xDDEE],
        },
    ),
    # uint64 0x0102030405060708
    (
        V.UINT64,
        0x0102030405060708,
        {
            A: [0x0102, 0x0304, 0x0506, 0x0708],
            C: [0x0708, 0x0506, 0x0304, 0x0102],
            B: [0x0201, 0x0403, 0x0605, 0x0807],
            D: [0x0807, 0x0605, 0x0403, 0x0201],
        },
    ),
    # float64 123.456 = 40 5E DD 2F 1A 9F BE 77
    (
        V.FLOAT64,
        123.456,
        {
            A: [0x405E, 0xDD2F, 0x1A9F, 0xBE77],
            C: [0xBE77, 0x1A9F, 0xDD2F, 0x405E],
            B: [0x5E40, 0x2FDD, 0x9F1A, 0x77BE],
            D: [0x77BE, 0x9F1A, 0x2FDD, 0x5E40],
        },
    ),
]
GOLDEN_CASES = [
    pytest.param(kind, value, order, regs, id=f"{kind}-{order}")
    for kind, value, by_order in GOLDEN
    for order, regs in by_order.items()
]


@pytest.mark.parametrize(("kind", "value", "order", "registers"), GOLDEN_CASES)
def test_golden_decode(
    kind: ValueType, value: float, order: ByteOrder, registers: list[int]
) -> None:
    got = decode(registers, kind, order)
    assert got == value
    assert type(got) is (float if kind in (V.FLOAT32, V.FLOAT64) else int)


@pytest.mark.parametrize(("kind", "value", "order", "registers"), GOLDEN_CASES)
def test_golden_encode(
    kind: ValueType, value: float, order: ByteOrder, registers: list[int]
) -> None:
    assert encode(value, kind, order) == registers


def test_float32_123_456_is_close() -> None:
    assert decode([0xE979, 0x42F6], V.FLOAT32, C) == pytest.approx(123.456, rel=1e-6)


@pytest.mark.parametrize(
    ("order", "registers"),
    [
        (A, [0x4865, 0x6C6C, 0x6F00]),  # "He" "ll" "o\0"
        (C, [0x4865, 0x6C6C, 0x6F00]),
        (B, [0x6548, 0x6C6C, 0x006F]),
        (D, [0x6548, 0x6C6C, 0x006F]),
    ],
)
def test_golden_string(order: ByteOrder, registers: list[int]) -> None:
    assert decode(registers, V.STRING, order) == "Hello"
    assert encode("Hello", V.STRING, order, length=3) == registers


def test_string_strips_nuls_and_trailing_spaces() -> None:
    assert decode([0x4142, 0x2020, 0x0000], V.STRING) == "AB"
    assert decode([0x0000], V.STRING) == ""
    assert decode([0x2041], V.STRING) == " A"


def test_bool_from_a_register_bit() -> None:
    assert decode([0b1000_0000_0000_0100], V.BOOL, bit=2) is True
    assert decode([0b1000_0000_0000_0100], V.BOOL, bit=3) is False
    assert decode([0x8000], V.BOOL, bit=15) is True
    assert encode(True, V.BOOL, bit=15) == [0x8000]
    assert encode(False, V.BOOL, bit=15) == [0]


def test_wrong_register_count_and_bad_values_are_errors() -> None:
    with pytest.raises(CodecError):
        decode([1], V.FLOAT32)
    with pytest.raises(CodecError):
        decode([1, 2, 3], V.INT32)
    with pytest.raises(CodecError):
        decode([0x10000], V.UINT16)
    with pytest.raises(CodecError):
        decode([1], V.BOOL)
    with pytest.raises(CodecError):
        encode(70000, V.INT16)
    with pytest.raises(CodecError):
        encode("toolong", V.STRING, length=2)


def test_scale_and_offset() -> None:
    assert scaled(1234) == 1234
    assert type(scaled(1234)) is int
    assert scaled(1234, 0.1) == pytest.approx(123.4)
    assert type(scaled(5, 1.0, 0.0)) is int
    assert scaled(5, 1.0, -273.15) == pytest.approx(-268.15)
    assert scaled(True, 2.0) is True
    assert scaled("x", 2.0) == "x"


INT_RANGES = {
    V.INT16: (-(2**15), 2**15 - 1),
    V.UINT16: (0, 2**16 - 1),
    V.INT32: (-(2**31), 2**31 - 1),
    V.UINT32: (0, 2**32 - 1),
    V.INT64: (-(2**63), 2**63 - 1),
    V.UINT64: (0, 2**64 - 1),
}


@st.composite
def typed_values(draw: st.DrawFn) -> tuple[ValueType, int | float]:
    kind = draw(st.sampled_from([*INT_RANGES, V.FLOAT32, V.FLOAT64]))
    if kind in INT_RANGES:
        low, high = INT_RANGES[kind]
        return kind, draw(st.integers(low, high))
    if kind is V.FLOAT32:
        return kind, draw(st.floats(width=32, allow_nan=False))
    return kind, draw(st.floats(allow_nan=False))


@given(typed_values(), st.sampled_from(list(ByteOrder)))
def test_round_trip_numbers(typed: tuple[ValueType, int | float], order: ByteOrder) -> None:
    kind, value = typed
    assert decode(encode(value, kind, order), kind, order) == value


@given(st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4), st.sampled_from(list(ByteOrder)))
def test_round_trip_registers(registers: list[int], order: ByteOrder) -> None:
    for kind in (V.UINT16, V.INT32, V.UINT64, V.FLOAT64):
        regs = registers[: {V.UINT16: 1, V.INT32: 2}.get(kind, 4)]
        value = decode(regs, kind, order)
        if isinstance(value, float) and math.isnan(value):
            continue  # NaN payloads need not survive struct's round trip
        assert encode(value, kind, order) == regs


@given(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), max_size=20),
    st.sampled_from(list(ByteOrder)),
)
def test_round_trip_strings(text: str, order: ByteOrder) -> None:
    assert decode(encode(text, V.STRING, order, length=10), V.STRING, order) == text


def _wire(registers: list[int]) -> bytes:
    return b"".join(r.to_bytes(2, "big") for r in registers)


@pytest.mark.parametrize(("kind", "value", "order", "registers"), GOLDEN_CASES)
def test_golden_reader(
    kind: ValueType, value: float, order: ByteOrder, registers: list[int]
) -> None:
    read = reader(kind, order)
    # At an offset inside a longer answer, as in a coalesced read.
    got = read(b"\xaa\xbb" + _wire(registers) + b"\xcc\xdd", 2)
    assert got == value
    assert type(got) is type(decode(registers, kind, order))


@given(
    st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=12),
    st.integers(0, 3),
    st.sampled_from(list(ByteOrder)),
)
def test_reader_agrees_with_decode(registers: list[int], skip: int, order: ByteOrder) -> None:
    data = _wire([0x1234] * skip + registers)
    for kind in (*INT_RANGES, V.FLOAT32, V.FLOAT64):
        width = {V.INT16: 1, V.UINT16: 1, V.INT32: 2, V.UINT32: 2, V.FLOAT32: 2}.get(kind, 4)
        if width > len(registers):
            continue
        want = decode(registers[:width], kind, order)
        got = reader(kind, order)(data, 2 * skip)
        if isinstance(want, float) and math.isnan(want):
            assert isinstance(got, float)
            assert math.isnan(got)
        else:
            assert got == want, (kind, order)
            assert type(got) is type(want), (kind, order)
    for bit in range(16):
        assert reader(V.BOOL, bit=bit)(data, 2 * skip) == decode(registers[:1], V.BOOL, bit=bit)
    text = reader(V.STRING, order, length=len(registers))(data, 2 * skip)
    assert text == decode(registers, V.STRING, order)


# -- 8-bit halves and string encodings (issue 14, item 6) ------------------------------


@pytest.mark.parametrize(
    ("kind", "byte", "register", "value"),
    [
        (V.UINT8, Half.HIGH, 0xFE01, 0xFE),
        (V.UINT8, Half.LOW, 0xFE01, 0x01),
        (V.INT8, Half.HIGH, 0xFE01, -2),
        (V.INT8, Half.LOW, 0x01FE, -2),
        (V.INT8, Half.LOW, 0xFF7F, 127),
        (V.INT8, Half.HIGH, 0x8000, -128),
    ],
)
def test_8_bit_halves_of_a_register(kind: ValueType, byte: Half, register: int, value: int) -> None:
    assert decode([register], kind, byte=byte) == value
    assert reader(kind, byte=byte)(b"\x00\x00" + register.to_bytes(2, "big"), 2) == value
    # Encoding sets only that half; decoding it back gives the value.
    assert decode(encode(value, kind, byte=byte), kind, byte=byte) == value


def test_both_halves_of_one_register_are_independent() -> None:
    register = encode(-5, V.INT8, byte=Half.HIGH)[0] | encode(200, V.UINT8, byte=Half.LOW)[0]
    assert decode([register], V.INT8, byte=Half.HIGH) == -5
    assert decode([register], V.UINT8, byte=Half.LOW) == 200


def test_a_string_ends_at_its_first_nul() -> None:
    # Before: every NUL was removed, so the garbage after the terminator joined the text.
    assert decode([0x4142, 0x0043, 0x4400], V.STRING) == "AB"
    assert reader(V.STRING, length=3)(_wire([0x4142, 0x0043, 0x4400]), 0) == "AB"


@pytest.mark.parametrize("order", list(ByteOrder))
def test_utf8_string_in_every_byte_order(order: ByteOrder) -> None:
    text = "Grüße 1°C"  # 12 bytes in UTF-8
    registers = encode(text, V.STRING, order, length=8, encoding=Encoding.UTF8)
    assert decode(registers, V.STRING, order, encoding=Encoding.UTF8) == text
    assert reader(V.STRING, order, length=8, encoding=Encoding.UTF8)(_wire(registers), 0) == text
    # The same bytes read as Latin-1 are other characters: the encoding matters.
    assert decode(registers, V.STRING, order, encoding=Encoding.LATIN1) != text


def test_bytes_that_are_not_text_in_the_encoding_are_an_error_not_a_guess() -> None:
    high = [0x41E9, 0x0000]  # "A" then 0xE9: Latin-1 "é", not ASCII, not UTF-8
    assert decode(high, V.STRING, encoding=Encoding.LATIN1) == "Aé"
    for encoding in (Encoding.ASCII, Encoding.UTF8):
        with pytest.raises(CodecError, match=f"not {encoding} text"):
            decode(high, V.STRING, encoding=encoding)
        with pytest.raises(CodecError):
            reader(V.STRING, length=2, encoding=encoding)(_wire(high), 0)
    with pytest.raises(CodecError):
        encode("é", V.STRING, length=2, encoding=Encoding.ASCII)

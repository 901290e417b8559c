"""Modbus register values, both ways, in the four byte/word orders.

Pure functions: registers (16-bit ints as read) in, a value out, and back.
pymodbus's own payload helpers know big- and little-endian word order only
(pymodbus #1661, #2616, telegraf #7518), so this is our own.

A value's bytes are named from the most significant: ``A B C D`` for 32 bits,
``A B C D E F G H`` for 64. Each register is sent high byte first, so::

    order   reg0  reg1      (32-bit)    64-bit: reg0 reg1 reg2 reg3
    ABCD    A B   C D                           AB   CD   EF   GH
    CDAB    C D   A B       words swapped       GH   EF   CD   AB
    BADC    B A   D C       bytes swapped       BA   DC   FE   HG
    DCBA    D C   B A       little-endian       HG   FE   DC   BA

A 16-bit value is ``AB`` (orders ABCD, CDAB) or ``BA`` (BADC, DCBA). An 8-bit
value (int8, uint8) is the register's high or low byte as it came off the
wire. A string keeps its registers in address order and uses the byte part of
the order only: the first character is the high byte (``AB..``) or the low
byte (``BA..``). It ends at its first NUL (C strings; what follows is padding
or garbage), trailing spaces are dropped (the other padding), and its bytes are
read in the tag's encoding: bytes that are not valid text in it are an error
(a BAD value with the reason), never text made up by replacement.
"""

from __future__ import annotations

import functools
import operator
import struct
from collections.abc import Callable, Sequence

from diode.config.modbus import ByteOrder, Encoding, Half, width_of
from diode.records import ValueType

Decoded = bool | int | float | str

_STRUCT = {
    ValueType.INT16: ">h",
    ValueType.UINT16: ">H",
    ValueType.INT32: ">i",
    ValueType.UINT32: ">I",
    ValueType.FLOAT32: ">f",
    ValueType.INT64: ">q",
    ValueType.UINT64: ">Q",
    ValueType.FLOAT64: ">d",
}
_HALVES = {ValueType.INT8: ">b", ValueType.UINT8: ">B"}
_BYTE_SWAPPED = (ByteOrder.BADC, ByteOrder.DCBA)
_WORD_SWAPPED = (ByteOrder.CDAB, ByteOrder.DCBA)


class CodecError(ValueError):
    """Registers that cannot be the value asked for (wrong count, out of range)."""


def _swap_bytes(data: bytes) -> bytes:
    out = bytearray(data)
    out[0::2], out[1::2] = data[1::2], data[0::2]
    return bytes(out)


def _swap_words(data: bytes) -> bytes:
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    return b"".join(reversed(words))


def _raw(registers: Sequence[int]) -> bytes:
    for reg in registers:
        if not 0 <= reg <= 0xFFFF:
            raise CodecError(f"register value {reg} is not 16-bit")
    return b"".join(reg.to_bytes(2, "big") for reg in registers)


def _registers(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def _to_canonical(data: bytes, order: ByteOrder, *, words: bool = True) -> bytes:
    """Wire bytes to big-endian value bytes (the transform is its own inverse)."""
    if order in _BYTE_SWAPPED:
        data = _swap_bytes(data)
    if words and order in _WORD_SWAPPED:
        data = _swap_words(data)
    return data


def _text(data: bytes, encoding: Encoding) -> str:
    """A string's bytes (in character order) as text: up to the first NUL, no trailing spaces."""
    try:
        return data.split(b"\x00", 1)[0].decode(encoding).rstrip(" ")
    except UnicodeDecodeError as exc:
        raise CodecError(f"not {encoding} text: {exc.reason} at byte {exc.start}") from None


def decode(
    registers: Sequence[int],
    value_type: ValueType,
    order: ByteOrder = ByteOrder.ABCD,
    *,
    bit: int | None = None,
    byte: Half | None = None,
    encoding: Encoding = Encoding.LATIN1,
) -> Decoded:
    """The value held by ``registers`` (exactly as many as the type spans).

    A bool is bit ``bit`` (0 = least significant) of the one register, read as
    it came off the wire; an int8 or uint8 its ``byte`` half. A string ends at
    its first NUL and loses its trailing spaces.
    """
    expected = len(registers) if value_type is ValueType.STRING else width_of(value_type)
    if len(registers) != expected or not registers:
        raise CodecError(f"{value_type} needs {expected} registers, got {len(registers)}")
    data = _raw(registers)
    if value_type is ValueType.BOOL:
        if bit is None or not 0 <= bit <= 15:
            raise CodecError("a bool in a register needs a bit 0..15")
        return bool(registers[0] >> bit & 1)
    if value_type in _HALVES:
        if byte is None:
            raise CodecError(f"an {value_type} needs byte = high or low")
        half = data[0:1] if byte is Half.HIGH else data[1:2]
        small: int = struct.unpack(_HALVES[value_type], half)[0]
        return small
    if value_type is ValueType.STRING:
        return _text(_to_canonical(data, order, words=False), encoding)
    value: int | float = struct.unpack(_STRUCT[value_type], _to_canonical(data, order))[0]
    return value


Reader = Callable[[bytes, int], Decoded]


@functools.cache  # pure: tags of one kind share one reader (20 000 tags, a handful of kinds)
def reader(
    value_type: ValueType,
    order: ByteOrder = ByteOrder.ABCD,
    *,
    bit: int | None = None,
    length: int | None = None,
    byte: Half | None = None,
    encoding: Encoding = Encoding.LATIN1,
) -> Reader:
    """:func:`decode` prepared once for one tag: ``read(data, at)`` is its value.

    ``data`` is a read's register bytes as they came off the wire (two per
    register, high byte first) and ``at`` the tag's first byte in them. The
    poller decodes every tag of every answer, so the per-tag work (byte order,
    struct format, checks) is decided here, at start, and a read costs one
    ``struct.unpack_from``, or a byte shuffle and one unpack for the mixed
    orders. The caller checks that the answer is long enough.
    """
    if value_type is ValueType.BOOL:
        if bit is None or not 0 <= bit <= 15:
            raise CodecError("a bool in a register needs a bit 0..15")
        # Bits 8..15 lie in the register's first (high) byte, 0..7 in its second.
        index, shift = (0, bit - 8) if bit >= 8 else (1, bit)

        def read_bool(data: bytes, at: int) -> Decoded:
            return bool(data[at + index] >> shift & 1)

        return read_bool
    if value_type is ValueType.STRING:
        if length is None:
            raise CodecError("a string needs a length")
        size = 2 * length
        swap = order in _BYTE_SWAPPED

        def read_string(data: bytes, at: int) -> Decoded:
            text = data[at : at + size]
            if swap:
                text = _swap_bytes(text)
            return _text(text, encoding)

        return read_string
    if value_type in _HALVES:
        if byte is None:
            raise CodecError(f"an {value_type} needs byte = high or low")
        index = 0 if byte is Half.HIGH else 1
        signed = value_type is ValueType.INT8

        def read_half(data: bytes, at: int) -> Decoded:
            small = data[at + index]
            return small - 256 if signed and small > 127 else small

        return read_half
    fmt = _STRUCT[value_type]
    size = 2 * width_of(value_type)
    # Where each big-endian value byte lies on the wire: the order's transform
    # applied to the byte indices themselves.
    perm = list(_to_canonical(bytes(range(size)), order))
    if perm == sorted(perm):
        unpack = struct.Struct(fmt).unpack_from
        return lambda data, at: unpack(data, at)[0]
    if perm == sorted(perm, reverse=True):
        unpack = struct.Struct("<" + fmt[1:]).unpack_from
        return lambda data, at: unpack(data, at)[0]
    value_of = struct.Struct(fmt).unpack
    pick = operator.itemgetter(*perm)

    def read_mixed(data: bytes, at: int) -> Decoded:
        value: int | float = value_of(bytes(pick(data[at : at + size])))[0]
        return value

    return read_mixed


def encode(
    value: Decoded,
    value_type: ValueType,
    order: ByteOrder = ByteOrder.ABCD,
    *,
    bit: int | None = None,
    length: int | None = None,
    byte: Half | None = None,
    encoding: Encoding = Encoding.LATIN1,
) -> list[int]:
    """Registers holding ``value``: the inverse of :func:`decode`.

    A bool gives one register with only ``bit`` set (or none), an int8 or
    uint8 one with only its ``byte`` half set; a string is NUL-padded to
    ``length`` registers.
    """
    if value_type is ValueType.BOOL:
        if bit is None or not 0 <= bit <= 15:
            raise CodecError("a bool in a register needs a bit 0..15")
        return [int(bool(value)) << bit]
    if value_type in _HALVES:
        if byte is None or isinstance(value, str | bool | float):
            raise CodecError(f"an {value_type} needs an int value and byte = high or low")
        try:
            small = struct.pack(_HALVES[value_type], value)[0]
        except struct.error as exc:
            raise CodecError(f"{value!r} does not fit {value_type}: {exc}") from exc
        return [small << 8 if byte is Half.HIGH else small]
    if value_type is ValueType.STRING:
        if not isinstance(value, str) or length is None:
            raise CodecError("a string needs a str value and a length")
        try:
            data = value.encode(encoding)
        except UnicodeEncodeError as exc:
            raise CodecError(f"{value!r} is not {encoding} text") from exc
        if len(data) > 2 * length:
            raise CodecError(f"{len(data)} bytes do not fit {length} registers")
        data = data.ljust(2 * length, b"\x00")
        return _registers(_to_canonical(data, order, words=False))
    if isinstance(value, str | bool):
        raise CodecError(f"{value_type} needs a number, got {value!r}")
    try:
        data = struct.pack(_STRUCT[value_type], value)
    except struct.error as exc:
        raise CodecError(f"{value!r} does not fit {value_type}: {exc}") from exc
    return _registers(_to_canonical(data, order))


def scaled(value: Decoded, scale: float = 1.0, offset: float = 0.0) -> Decoded:
    """``value * scale + offset``; an int stays an int when both are the identity."""
    if isinstance(value, bool | str):
        return value
    if scale == 1.0 and offset == 0.0:
        return value
    return float(value) * scale + offset

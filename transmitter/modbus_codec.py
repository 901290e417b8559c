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

A 16-bit value is ``AB`` (orders ABCD, CDAB) or ``BA`` (BADC, DCBA). A string
keeps its registers in address order and uses the byte part of the order only:
the first character is the high byte (``AB..``) or the low byte (``BA..``).
"""

from __future__ import annotations

import functools
import operator
import struct
from collections.abc import Callable, Sequence

from diode.config.modbus import ByteOrder, width_of
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


def decode(
    registers: Sequence[int],
    value_type: ValueType,
    order: ByteOrder = ByteOrder.ABCD,
    *,
    bit: int | None = None,
) -> Decoded:
    """The value held by ``registers`` (exactly as many as the type spans).

    A bool is bit ``bit`` (0 = least significant) of the one register, read as
    it came off the wire. A string is stripped of NULs and trailing spaces.
    """
    expected = len(registers) if value_type is ValueType.STRING else width_of(value_type)
    if len(registers) != expected or not registers:
        raise CodecError(f"{value_type} needs {expected} registers, got {len(registers)}")
    data = _raw(registers)
    if value_type is ValueType.BOOL:
        if bit is None or not 0 <= bit <= 15:
            raise CodecError("a bool in a register needs a bit 0..15")
        return bool(registers[0] >> bit & 1)
    if value_type is ValueType.STRING:
        text = _to_canonical(data, order, words=False)
        return text.replace(b"\x00", b"").decode("latin-1").rstrip(" ")
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
            return text.replace(b"\x00", b"").decode("latin-1").rstrip(" ")

        return read_string
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
) -> list[int]:
    """Registers holding ``value``: the inverse of :func:`decode`.

    A bool gives one register with only ``bit`` set (or none); a string is
    NUL-padded to ``length`` registers.
    """
    if value_type is ValueType.BOOL:
        if bit is None or not 0 <= bit <= 15:
            raise CodecError("a bool in a register needs a bit 0..15")
        return [int(bool(value)) << bit]
    if value_type is ValueType.STRING:
        if not isinstance(value, str) or length is None:
            raise CodecError("a string needs a str value and a length")
        data = value.encode("latin-1")
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

"""The Modbus TCP devices the transmitter polls, their units and their tags.

A TOML example::

    [[modbus.devices]]
    name = "plc1"
    host = "10.0.0.5"
    poll_interval_s = 1.0

    [[modbus.devices.units]]
    id = 1

    [[modbus.devices.units.tags]]
    name = "tank1.level"
    table = "holding_register"
    address = 100
    type = "float32"
    order = "CDAB"
    unit = "m"

Addresses are the protocol addresses (0-based) unless the device says
``address_base = 1``, in which case the first register of each table is 1, as
in many PLC manuals. Everything is checked at load time: a tag that does not
fit its table, a bool in a register without a ``bit``, a string without a
``length``, two tags with one name.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from diode.config import Section
from diode.records import ValueType

ADDRESS_MAX = 65535
# A name ends up in MQTT topics and in log lines: keep it to a safe alphabet.
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class Table(enum.StrEnum):
    """The four Modbus data tables."""

    COIL = "coil"
    DISCRETE_INPUT = "discrete_input"
    HOLDING_REGISTER = "holding_register"
    INPUT_REGISTER = "input_register"

    @property
    def is_bits(self) -> bool:
        """Coils and discrete inputs hold single bits; the other tables 16-bit registers."""
        return self in (Table.COIL, Table.DISCRETE_INPUT)


class Half(enum.StrEnum):
    """Which byte of a register an 8-bit value is: as it comes off the wire, high first."""

    HIGH = "high"
    LOW = "low"


class Encoding(enum.StrEnum):
    """How a string's bytes are read as text."""

    ASCII = "ascii"
    UTF8 = "utf-8"
    LATIN1 = "latin-1"


class ByteOrder(enum.StrEnum):
    """How a multi-byte value lies in its registers, value bytes named A (most significant) on.

    ``ABCD`` big-endian bytes and words (the Modbus default); ``CDAB`` words swapped;
    ``BADC`` bytes swapped within each word; ``DCBA`` fully little-endian. For 64-bit
    values the same rule extends to ``ABCDEFGH``. For strings only the byte part
    counts (``AB..``: first character in the high byte; ``BA..``: in the low byte).
    """

    ABCD = "ABCD"
    DCBA = "DCBA"
    BADC = "BADC"
    CDAB = "CDAB"


# Enums come from TOML as strings: let pydantic turn them into members (strict
# mode would accept only members), while everything else stays strict.
TableField = Annotated[Table, Field(strict=False)]
OrderField = Annotated[ByteOrder, Field(strict=False)]
TypeField = Annotated[ValueType, Field(strict=False)]
HalfField = Annotated[Half, Field(strict=False)]
EncodingField = Annotated[Encoding, Field(strict=False)]

_REGISTERS = {
    ValueType.BOOL: 1,
    ValueType.INT8: 1,
    ValueType.UINT8: 1,
    ValueType.INT16: 1,
    ValueType.UINT16: 1,
    ValueType.INT32: 2,
    ValueType.UINT32: 2,
    ValueType.FLOAT32: 2,
    ValueType.INT64: 4,
    ValueType.UINT64: 4,
    ValueType.FLOAT64: 4,
}
STRING_REGISTERS_MAX = 123  # a string must fit one read (125) with room to spare
# Chosen from measurements (docs/BENCHMARKS.md section 5; ModbusDevice says why).
DEFAULT_MAX_GAP = 32


def width_of(value_type: ValueType, length: int | None = None) -> int:
    """Registers (or bits, in a bit table) a value of this type occupies."""
    if value_type is ValueType.STRING:
        if length is None:
            raise ValueError("a string needs a length in registers")
        return length
    return _REGISTERS[value_type]


class ModbusTag(Section):
    """One value read from one unit: where it lies and how to read it."""

    name: Name = Field(description="tag name, unique in its device; used in topics")
    table: TableField = Field(description="coil, discrete_input, holding_register, input_register")
    address: int = Field(
        ge=0, le=ADDRESS_MAX + 1, description="first address, in the device's address_base"
    )
    type: TypeField = Field(
        description="value type: bool, int8, uint8, int16, uint16, int32, uint32, int64, "
        "uint64, float32, float64, string"
    )
    order: OrderField = Field(
        ByteOrder.ABCD,
        description="byte/word order: ABCD DCBA BADC CDAB; for a string only the byte "
        "part counts (BADC, DCBA: first character in the low byte)",
    )
    bit: int | None = Field(
        None, ge=0, le=15, description="for a bool in a register: bit 0 (LSB) to 15"
    )
    byte: HalfField | None = Field(
        None, description="for an int8 or uint8: the register's high or low byte"
    )
    length: int | None = Field(
        None, ge=1, le=STRING_REGISTERS_MAX, description="for a string: registers it spans"
    )
    encoding: EncodingField = Field(
        Encoding.LATIN1,
        description="for a string: ascii, utf-8 or latin-1; it ends at the first NUL, "
        "trailing spaces are dropped, bytes that are not valid text make the value BAD",
    )
    scale: float = Field(1.0, description="value = raw * scale + offset (numbers only)")
    offset: float = Field(0.0, description="value = raw * scale + offset (numbers only)")
    unit: str = Field("", max_length=32, description="engineering unit, e.g. 'degC'")
    description: str = Field("", max_length=256, description="free text for the catalogue")
    deadband: float = Field(
        0.0, ge=0.0, description="absolute change that is worth reporting; 0 = any change"
    )

    @property
    def width(self) -> int:
        """Registers (or bits) this tag occupies."""
        return width_of(self.type, self.length)

    def _check_halves_and_text(self) -> None:
        kind = self.type
        if kind not in _REGISTERS and kind is not ValueType.STRING:
            raise ValueError(f"{kind} is not a Modbus value type")
        half = kind in (ValueType.INT8, ValueType.UINT8)
        if half and self.byte is None:
            raise ValueError(f'an {kind} is half a register: set byte = "high" or "low"')
        if not half and self.byte is not None:
            raise ValueError(f"byte is only for int8 and uint8 tags, not {kind}")
        if half and self.order is not ByteOrder.ABCD:
            raise ValueError('order does not apply to an 8-bit value: byte = "high" or "low"')
        if kind is not ValueType.STRING and "encoding" in self.model_fields_set:
            raise ValueError(f"encoding is only for string tags, not {kind}")

    @model_validator(mode="after")
    def _consistent(self) -> ModbusTag:
        kind = self.type
        self._check_halves_and_text()
        if self.table.is_bits:
            if kind is not ValueType.BOOL:
                raise ValueError(f"a {self.table} holds single bits: its type must be bool")
            if self.bit is not None:
                raise ValueError(f"bit is for a bool in a register, not in a {self.table}")
        elif kind is ValueType.BOOL and self.bit is None:
            raise ValueError(f"a bool in a {self.table} needs bit = 0..15")
        elif kind is not ValueType.BOOL and self.bit is not None:
            raise ValueError(f"bit is only for bool tags, not {kind}")
        if kind is ValueType.STRING and self.length is None:
            raise ValueError("a string needs length = number of registers")
        if kind is not ValueType.STRING and self.length is not None:
            raise ValueError(f"length is only for string tags, not {kind}")
        if kind in (ValueType.BOOL, ValueType.STRING) and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"scale and offset apply to numbers, not to a {kind}")
        if self.scale == 0.0:
            raise ValueError("scale = 0 would make every value the offset")
        if kind in (ValueType.BOOL, ValueType.STRING) and self.deadband != 0.0:
            raise ValueError(f"a deadband applies to numbers, not to a {kind}")
        return self


class ModbusUnit(Section):
    """One unit (slave) id behind the device's address, with its tags."""

    id: int = Field(ge=0, le=255, description="Modbus unit id (device_id) 0..255")
    tags: list[ModbusTag] = Field(min_length=1, description="the tags read from this unit")


class ModbusDevice(Section):
    """One Modbus TCP endpoint (a PLC or a gateway) and how gently to poll it.

    Reads are joined across holes of up to ``max_gap`` unused addresses. The
    default, 32, reads 100 float32 tags scattered over 1000 registers in 8.6
    requests a cycle (the floor is 8; 34 with 8, 15 with 16): fewer round
    trips is what lets one transmitter serve 200 such devices a second, and it
    is fewer requests for the PLC to serve. On a 9600-baud serial gateway the
    extra bytes cost about what the saved round trips did (8 and 32 take the
    same time per cycle); 100 would read 5 % more for 7 % fewer requests. A
    device that answers exception 2 or 3 (illegal address or value) to a read
    spanning unused addresses has that read split into reads of its tags'
    addresses only, in the same cycle (no value is lost) and for the rest of
    the run; counted as ``poll_splits``, logged once per device. Lower
    ``max_gap`` (or ``coalesce = false``) for a device where reading an unused
    address has an effect, such as a register cleared by reading it.
    """

    name: Name = Field(description="device name, unique; used in topics")
    host: str = Field(min_length=1, max_length=253, description="IP address or host name")
    port: int = Field(502, ge=1, le=65535, description="TCP port")
    units: list[ModbusUnit] = Field(min_length=1, description="unit ids and their tags")
    address_base: Literal[0, 1] = Field(
        0, description="0: addresses as on the wire; 1: the manual's 1-based numbering"
    )
    poll_interval_s: float = Field(
        1.0,
        ge=0.01,
        le=86400.0,
        description="time between polls; the first at start, then on the device's own "
        "phase of the interval (from its name), so that devices do not all poll at once",
    )
    timeout_s: float = Field(1.0, gt=0.0, le=60.0, description="wait for one answer")
    retries: int = Field(1, ge=0, le=5, description="re-sends of a request that timed out")
    backoff_initial_s: float = Field(
        0.5, gt=0.0, le=3600.0, description="first wait before reconnecting"
    )
    backoff_max_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="longest wait between reconnects"
    )
    max_in_flight: int = Field(
        1,
        ge=1,
        le=8,
        description="parallel requests; each uses its own TCP connection (1 = one, in turn)",
    )
    request_pause_s: float = Field(
        0.0, ge=0.0, le=10.0, description="pause after each request, for slow devices"
    )
    max_gap: int = Field(
        DEFAULT_MAX_GAP,
        ge=0,
        le=124,
        description="unused registers/bits read to join two tags in one request "
        "(a device refusing such a read gets reads of its tags only, see above)",
    )
    coalesce: bool = Field(True, description="false: one request per tag, for picky devices")
    read_identity: bool = Field(
        True, description="read Device Identification (function 43/14) once per connection"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModbusDevice:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError(
                f"backoff_initial_s {self.backoff_initial_s} exceeds "
                f"backoff_max_s {self.backoff_max_s}"
            )
        ids = [unit.id for unit in self.units]
        if len(set(ids)) != len(ids):
            raise ValueError(f"unit ids must be unique, got {ids}")
        seen: set[str] = set()
        for unit in self.units:
            for tag in unit.tags:
                if tag.name in seen:
                    raise ValueError(f"tag name {tag.name!r} is used twice in this device")
                seen.add(tag.name)
                start = tag.address - self.address_base
                end = start + tag.width - 1
                if start < 0 or end > ADDRESS_MAX:
                    first = self.address_base
                    raise ValueError(
                        f"tag {tag.name!r} spans addresses {tag.address}.."
                        f"{tag.address + tag.width - 1}, outside the table "
                        f"({first}..{ADDRESS_MAX + first} with address_base {first})"
                    )
        return self


class ModbusSection(Section):
    """The ``[modbus]`` section: the devices to poll."""

    devices: list[ModbusDevice] = Field(default_factory=list, description="devices to poll")

    @model_validator(mode="after")
    def _unique_names(self) -> ModbusSection:
        names = [device.name for device in self.devices]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"device names must be unique: {', '.join(dupes)} used twice")
        return self

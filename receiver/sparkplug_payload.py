"""Sparkplug B payloads: the protobuf ``Payload`` of Eclipse Tahu's ``sparkplug_b.proto``.

The messages are built at import from a descriptor described here field by
field (names, numbers and wire types exactly as in the official proto, package
``org.eclipse.tahu.protobuf``), and encoded by Google's ``protobuf`` runtime,
the library Tahu's own Python and Java use: the bytes are those Tahu writes.
Only the parts the receiver uses or must read are described (Payload, Metric,
PropertySet, PropertyValue, PropertySetList); fields of a command payload this
description leaves out (DataSet, Template, MetaData) are skipped as unknown
fields by the parser, not an error.

Why not a Sparkplug package from PyPI: pysparkplug 0.6 pins ``paho-mqtt < 2``
(the receiver needs paho 2); mqtt-spb-wrapper, tahu and tahutils each ship a
copy of Tahu's generated ``sparkplug_b_pb2`` plus their own MQTT client, of
which we would use neither. protobuf itself is the well-kept part.

Value encoding follows Tahu's reference Python (``addMetric``): Int8/16/32 are
carried in ``int_value`` (uint32) as two's complement at their own width
(-1 as Int16 is 65535), Int64 in ``long_value`` as 64-bit two's complement,
unsigned types as they are; a decoder narrows ``int_value`` to the datatype's
width, which reads both Tahu's Python and its Java encodings.
"""

from __future__ import annotations

import enum
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "org.eclipse.tahu.protobuf"


class DataType(enum.IntEnum):
    """Sparkplug B datatypes (the ``DataType`` enum of sparkplug_b.proto) this receiver uses."""

    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14


_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_TYPES = {
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}

# (name, number, type or nested message, repeated, in the oneof "value")
_Field = tuple[str, int, str, bool, bool]
_MESSAGES: dict[str, list[_Field]] = {
    "PropertyValue": [
        ("type", 1, "uint32", False, False),
        ("is_null", 2, "bool", False, False),
        ("int_value", 3, "uint32", False, True),
        ("long_value", 4, "uint64", False, True),
        ("float_value", 5, "float", False, True),
        ("double_value", 6, "double", False, True),
        ("boolean_value", 7, "bool", False, True),
        ("string_value", 8, "string", False, True),
        ("propertyset_value", 9, ".PropertySet", False, True),
        ("propertysets_value", 10, ".PropertySetList", False, True),
    ],
    "PropertySet": [
        ("keys", 1, "string", True, False),
        ("values", 2, ".PropertyValue", True, False),
    ],
    "PropertySetList": [("propertyset", 1, ".PropertySet", True, False)],
    "Metric": [
        ("name", 1, "string", False, False),
        ("alias", 2, "uint64", False, False),
        ("timestamp", 3, "uint64", False, False),
        ("datatype", 4, "uint32", False, False),
        ("is_historical", 5, "bool", False, False),
        ("is_transient", 6, "bool", False, False),
        ("is_null", 7, "bool", False, False),
        ("properties", 9, ".PropertySet", False, False),
        ("int_value", 10, "uint32", False, True),
        ("long_value", 11, "uint64", False, True),
        ("float_value", 12, "float", False, True),
        ("double_value", 13, "double", False, True),
        ("boolean_value", 14, "bool", False, True),
        ("string_value", 15, "string", False, True),
        ("bytes_value", 16, "bytes", False, True),
    ],
}
_PAYLOAD: list[_Field] = [
    ("timestamp", 1, "uint64", False, False),
    ("metrics", 2, ".Metric", True, False),
    ("seq", 3, "uint64", False, False),
    ("uuid", 4, "string", False, False),
    ("body", 5, "bytes", False, False),
]


def _describe(message: descriptor_pb2.DescriptorProto, fields: list[_Field]) -> None:
    if any(in_oneof for *_, in_oneof in fields):
        message.oneof_decl.add(name="value")
    for name, number, kind, repeated, in_oneof in fields:
        field = message.field.add(
            name=name, number=number, label=_REPEATED if repeated else _OPTIONAL
        )
        if kind.startswith("."):
            field.type = _F.TYPE_MESSAGE
            field.type_name = f".{PACKAGE}.Payload{kind}"
        else:
            field.type = _TYPES[kind]
        if in_oneof:
            field.oneof_index = 0


def _build() -> Any:
    file = descriptor_pb2.FileDescriptorProto(
        name="diode_sparkplug_b.proto", package=PACKAGE, syntax="proto2"
    )
    payload = file.message_type.add(name="Payload")
    _describe(payload, _PAYLOAD)
    for name, fields in _MESSAGES.items():
        _describe(payload.nested_type.add(name=name), fields)
    payload.extension_range.add(start=6, end=536870912)  # "extensions 6 to max"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Payload"))


#: The ``Payload`` message class (protobuf's upb-backed implementation).
Payload: Any = _build()

_U32 = 2**32
_U64 = 2**64
# Tahu's width for the two's complement of each signed type carried in int_value.
_SIGNED_WIDTH = {DataType.INT8: 2**8, DataType.INT16: 2**16, DataType.INT32: _U32}
INT_VALUE_TYPES = frozenset(
    {
        DataType.INT8,
        DataType.INT16,
        DataType.INT32,
        DataType.UINT8,
        DataType.UINT16,
        DataType.UINT32,
    }
)
LONG_VALUE_TYPES = frozenset({DataType.INT64, DataType.UINT64, DataType.DATETIME})


def set_value(target: Any, datatype: DataType, value: bool | int | float | str | None) -> None:
    """Put ``value`` in the field of ``target`` (a Metric or PropertyValue) its datatype uses.

    The caller has checked the value fits the datatype (see ``receiver/sparkplug.py``).
    """
    if value is None:
        target.is_null = True
    elif datatype in INT_VALUE_TYPES:
        number = int(value)
        target.int_value = number + _SIGNED_WIDTH[datatype] if number < 0 else number
    elif datatype in LONG_VALUE_TYPES:
        number = int(value)
        target.long_value = number + _U64 if number < 0 else number
    elif datatype is DataType.FLOAT:
        target.float_value = float(value)
    elif datatype is DataType.DOUBLE:
        target.double_value = float(value)
    elif datatype is DataType.BOOLEAN:
        target.boolean_value = bool(value)
    else:
        target.string_value = str(value)


def decode(data: bytes) -> Any:
    """A Payload from bytes; protobuf's ``DecodeError`` on bytes that are not one."""
    payload = Payload()
    payload.ParseFromString(data)
    return payload


_SIGNED_BITS: dict[int, int] = {
    DataType.INT8: 8,
    DataType.INT16: 16,
    DataType.INT32: 32,
    DataType.INT64: 64,
}


def value_of(metric: Any, datatype: int) -> bool | int | float | str | None:
    """A metric's value read back as ``datatype`` says (signed types narrowed to their width)."""
    if metric.is_null:
        return None
    kind = metric.WhichOneof("value")
    if kind is None:
        return None
    value: Any = getattr(metric, kind)
    if kind in ("int_value", "long_value"):
        bits = _SIGNED_BITS.get(datatype)
        if bits is not None:
            value &= (1 << bits) - 1
            if value >> (bits - 1):
                value -= 1 << bits
    return value  # type: ignore[no-any-return]

"""Records: what travels inside a block, and their one encoding.

A block's payload is a sequence of msgpack arrays, one per record, each
starting with its kind::

    Sample      [0, tag_id, ts_ns, quality, value, reason]

A value is nil, a bool, an int (int64 or uint64 range), a float64, a str, a
bin (an OPC UA ByteString) or an array of values (an OPC UA array, or the
parts of one composite value: a LocalizedText is ``[text, locale]``, a
StatusCode ``[code, name]``). The catalogue's value type says how to read it:
it names the type of the value, or of each element when the value is an
array. The encoder writes one form of each (bin for bytes, float64 for every
float, arrays for sequences); decoding checks every field's type, and every
element of an array.
    TagInfo     [1, tag_id, name, device, value_type, unit, source, description]
    Heartbeat   [2, ts_ns, {counter: int}]
    DeviceInfo  [3, device, protocol, endpoint, {key: str}]
    LogRecord   [5, seq, ts_ns, source, format, pri, timestamp, hostname,
                 app_name, procid, msgid, structured_data, msg (bin)]

msgpack is used because it is fast (about 11 us to pack 50 samples here), has
no way to name code to run (never pickle on a wire), and keeps bool, int up to
64 bits, float64, str, bin, array and nil apart, which is every PLC value type
we carry.

What a PLC hands the transmitter is checked before it is encoded
(:func:`unrepresentable`): a timestamp outside int64 nanoseconds (OPC UA
allows years up to 9999; msgpack cannot pack past 2554, and the receiver reads
no further than 2262), an int past 64 bits, a string that is not valid
Unicode, an array nested too deep: such a value becomes a BAD sample with the
reason, never a crash nor a block the receiver must reject whole.
Decoding checks every field's type: a well-signed block from a buggy
transmitter still gives a FrameError, never a wrong-typed record.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from diode.errors import DiodeError, FrameError
from diode.files import (
    FILE_KINDS,
    FileChunk,
    FileHoles,
    FileManifest,
    file_from_list,
    file_to_list,
)

Value = bool | int | float | str | bytes | tuple["Value", ...] | None

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
# Arrays of arrays: OPC UA matrices. Deeper than this is a value we do not carry.
DEPTH_MAX = 8


class Quality(enum.IntEnum):
    """How far a sample's value can be trusted (OPC UA's three classes, plus stale)."""

    GOOD = 0
    UNCERTAIN = 1
    BAD = 2
    # Only the receiver assigns STALE: the link went quiet, the value is the last known.
    STALE = 3


class ValueType(enum.StrEnum):
    """The PLC value types a tag can have (of each element, when the value is an array)."""

    BOOL = "bool"
    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"
    BYTESTRING = "bytestring"  # bin on the wire, base64 in JSON
    DATETIME = "datetime"  # RFC 3339 text (OPC UA dates reach 9999, past int64 ns)
    LOCALIZED_TEXT = "localized_text"  # [text, locale]
    GUID = "guid"  # text, 8-4-4-4-12 lower-case hex
    NODE_ID = "node_id"  # text, OPC UA string form ("ns=2;s=Tank.Level")
    QUALIFIED_NAME = "qualified_name"  # text, "2:Name"
    STATUS_CODE = "status_code"  # [code, name]


class Kind(enum.IntEnum):
    SAMPLE = 0
    TAG = 1
    HEARTBEAT = 2
    DEVICE = 3
    LOG = 5  # a syslog message or a security event: its own lane (diode/syslog.py)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One value of one tag at one time, with its quality and, when not good, why."""

    tag_id: int
    ts_ns: int
    value: Value
    quality: Quality = Quality.GOOD
    reason: str = ""


_new_object = object.__new__
_slot = vars(Sample)  # the slot descriptors: their __set__ writes past the frozen __setattr__
_set_tag_id = _slot["tag_id"].__set__
_set_ts_ns = _slot["ts_ns"].__set__
_set_value = _slot["value"].__set__
_set_quality = _slot["quality"].__set__
_set_reason = _slot["reason"].__set__
_GOOD = Quality.GOOD


def good_sample(tag_id: int, ts_ns: int, value: Value) -> Sample:
    """``Sample(tag_id=..., ts_ns=..., value=...)``, GOOD, built for a hot loop.

    The same object the dataclass builds (Sample has no validation of its
    own), its slots filled directly: 0.35 against 0.85 us here, where the
    generated ``__init__`` of a frozen class calls ``object.__setattr__`` per field.
    """
    sample = _new_object(Sample)
    _set_tag_id(sample, tag_id)
    _set_ts_ns(sample, ts_ns)
    _set_value(sample, value)
    _set_quality(sample, _GOOD)
    _set_reason(sample, "")
    return sample


@dataclass(frozen=True, slots=True, kw_only=True)
class TagInfo:
    """A catalogue entry: what a tag id means. Re-sent on the carousel."""

    tag_id: int
    name: str
    device: str
    value_type: ValueType
    unit: str = ""
    source: str = ""
    description: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """The transmitter is alive; its counters ride along."""

    ts_ns: int
    counters: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceInfo:
    """Inventory of one polled device: what it told us about itself."""

    device: str
    protocol: str
    endpoint: str
    identity: Mapping[str, str] = field(default_factory=dict)


class LogFormat(enum.IntEnum):
    """What a log record's fields came from."""

    RFC5424 = 0
    RFC3164 = 1
    RAW = 2  # not parseable as syslog: ``msg`` holds the bytes as received
    EVENT = 3  # a security event of diode's own


# Bounds of a log record's fields (RFC 5424 section 6 for the header fields).
LOG_LIMITS = {
    "source": 64,
    "timestamp": 64,
    "hostname": 255,
    "app_name": 48,
    "procid": 128,
    "msgid": 32,
    "sd": 8192,
    "msg": 16384,
}
PRI_NONE = -1
PRI_MAX = 191


@dataclass(frozen=True, slots=True, kw_only=True)
class LogRecord:
    """One syslog message from the OT side, or one security event of diode's own.

    ``seq`` numbers the log lane inside an epoch (0, 1, 2 ...), apart from the
    record numbers of the block: the receiver counts a missing ``seq`` as an
    exact number of log messages lost. Header fields are as in RFC 5424 with
    its nil value ``-`` stored as ``""``; ``pri`` is -1 when the message had none.
    """

    seq: int
    ts_ns: int
    source: str
    format: LogFormat
    pri: int = PRI_NONE
    timestamp: str = ""
    hostname: str = ""
    app_name: str = ""
    procid: str = ""
    msgid: str = ""
    sd: str = ""
    msg: bytes = b""

    def __post_init__(self) -> None:
        check_log_record(self)


def _too_long(record: LogRecord) -> str | None:
    for name, limit in LOG_LIMITS.items():
        value = getattr(record, name)
        # A str of n characters is at most 4n bytes of UTF-8: encode only when it matters.
        if len(value) > limit or (
            type(value) is str and len(value) * 4 > limit and len(value.encode()) > limit
        ):
            return name
    return None


def check_log_record(record: LogRecord) -> None:
    """Every field in bounds, or a ValueError naming the field."""
    if not 0 <= record.seq <= UINT64_MAX:
        raise ValueError("log seq out of range")
    if not PRI_NONE <= record.pri <= PRI_MAX:
        raise ValueError("log pri out of range")
    if (name := _too_long(record)) is not None:
        raise ValueError(f"log field {name} longer than {LOG_LIMITS[name]} bytes")


# The file lane's records (kinds 16, 17) are defined in diode/files.py.
Record = (
    Sample | TagInfo | Heartbeat | DeviceInfo | LogRecord | FileManifest | FileChunk | FileHoles
)


def _to_list(record: Record) -> list[Any]:
    match record:
        case Sample():
            return [
                Kind.SAMPLE,
                record.tag_id,
                record.ts_ns,
                int(record.quality),
                record.value,
                record.reason,
            ]
        case TagInfo():
            return [
                Kind.TAG,
                record.tag_id,
                record.name,
                record.device,
                str(record.value_type),
                record.unit,
                record.source,
                record.description,
            ]
        case Heartbeat():
            return [Kind.HEARTBEAT, record.ts_ns, dict(record.counters)]
        case DeviceInfo():
            return [
                Kind.DEVICE,
                record.device,
                record.protocol,
                record.endpoint,
                dict(record.identity),
            ]
        case LogRecord():
            return [
                Kind.LOG,
                record.seq,
                record.ts_ns,
                record.source,
                int(record.format),
                record.pri,
                record.timestamp,
                record.hostname,
                record.app_name,
                record.procid,
                record.msgid,
                record.sd,
                record.msg,
            ]
        case FileManifest() | FileChunk() | FileHoles():
            return file_to_list(record)


_packer = msgpack.Packer(use_bin_type=True, strict_types=False)
_pack = _packer.pack
_SAMPLE = int(Kind.SAMPLE)  # IntEnums pack as their int (strict_types=False)


def encode_record(record: Record) -> bytes:
    """The one encoding of a record; a record msgpack cannot carry is a DiodeError.

    The transmitter checks samples first (:func:`unrepresentable`); this is the
    backstop that keeps anything it missed from escaping as another exception.
    """
    try:
        if type(record) is Sample:  # the hot path: _to_list's match, inlined
            return _pack(
                [_SAMPLE, record.tag_id, record.ts_ns, record.quality, record.value, record.reason]
            )
        return _pack(_to_list(record))
    except Exception as exc:  # OverflowError, UnicodeEncodeError, TypeError, ValueError...
        raise DiodeError(f"record cannot be encoded: {exc!r}", reason="unencodable") from exc


def _bad_value(value: object, depth: int = 0) -> str:  # noqa: PLR0911 - one return per kind
    """Why ``value`` cannot travel as a sample's value, or ``""``."""
    kind = type(value)
    if value is None or kind is bool or kind is float or kind is bytes:
        return ""
    if kind is int:
        return "" if INT64_MIN <= value <= UINT64_MAX else "integer out of the 64-bit range"  # type: ignore[operator]  # an int, by the check above
    if kind is str:
        try:
            value.encode()  # type: ignore[attr-defined]  # a str, by the check above
        except UnicodeEncodeError:
            return "text is not valid Unicode"
        return ""
    if kind is tuple or kind is list:
        if depth >= DEPTH_MAX:
            return f"array nested deeper than {DEPTH_MAX}"
        for item in value:  # type: ignore[attr-defined]  # a sequence, by the check above
            if problem := _bad_value(item, depth + 1):
                return problem
        return ""
    return f"unsupported value type {kind.__name__}"


def unrepresentable(sample: Sample) -> str:
    """Why ``sample`` cannot be encoded or read back as it is, or ``""`` if it can.

    The hot path (a float, int, bool or nil with a sane timestamp) costs a few
    type checks.
    """
    ts = sample.ts_ns
    if type(ts) is not int or not INT64_MIN <= ts <= INT64_MAX:
        return "timestamp out of range"
    reason = sample.reason
    if type(reason) is not str or (reason and _bad_value(reason)):
        return "reason is not valid text"
    value = sample.value
    kind = type(value)
    if kind is float or kind is bool or value is None:  # most samples: no call
        return ""
    if kind is int and INT64_MIN <= value <= UINT64_MAX:  # type: ignore[operator]  # an int
        return ""
    if kind is str and value.isascii():  # type: ignore[union-attr]  # a str, by the check
        return ""  # O(1) in CPython, where encoding a 1 KB text to check it cost 1 us
    return _bad_value(value)


def encode_records(records: Iterable[Record]) -> bytes:
    return b"".join(encode_record(r) for r in records)


def _int(value: object, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise FrameError(f"record field {what} out of range", reason="bad_record")
    return value


def _str(value: object, what: str) -> str:
    if type(value) is not str:
        raise FrameError(f"record field {what} is not a string", reason="bad_record")
    return value


def _value(value: object, depth: int = 0) -> Value:
    if value is None or type(value) in (bool, str, bytes, float):
        return value  # type: ignore[return-value]  # narrowed by the type() check above
    if type(value) is int:
        return _int(value, INT64_MIN, UINT64_MAX, "value")
    if type(value) is list and depth < DEPTH_MAX:
        return tuple(_value(v, depth + 1) for v in value)
    raise FrameError("record value of an unsupported type", reason="bad_record")


def _str_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise FrameError(f"record field {what} is not a map", reason="bad_record")
    return {_str(k, what): _str(v, what) for k, v in value.items()}


def _int_map(value: object, what: str) -> dict[str, int]:
    if not isinstance(value, dict):
        raise FrameError(f"record field {what} is not a map", reason="bad_record")
    return {_str(k, what): _int(v, INT64_MIN, UINT64_MAX, what) for k, v in value.items()}


_QUALITIES = tuple(Quality)
_UINT32_MAX = 2**32 - 1
_INT64_MAX = INT64_MAX


def _log(rest: list[Any]) -> LogRecord:
    seq, ts_ns, source, fmt, pri, timestamp, hostname, app_name, procid, msgid, sd, msg = rest
    if type(msg) is not bytes:
        raise FrameError("record field msg is not bin", reason="bad_record")
    texts = (source, timestamp, hostname, app_name, procid, msgid, sd)
    if not all(type(text) is str for text in texts):
        for text, name in zip(texts, _LOG_TEXTS, strict=True):
            _str(text, name)  # names the first field that is not a string
    log_format = _LOG_FORMATS.get(fmt) if type(fmt) is int else None
    if log_format is None:
        raise FrameError("record field format has an unknown value", reason="bad_record")
    return LogRecord(
        seq=_int(seq, 0, UINT64_MAX, "seq"),
        ts_ns=_int(ts_ns, INT64_MIN, _INT64_MAX, "ts_ns"),
        source=source,
        format=log_format,
        pri=_int(pri, PRI_NONE, PRI_MAX, "pri"),
        timestamp=timestamp,
        hostname=hostname,
        app_name=app_name,
        procid=procid,
        msgid=msgid,
        sd=sd,
        msg=msg,
    )


_LOG_TEXTS = ("source", "timestamp", "hostname", "app_name", "procid", "msgid", "sd")
_LOG_FORMATS = {int(f): f for f in LogFormat}


def _from_list(item: object) -> Record:
    if not isinstance(item, list) or not item:
        raise FrameError("record is not a non-empty array", reason="bad_record")
    kind, *rest = item
    if kind in FILE_KINDS:
        return file_from_list(kind, rest)
    try:
        match kind, len(rest):
            case Kind.SAMPLE, 5:
                tag_id, ts_ns, quality, value, reason = rest
                return Sample(
                    tag_id=_int(tag_id, 0, 2**32 - 1, "tag_id"),
                    ts_ns=_int(ts_ns, INT64_MIN, 2**63 - 1, "ts_ns"),
                    quality=Quality(_int(quality, 0, 3, "quality")),
                    value=_value(value),
                    reason=_str(reason, "reason"),
                )
            case Kind.TAG, 7:
                tag_id, name, device, value_type, unit, source, description = rest
                return TagInfo(
                    tag_id=_int(tag_id, 0, 2**32 - 1, "tag_id"),
                    name=_str(name, "name"),
                    device=_str(device, "device"),
                    value_type=ValueType(_str(value_type, "value_type")),
                    unit=_str(unit, "unit"),
                    source=_str(source, "source"),
                    description=_str(description, "description"),
                )
            case Kind.HEARTBEAT, 2:
                ts_ns, counters = rest
                return Heartbeat(
                    ts_ns=_int(ts_ns, INT64_MIN, 2**63 - 1, "ts_ns"),
                    counters=_int_map(counters, "counters"),
                )
            case Kind.DEVICE, 4:
                device, protocol, endpoint, identity = rest
                return DeviceInfo(
                    device=_str(device, "device"),
                    protocol=_str(protocol, "protocol"),
                    endpoint=_str(endpoint, "endpoint"),
                    identity=_str_map(identity, "identity"),
                )
            case Kind.LOG, 12:
                return _log(rest)
    except ValueError as exc:  # an enum value we do not know, a log field out of bounds
        raise FrameError(f"record field has an unknown value: {exc}", reason="bad_record") from exc
    raise FrameError("record of an unknown kind or shape", reason="bad_record")


_ARRAY32 = b"\xdd"  # msgpack's array 32 header; a u32 count follows
_new_record = object.__new__
# The slots of a Sample, filled through their descriptors. A frozen dataclass's
# __init__ sets each field with object.__setattr__, by name: 1.5 us a sample
# here, against 0.6 for the descriptors, and the receiver builds one per update.
# Used only on a new object, for fields _samples has checked as __init__ would
# take them: the Sample is the one __init__ would build (tests/test_core_properties.py).
_SAMPLE_SLOTS = tuple(Sample.__dict__[name].__set__ for name in Sample.__slots__)


def _samples(items: list[Any]) -> list[Record]:
    """Records of a block's items: well-formed samples of scalars checked and built inline
    (the hot path, one pass); anything else (arrays, other kinds, errors) through
    :func:`_from_list`."""
    out: list[Record] = []
    append = out.append
    qualities = _QUALITIES
    new = _new_record
    set_tag_id, set_ts_ns, set_value, set_quality, set_reason = _SAMPLE_SLOTS
    for item in items:
        if type(item) is list and len(item) == 6 and item[0] == 0:
            _, tag_id, ts_ns, quality, value, reason = item
            if (
                type(tag_id) is int
                and 0 <= tag_id <= _UINT32_MAX
                and type(ts_ns) is int
                and INT64_MIN <= ts_ns <= _INT64_MAX
                and type(quality) is int
                and 0 <= quality <= 3
                and type(reason) is str
                and (
                    type(value) in (float, bool, str, bytes)
                    or value is None
                    or (type(value) is int and INT64_MIN <= value <= UINT64_MAX)
                )
            ):
                sample = new(Sample)
                set_tag_id(sample, tag_id)
                set_ts_ns(sample, ts_ns)
                set_value(sample, value)
                set_quality(sample, qualities[quality])
                set_reason(sample, reason)
                append(sample)
                continue
        append(_from_list(item))
    return out


def decode_records(payload: bytes | memoryview, count: int) -> list[Record]:
    """Decode exactly ``count`` records filling ``payload``; anything else is a FrameError.

    The records are msgpack arrays one after the other; read as the items of one
    array of ``count`` (a header put in front), msgpack decodes them all in one
    call and itself refuses fewer items (incomplete input), more (extra data)
    and a count larger than the payload could hold (``max_array_len``).
    """
    if not 0 <= count <= _UINT32_MAX:
        raise FrameError("record count out of range", reason="bad_record")
    try:
        items = msgpack.unpackb(
            _ARRAY32 + count.to_bytes(4, "big") + payload,
            use_list=True,
            raw=False,
            strict_map_key=True,
        )
        return _samples(items)
    except FrameError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise FrameError(f"records do not decode: {exc!r}", reason="bad_record") from exc

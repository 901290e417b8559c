"""Topics and JSON payloads: what MQTT subscribers see. Pure functions, no I/O.

Per-tag message, on ``topic_template`` (default ``{prefix}/{site}/{area}/{device}/{tag}``,
an ISA-95 style Unified Namespace: enterprise (the prefix), site, area and line
(``areas`` per device; left out when empty), device (the PLC), tag)::

    {"value": 21.5, "ts": "2024-05-01T12:00:00.123456Z", "quality": "good", "unit": "degC"}
    {"value": 21.5, "ts": "...", "quality": "stale", "unit": "degC", "reason": "link down"}

Batched message, one per device per block, on ``{prefix}/{site}/{area}/{device}``; the
samples are a list in arrival order, so two values of one tag in one block are
both kept::

    {"device": "plc1", "samples": [{"tag": "temp", "value": 21.5, "ts": "...", ...}, ...]}

Inventory (retained) on ``{prefix}/{site}/{area}/{device}/$inventory``, each tag's
metadata (retained) on its value topic plus ``/$meta``, stream status
(retained) on ``{prefix}/{site}/$status``.

A value is written as the catalogue's value type says. A float32 (Modbus
float32, OPC UA Float) is the shortest decimal that reads back to the same
float32 (``12.47``, not the float64 expansion ``12.470000267028809``); a
float64 is written in full (the shortest decimal that reads back to the same
float64). An OPC UA array is a JSON array (of arrays, for a matrix); a
ByteString is base64 text (RFC 4648, with padding); a DateTime is RFC 3339
text; a LocalizedText is ``{"text": ..., "locale": ...}``; a StatusCode is
``{"code": 2156724224, "name": "BadSensorFailure"}``; Guid, NodeId and
QualifiedName are their OPC UA text forms.

Timestamps are RFC 3339 in UTC with microseconds, which every common parser
reads (nanoseconds are not: JavaScript, Java's older APIs and Python < 3.11
reject or mis-read nine digits). Non-finite floats, which JSON cannot carry,
are sent as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, as the
proto3 JSON mapping does, rather than invented numbers.

Device and tag names come from the transmitter's catalogue, so they are made
safe for one topic level: ``/``, ``+``, ``#`` and NUL become ``_``; an empty
name becomes ``_``.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from diode.config.mqtt import StreamOutput
from diode.records import DeviceInfo, Quality, Sample, TagInfo, Value, ValueType

CONTENT_TYPE = "application/json"
QUALITY_NAMES = {q: q.name.lower() for q in Quality}
_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_", "\0": "_"})
_NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


class Message(NamedTuple):
    """One MQTT message ready to publish (a tuple: cheap to build in the hot path)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    expiry_s: int | None = None


def level(name: str) -> str:
    """A catalogue name made safe for one topic level."""
    return name.translate(_UNSAFE) or "_"


_second_cache: dict[int, str] = {}


def rfc3339(ts_ns: int) -> str:
    """``ts_ns`` (ns since the Unix epoch) as RFC 3339 UTC with microseconds."""
    seconds, ns = divmod(ts_ns, 1_000_000_000)
    head = _second_cache.get(seconds)
    if head is None:
        if len(_second_cache) > 4096:  # a block spans a few seconds; keep the cache small
            _second_cache.clear()
        head = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_cache[seconds] = head
    return f"{head}.{ns // 1000:06d}Z"


_FLOAT32 = struct.Struct("<f")
_FLOAT32_NORMAL = 2.0**-126  # the smallest normal float32


_float32_cache: dict[float, float] = {}


def float32_decimal(value: float) -> float:
    """The shortest decimal that reads back to the float32 ``value`` holds.

    As a float whose shortest float64 text is that decimal, which is what the
    JSON encoder writes. A value that is not exactly a float32 (a scaled one)
    is returned whole: precision is never dropped. Plant values repeat (a
    level that holds, the integrity refresh, stale republishing): the last
    65 536 are remembered, which costs a dict lookup; a new one costs about
    3 us more than a float64 (measured on 2 busy cores, load average 10).
    """
    if value == 0.0:
        return value  # 0.0 or -0.0, which a dict would take for one key
    known = _float32_cache.get(value)
    if known is not None:
        return known
    if len(_float32_cache) >= 65_536:
        _float32_cache.clear()
    _float32_cache[value] = shortest = _float32_decimal(value)
    return shortest


def _float32_decimal(value: float) -> float:
    pack, unpack = _FLOAT32.pack, _FLOAT32.unpack
    try:
        if unpack(pack(value))[0] != value:
            return value
    except OverflowError:  # beyond float32's range: not a float32
        return value
    if abs(value) < _FLOAT32_NORMAL:  # zero or subnormal: a wider interval, every length
        for digits in range(1, 9):
            candidate = float(f"{value:.{digits}g}")
            if unpack(pack(candidate))[0] == value:
                return candidate
        return float(f"{value:.9g}")
    # A normal float32's rounding interval is under 1.2e-7 of it wide, while
    # 6-digit decimals lie 1e-6 of it apart or more: at most one of 6 digits or
    # fewer reads back, and %.6g finds it. More digits only come closer, so
    # the shortest length is found in two tries (7, then 6 or 8); 9 digits
    # always read back (IEEE 754-2008, 5.12.2). Two tries, not up to four: the
    # receiver formats every float32 it publishes.
    seven = float(f"{value:.7g}")
    if unpack(pack(seven))[0] == value:
        six = float(f"{value:.6g}")
        return six if unpack(pack(six))[0] == value else seven
    eight = float(f"{value:.8g}")
    return eight if unpack(pack(eight))[0] == value else float(f"{value:.9g}")


_COMPOSITE_KEYS = {
    ValueType.LOCALIZED_TEXT: ("text", "locale"),
    ValueType.STATUS_CODE: ("code", "name"),
}


def json_value(value: Value, value_type: ValueType | None = None) -> Any:
    """The value as JSON carries it, read as ``value_type`` says (see the module docstring).

    Non-finite floats are their proto3 JSON strings, ``"NaN"``, ``"Infinity"``
    and ``"-Infinity"``.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            return _NONFINITE[repr(value)]
        return float32_decimal(value) if value_type is ValueType.FLOAT32 else value
    if isinstance(value, tuple):
        keys = _COMPOSITE_KEYS.get(value_type) if value_type is not None else None
        if keys is not None and len(value) == 2 and not isinstance(value[0], tuple):
            # Each member as JSON carries it too: the decoder takes any value for any
            # type, and a bytes member (a NaN...) reached orjson raw and raised.
            return dict(zip(keys, (json_value(item) for item in value), strict=True))
        return [json_value(item, value_type) for item in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value


def sample_fields(tag: TagInfo, sample: Sample) -> dict[str, Any]:
    """The JSON object of one sample (without the tag name)."""
    fields: dict[str, Any] = {
        "value": json_value(sample.value, tag.value_type),
        "ts": rfc3339(sample.ts_ns),
        "quality": QUALITY_NAMES[sample.quality],
        "unit": tag.unit,
    }
    if sample.quality is not Quality.GOOD:
        fields["reason"] = sample.reason
    return fields


def encode(obj: object) -> bytes:
    """Compact UTF-8 JSON.

    orjson, copied out: 0.32 us for a per-tag payload against 1.8 us for the
    standard library's encoder (it was 15 % of the receiver at 50 000
    updates/s). The copy matters: orjson's result keeps a 4 KiB allocation
    whatever its length, and a receiver catching up holds a whole drain's
    messages at once (a 4 s stall at 50 000/s: 428 MB peak without it). orjson
    would write a non-finite float as null: callers pass them through
    :func:`json_value` first, never an invented value.
    """
    return bytes(memoryview(orjson.dumps(obj)))


class Topics:
    """Topic names of one stream, with per-tag topics cached (the hot path)."""

    def __init__(self, stream: StreamOutput) -> None:
        self.stream = stream
        self.root = f"{stream.prefix}/{stream.site}"
        self._template = stream.topic_template
        # An empty area leaves its level out, with one of the slashes around it.
        self._template_no_area = self._template.replace("{area}/", "").replace("/{area}", "")
        self._tags: dict[tuple[str, str], str] = {}
        # Per catalogue entry (by identity, the entry held so its id stays its own): the
        # topic and the end of a good sample's per-tag payload (see sample_messages), and
        # apart (a per-tag stream never encodes the name in a payload) the end of its
        # object in a batched payload.
        self._entries: dict[int, tuple[TagInfo, str, bytes]] = {}
        self._batched_tails: dict[int, tuple[TagInfo, bytes]] = {}

    def area(self, device: str) -> str:
        """The ISA-95 levels between the site and ``device`` (may be empty)."""
        return self.stream.areas.get(device, self.stream.default_area)

    def tag(self, device: str, name: str) -> str:
        key = (device, name)
        topic = self._tags.get(key)
        if topic is None:
            if len(self._tags) > 1_000_000:  # a renamed catalogue must not grow this forever
                self._tags.clear()
            area = self.area(device)
            topic = (self._template if area else self._template_no_area).format(
                prefix=self.stream.prefix,
                site=self.stream.site,
                area=area,
                device=level(device),
                tag=level(name),
            )
            self._tags[key] = topic
        return topic

    def entry(self, tag: TagInfo) -> tuple[str, bytes]:
        """The tag's topic, and what follows the ``ts`` of a good sample's per-tag payload."""
        known = self._entries.get(id(tag))
        if known is not None and known[0] is tag:
            return known[1], known[2]
        if len(self._entries) > 1_000_000:  # a renamed catalogue must not grow this forever
            self._entries.clear()
        topic = self.tag(tag.device, tag.name)
        tail = _GOOD_HEAD + orjson.dumps(tag.unit) + b"}"
        self._entries[id(tag)] = (tag, topic, tail)
        return topic, tail

    def batched_tail(self, tag: TagInfo) -> bytes:
        """What follows the ``ts`` of a good sample's object in a batched payload."""
        known = self._batched_tails.get(id(tag))
        if known is not None and known[0] is tag:
            return known[1]
        if len(self._batched_tails) > 1_000_000:
            self._batched_tails.clear()
        tail = _GOOD_HEAD + orjson.dumps(tag.unit) + b',"tag":' + orjson.dumps(tag.name) + b"}"
        self._batched_tails[id(tag)] = (tag, tail)
        return tail

    def device(self, device: str) -> str:
        area = self.area(device)
        return f"{self.root}/{area}/{level(device)}" if area else f"{self.root}/{level(device)}"

    def inventory(self, device: str) -> str:
        return f"{self.device(device)}/$inventory"

    def status(self) -> str:
        return f"{self.root}/$status"

    def files(self) -> str:
        return f"{self.root}/$files"


def sample_messages(topics: Topics, items: Sequence[tuple[TagInfo, Sample]]) -> list[Message]:
    """The value messages of ``items`` for the stream's payload mode, in order."""
    stream = topics.stream
    qos, retain, expiry = stream.qos, stream.retain, stream.message_expiry_s
    if stream.payload == "per_tag":
        return _per_tag(topics, items, qos, retain, expiry)
    return _batched(topics, items, qos, retain, expiry)


_GOOD = Quality.GOOD
_VALUE_HEAD = b'{"value":'
_TS_HEAD = b',"ts":"'
_GOOD_HEAD = b'","quality":"good","unit":'  # after the ts, in both payloads
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what orjson writes as a JSON integer


def _value_json(value: Value, value_type: ValueType) -> bytes:
    """A good sample's value as its payload writes it (an integer without orjson)."""
    if type(value) is int and _INT_MIN <= value <= _INT_MAX:
        return str(value).encode()
    return orjson.dumps(json_value(value, value_type))


def _per_tag(
    topics: Topics,
    items: Sequence[tuple[TagInfo, Sample]],
    qos: int,
    retain: bool,
    expiry: int | None,
) -> list[Message]:
    """One message per sample: ``encode(sample_fields(tag, sample))``, the bytes built
    directly for a good sample (tests/test_payload.py holds them to it).

    The hot path of the receiver: a good sample's payload is its value, its
    timestamp and a tail its catalogue entry fixes (quality and unit), so the
    tail is made once per entry and the timestamp once per distinct ``ts_ns``
    (the samples of one poll share it); a dict and an orjson call per sample
    cost twice as much (2.8 against 1.3 us here).
    """
    out: list[Message] = []
    append = out.append
    entry = topics.entry
    last_ts: int | None = None
    ts = b""
    for tag, sample in items:
        if sample.quality is not _GOOD:
            append(
                Message(topics.tag(tag.device, tag.name), encode(sample_fields(tag, sample)),
                        qos, retain, expiry)
            )  # fmt: skip
            continue
        topic, tail = entry(tag)
        text = _value_json(sample.value, tag.value_type)
        if sample.ts_ns != last_ts:
            last_ts = sample.ts_ns
            ts = rfc3339(last_ts).encode()
        append(
            Message(topic, b"".join((_VALUE_HEAD, text, _TS_HEAD, ts, tail)), qos, retain, expiry)
        )
    return out


def _batched(
    topics: Topics,
    items: Sequence[tuple[TagInfo, Sample]],
    qos: int,
    retain: bool,
    expiry: int | None,
) -> list[Message]:
    """One message per device: ``encode({"device": ..., "samples": [...]})`` with each
    sample's ``sample_fields`` and its ``tag``, a good sample's object built as bytes the
    way :func:`_per_tag` builds its payload (tests/test_payload.py holds them to it).

    A dict per sample and orjson over the whole list were 2 us a sample of the link
    bench's (1 KB strings, 44 a block): the second largest cost of its output path.
    """
    per_device: dict[str, list[bytes]] = {}
    tail_of, dumps = topics.batched_tail, orjson.dumps
    last_ts: int | None = None
    ts = b""
    for tag, sample in items:
        objects = per_device.get(tag.device)
        if objects is None:
            objects = per_device[tag.device] = []
        if sample.quality is not _GOOD:
            fields = sample_fields(tag, sample)
            fields["tag"] = tag.name
            objects.append(dumps(fields))
            continue
        text = _value_json(sample.value, tag.value_type)
        if sample.ts_ns != last_ts:
            last_ts = sample.ts_ns
            ts = rfc3339(last_ts).encode()
        objects.append(b"".join((_VALUE_HEAD, text, _TS_HEAD, ts, tail_of(tag))))
    return [
        Message(
            topics.device(device),
            b"".join((b'{"device":', dumps(device), b',"samples":[', b",".join(objects), b"]}")),
            qos,
            retain,
            expiry,
        )
        for device, objects in per_device.items()
    ]


def inventory_message(topics: Topics, info: DeviceInfo) -> Message:
    """Retained, QoS 1: what the device told the transmitter about itself."""
    payload = {
        "device": info.device,
        "protocol": info.protocol,
        "endpoint": info.endpoint,
        "identity": dict(info.identity),
    }
    return Message(topics.inventory(info.device), encode(payload), 1, True)


def meta_message(topics: Topics, info: TagInfo) -> Message:
    """Retained, QoS 1: what the catalogue says of a tag, on ``{tag topic}/$meta``."""
    payload = {
        "device": info.device,
        "tag": info.name,
        "value_type": str(info.value_type),
        "unit": info.unit,
        "description": info.description,
        "source": info.source,
    }
    return Message(topics.tag(info.device, info.name) + "/$meta", encode(payload), 1, True)


def _plain(obj: object) -> object:
    """``obj`` with non-finite floats replaced and other unknown types as strings."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return json_value(obj)
    return str(obj)


def status_message(topics: Topics, status: dict[str, Any]) -> Message:
    """Retained, QoS 1: the stream's status as the receiver reports it."""
    return Message(topics.status(), encode(_plain(status)), 1, True)


def file_message(topics: Topics, result: dict[str, Any]) -> Message:
    """QoS 1, not retained: one received (or failed) file, as ``receiver/files.py`` reports it."""
    return Message(topics.files(), encode(result), 1, False)

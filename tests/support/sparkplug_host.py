"""An independent Sparkplug B host application for the tests.

It shares no code with the receiver's Sparkplug implementation: the receiver
encodes with Google's ``protobuf`` runtime (``receiver/sparkplug_payload.py``);
this host reads the protobuf wire format with its own few lines below, written
from the protobuf encoding rules and the field numbers of Eclipse Tahu's
``sparkplug_b.proto``, and keeps the session rules a Sparkplug 3.0 primary host
keeps: NBIRTH first with seq 0, seq +1 (mod 256) on every message of the node
but NDEATH, no data for a device without a birth, aliases resolved from births,
the NDEATH's bdSeq equal to the NBIRTH's. Every broken rule is recorded in
``violations``; a test asserts there are none.
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

# -- the protobuf wire format, by hand --------------------------------------------------

VARINT, I64, LEN, I32 = 0, 1, 2, 5


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, raw value) of a message, in order."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _varint(data, pos)
        elif wire == I64:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == I32:
            value, pos = data[pos : pos + 4], pos + 4
        elif wire == LEN:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated")
        out.append((number, wire, value))
    return out


# Sparkplug datatypes (sparkplug_b.proto's DataType)
INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64 = 1, 2, 3, 4, 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING = 9, 10, 11, 12
WIDTH = {INT8: 8, INT16: 16, INT32: 32, INT64: 64}


def _signed(raw: int, bits: int) -> int:
    raw &= (1 << bits) - 1
    return raw - (1 << bits) if raw >> (bits - 1) else raw


def typed(datatype: int | None, number: int, raw: Any) -> Any:
    """A value field (Metric 10..15, PropertyValue 3..8 shifted to Metric's numbers)."""
    if number == 10 or number == 11:  # int_value / long_value
        if datatype in WIDTH:
            return _signed(raw, WIDTH[datatype])
        return raw
    if number == 12:
        return struct.unpack("<f", raw)[0]
    if number == 13:
        return struct.unpack("<d", raw)[0]
    if number == 14:
        return bool(raw)
    if number == 15:
        return raw.decode()
    return raw


def property_set(data: bytes) -> dict[str, Any]:
    keys: list[str] = []
    values: list[Any] = []
    for number, _, raw in fields(data):
        if number == 1:
            keys.append(raw.decode())
        elif number == 2:
            datatype: int | None = None
            value: Any = None
            for n, _, r in fields(raw):
                if n == 1:
                    datatype = r
                elif 3 <= n <= 8:
                    value = typed(datatype, n + 7, r)
            values.append(value)
    return dict(zip(keys, values, strict=True))


@dataclass
class Metric:
    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None
    datatype: int | None = None
    is_historical: bool = False
    is_null: bool = False
    properties: dict[str, Any] = field(default_factory=dict)
    value: Any = None


def metric(data: bytes, datatypes: dict[int, int]) -> Metric:
    m = Metric()
    value_field: tuple[int, Any] | None = None
    for number, _, raw in fields(data):
        match number:
            case 1:
                m.name = raw.decode()
            case 2:
                m.alias = raw
            case 3:
                m.timestamp = raw
            case 4:
                m.datatype = raw
            case 5:
                m.is_historical = bool(raw)
            case 7:
                m.is_null = bool(raw)
            case 9:
                m.properties = property_set(raw)
            case n if 10 <= n <= 16:
                value_field = (n, raw)
    datatype = m.datatype
    if datatype is None and m.alias is not None:
        datatype = datatypes.get(m.alias)
    if value_field is not None:
        m.value = typed(datatype, *value_field)
    return m


@dataclass
class Payload:
    timestamp: int | None = None
    seq: int | None = None
    metrics: list[Metric] = field(default_factory=list)


def payload(data: bytes, datatypes: dict[int, int] | None = None) -> Payload:
    p = Payload()
    raw_metrics: list[bytes] = []
    for number, _, raw in fields(data):
        if number == 1:
            p.timestamp = raw
        elif number == 2:
            raw_metrics.append(raw)
        elif number == 3:
            p.seq = raw
    p.metrics = [metric(r, datatypes or {}) for r in raw_metrics]
    return p


def _key(number: int, wire: int) -> bytes:
    return _uvarint(number << 3 | wire)


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def command(name: str, datatype: int, value: bool | int) -> bytes:
    """A one-metric NCMD/DCMD payload (boolean or integer value)."""
    name_b = name.encode()
    body = _key(1, LEN) + _uvarint(len(name_b)) + name_b + _key(4, VARINT) + _uvarint(datatype)
    if datatype == BOOLEAN:
        body += _key(14, VARINT) + _uvarint(int(bool(value)))
    else:
        body += _key(10, VARINT) + _uvarint(int(value) & 0xFFFFFFFF)
    ts = int(time.time() * 1000)
    return _key(1, VARINT) + _uvarint(ts) + _key(2, LEN) + _uvarint(len(body)) + body


# -- the host ------------------------------------------------------------------------


@dataclass
class Event:
    at: float  # time.monotonic() on arrival
    kind: str  # NBIRTH, DBIRTH, DDATA, DDEATH, NDEATH
    device: str | None
    payload: Payload


@dataclass
class Device:
    metrics: dict[str, Metric] = field(default_factory=dict)  # by name, current values
    born: bool = False


class SparkplugHost:
    """Subscribes to ``spBv1.0/{group}/#`` and keeps one edge node's session as a host would."""

    def __init__(self, port: int, group: str = "diode", host_id: str | None = None) -> None:
        self.group = group
        self.host_id = host_id
        self.lock = threading.Lock()
        self.events: list[Event] = []
        self.violations: list[str] = []
        self.devices: dict[str, Device] = {}
        self.historical: list[tuple[str, Metric]] = []
        self.bd_seq: int | None = None
        self.ndeath_bd_seqs: list[int] = []
        self.node_born = False
        self._seq: int | None = None
        self._datatypes: dict[int, int] = {}
        self._names: dict[int, str] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"spBv1.0/{group}/#", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    # -- rules ---------------------------------------------------------------------

    def _violation(self, text: str) -> None:
        self.violations.append(text)

    def _check_seq(self, kind: str, p: Payload) -> None:
        if p.seq is None:
            self._violation(f"{kind} without seq")
            return
        if kind == "NBIRTH":
            if p.seq != 0:
                self._violation(f"NBIRTH seq {p.seq}, not 0")
        elif self._seq is None:
            self._violation(f"{kind} before any NBIRTH")
        elif p.seq != (self._seq + 1) % 256:
            self._violation(f"{kind} seq {p.seq} after {self._seq}")
        self._seq = p.seq

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 4 or parts[2] not in {"NBIRTH", "DBIRTH", "DDATA", "DDEATH", "NDEATH"}:
            return
        kind = parts[2]
        device = parts[4] if len(parts) > 4 else None
        with self.lock:
            try:
                p = payload(msg.payload, self._datatypes)
            except (ValueError, IndexError, UnicodeDecodeError) as exc:
                self._violation(f"{kind} does not decode: {exc}")
                return
            self.events.append(Event(time.monotonic(), kind, device, p))
            handler = getattr(self, f"_{kind.lower()}")
            handler(device, p)

    def _nbirth(self, _device: str | None, p: Payload) -> None:
        self._check_seq("NBIRTH", p)
        bd = [m.value for m in p.metrics if m.name == "bdSeq"]
        if len(bd) != 1:
            self._violation("NBIRTH without one bdSeq")
        else:
            self.bd_seq = bd[0]
        self.node_born = True
        for dev in self.devices.values():
            dev.born = False

    def _dbirth(self, device: str | None, p: Payload) -> None:
        assert device is not None
        if not self.node_born:
            self._violation(f"DBIRTH of {device} before NBIRTH")
        self._check_seq("DBIRTH", p)
        dev = self.devices.setdefault(device, Device())
        dev.born = True
        dev.metrics = {}
        for m in p.metrics:
            if m.name is None or m.alias is None or m.datatype is None:
                self._violation(f"DBIRTH metric without name, alias or datatype: {m}")
                continue
            if m.alias in self._names and self._names[m.alias] != m.name:
                self._violation(f"alias {m.alias} reused for {m.name}")
            self._names[m.alias] = m.name
            self._datatypes[m.alias] = m.datatype
            dev.metrics[m.name] = m

    def _ddata(self, device: str | None, p: Payload) -> None:
        assert device is not None
        self._check_seq("DDATA", p)
        dev = self.devices.get(device)
        if dev is None or not dev.born:
            self._violation(f"DDATA of {device} without its DBIRTH")
            return
        for m in p.metrics:
            name = self._names.get(m.alias) if m.alias is not None else m.name
            if name is None or name not in dev.metrics:
                self._violation(f"DDATA metric with unknown alias {m.alias}")
                continue
            if m.is_historical:
                self.historical.append((name, m))
                continue
            known = dev.metrics[name]
            known.value, known.is_null, known.timestamp = m.value, m.is_null, m.timestamp
            if "Quality" in m.properties:
                known.properties["Quality"] = m.properties["Quality"]

    def _ddeath(self, device: str | None, p: Payload) -> None:
        assert device is not None
        self._check_seq("DDEATH", p)
        dev = self.devices.get(device)
        if dev is not None:
            dev.born = False

    def _ndeath(self, _device: str | None, p: Payload) -> None:
        bd = [m.value for m in p.metrics if m.name == "bdSeq"]
        if len(bd) != 1:
            self._violation("NDEATH without one bdSeq")
            return
        self.ndeath_bd_seqs.append(bd[0])
        if bd[0] == self.bd_seq:
            # 3.0: an NDEATH whose bdSeq is not the current NBIRTH's is an old session's
            self.node_born = False
            self._seq = None
            for dev in self.devices.values():
                dev.born = False

    # -- what tests ask ------------------------------------------------------------

    def of(self, kind: str, device: str | None = None) -> list[Event]:
        with self.lock:
            return [
                e for e in self.events if e.kind == kind and (device is None or e.device == device)
            ]

    def value(self, device: str, name: str) -> Any:
        with self.lock:
            dev = self.devices.get(device)
            m = None if dev is None else dev.metrics.get(name)
            return None if m is None else m.value

    def metric(self, device: str, name: str) -> Metric | None:
        with self.lock:
            dev = self.devices.get(device)
            return None if dev is None else dev.metrics.get(name)

    def state(self, *, online: bool, timestamp: int | None = None) -> None:
        """Publish this host's STATE (retained, QoS 1) as a Sparkplug 3.0 primary host does."""
        assert self.host_id is not None
        body = orjson.dumps({"online": online, "timestamp": timestamp or int(time.time() * 1000)})
        self.client.publish(
            f"spBv1.0/STATE/{self.host_id}", body, qos=1, retain=True
        ).wait_for_publish(5)

    def send(self, topic: str, data: bytes) -> None:
        self.client.publish(topic, data, qos=0).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

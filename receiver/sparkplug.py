"""The receiver as a Sparkplug B 3.0 edge node: births, sequence, aliases. No I/O here.

One :class:`EdgeNode` per Sparkplug stream, one Sparkplug device per PLC (the
catalogue's ``device``). It is fed what the router hands the outputs (named
samples, the stream's status) and what the broker delivers (NCMD, DCMD, the
primary host's STATE), and answers with the messages to publish; the I/O
shell (``receiver/sparkplug_node.py``) owns the connection, the will and the
clock, and passes ``now_ms`` in.

Topics, all under ``spBv1.0/{group_id}``::

    NBIRTH/{node}   seq 0; bdSeq (the will's), Node Control/Rebirth
    DBIRTH/{node}/{device}  every metric: name, alias, datatype, value, properties
    DDATA/{node}/{device}   aliases only, only what changed; historical ones flagged
    DDEATH/{node}/{device}  the link is down, or every tag of the PLC reads BAD
    NDEATH/{node}   the MQTT will (bdSeq); published by hand before a clean disconnect
    NCMD/{node}, DCMD/{node}/+   subscribed: a rebirth is answered here, anything else refused

The one-way situation, as the spec intends it: the OT side can never be asked,
so the receiver answers for it. ``Node Control/Rebirth`` is answered from the
last-value cache (a new NBIRTH with the *same* bdSeq and every DBIRTH); every
other command metric is a write, refused and counted, and there is no path by
which it could reach the OT side anyway (property 1).

``seq`` runs 0..255 over every message but NDEATH, wrapping, starting at 0 with
each NBIRTH. Values that arrive while the node is not publishing (no broker,
or the primary host offline) are kept, bounded (and on disk, by the shell:
:meth:`EdgeNode.take_kept`, :meth:`EdgeNode.restore`), and sent after the births as
DDATA metrics marked ``is_historical``, in arrival order, numbered in the
same sequence as everything else: a host sees births, then history, then live
data, never a gap in ``seq`` and never data for a device it has no birth of.

Datatypes come from the catalogue's value type (:data:`DATATYPES`, the one
table to extend when a value type is added). A value that does not fit its
declared type (a scaled integer register gives 12.5) promotes the metric to
the type of the value and the device is reborn, since a metric's datatype is
fixed by its birth. Quality rides as the ``Quality`` property (OPC DA codes
as Ignition reads them: 192 good, 64 uncertain, 0 bad, 500 stale), written
when it is not good or has just become good again.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from diode.config.sparkplug import SparkplugSettings
from diode.records import Quality, Sample, TagInfo, Value, ValueType
from receiver.payload import json_value, level
from receiver.sparkplug_payload import DataType, Payload, decode, set_value

NAMESPACE = "spBv1.0"
BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
REBIRTH_ALIAS = 1
TAG_ALIAS_BASE = 16  # aliases below are the node's own metrics
SEQ_MODULO = 256  # seq and bdSeq both run 0..255 (Sparkplug 3.0)
HISTORY_CHUNK = 500  # historical metrics per DDATA

#: Catalogue value type -> Sparkplug datatype. The one table to extend with new value types.
DATATYPES: dict[ValueType, DataType] = {
    ValueType.BOOL: DataType.BOOLEAN,
    ValueType.INT16: DataType.INT16,
    ValueType.UINT16: DataType.UINT16,
    ValueType.INT32: DataType.INT32,
    ValueType.UINT32: DataType.UINT32,
    ValueType.INT64: DataType.INT64,
    ValueType.UINT64: DataType.UINT64,
    ValueType.FLOAT32: DataType.FLOAT,
    ValueType.FLOAT64: DataType.DOUBLE,
    ValueType.STRING: DataType.STRING,
    ValueType.INT8: DataType.INT8,
    ValueType.UINT8: DataType.UINT8,
    # OPC UA's other types travel as the text the JSON payload gives them (base64 for a
    # ByteString, RFC 3339 for a DateTime, JSON for a LocalizedText, a StatusCode or an
    # array): a host reads them without a custom datatype.
    ValueType.BYTESTRING: DataType.STRING,
    ValueType.DATETIME: DataType.STRING,
    ValueType.LOCALIZED_TEXT: DataType.STRING,
    ValueType.GUID: DataType.STRING,
    ValueType.NODE_ID: DataType.STRING,
    ValueType.QUALIFIED_NAME: DataType.STRING,
    ValueType.STATUS_CODE: DataType.STRING,
}

Scalar = bool | int | float | str


def scalar(tag: TagInfo, sample: Sample) -> Sample:
    """``sample`` with a bytes or array value turned into the text a STRING metric carries."""
    value = sample.value
    if isinstance(value, bytes):
        text = base64.b64encode(value).decode("ascii")
    elif isinstance(value, tuple):
        text = orjson.dumps(json_value(value, tag.value_type)).decode()
    else:
        return sample
    return dataclasses.replace(sample, value=text)


#: Our quality -> the ``Quality`` property's value (OPC DA codes; 500 is Ignition's stale).
QUALITY_CODES: dict[Quality, int] = {
    Quality.GOOD: 192,
    Quality.UNCERTAIN: 64,
    Quality.BAD: 0,
    Quality.STALE: 500,
}

_RANGES: dict[DataType, tuple[int, int]] = {
    DataType.INT8: (-(2**7), 2**7 - 1),
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT8: (0, 2**8 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}


def _natural(value: bool | int | float | str) -> DataType:
    """The datatype a value carries by itself (for a metric it no longer fits)."""
    if isinstance(value, bool):
        return DataType.BOOLEAN
    if isinstance(value, int):
        return DataType.INT64 if value < 2**63 else DataType.UINT64
    if isinstance(value, float):
        return DataType.DOUBLE
    return DataType.STRING


def _fits_integer(datatype: DataType, value: bool | int | float | str) -> DataType:
    low, high = _RANGES[datatype]
    if isinstance(value, float):
        if not value.is_integer():
            return DataType.DOUBLE
        value = int(value)
    if isinstance(value, int) and low <= value <= high:
        return datatype
    return _natural(value)


def fit(datatype: DataType, value: Value) -> DataType:
    """``datatype`` if ``value`` can be carried in it, else the datatype to promote to."""
    if value is None:
        return datatype
    if isinstance(value, bytes | tuple):
        return DataType.STRING  # see scalar(): only its text form is ever carried
    if datatype in _RANGES:
        return _fits_integer(datatype, value)
    if datatype in (DataType.FLOAT, DataType.DOUBLE):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif datatype is DataType.BOOLEAN:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    return datatype if ok else _natural(value)


class Publish(NamedTuple):
    """One Sparkplug message to publish."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What an NCMD/DCMD asked and what the node did."""

    messages: list[Publish]
    rebirth: bool
    refused: tuple[str, ...]  # the metrics of refused writes, by name or alias
    malformed: bool = False


# Datatypes whose values need no range check: the Python type each takes as it is,
# and the field it goes in (the hot path of DDATA; integers go through fit/set_value).
_EXACT: dict[DataType, tuple[type, str]] = {
    DataType.FLOAT: (float, "float_value"),
    DataType.DOUBLE: (float, "double_value"),
    DataType.BOOLEAN: (bool, "boolean_value"),
    DataType.STRING: (str, "string_value"),
}


@dataclass(slots=True)
class _Metric:
    tag: TagInfo
    device: _Device
    alias: int
    datatype: DataType
    value: Value = None
    quality: Quality = Quality.GOOD
    ts_ms: int = 0
    sent_quality: Quality = Quality.GOOD  # the quality the host last saw

    def retype(self, datatype: DataType) -> None:
        self.datatype = datatype
        self.exact, self.value_field = _EXACT.get(datatype, (None, ""))

    exact: type | None = None  # values of this Python type go in ``field`` unchecked
    value_field: str = ""


@dataclass(slots=True)
class _Device:
    name: str
    metrics: dict[int, _Metric] = field(default_factory=dict)
    born: bool = False

    def all_bad(self) -> bool:
        """Every tag's last value is BAD: the transmitter cannot read this PLC."""
        return bool(self.metrics) and all(m.quality is Quality.BAD for m in self.metrics.values())


class EdgeNode:
    """Births, seq, bdSeq, aliases and the last-value cache of one edge node."""

    def __init__(self, settings: SparkplugSettings, *, qos: int, bd_seq: int) -> None:
        self.group_id = settings.group_id
        self.edge_node_id = settings.edge_node_id
        self.primary_host_id = settings.primary_host_id
        self.qos = qos
        self.bd_seq = bd_seq % SEQ_MODULO
        self._history_max = settings.history_max_samples
        base = f"{NAMESPACE}/{self.group_id}"
        node = self.edge_node_id
        self.topic_nbirth = f"{base}/NBIRTH/{node}"
        self.topic_ndeath = f"{base}/NDEATH/{node}"
        self.topic_ncmd = f"{base}/NCMD/{node}"
        self.topic_dcmd = f"{base}/DCMD/{node}/+"
        self._dcmd_prefix = f"{base}/DCMD/{node}/"
        self.topic_state = (
            None if self.primary_host_id is None else f"{NAMESPACE}/STATE/{self.primary_host_id}"
        )
        self._seq = 0
        self.connected = False
        self.host_online = self.primary_host_id is None
        self._host_ts = -1
        self.born = False  # NBIRTH published in this session
        self.link_down = False
        self.epoch: int | None = None
        self.devices: dict[str, _Device] = {}
        self._metrics: dict[int, _Metric] = {}  # by tag id, across devices
        self.history: deque[tuple[TagInfo, Sample]] = deque()
        self._kept: list[tuple[TagInfo, Sample]] = []
        self.counters: dict[str, int] = {
            "node_births": 0,
            "device_births": 0,
            "device_deaths": 0,
            "ddata": 0,
            "metrics": 0,
            "historical_metrics": 0,
            "history_dropped": 0,
            "rebirths_requested": 0,
            "commands_refused": 0,
            "commands_malformed": 0,
            "unmapped_type": 0,
        }

    # -- topics and payloads ---------------------------------------------------------

    def _topic(self, kind: str, device: str) -> str:
        return f"{NAMESPACE}/{self.group_id}/{kind}/{self.edge_node_id}/{device}"

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) % SEQ_MODULO
        return seq

    def _payload(self, now_ms: int, *, seq: bool = True) -> Any:
        payload = Payload()
        payload.timestamp = now_ms
        if seq:
            payload.seq = self._next_seq()
        return payload

    def will(self, now_ms: int) -> bytes:
        """The NDEATH payload, given as the MQTT will of the session with this bdSeq."""
        payload = Payload()
        payload.timestamp = now_ms
        _bd_seq_metric(payload, self.bd_seq, now_ms)
        return bytes(payload.SerializeToString())

    def death(self, now_ms: int) -> Publish:
        """NDEATH to publish before a clean disconnect (a clean DISCONNECT fires no will)."""
        self.born = False
        return Publish(self.topic_ndeath, self.will(now_ms), 1)

    # -- the session -----------------------------------------------------------------

    @property
    def publishing(self) -> bool:
        """Births are out and the primary host (if any) is online: values go out live."""
        return self.connected and self.host_online and self.born

    def session(self, bd_seq: int) -> None:
        """A new MQTT session is about to connect with this bdSeq in its will."""
        self.bd_seq = bd_seq % SEQ_MODULO

    def on_connect(self, now_ms: int) -> list[Publish]:
        """The session is up and NCMD/DCMD (and STATE) are subscribed: births if allowed."""
        self.connected = True
        return self._births(now_ms) if self.host_online else []

    def on_disconnect(self) -> None:
        """The session is gone: from now on values are kept for after the next births."""
        self.connected = False
        self.born = False
        for device in self.devices.values():
            device.born = False

    def _births(self, now_ms: int) -> list[Publish]:
        """NBIRTH (seq 0, this session's bdSeq), a DBIRTH per live device, then history."""
        self._seq = 0
        payload = self._payload(now_ms)
        _bd_seq_metric(payload, self.bd_seq, now_ms)
        rebirth = payload.metrics.add()
        rebirth.name = REBIRTH
        rebirth.alias = REBIRTH_ALIAS
        rebirth.timestamp = now_ms
        rebirth.datatype = DataType.BOOLEAN
        rebirth.boolean_value = False
        out = [Publish(self.topic_nbirth, bytes(payload.SerializeToString()), self.qos)]
        self.born = True
        self.counters["node_births"] += 1
        for device in self.devices.values():
            device.born = False
            if not self.link_down and device.metrics and not device.all_bad():
                out.append(self._dbirth(device, now_ms))
        out.extend(self._flush_history(now_ms))
        return out

    def _dbirth(self, device: _Device, now_ms: int) -> Publish:
        payload = self._payload(now_ms)
        for m in device.metrics.values():
            metric = payload.metrics.add()
            metric.name = m.tag.name
            metric.alias = m.alias
            metric.timestamp = m.ts_ms
            metric.datatype = m.datatype
            set_value(metric, m.datatype, _carried(m.datatype, m.value))
            props = metric.properties
            if m.tag.unit:
                _property(props, "engUnit", DataType.STRING, m.tag.unit)
            if m.tag.description:
                _property(props, "description", DataType.STRING, m.tag.description)
            _property(props, "readOnly", DataType.BOOLEAN, True)  # a one-way link: never writable
            if m.quality is not Quality.GOOD:
                _property(props, "Quality", DataType.INT32, QUALITY_CODES[m.quality])
            m.sent_quality = m.quality
        device.born = True
        self.counters["device_births"] += 1
        self.counters["metrics"] += len(device.metrics)
        return Publish(
            self._topic("DBIRTH", device.name), bytes(payload.SerializeToString()), self.qos
        )

    def _ddeath(self, device: _Device, now_ms: int) -> Publish:
        device.born = False
        self.counters["device_deaths"] += 1
        payload = self._payload(now_ms)
        return Publish(
            self._topic("DDEATH", device.name), bytes(payload.SerializeToString()), self.qos
        )

    def _ddata(
        self,
        device: _Device,
        changes: Iterable[tuple[_Metric, Sample]],
        now_ms: int,
        *,
        historical: bool = False,
    ) -> Publish:
        payload = self._payload(now_ms)
        count = 0
        for m, sample in changes:
            _data_metric(payload, m, sample, historical=historical)
            count += 1
        self.counters["ddata"] += 1
        self.counters["historical_metrics" if historical else "metrics"] += count
        return Publish(
            self._topic("DDATA", device.name), bytes(payload.SerializeToString()), self.qos
        )

    def _flush_history(self, now_ms: int) -> list[Publish]:
        """The values kept while not publishing, as historical DDATA, in arrival order."""
        out: list[Publish] = []
        payload: Any = None
        current: _Device | None = None
        count = 0

        def emit() -> None:
            if payload is not None and current is not None and count:
                out.append(
                    Publish(
                        self._topic("DDATA", current.name),
                        bytes(payload.SerializeToString()),
                        self.qos,
                    )
                )
                self.counters["ddata"] += 1

        while self.history:
            tag, sample = self.history.popleft()
            device = self.devices.get(level(tag.device))
            m = None if device is None else device.metrics.get(tag.tag_id)
            if device is None or m is None or m.tag != tag or not device.born:
                # Its device has no birth (dead PLC, link down) or its epoch ended: a host
                # would reject it. Counted, never silent.
                self.counters["history_dropped"] += 1
                continue
            if device is not current or count >= HISTORY_CHUNK:
                emit()
                current, count = device, 0
                payload = self._payload(now_ms)
            _data_metric(payload, m, sample, historical=True)
            count += 1
            self.counters["historical_metrics"] += 1
        emit()
        return out

    # -- what the router hands over --------------------------------------------------

    def samples(self, items: Sequence[tuple[TagInfo, Sample]], now_ms: int) -> list[Publish]:
        """Named samples of one router call -> DBIRTH / DDATA / DDEATH per device."""
        publishing = self.publishing
        touched: dict[str, _Device] = {}
        reborn: set[str] = set()
        changes: dict[str, list[tuple[_Metric, Sample]]] = {}
        metrics = self._metrics
        stale = Quality.STALE
        for tag, sample in items:
            quality = sample.quality
            if quality is stale:
                continue  # the router's link-down republish: the DDEATH says it here
            if type(sample.value) is bytes or type(sample.value) is tuple:
                sample = scalar(tag, sample)  # noqa: PLW2901 (the sample as carried)
            m = metrics.get(tag.tag_id)
            if m is None or m.tag is not tag:
                m = self._metric(tag, reborn)
                if m is None:
                    continue
            device = m.device
            touched[device.name] = device
            value = sample.value
            if type(value) is not m.exact and value is not None:
                needed = fit(m.datatype, value)
                if needed is not m.datatype:
                    m.retype(needed)
                    reborn.add(device.name)
            unchanged = (
                m.ts_ms
                and m.quality is quality
                and type(m.value) is type(value)
                and m.value == value
            )
            m.value, m.quality, m.ts_ms = value, quality, sample.ts_ns // 1_000_000
            if not publishing:
                self._keep(tag, sample)
            elif not unchanged:
                entry = changes.get(device.name)
                if entry is None:
                    entry = changes[device.name] = []
                entry.append((m, sample))
        if not publishing or self.link_down:
            return []
        return self._device_messages(touched, reborn, changes, now_ms)

    def _metric(self, tag: TagInfo, reborn: set[str]) -> _Metric | None:
        """The cache entry of ``tag``, made (and its device marked for a birth) when new."""
        m = self._metrics.get(tag.tag_id)
        if m is not None and m.tag == tag:
            m.tag = tag  # the carousel's fresh copy of the same entry: same metric
            return m
        datatype = DATATYPES.get(tag.value_type)
        if datatype is None:
            self.counters["unmapped_type"] += 1
            return None
        if m is not None:  # the tag id now names another tag (renamed, retyped, moved)
            m.device.metrics.pop(tag.tag_id, None)
        name = level(tag.device)
        device = self.devices.get(name)
        if device is None:
            device = self.devices[name] = _Device(name)
        m = _Metric(tag, device, TAG_ALIAS_BASE + tag.tag_id, datatype)
        m.retype(datatype)
        device.metrics[tag.tag_id] = m
        self._metrics[tag.tag_id] = m
        reborn.add(name)
        return m

    def _device_messages(
        self,
        touched: dict[str, _Device],
        reborn: set[str],
        changes: dict[str, list[tuple[_Metric, Sample]]],
        now_ms: int,
    ) -> list[Publish]:
        out: list[Publish] = []
        for name, device in touched.items():
            if device.all_bad():
                if device.born:
                    out.append(self._ddeath(device, now_ms))
            elif not device.born or name in reborn:
                out.append(self._dbirth(device, now_ms))
                # The birth carries each metric's last value of this call; the values
                # before it in the same call are older: they follow as historical.
                earlier = _before_last(changes.get(name, []))
                if earlier:
                    out.append(self._ddata(device, earlier, now_ms, historical=True))
            elif name in changes:
                out.append(self._ddata(device, changes[name], now_ms))
        return out

    def _keep(self, tag: TagInfo, sample: Sample) -> None:
        if len(self.history) >= self._history_max:
            self.history.popleft()
            self.counters["history_dropped"] += 1
        self.history.append((tag, sample))
        self._kept.append((tag, sample))

    def take_kept(self) -> list[tuple[TagInfo, Sample]]:
        """What went into the history since the last call, for the shell to put on disk."""
        kept, self._kept = self._kept, []
        return kept

    def restore(self, entries: Iterable[tuple[TagInfo, Sample]]) -> None:
        """History a previous run kept on disk: back in the history, and its last values cached.

        Called before the first session: the births then carry these values (the
        last the previous run saw) and the history follows them as usual.
        """
        for tag, kept in entries:
            sample = scalar(tag, kept)
            m = self._metric(tag, set())
            if m is None:
                continue
            needed = fit(m.datatype, sample.value)
            if needed is not m.datatype:
                m.retype(needed)
            m.value, m.quality, m.ts_ms = sample.value, sample.quality, sample.ts_ns // 1_000_000
            if len(self.history) >= self._history_max:
                self.history.popleft()
                self.counters["history_dropped"] += 1
            self.history.append((tag, sample))

    def status(self, status: dict[str, Any], now_ms: int) -> list[Publish]:
        """The router's stream status: link down -> DDEATHs, up -> DBIRTHs; a new epoch."""
        out: list[Publish] = []
        epoch = status.get("epoch")
        if isinstance(epoch, int) and self.epoch is not None and epoch != self.epoch:
            # Tag ids are numbered per transmitter run: nothing old may name a new value.
            out.extend(self._all_dead(now_ms))
            self.devices.clear()
            self._metrics.clear()
        if isinstance(epoch, int):
            self.epoch = epoch
        link = status.get("link")
        if link == "down" and not self.link_down:
            self.link_down = True
            out.extend(self._all_dead(now_ms))
        elif link == "up" and self.link_down:
            self.link_down = False
            if self.publishing:
                out.extend(
                    self._dbirth(d, now_ms)
                    for d in self.devices.values()
                    if d.metrics and not d.all_bad()
                )
        return out

    def _all_dead(self, now_ms: int) -> list[Publish]:
        if not self.publishing:
            for device in self.devices.values():
                device.born = False
            return []
        return [self._ddeath(d, now_ms) for d in self.devices.values() if d.born]

    # -- what the broker delivers ----------------------------------------------------

    def command(self, topic: str, data: bytes, now_ms: int) -> CommandResult:
        """An NCMD or DCMD: a rebirth is answered from the cache, anything else refused."""
        try:
            payload = decode(data)
        except Exception:  # protobuf's DecodeError and friends: any bytes, never a crash
            self.counters["commands_malformed"] += 1
            return CommandResult([], rebirth=False, refused=(), malformed=True)
        rebirth = False
        refused: list[str] = []
        node_command = topic == self.topic_ncmd
        for metric in payload.metrics:
            is_rebirth = metric.name == REBIRTH or (
                not metric.name and metric.HasField("alias") and metric.alias == REBIRTH_ALIAS
            )
            if node_command and is_rebirth and metric.boolean_value:
                rebirth = True
            else:
                refused.append(metric.name or f"alias {metric.alias}")
        if refused:
            self.counters["commands_refused"] += 1
        out: list[Publish] = []
        if rebirth:
            self.counters["rebirths_requested"] += 1
            if self.connected and self.host_online:
                out = self._births(now_ms)
        return CommandResult(out, rebirth=rebirth, refused=tuple(refused))

    def is_command(self, topic: str) -> bool:
        return topic == self.topic_ncmd or topic.startswith(self._dcmd_prefix)

    def host_state(self, data: bytes, now_ms: int) -> list[Publish]:
        """The primary host's STATE: online -> births and history; offline -> hold.

        On offline the shell also ends the session (NDEATH, disconnect, 3.0's rule);
        the next one waits here for online again.
        """
        try:
            state = orjson.loads(data)
            online = state["online"]
            ts = state.get("timestamp", 0)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return []
        if not isinstance(online, bool) or not isinstance(ts, int):
            return []
        if ts < self._host_ts:
            return []  # an older STATE than one already seen (3.0: compare timestamps)
        self._host_ts = ts
        if not online:
            self.host_online = False
            self.born = False
            for device in self.devices.values():
                device.born = False
            return []
        self.host_online = True
        return self._births(now_ms) if self.connected else []


def _before_last(changes: list[tuple[_Metric, Sample]]) -> list[tuple[_Metric, Sample]]:
    """Every change but the last of each metric (which its birth carries), in order."""
    last = {id(m): i for i, (m, _) in enumerate(changes)}
    return [change for i, change in enumerate(changes) if last[id(change[0])] != i]


def _carried(datatype: DataType, value: Value) -> Scalar | None:
    """``value`` as its datatype carries it (an integral float in an integer metric)."""
    if isinstance(value, float) and datatype in _RANGES and math.isfinite(value):
        return int(value)
    if isinstance(value, bytes | tuple):
        return None  # scalar() turned every such value into text before it got here
    return value


def _bd_seq_metric(payload: Any, bd_seq: int, now_ms: int) -> None:
    metric = payload.metrics.add()
    metric.name = BDSEQ
    metric.timestamp = now_ms
    metric.datatype = DataType.INT64
    metric.long_value = bd_seq


def _property(props: Any, key: str, datatype: DataType, value: bool | int | str) -> None:
    props.keys.append(key)
    entry = props.values.add()
    entry.type = datatype
    set_value(entry, datatype, value)


def _data_metric(payload: Any, m: _Metric, sample: Sample, *, historical: bool) -> None:
    metric = payload.metrics.add()
    metric.alias = m.alias
    metric.timestamp = sample.ts_ns // 1_000_000
    if historical:
        metric.is_historical = True
    value = sample.value
    if type(value) is m.exact:
        setattr(metric, m.value_field, value)  # the hot path: a float in a Float/Double metric
    else:
        if fit(m.datatype, value) is not m.datatype:
            value = None  # a kept value its metric was promoted away from: sent as null
        set_value(metric, m.datatype, _carried(m.datatype, value))
    quality = sample.quality
    if quality is not Quality.GOOD or m.sent_quality is not Quality.GOOD:
        _property(metric.properties, "Quality", DataType.INT32, QUALITY_CODES[quality])
    if not historical:
        m.sent_quality = quality

"""The Sparkplug edge node's state machine, without a broker: bytes in, messages out.

Payloads are read back with the tests' own protobuf reader
(tests/support/sparkplug_host.py), not with the library that wrote them.
"""

from __future__ import annotations

import itertools

import pytest

from diode.config import validate
from diode.config.rx import RxConfig
from diode.config.sparkplug import SparkplugSettings
from diode.errors import ConfigError
from diode.records import Quality, Sample, TagInfo, ValueType
from receiver.sparkplug import DATATYPES, REBIRTH, EdgeNode, Publish
from receiver.sparkplug_payload import DataType
from tests.support import sparkplug_host as host

T0 = 1_700_000_000_000  # ms


def tag(tag_id: int, name: str, value_type: ValueType, device: str = "plc1") -> TagInfo:
    return TagInfo(
        tag_id=tag_id,
        name=name,
        device=device,
        value_type=value_type,
        unit="degC" if name == "level" else "",
        description=f"the {name}",
    )


LEVEL = tag(0, "level", ValueType.FLOAT32)
COUNT = tag(1, "count", ValueType.INT16)
PUMP = tag(2, "pump", ValueType.BOOL)


def sample(t: TagInfo, value: object, ms: int = 0, quality: Quality = Quality.GOOD) -> Sample:
    return Sample(tag_id=t.tag_id, ts_ns=(T0 + ms) * 1_000_000, value=value, quality=quality)  # type: ignore[arg-type]


def node(**settings: object) -> EdgeNode:
    return EdgeNode(SparkplugSettings(**settings), qos=0, bd_seq=7)  # type: ignore[arg-type]


def kinds(messages: list[Publish]) -> list[str]:
    return [m.topic.split("/")[2] for m in messages]


def decoded(message: Publish, datatypes: dict[int, int] | None = None) -> host.Payload:
    return host.payload(message.payload, datatypes)


def born(n: EdgeNode) -> list[Publish]:
    out = n.on_connect(T0)
    out += n.samples([(LEVEL, sample(LEVEL, 2.5)), (COUNT, sample(COUNT, -3))], T0)
    out += n.samples([(PUMP, sample(PUMP, True))], T0)
    return out


def test_every_value_type_has_a_sparkplug_datatype() -> None:
    assert set(ValueType) <= set(DATATYPES), "extend receiver/sparkplug.py DATATYPES"


def test_the_will_is_the_bytes_tahu_writes() -> None:
    # Payload{timestamp=1000, metrics=[{name="bdSeq", timestamp=1000, datatype=Int64,
    # long_value=5}]}, encoded by hand from the protobuf rules and sparkplug_b.proto.
    metric = b"\x0a\x05bdSeq" + b"\x18\xe8\x07" + b"\x20\x04" + b"\x58\x05"
    expected = b"\x08\xe8\x07" + b"\x12" + bytes([len(metric)]) + metric
    n = node()
    n.session(5)
    assert n.will(1000) == expected


def test_births_come_first_then_only_changes_by_alias() -> None:
    n = node()
    out = born(n)
    assert kinds(out) == ["NBIRTH", "DBIRTH", "DBIRTH"]  # pump is new: its device is reborn
    nbirth = decoded(out[0])
    assert nbirth.seq == 0
    assert {m.name: m.value for m in nbirth.metrics} == {"bdSeq": 7, REBIRTH: False}
    dbirth = decoded(out[2])
    assert dbirth.seq == 2
    metrics = {m.name: m for m in dbirth.metrics}
    assert metrics["level"].datatype == DataType.FLOAT
    assert metrics["level"].value == 2.5
    assert metrics["count"].datatype == DataType.INT16
    assert metrics["count"].value == -3
    assert metrics["pump"].datatype == DataType.BOOLEAN
    assert metrics["pump"].value is True
    assert metrics["level"].properties == {
        "engUnit": "degC",
        "description": "the level",
        "readOnly": True,
    }
    datatypes = {m.alias: m.datatype for m in dbirth.metrics if m.alias and m.datatype}
    # The same values again: nothing; one change: one DDATA with one metric, by alias.
    assert n.samples([(LEVEL, sample(LEVEL, 2.5)), (COUNT, sample(COUNT, -3))], T0) == []
    out = n.samples([(LEVEL, sample(LEVEL, 2.5, 10)), (COUNT, sample(COUNT, -4, 10))], T0)
    assert kinds(out) == ["DDATA"]
    ddata = decoded(out[0], datatypes)
    assert ddata.seq == 3
    assert [(m.name, m.alias, m.value) for m in ddata.metrics] == [
        (None, metrics["count"].alias, -4)
    ]
    assert out[0].topic == "spBv1.0/diode/DDATA/diode-rx/plc1"


def test_int16_is_tahu_pythons_twos_complement_at_its_width() -> None:
    n = node()
    out = born(n)
    raw = [f for f in host.fields(out[1].payload) if f[0] == 2]  # metrics
    count = next(host.fields(r[2]) for r in raw if b"count" in r[2])
    assert (10, host.VARINT, 2**16 - 3) in count  # int_value of -3 as Int16


def test_seq_wraps_at_256_continuously() -> None:
    n = node()
    out = born(n)
    for i in range(600):
        out += n.samples([(COUNT, sample(COUNT, i % 100, i))], T0 + i)
    seqs = [decoded(m).seq for m in out]
    assert len(seqs) == 603
    assert all(b == (a + 1) % 256 for a, b in itertools.pairwise(seqs))
    assert seqs.count(0) == 3  # the NBIRTH and two wraps


def test_rebirth_is_answered_from_the_cache_with_the_same_bd_seq() -> None:
    n = node()
    born(n)
    n.samples([(COUNT, sample(COUNT, 9, 5))], T0)
    result = n.command(n.topic_ncmd, host.command(REBIRTH, host.BOOLEAN, True), T0 + 1)
    assert result.rebirth
    assert not result.refused
    assert kinds(result.messages) == ["NBIRTH", "DBIRTH"]
    nbirth = decoded(result.messages[0])
    assert nbirth.seq == 0
    assert next(m.value for m in nbirth.metrics if m.name == "bdSeq") == 7
    dbirth = decoded(result.messages[1])
    assert dbirth.seq == 1
    assert {m.name: m.value for m in dbirth.metrics}["count"] == 9


def test_every_write_is_refused_and_counted() -> None:
    n = node()
    born(n)
    dcmd = n.command("spBv1.0/diode/DCMD/diode-rx/plc1", host.command("count", host.INT16, 5), T0)
    ncmd = n.command(n.topic_ncmd, host.command("Node Control/Reboot", host.BOOLEAN, True), T0)
    garbage = n.command(n.topic_ncmd, b"\xff\xff\xff", T0)
    assert dcmd.messages == []
    assert dcmd.refused == ("count",)
    assert ncmd.refused == ("Node Control/Reboot",)
    assert garbage.malformed
    assert n.counters["commands_refused"] == 2
    assert n.counters["commands_malformed"] == 1


def test_values_kept_offline_follow_the_births_as_history_in_order() -> None:
    n = node()
    born(n)
    n.on_disconnect()
    for i in range(5):
        assert n.samples([(COUNT, sample(COUNT, 100 + i, 100 + i))], T0) == []
    n.session(8)
    out = n.on_connect(T0 + 1000)
    assert kinds(out) == ["NBIRTH", "DBIRTH", "DDATA"]
    dbirth = decoded(out[1])
    datatypes = {m.alias: m.datatype for m in dbirth.metrics if m.alias and m.datatype}
    assert {m.name: m.value for m in dbirth.metrics}["count"] == 104  # the current value
    history = decoded(out[2], datatypes)
    assert [m.value for m in history.metrics] == [100, 101, 102, 103, 104]
    assert all(m.is_historical for m in history.metrics)
    assert [m.timestamp for m in history.metrics] == [T0 + 100 + i for i in range(5)]
    assert [decoded(m).seq for m in out] == [0, 1, 2]
    assert n.counters["historical_metrics"] == 5


def test_history_is_bounded_and_what_it_drops_is_counted() -> None:
    n = node(history_max_samples=3)
    born(n)
    n.on_disconnect()
    for i in range(5):
        n.samples([(COUNT, sample(COUNT, i, i))], T0)
    assert len(n.history) == 3
    assert n.counters["history_dropped"] == 2


def test_link_down_kills_the_devices_and_its_return_rebirths_them() -> None:
    n = node()
    born(n)
    out = n.status({"link": "down", "epoch": 1}, T0)
    assert kinds(out) == ["DDEATH"]
    assert n.samples([(COUNT, sample(COUNT, 1, 1))], T0) == []
    out = n.status({"link": "up", "epoch": 1}, T0)
    assert kinds(out) == ["DBIRTH"]


def test_a_plc_whose_every_tag_reads_bad_is_a_dead_device() -> None:
    n = node()
    born(n)
    bad = [(t, sample(t, None, 1, Quality.BAD)) for t in (LEVEL, COUNT)]
    out = n.samples(bad, T0)  # pump still good: the PLC is not dead, these are bad values
    assert kinds(out) == ["DDATA"]
    assert [(m.is_null, m.properties) for m in decoded(out[0]).metrics] == [
        (True, {"Quality": 0}),
        (True, {"Quality": 0}),
    ]
    out = n.samples([(PUMP, sample(PUMP, None, 1, Quality.BAD))], T0)
    assert kinds(out) == ["DDEATH"]
    out = n.samples([(LEVEL, sample(LEVEL, 1.0, 2))], T0)
    assert kinds(out) == ["DBIRTH"]
    metrics = {m.name: m for m in decoded(out[0]).metrics}
    assert metrics["count"].is_null
    assert metrics["count"].properties["Quality"] == 0
    assert "Quality" not in metrics["level"].properties


def test_a_value_that_does_not_fit_its_type_promotes_the_metric() -> None:
    n = node()
    born(n)
    out = n.samples([(COUNT, sample(COUNT, 12.5, 1))], T0)
    assert kinds(out) == ["DBIRTH"]
    count = next(m for m in decoded(out[0]).metrics if m.name == "count")
    assert (count.datatype, count.value) == (DataType.DOUBLE, 12.5)


def test_a_primary_host_is_waited_for_and_its_return_rebirths() -> None:
    n = node(primary_host_id="scada")
    assert n.on_connect(T0) == []
    n.samples([(COUNT, sample(COUNT, 1, 1))], T0)
    out = n.host_state(b'{"online": true, "timestamp": 10}', T0)
    assert kinds(out) == ["NBIRTH", "DBIRTH", "DDATA"]  # the value meanwhile: historical
    assert n.host_state(b'{"online": false, "timestamp": 5}', T0) == []  # older: ignored
    assert n.publishing
    assert n.host_state(b'{"online": false, "timestamp": 20}', T0) == []
    assert not n.publishing
    out = n.host_state(b'{"online": true, "timestamp": 30}', T0)
    assert kinds(out) == ["NBIRTH", "DBIRTH"]
    assert next(m.value for m in decoded(out[0]).metrics if m.name == "bdSeq") == 7
    assert n.host_state(b"not json", T0) == []


def test_a_new_transmitter_epoch_kills_the_old_devices() -> None:
    n = node()
    born(n)
    n.status({"link": "up", "epoch": 1}, T0)
    out = n.status({"link": "up", "epoch": 2}, T0)
    assert kinds(out) == ["DDEATH"]
    assert n.devices == {}


def test_history_handed_to_the_disk_comes_back_in_a_new_run() -> None:
    n = node()
    n.on_disconnect()
    n.samples([(COUNT, sample(COUNT, 5, 1)), (LEVEL, sample(LEVEL, 1.5, 1))], T0)
    n.samples([(COUNT, sample(COUNT, 6, 2))], T0)
    kept = n.take_kept()
    assert [s.value for _, s in kept] == [5, 1.5, 6]
    assert n.take_kept() == []
    again = node()  # the next run, before its first session
    again.restore(kept)
    out = again.on_connect(T0 + 10)
    assert kinds(out) == ["NBIRTH", "DBIRTH", "DDATA"]
    dbirth = decoded(out[1])
    assert {m.name: m.value for m in dbirth.metrics} == {"count": 6, "level": 1.5}
    datatypes = {m.alias: m.datatype for m in dbirth.metrics if m.alias and m.datatype}
    history = decoded(out[2], datatypes)
    assert [(m.value, m.is_historical) for m in history.metrics] == [
        (5, True),
        (1.5, True),
        (6, True),
    ]


def test_values_before_the_last_in_a_birth_call_follow_it_as_history() -> None:
    # A device's first call may hold several values of one tag (samples released
    # together when their catalogue entry arrives): the birth has the last one.
    n = node()
    n.on_connect(T0)
    first = [(COUNT, sample(COUNT, 1, 1)), (LEVEL, sample(LEVEL, 0.5, 1))]
    out = n.samples([*first, (COUNT, sample(COUNT, 2, 2))], T0)
    assert kinds(out) == ["DBIRTH", "DDATA"]
    dbirth = decoded(out[0])
    assert {m.name: m.value for m in dbirth.metrics} == {"count": 2, "level": 0.5}
    datatypes = {m.alias: m.datatype for m in dbirth.metrics if m.alias and m.datatype}
    earlier = decoded(out[1], datatypes)
    assert [(m.value, m.is_historical) for m in earlier.metrics] == [(1, True)]


def test_two_sparkplug_streams_may_not_share_an_edge_node_identity() -> None:
    output = {"payload": "sparkplug", "sparkplug": {"edge_node_id": "rx"}}
    streams = [{"id": i, "public_keys": ["k.pub"], "output": output} for i in (1, 2)]
    receiver = {"listen": "192.0.2.1"}
    with pytest.raises(ConfigError, match="edge_node_id"):
        validate(RxConfig, {"receiver": receiver, "streams": streams}, "rx.toml")
    streams[1]["output"] = {"payload": "sparkplug", "sparkplug": {"edge_node_id": "rx2"}}
    config = validate(RxConfig, {"receiver": receiver, "streams": streams}, "rx.toml")
    assert len(config.streams) == 2

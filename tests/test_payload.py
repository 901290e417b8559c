"""Topics and JSON payloads of the MQTT output, and the config that shapes them."""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diode.config import validate
from diode.config.mqtt import MqttBroker, StreamOutput
from diode.errors import ConfigError
from diode.records import DeviceInfo, Quality, Sample, TagInfo, ValueType
from receiver.payload import (
    Topics,
    encode,
    inventory_message,
    level,
    rfc3339,
    sample_fields,
    sample_messages,
    status_message,
)

TAG = TagInfo(tag_id=1, name="temp", device="plc1", value_type=ValueType.FLOAT64, unit="degC")
OTHER = TagInfo(tag_id=2, name="run", device="plc1", value_type=ValueType.BOOL)


def test_rfc3339_is_utc_with_microseconds() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000000Z"
    assert rfc3339(1_714_564_800_123_456_789) == "2024-05-01T12:00:00.123456Z"
    assert rfc3339(-1) == "1969-12-31T23:59:59.999999Z"


def test_per_tag_message() -> None:
    stream = StreamOutput(site="north", qos=0, retain=False, message_expiry_s=60)
    good = Sample(tag_id=1, ts_ns=1_000_000_000, value=21.5)
    bad = Sample(tag_id=1, ts_ns=2_000_000_000, value=None, quality=Quality.BAD, reason="timeout")
    first, second = sample_messages(Topics(stream), [(TAG, good), (TAG, bad)])
    assert first.topic == "diode/north/plc1/temp"
    assert (first.qos, first.retain, first.expiry_s) == (0, False, 60)
    assert json.loads(first.payload) == {
        "value": 21.5,
        "ts": "1970-01-01T00:00:01.000000Z",
        "quality": "good",
        "unit": "degC",
    }
    assert json.loads(second.payload) == {
        "value": None,
        "ts": "1970-01-01T00:00:02.000000Z",
        "quality": "bad",
        "unit": "degC",
        "reason": "timeout",
    }


def test_non_finite_floats_are_strings() -> None:
    items = [(TAG, Sample(tag_id=1, ts_ns=0, value=v)) for v in (float("nan"), float("-inf"))]
    values = [
        json.loads(m.payload)["value"] for m in sample_messages(Topics(StreamOutput()), items)
    ]
    assert values == ["NaN", "-Infinity"]


def test_batched_keeps_every_sample_per_device() -> None:
    stream = StreamOutput(payload="batched")
    pump = TagInfo(tag_id=3, name="p", device="plc2", value_type=ValueType.INT16)
    items = [
        (TAG, Sample(tag_id=1, ts_ns=0, value=1.0)),
        (pump, Sample(tag_id=3, ts_ns=0, value=7)),
        (TAG, Sample(tag_id=1, ts_ns=1000, value=2.0)),
        (OTHER, Sample(tag_id=2, ts_ns=0, value=True, quality=Quality.STALE, reason="link down")),
    ]
    plc1, plc2 = sample_messages(Topics(stream), items)
    assert (plc1.topic, plc2.topic) == ("diode/site/plc1", "diode/site/plc2")
    body = json.loads(plc1.payload)
    assert body["device"] == "plc1"
    assert [(s["tag"], s["value"], s["quality"]) for s in body["samples"]] == [
        ("temp", 1.0, "good"),
        ("temp", 2.0, "good"),
        ("run", True, "stale"),
    ]
    assert body["samples"][2]["reason"] == "link down"


def test_names_are_made_safe_for_one_level() -> None:
    assert level("a/b+c#d") == "a_b_c_d"
    assert level("") == "_"
    tag = TagInfo(tag_id=1, name="x/y", device="#dev", value_type=ValueType.BOOL)
    (m,) = sample_messages(Topics(StreamOutput()), [(tag, Sample(tag_id=1, ts_ns=0, value=True))])
    assert m.topic == "diode/site/_dev/x_y"


def test_inventory_and_status() -> None:
    topics = Topics(StreamOutput(prefix="plant/a", site="s1"))
    info = DeviceInfo(device="plc1", protocol="modbus", endpoint="10.0.0.1:502")
    inv = inventory_message(topics, info)
    assert (inv.topic, inv.qos, inv.retain) == ("plant/a/s1/plc1/$inventory", 1, True)
    assert json.loads(inv.payload)["endpoint"] == "10.0.0.1:502"
    status = status_message(topics, {"link": "up", "age_s": float("inf"), "gaps": [(1, 2)]})
    assert status.topic == "plant/a/s1/$status"
    assert json.loads(status.payload) == {"link": "up", "age_s": "Infinity", "gaps": [[1, 2]]}


def test_the_default_layout_is_an_isa95_namespace_with_areas_from_config() -> None:
    stream = StreamOutput(
        prefix="acme",
        site="lyon",
        areas={"plc1": "packaging/line2"},
        default_area="utilities",
    )
    topics = Topics(stream)
    assert topics.tag("plc1", "level") == "acme/lyon/packaging/line2/plc1/level"
    assert topics.tag("boiler", "temp") == "acme/lyon/utilities/boiler/temp"
    assert topics.device("plc1") == "acme/lyon/packaging/line2/plc1"
    assert topics.inventory("plc1") == "acme/lyon/packaging/line2/plc1/$inventory"
    assert topics.status() == "acme/lyon/$status"
    # Without areas, the levels the catalogue knows: no empty level in between.
    plain = Topics(StreamOutput(prefix="acme", site="lyon"))
    assert plain.tag("plc1", "level") == "acme/lyon/plc1/level"
    assert plain.device("plc1") == "acme/lyon/plc1"
    custom = Topics(StreamOutput(topic_template="uns/{site}/{area}/{device}/{tag}"))
    assert custom.tag("plc1", "level") == "uns/site/plc1/level"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"topic_template": "{prefix}/{device}"}, ""),
        ({"topic_template": "{prefix}/{oops}/{tag}"}, ""),
        ({"topic_template": "{prefix}/+/{tag}"}, ""),
        ({"site": "a#"}, "site"),
        ({"qos": 2}, "qos"),
        ({"payload": "protobuf"}, "payload"),
        ({"areas": {"plc1": "a/+"}}, "areas"),
        ({"areas": {"plc1": "a//b"}}, "areas"),
        ({"default_area": "/x"}, "default_area"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_stream_output_rejects(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(StreamOutput, data, "rx.toml")
    assert info.value.key == key or key == ""


def test_broker_cross_checks() -> None:
    assert MqttBroker().port == 1883
    with pytest.raises(ConfigError, match="tls"):
        validate(MqttBroker, {"ca_file": "/x"}, "rx.toml")
    with pytest.raises(ConfigError, match="reconnect_max_s"):
        validate(MqttBroker, {"reconnect_initial_s": 10.0, "reconnect_max_s": 1.0}, "rx.toml")


def test_a_payload_holds_about_its_own_size() -> None:
    # A receiver catching up holds a whole drain's messages at once: a payload that
    # kept a 4 KiB buffer (orjson's, uncopied) made a 4 s stall cost 428 MB.
    fields = {"value": 123456, "ts": "2026-12-06T01:47:10.123456Z", "quality": "good"}
    tracemalloc.start()
    try:
        kept = [encode(fields) for _ in range(1000)]
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept) == 1000
    assert held < 1000 * 256, f"{held / 1000:.0f} bytes per {len(kept[0])}-byte payload"


# -- issue 14, items 5 and 6: every value as the PLC holds it ---------------------------


def _published(value_type: ValueType, value: object) -> tuple[bytes, object]:
    tag = TagInfo(tag_id=1, name="t", device="d", value_type=value_type)
    sample = Sample(tag_id=1, ts_ns=0, value=value)  # type: ignore[arg-type]
    (message,) = sample_messages(Topics(StreamOutput()), [(tag, sample)])
    raw = message.payload.split(b'"value":', 1)[1].rsplit(b',"ts"', 1)[0]
    return raw, json.loads(message.payload)["value"]


def _f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def test_float32_is_published_as_the_plc_shows_it() -> None:
    """The demo published 12.470000267028809 and 2.919461250305176 (float64 noise)."""
    assert _published(ValueType.FLOAT32, _f32(12.47))[0] == b"12.47"
    assert _published(ValueType.FLOAT32, _f32(2.9194613))[0] == b"2.9194613"
    assert _published(ValueType.FLOAT32, _f32(0.1))[0] == b"0.1"
    assert _published(ValueType.FLOAT32, _f32(-1e-30))[0] == b"-1e-30"
    # Zero keeps its sign, also after a +0.0 was published (the formatter caches values).
    assert _published(ValueType.FLOAT32, 0.0)[0] == b"0.0"
    assert _published(ValueType.FLOAT32, -0.0)[0] == b"-0.0"
    assert _published(ValueType.FLOAT32, _f32(12.47))[0] == b"12.47"  # a cached value
    # A float64 keeps every digit it has.
    assert _published(ValueType.FLOAT64, 0.1 + 0.2)[0] == b"0.30000000000000004"
    # A value that is not a float32 (scaled) is never rounded to one.
    assert _published(ValueType.FLOAT32, 0.1)[0] == b"0.1"
    assert _published(ValueType.FLOAT32, 1 / 3)[1] == 1 / 3


@given(st.integers(0, 2**32 - 1))
def test_float32_text_is_the_shortest_that_reads_back(bits: int) -> None:
    (x,) = struct.unpack("<f", struct.pack("<I", bits))
    raw, value = _published(ValueType.FLOAT32, x)
    if not math.isfinite(x):
        assert value in ("NaN", "Infinity", "-Infinity")
        return
    assert _f32(float(raw)) == x  # reads back to the same float32, bit for bit
    digits = len(raw.decode().lstrip("-").split("e")[0].replace(".", "").strip("0"))
    shorter = f"{x:.{max(digits - 1, 1)}g}"
    assert digits <= 1 or _f32(float(shorter)) != x, (raw, shorter)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float64_is_published_in_full(x: float) -> None:
    raw, value = _published(ValueType.FLOAT64, x)
    assert float(raw) == x
    assert value == x


@pytest.mark.parametrize(
    ("value_type", "value", "expected"),
    [
        (ValueType.BYTESTRING, b"\x00\x01\xfe\xff", "AAH+/w=="),
        (ValueType.BYTESTRING, b"", ""),
        (ValueType.LOCALIZED_TEXT, ("Hallo", "de-DE"), {"text": "Hallo", "locale": "de-DE"}),
        (
            ValueType.LOCALIZED_TEXT,
            (("a", "en"), ("b", "fr")),
            [{"text": "a", "locale": "en"}, {"text": "b", "locale": "fr"}],
        ),
        (ValueType.LOCALIZED_TEXT, (), []),
        # A member no plant sends but the decoder takes: as JSON carries it (it raised).
        (ValueType.LOCALIZED_TEXT, (None, b"\x01"), {"text": None, "locale": "AQ=="}),
        (
            ValueType.STATUS_CODE,
            (0x808D0000, "BadSensorFailure"),
            {"code": 0x808D0000, "name": "BadSensorFailure"},
        ),
        (ValueType.DATETIME, "2600-01-01T00:00:00.000000Z", "2600-01-01T00:00:00.000000Z"),
        (ValueType.FLOAT32, (_f32(1.1), _f32(2.2)), [1.1, 2.2]),
        (ValueType.FLOAT64, ((1.5, float("nan")), (3.0, 4.0)), [[1.5, "NaN"], [3.0, 4.0]]),
        (ValueType.BYTESTRING, (b"a", b"bc"), ["YQ==", "YmM="]),
        (ValueType.INT32, (1, -2, 3), [1, -2, 3]),
        (ValueType.STRING, ("x", None), ["x", None]),
    ],
)
def test_plant_types_as_json(value_type: ValueType, value: object, expected: object) -> None:
    assert _published(value_type, value)[1] == expected


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),  # NaN and infinities too: their proto3 strings
    st.floats(width=32),
    st.text(max_size=8),
    st.binary(max_size=8),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=6)


@given(
    entries=st.lists(
        st.tuples(
            st.sampled_from(list(ValueType)),
            st.text(max_size=6),  # the unit: quotes, control characters, anything
            _VALUES,
            st.sampled_from(list(Quality)),
            st.integers(-(2**62), 2**62),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_per_tag_payloads_are_the_encoding_of_their_fields(entries: list[Any]) -> None:
    """The per-tag hot path builds a good sample's bytes itself: they must be the bytes
    ``encode(sample_fields(...))`` gives, for any value, unit and timestamp (and the same
    entry used twice, as the cache would)."""
    items = []
    for i, (value_type, unit, value, quality, ts_ns) in enumerate(entries):
        tag = TagInfo(tag_id=i, name=f"t{i}", device="d", value_type=value_type, unit=unit)
        reason = "" if quality is Quality.GOOD else "why"
        sample = Sample(tag_id=i, ts_ns=ts_ns, value=value, quality=quality, reason=reason)
        items += [(tag, sample), (tag, sample)]
    topics = Topics(StreamOutput())
    for _ in range(2):  # the second time from the entries' cache
        messages = sample_messages(topics, items)
        assert [m.payload for m in messages] == [encode(sample_fields(t, s)) for t, s in items]
        assert [m.topic for m in messages] == [topics.tag(t.device, t.name) for t, _ in items]


@given(
    entries=st.lists(
        st.tuples(
            st.sampled_from(["d", 'e"/+', ""]),  # the device: several, with JSON escapes
            st.text(max_size=6),  # the tag name
            st.text(max_size=6),  # the unit
            _VALUES,
            st.sampled_from(list(Quality)),
            st.integers(-(2**62), 2**62),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_batched_payloads_are_the_encoding_of_their_fields(entries: list[Any]) -> None:
    """The batched path builds a good sample's object itself: each device's payload must be
    the bytes ``encode`` gives for its samples' fields, in order."""
    items = []
    for i, (device, name, unit, value, quality, ts_ns) in enumerate(entries):
        tag = TagInfo(tag_id=i, name=name, device=device, value_type=ValueType.STRING, unit=unit)
        reason = "" if quality is Quality.GOOD else "why"
        sample = Sample(tag_id=i, ts_ns=ts_ns, value=value, quality=quality, reason=reason)
        items += [(tag, sample), (tag, sample)]
    expected: dict[str, list[dict[str, Any]]] = {}
    for tag, sample in items:
        expected.setdefault(tag.device, []).append({**sample_fields(tag, sample), "tag": tag.name})
    topics = Topics(StreamOutput(payload="batched"))
    for _ in range(2):  # the second time from the entries' cache
        messages = sample_messages(topics, items)
        assert [(m.topic, m.payload) for m in messages] == [
            (topics.device(d), encode({"device": d, "samples": s})) for d, s in expected.items()
        ]

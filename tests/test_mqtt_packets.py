"""PUBLISH and PUBACK packets: golden bytes from the spec, and paho's own encoder agrees."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver import mqtt_packets
from receiver.mqtt import _PackedProperties


def paho_publish(
    topic: bytes, payload: bytes, qos: int, retain: bool, mid: int, protocol: int, props: Any
) -> bytes:
    """What paho itself would write for this PUBLISH (captured at its packet queue)."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=protocol)
    captured: list[bytes] = []
    client._sock = object()  # type: ignore[assignment]  # only checked for None before queueing
    client._packet_queue = (  # type: ignore[method-assign]
        lambda command, packet, mid, qos, info=None: captured.append(bytes(packet))
    )
    try:
        client._send_publish(mid, topic, payload, qos, retain, info=None, properties=props)
    finally:
        client._sock = None  # its destructor would close it
    (packet,) = captured
    return packet


@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_at_every_boundary(n: int, encoded: bytes) -> None:
    assert mqtt_packets.remaining_length(n) == encoded  # MQTT 5.0 table 1-1


@pytest.mark.parametrize("n", [-1, 268_435_456])
def test_remaining_length_out_of_range(n: int) -> None:
    with pytest.raises(ValueError, match="remaining length"):
        mqtt_packets.remaining_length(n)


def test_publish_golden_bytes() -> None:
    # MQTT 3.1.1, QoS 0, no retain: 0x30, length, topic "a/b", payload "hi".
    assert mqtt_packets.publish(b"a/b", b"hi", qos=0, retain=False) == b"\x30\x07\x00\x03a/bhi"
    # MQTT 5, QoS 1, retained, packet id 0x1234, no properties.
    assert (
        mqtt_packets.publish(b"t", b"", qos=1, retain=True, mid=0x1234, properties=b"\x00")
        == b"\x33\x06\x00\x01t\x12\x34\x00"
    )


@given(
    topic=st.text(min_size=1, max_size=300).map(str.encode),
    payload=st.binary(max_size=20_000),
    qos=st.sampled_from([0, 1]),
    retain=st.booleans(),
    mid=st.integers(1, 65535),
    v5=st.booleans(),
    expiry=st.one_of(st.none(), st.integers(1, 2**32 - 1)),
)
def test_publish_matches_paho(
    topic: bytes, payload: bytes, qos: int, retain: bool, mid: int, v5: bool, expiry: int | None
) -> None:
    props = _PackedProperties(expiry) if v5 else None
    ours = mqtt_packets.publish(
        topic,
        payload,
        qos=qos,
        retain=retain,
        mid=mid,
        properties=props.pack() if props is not None else None,
    )
    protocol = paho.MQTTv5 if v5 else paho.MQTTv311
    assert ours == paho_publish(topic, payload, qos, retain, mid, protocol, props)


def test_puback_with_and_without_a_reason() -> None:
    assert mqtt_packets.puback(b"\x01\x02") == (0x0102, 0)  # 3.1.1, or MQTT 5 success
    assert mqtt_packets.puback(bytearray(b"\xff\xff\x87\x00")) == (0xFFFF, 0x87)  # not authorized
    with pytest.raises(ValueError, match="PUBACK"):
        mqtt_packets.puback(b"\x01")


@given(
    messages=st.lists(
        st.tuples(
            st.sampled_from(["a/b", "plant/site/plc1/temp", "x" * 200, "ü/é"]),
            st.binary(max_size=300),
            st.integers(0, 1),
            st.booleans(),
            st.integers(1, 65535),
            st.sampled_from([None, b"\x00", _PackedProperties(None).pack()]),
        ),
        max_size=12,
    )
)
def test_the_builder_writes_the_bytes_of_publish(messages: list[Any]) -> None:
    """The output's bulk builder (topic fields cached) and :func:`publish` agree byte for byte,
    across the one-byte and two-byte remaining lengths, QoS 0 and 1, with and without properties.
    """
    builder = mqtt_packets.PublishBuilder(max_topics=2)  # small: the cache is also forgotten
    parts: list[bytes] = []
    for topic, payload, qos, retain, mid, props in messages:
        builder.add(parts, topic, payload, qos=qos, retain=retain, mid=mid, properties=props)
    assert b"".join(parts) == b"".join(
        mqtt_packets.publish(topic.encode(), payload, qos=qos, retain=retain, mid=mid, properties=p)
        for topic, payload, qos, retain, mid, p in messages
    )

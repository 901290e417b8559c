"""MQTT PUBLISH and PUBACK packets, the only two the receiver builds or reads itself.

paho stays the connection manager (CONNECT, TLS, keepalive, the will, the
receiver status messages), but values do not go through ``Client.publish``:
it costs ~12 us a message (an ``MQTTMessageInfo`` with a
``threading.Condition`` each, a message id lock, debug-log formatting) and
paho then writes every packet with its own ``send()``, which on loopback is
another ~6 us of kernel TCP work per message (py-spy on the receiver at
10 000 updates/s: ``Client._sock_send`` 24 % of the process, ``publish`` 12 %).
The output builds the packets of a whole spool read here and hands them to
paho as one write (see receiver/mqtt.py).

PUBLISH (MQTT 3.1.1 section 3.3, MQTT 5.0 section 3.3)::

    byte 0        0x30 | DUP << 3 | QoS << 1 | RETAIN
    1..4          remaining length, variable byte integer
    2 + n         topic name: u16 length, UTF-8 bytes
    2             packet identifier (QoS 1 only)
    (MQTT 5)      properties: length (variable byte integer), then the properties
    rest          payload

PUBACK (section 3.4): ``0x40``, remaining length, packet identifier (u16);
MQTT 5 may add a reason code (a byte, 0 when absent) and properties.
"""

from __future__ import annotations

import struct

PUBLISH = 0x30
MAX_REMAINING_LENGTH = 268_435_455  # four bytes of variable byte integer
MAX_TOPIC_BYTES = 65_535  # a UTF-8 string's u16 length (MQTT section 1.5.4)
_NOT_IN_TOPIC = ("+", "#", "\0")  # wildcards (section 4.7.1) and U+0000 (section 1.5.4)
NO_PROPERTIES = b"\x00"
_U16 = struct.Struct("!H")


def remaining_length(n: int) -> bytes:
    """``n`` as an MQTT variable byte integer (1 to 4 bytes)."""
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"MQTT remaining length out of range: {n}")
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def topic_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be the topic of a PUBLISH packet, or None when it can.

    A broker closes the connection on a PUBLISH with a wildcard, NUL or an
    empty topic, and a topic over 65 535 bytes does not fit its length field:
    sent, each would come back from the spool after every reconnect.
    """
    if not topic:
        return "empty topic"
    try:
        size = len(topic.encode())
    except UnicodeEncodeError:
        return "topic is not valid UTF-8"
    if size > MAX_TOPIC_BYTES:
        return f"topic of {size} bytes, over {MAX_TOPIC_BYTES}"
    for bad in _NOT_IN_TOPIC:
        if bad in topic:
            return f"topic contains {bad!r}"
    return None


def publish(
    topic: bytes,
    payload: bytes,
    *,
    qos: int,
    retain: bool,
    mid: int = 0,
    properties: bytes | None = None,
) -> bytes:
    """One PUBLISH packet; ``properties`` (packed, with their length) for MQTT 5, None for 3.1.1.

    ``mid`` is the packet identifier, used for QoS 1 only.
    """
    variable = _U16.pack(len(topic)) + topic
    if qos:
        variable += _U16.pack(mid)
    if properties is not None:
        variable += properties
    first = PUBLISH | (qos << 1) | retain
    return bytes((first,)) + remaining_length(len(variable) + len(payload)) + variable + payload


class PublishBuilder:
    """PUBLISH packets of many messages, with each topic's field encoded once.

    The output's hot path: per-tag topics repeat at every update, so the
    topic's length-prefixed UTF-8 bytes are kept (at most ``max_topics``;
    forgotten all at once beyond). :meth:`add` writes the packet's parts to a
    list the caller joins once for the whole write; the bytes are those of
    :func:`publish`.
    """

    def __init__(self, max_topics: int = 1_000_000) -> None:
        self._topics: dict[str, bytes] = {}
        self._max_topics = max_topics

    def add(
        self,
        parts: list[bytes],
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        mid: int = 0,
        properties: bytes | None = None,
    ) -> None:
        field = self._topics.get(topic)
        if field is None:
            if len(self._topics) >= self._max_topics:
                self._topics.clear()
            encoded = topic.encode()
            field = self._topics[topic] = _U16.pack(len(encoded)) + encoded
        if qos:
            field += _U16.pack(mid)
        if properties is not None:
            field += properties
        size = len(field) + len(payload)
        first = PUBLISH | (qos << 1) | retain
        head = bytes((first, size)) if size < 128 else bytes((first,)) + remaining_length(size)
        parts += (head, field, payload)


def puback(packet: bytes | bytearray) -> tuple[int, int]:
    """(packet identifier, reason code) of a PUBACK's variable header and properties.

    ``packet`` is what follows the remaining length. A reason code of 0x80 or
    more means the broker refused the message (MQTT 5 section 3.4.2.1).
    """
    if len(packet) < 2:
        raise ValueError("PUBACK shorter than its packet identifier")
    (mid,) = _U16.unpack_from(packet)
    reason = packet[2] if len(packet) > 2 else 0
    return mid, reason

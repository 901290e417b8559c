"""MQTT 5 clients in front of an MQTT 3.1.1 broker: the embedded broker's front door.

amqtt 0.12, the broker the demo embeds, speaks MQTT 3.1.1 only (it refuses
protocol level 5 at CONNECT), while the receiver publishes with MQTT 5. This
proxy listens where clients connect, looks at each client's CONNECT, and
either passes a 3.1.1 session through untouched or translates a 5.0 session
packet by packet: properties are dropped on the way in (the demo relies on
none of them) and empty ones added on the way out (MQTT 5.0, 2.2.2: a
property length of 0 is valid everywhere).

The translation is sans-I/O (bytes in, bytes out: :func:`to_v311` and
:func:`to_v5`); :class:`DowngradeProxy` only moves packets between sockets.

    client (5.0) --CONNECT/PUBLISH/SUBSCRIBE...--> to_v311 --> amqtt (3.1.1)
                 <--CONNACK/PUBLISH/SUBACK...----- to_v5   <--
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from diode.demo.plant import free_port

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)
MQTT_311, MQTT_5 = 4, 5
WILL_FLAG, PASSWORD_FLAG, USERNAME_FLAG = 0x04, 0x40, 0x80
MAX_REMAINING = 268_435_455  # four length bytes (MQTT 3.1.1, 2.2.3)
# CONNACK return codes of 3.1.1 (3.2.2.3) -> reason codes of 5.0 (3.2.2.2)
CONNACK_REASON = {0: 0x00, 1: 0x84, 2: 0x85, 3: 0x88, 4: 0x86, 5: 0x87}


class PacketError(ValueError):
    """A packet this proxy cannot parse: the connection is closed."""


# -- framing -----------------------------------------------------------------------------


def varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a variable byte integer at ``pos``: (value, bytes used)."""
    value, shift = 0, 0
    for used in range(1, 5):
        if pos + used > len(data):
            raise PacketError("truncated length")
        byte = data[pos + used - 1]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, used
        shift += 7
    raise PacketError("length longer than four bytes")


def encode_varint(value: int) -> bytes:
    if not 0 <= value <= MAX_REMAINING:
        raise PacketError(f"length {value} out of range")
    out = bytearray()
    while True:
        value, byte = value >> 7, value & 0x7F
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_varint(len(body)) + body


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One whole packet: (first byte, body)."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return first, await reader.readexactly(length)
        shift += 7
    raise PacketError("length longer than four bytes")


def _string_end(body: bytes, pos: int) -> int:
    """Where the length-prefixed string (or binary) at ``pos`` ends."""
    if pos + 2 > len(body):
        raise PacketError("truncated string")
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    if end > len(body):
        raise PacketError("truncated string")
    return end


def _skip_properties(body: bytes, pos: int) -> int:
    length, used = varint(body, pos)
    end = pos + used + length
    if end > len(body):
        raise PacketError("truncated properties")
    return end


# -- translation ---------------------------------------------------------------------------


@dataclass(slots=True)
class Session:
    """What a translated session must remember between packets."""

    unsubscribe_topics: dict[bytes, int] = field(default_factory=dict)  # packet id -> topics


def protocol_level(connect_body: bytes) -> int:
    """The protocol level of a CONNECT body (4: 3.1.1, 5: 5.0)."""
    level_at = _string_end(connect_body, 0)
    if level_at >= len(connect_body):
        raise PacketError("truncated CONNECT")
    return connect_body[level_at]


def _connect_to_v311(body: bytes) -> bytes:
    pos = _string_end(body, 0)  # protocol name
    if pos + 4 > len(body):
        raise PacketError("truncated CONNECT")
    flags = body[pos + 1]
    keepalive = body[pos + 2 : pos + 4]
    pos = _skip_properties(body, pos + 4)
    end = _string_end(body, pos)  # client id
    payload = body[pos:end]
    pos = end
    if flags & WILL_FLAG:
        pos = _skip_properties(body, pos)
        end = _string_end(body, _string_end(body, pos))  # will topic, will payload
        payload += body[pos:end]
        pos = end
    payload += body[pos:]  # user name and password are the same in both versions
    return b"\x00\x04MQTT" + bytes([MQTT_311, flags]) + keepalive + payload


def _publish_to_v311(first: int, body: bytes, _session: Session) -> bytes:
    pos = _string_end(body, 0)
    if (first >> 1) & 0x03:
        pos += 2  # packet identifier
    return body[:pos] + body[_skip_properties(body, pos) :]


def _ack_to_v311(_first: int, body: bytes, _session: Session) -> bytes:
    return body[:2]  # reason code and properties dropped


def _subscribe_to_v311(_first: int, body: bytes, _session: Session) -> bytes:
    out = bytearray(body[:2])
    pos = _skip_properties(body, 2)
    while pos < len(body):
        end = _string_end(body, pos)
        if end >= len(body):
            raise PacketError("truncated SUBSCRIBE")
        out += body[pos:end] + bytes([body[end] & 0x03])  # QoS only: no 5.0 options
        pos = end + 1
    return bytes(out)


def _unsubscribe_to_v311(_first: int, body: bytes, session: Session) -> bytes:
    pos = start = _skip_properties(body, 2)
    topics = 0
    while pos < len(body):
        pos, topics = _string_end(body, pos), topics + 1
    session.unsubscribe_topics[body[:2]] = topics  # a 5.0 UNSUBACK has one code per topic
    return body[:2] + body[start:]


def _same(_first: int, body: bytes, _session: Session) -> bytes:
    return body


def _empty(_first: int, _body: bytes, _session: Session) -> bytes:
    return b""  # DISCONNECT: reason code and properties dropped


_TO_V311: dict[int, Callable[[int, bytes, Session], bytes]] = {
    CONNECT: lambda _f, body, _s: _connect_to_v311(body),
    PUBLISH: _publish_to_v311,
    PUBACK: _ack_to_v311,
    PUBREC: _ack_to_v311,
    PUBREL: _ack_to_v311,
    PUBCOMP: _ack_to_v311,
    SUBSCRIBE: _subscribe_to_v311,
    UNSUBSCRIBE: _unsubscribe_to_v311,
    PINGREQ: _same,
    DISCONNECT: _empty,
}


def to_v311(first: int, body: bytes, session: Session) -> bytes:
    """A 5.0 client's packet as the 3.1.1 broker expects it."""
    translate = _TO_V311.get(first >> 4)
    if translate is None:  # AUTH, or a packet only a broker sends
        raise PacketError(f"packet type {first >> 4} has no 3.1.1 form")
    return packet(first, translate(first, body, session))


def to_v5(first: int, body: bytes, session: Session) -> bytes:
    """A 3.1.1 broker's packet as a 5.0 client expects it."""
    kind = first >> 4
    if kind == CONNACK:
        if len(body) != 2:
            raise PacketError("CONNACK of 3.1.1 has two bytes")
        return packet(first, bytes([body[0], CONNACK_REASON.get(body[1], 0x80), 0]))
    if kind == PUBLISH:
        pos = _string_end(body, 0)
        if (first >> 1) & 0x03:
            pos += 2
        return packet(first, body[:pos] + b"\x00" + body[pos:])
    if kind == SUBACK:
        return packet(first, body[:2] + b"\x00" + body[2:])
    if kind == UNSUBACK:
        topics = session.unsubscribe_topics.pop(body[:2], 1)
        return packet(first, body[:2] + b"\x00" + b"\x00" * topics)
    return packet(first, body)  # PUBACK...PUBCOMP (2 bytes are valid in 5.0), PINGRESP


# -- the proxy -----------------------------------------------------------------------------


class DowngradeProxy:
    """Listen on 127.0.0.1:``port``; forward every session to the broker at ``target``."""

    def __init__(self, target: tuple[str, int], port: int | None = None) -> None:
        self.target = target
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.translated = 0  # sessions translated from 5.0
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._sessions):
            task.cancel()
        for task in list(self._sessions):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if server is not None:
            await server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback that starts a task of ours: Python 3.11's start_server
        # logs a spurious error when the task it made for a coroutine is cancelled.
        task = asyncio.create_task(self._session(reader, writer))
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection(*self.target)
            await self._serve(reader, writer, up_reader, upstream)
        except (OSError, asyncio.IncompleteReadError, PacketError):
            pass  # a session ends as a TCP connection would: both sides closed
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> None:
        first, body = await read_packet(reader)
        if first >> 4 != CONNECT:
            raise PacketError("a session starts with CONNECT")
        session = Session()
        v5 = protocol_level(body) == MQTT_5
        self.translated += int(v5)

        def inward(f: int, b: bytes) -> bytes:
            return to_v311(f, b, session) if v5 else packet(f, b)

        def outward(f: int, b: bytes) -> bytes:
            return to_v5(f, b, session) if v5 else packet(f, b)

        upstream.write(inward(first, body))
        async with asyncio.TaskGroup() as group:
            up = group.create_task(self._pump(reader, upstream, inward))
            down = group.create_task(self._pump(up_reader, writer, outward))
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            (down if up in done else up).cancel()

    @staticmethod
    async def _pump(
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        translate: Callable[[int, bytes], bytes],
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, PacketError):
            while True:
                first, body = await read_packet(source)
                sink.write(translate(first, body))
                await sink.drain()

"""The demo's MQTT side: find or start a broker, and watch what the receiver publishes.

* :func:`probe` asks a broker for a session (an MQTT 3.1.1 CONNECT answered by
  a CONNACK "accepted"), not just for a TCP accept: a port that answers TCP
  may be another service, or a broker that refuses anonymous clients.
* :class:`EmbeddedBroker` is an amqtt broker in the demo's event loop on a free
  loopback port, for machines without one.
* :class:`Watcher` is the subscriber: aiomqtt in the same loop, keeping the
  last message of every topic and counting them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from diode.demo.sparkplug import SparkplugReader
from diode.loopback import free_port

PROBE_TIMEOUT_S = 1.0
CONNACK = 0x20
CONNACK_ACCEPTED = 0
DISCONNECT = b"\xe0\x00"


def connect_packet(client_id: str, keepalive_s: int = 10) -> bytes:
    """An MQTT 3.1.1 CONNECT with a clean session and no credentials (spec 3.1)."""
    ident = client_id.encode()
    variable = b"\x00\x04MQTT" + bytes([4, 0x02]) + keepalive_s.to_bytes(2, "big")
    body = variable + len(ident).to_bytes(2, "big") + ident
    # One length byte suffices below 128 (the spec's variable-length encoding).
    if len(body) >= 128:
        raise ValueError("client id too long for the probe")
    return bytes([0x10, len(body)]) + body


async def probe(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when an MQTT broker at host:port accepts an anonymous session."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(connect_packet(f"diode-demo-probe-{time.monotonic_ns() % 10**9}"))
            await writer.drain()
            answer = await reader.readexactly(4)
            accepted = answer[0] == CONNACK and answer[1] == 2 and answer[3] == CONNACK_ACCEPTED
            if accepted:
                writer.write(DISCONNECT)
                await writer.drain()
            return accepted
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await writer.wait_closed()


class EmbeddedBroker:
    """An amqtt broker on 127.0.0.1, anonymous, no $SYS topics, nothing on disk.

    amqtt 0.12 speaks MQTT 3.1.1 only: the receiver is configured with
    ``protocol = "3.1.1"`` for it, as it would be for an older plant broker.
    """

    protocol = "3.1.1"

    def __init__(self, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._broker: Any = None

    async def start(self) -> None:
        # Heavy (websockets, transitions): loaded only when the demo needs its own broker.
        from amqtt.broker import Broker  # noqa: PLC0415

        # amqtt logs every connection at INFO and its own teardown at WARNING.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        broker = Broker(config)
        await broker.start()
        self._broker = broker

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()


@dataclass(slots=True)
class Seen:
    """The last message on one topic."""

    payload: dict[str, Any] | str
    at: float  # monotonic arrival time
    count: int = 1


@dataclass(slots=True)
class Watcher:
    """Subscribes to ``topic_filter`` and keeps what arrives (live messages only)."""

    host: str
    port: int
    topic_filter: str
    client_id: str
    topics: dict[str, Seen] = field(default_factory=dict)
    messages: int = 0
    retained_skipped: int = 0
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    sparkplug: SparkplugReader | None = None  # also read Sparkplug B (spBv1.0/#) as tag values

    async def run(self) -> None:
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V311,  # what every broker speaks
            keepalive=10,
        )
        async with client:
            await client.subscribe(self.topic_filter, qos=1)
            if self.sparkplug is not None:
                await client.subscribe("spBv1.0/#", qos=0)
            self.subscribed.set()
            async for message in client.messages:
                self._take(str(message.topic), message.payload, message.retain)

    def _take(self, topic: str, raw: object, retain: bool) -> None:
        # A retained message is an earlier run's last value (a broker that
        # outlives the demo keeps them): shown nowhere and counted apart, so
        # the figures are this run's alone. Live messages reach a subscriber
        # with the retain flag clear (MQTT 3.1.1, 3.3.1.3).
        if retain:
            self.retained_skipped += 1
            return
        if self.sparkplug is not None and topic.startswith("spBv1.0/"):
            data = bytes(raw) if isinstance(raw, bytes | bytearray) else b""
            for tag_topic, value in self.sparkplug.take(topic, data):
                self._keep(tag_topic, value)
            return
        text = raw.decode(errors="replace") if isinstance(raw, bytes | bytearray) else str(raw)
        try:
            decoded = json.loads(text)
        except ValueError:
            decoded = text
        self._keep(topic, decoded if isinstance(decoded, dict) else text)

    def _keep(self, topic: str, payload: dict[str, Any] | str) -> None:
        self.messages += 1
        seen = self.topics.get(topic)
        count = seen.count + 1 if seen is not None else 1
        self.topics[topic] = Seen(payload=payload, at=time.monotonic(), count=count)

"""A pair of receivers, one publishing at a time: the hand-over rule and the peer watch.

Two receivers on two hosts get the same datagrams (an optical or port-mirror
splitter; a duplicating relay in tests). Each has ``[failover]
peer_status_topic`` set to the other's ``[mqtt] status_topic``. The rule:

1. **Everyone starts as the standby.** A standby decodes every datagram (its
   router learns the catalogue) and publishes nothing but its receiver status.
   It leaves in its socket's queue every datagram the active receiver's last
   announced positions do not cover (receiver/link.py), and saves those
   positions as its own.
2. **The active one announces** every ``ANNOUNCE_S``, retained, on
   ``{its status_topic}/positions``: its name, when it took over, and the
   stream positions of its last commit. The announcement goes through its
   spool like any message, so the broker has it only after every message those
   positions cover: the positions are *published* ones. Beside it, on its
   watch connection, it claims ``{its status_topic}/claim`` (name, since) every
   ``ANNOUNCE_S``: that one no backlog can hold up, so it is what says "alive".
3. **A standby takes over** when the active one's status goes offline while it
   watches (its last will, or a clean stop), or when it has heard neither a
   claim nor an announcement for ``takeover_after_s`` while connected to the
   broker. It
   starts from the last announced positions, reading its socket's queue from
   the head: consumers see again what the active one published after its last
   announcement (at most ``ANNOUNCE_S`` plus its delivery lag), never a hole.
   With no broker a standby never takes over: it could not tell a dead peer
   from a dead broker.
4. **Cold start** (nobody announcing): a receiver that was active when it
   stopped claims after ``takeover_after_s``, one that was standby after twice
   that, so the one with the freshest positions and the spool resumes.
5. **Two active** (both claimed, or one cut off from the broker came back):
   each that hears the other's announcement compares claims; the most recent
   claim wins (it proved the other unreachable), a tie goes to the smaller
   name; the other steps down at once. Both publish at most until the next
   announcement arrives, plus whatever the loser had spooled while cut off.

6. **An active receiver that has not run** for ``takeover_after_s`` (frozen,
   a suspended VM) steps down before it reads anything: the standby has taken
   over by then. Like any receiver that steps down, it then gives the peer
   ``takeover_after_s`` to be heard before it would claim again.

The watch is its own MQTT connection (client id ``{client_id}-failover``),
subscribed to the peer's status and announcements; the MQTT output stays
output only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import structlog

from diode.config.mqtt import MqttBroker
from diode.config.rx import FailoverSection
from diode.replay import StreamState
from receiver.mqtt import broker_connection

log = structlog.get_logger("diode.rx.failover")

ANNOUNCE_S = 0.5
POSITIONS_SUFFIX = "/positions"
CLAIM_SUFFIX = "/claim"


def announcement_topic(status_topic: str) -> str:
    """Where the active receiver's published positions go (through its spool, retained)."""
    return status_topic + POSITIONS_SUFFIX


def claim_topic(status_topic: str) -> str:
    """Where the active receiver says it is, directly (not behind a spool backlog)."""
    return status_topic + CLAIM_SUFFIX


def pack_positions(positions: dict[int, StreamState]) -> dict[str, list[int]]:
    return {str(k): [p.epoch, p.next_seq, p.next_record] for k, p in positions.items()}


def unpack_positions(data: Any) -> dict[int, StreamState]:
    """Positions from an announcement; anything malformed gives none (and is logged)."""
    out: dict[int, StreamState] = {}
    if not isinstance(data, dict):
        return out
    for key, value in data.items():
        if (
            isinstance(value, list)
            and len(value) == 3
            and all(type(v) is int and v >= 0 for v in value)
            and key.isdigit()
        ):
            out[int(key)] = StreamState(epoch=value[0], next_seq=value[1], next_record=value[2])
    return out


def newest(a: StreamState | None, b: StreamState | None) -> StreamState | None:
    """The position further along (same stream)."""
    if a is None or b is None:
        return a or b
    return a if (a.epoch, a.next_seq) >= (b.epoch, b.next_seq) else b


def merged(ours: dict[int, StreamState], theirs: dict[int, StreamState]) -> dict[int, StreamState]:
    """Per stream, the position further along."""
    out = {}
    for sid in ours.keys() | theirs.keys():
        position = newest(ours.get(sid), theirs.get(sid))
        if position is not None:
            out[sid] = position
    return out


@dataclass(slots=True)
class Claim:
    """An active receiver, as its claims and announcements name it."""

    name: str
    since: float  # wall clock, when it took over
    live: bool  # heard as it was published (not a retained copy from before we subscribed)


class Failover:
    """The peer as heard on the broker, and the rule above applied to it."""

    def __init__(self, broker: MqttBroker, section: FailoverSection, *, was_active: bool) -> None:
        assert section.peer_status_topic is not None
        self._broker = broker
        self.name = broker.client_id
        self.takeover_after_s = section.takeover_after_s
        self.peer_status_topic = section.peer_status_topic
        self.was_active = was_active
        self.connected_at: float | None = None  # monotonic
        self.heard_at: float | None = None  # the last live announcement (monotonic)
        self.claim: Claim | None = None  # the latest claim or announcement, live or retained
        self.peer_positions: dict[int, StreamState] = {}  # its latest announced positions
        self.claiming: float | None = None  # set by the receiver while active: its since
        self.peer_offline = False  # its status went offline while we watched
        self.ever_heard = False  # an active peer announced since we started
        self.standby_since: float | None = None  # when this one stepped down (monotonic)
        self.on_news: Callable[[], None] | None = None  # called after each message heard
        self.counters = {"failover_active": 0, "failover_takeovers": 0, "failover_stepdowns": 0}

    # -- the rule ------------------------------------------------------------------------

    def decide(self, now: float, *, active: bool, since: float) -> str | None:
        """What to do now: "take over: <why>", "step down: <why>", or None."""
        if self.connected_at is None:
            return None  # no broker: a dead peer and a dead broker look the same
        return self._as_active(since) if active else self._as_standby(now)

    def _as_active(self, since: float) -> str | None:
        claim = self.claim
        if claim is None or not claim.live or claim.name == self.name:
            return None
        # The most recent claim wins; a tie goes to the smaller name.
        if (claim.since, self.name) > (since, claim.name):
            return f"step down: {claim.name} claimed later"
        return None

    def _as_standby(self, now: float) -> str | None:
        assert self.connected_at is not None
        if self.peer_offline:
            return "take over: the active receiver's status is offline"
        marks = [t for t in (self.heard_at, self.standby_since) if t is not None]
        if marks:
            quiet = now - max(marks)
            if quiet >= self.takeover_after_s:
                return f"take over: nothing heard from the active receiver for {quiet:.1f} s"
            return None
        wait = self.takeover_after_s * (1 if self.was_active or self.ever_heard else 2)
        if now - self.connected_at >= wait:
            return f"take over: nobody active ({now - self.connected_at:.1f} s connected)"
        return None

    def positions(self) -> dict[int, StreamState]:
        return dict(self.peer_positions)

    # -- what the broker says ----------------------------------------------------------

    def heard(self, topic: str, payload: bytes, *, retained: bool, now: float) -> None:
        self._heard(topic, payload, retained=retained, now=now)
        if self.on_news is not None:
            self.on_news()  # a will or a later claim is acted on at once, not at the next tick

    def _heard(self, topic: str, payload: bytes, *, retained: bool, now: float) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            log.warning("failover: unreadable message from the peer", topic=topic)
            return
        if topic == self.peer_status_topic:
            online = data.get("online")
            if online is False and not retained:
                if not self.peer_offline:
                    log.warning("failover: the active receiver's status is offline", peer=data)
                self.peer_offline = True
            elif online is True and not retained:
                self.peer_offline = False
            return
        name, since = data.get("name"), data.get("since")
        if not isinstance(name, str) or not isinstance(since, int | float):
            log.warning("failover: malformed announcement", topic=topic)
            return
        self.claim = Claim(name, float(since), live=not retained)
        if topic.endswith(POSITIONS_SUFFIX):
            self.peer_positions = unpack_positions(data.get("positions"))
        if not retained:
            self.heard_at = now
            self.ever_heard = True
            self.peer_offline = False

    # -- the connection ------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        broker = self._broker
        return aiomqtt.Client(
            **broker_connection(broker), identifier=f"{broker.client_id}-failover"
        )

    async def run(self) -> None:
        """Watch the peer; reconnect with backoff; until cancelled."""
        delay = self._broker.reconnect_initial_s
        while True:
            try:
                async with self._client() as client, asyncio.TaskGroup() as group:
                    peer = self.peer_status_topic
                    for topic in (peer, announcement_topic(peer), claim_topic(peer)):
                        await client.subscribe(topic, qos=1)
                    self.connected_at = time.monotonic()
                    delay = self._broker.reconnect_initial_s
                    claims = group.create_task(self._claims(client))
                    try:
                        await self._listen(client)
                    finally:
                        claims.cancel()
            except aiomqtt.MqttError as exc:
                if self.connected_at is not None:
                    log.warning("failover: watch disconnected", reason=str(exc))
            finally:
                self.connected_at = None
                self.heard_at = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._broker.reconnect_max_s)

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            self.heard(
                str(message.topic),
                bytes(payload) if isinstance(payload, bytes | bytearray) else str(payload).encode(),
                retained=bool(message.retain),
                now=time.monotonic(),
            )

    async def _claims(self, client: aiomqtt.Client) -> None:
        """While active: "I am", every ANNOUNCE_S, on this connection (no spool ahead of it)."""
        topic = claim_topic(self._broker.status_topic)
        while True:
            if self.claiming is not None:
                payload = json.dumps({"name": self.name, "since": self.claiming})
                await client.publish(topic, payload, qos=0)
            await asyncio.sleep(ANNOUNCE_S)


class NullOutput:
    """Where a standby's router publishes: nowhere."""

    def publish_samples(self, stream: object, items: object) -> None:
        return

    def publish_inventory(self, stream: object, info: object) -> None:
        return

    def publish_status(self, stream: object, status: object) -> None:
        return

    def publish_meta(self, stream: object, info: object) -> None:
        return

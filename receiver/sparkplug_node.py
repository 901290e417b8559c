"""The I/O shell of the Sparkplug edge nodes: one MQTT session each, its will, its clock.

::

    router --publish_samples / publish_status--> SparkplugRouting
        |  Sparkplug streams                         |  other streams, inventory, status
        v                                            v
      SparkplugNode: EdgeNode (receiver/sparkplug.py)  MqttOutput (JSON, spool)
        |  paho publish, non-blocking
        v
      aiomqtt session: clean, will = NDEATH(bdSeq), subscribed to NCMD, DCMD/+ and
      the primary host's STATE  --> broker

A Sparkplug edge node is one MQTT session with NDEATH as its will, so each
Sparkplug stream has its own connection beside the JSON output's. bdSeq is
taken before each CONNECT and written to ``state_dir/sparkplug-<stream>.bdseq``
first, so it keeps counting across reconnects and restarts (0..255, wrapping).
A clean stop publishes the NDEATH itself (a clean DISCONNECT fires no will).

Values kept for later (no broker, primary host offline) are written to
``state_dir/sparkplug-<stream>.history.sqlite3`` (receiver/spool.py) in the
router's call, so before the receiver commits the stream positions that cover
them: a receiver killed during an outage sends them, as historical, after its
next births. They leave the file once those births and the history are handed
to the connection.

With a primary host, a STATE offline ends the session (NDEATH, disconnect:
Sparkplug 3.0); the next session waits for STATE online before its births.

Commands never leave this module: a rebirth is answered by the EdgeNode from
its cache; any other NCMD/DCMD metric is refused, counted and logged with the
requester's topic. The receiver has no path to the OT side at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode

from diode.config.mqtt import MqttBroker, StreamOutput
from diode.config.rx import RxConfig
from diode.errors import FrameError
from diode.records import DeviceInfo, Sample, TagInfo, decode_records, encode_records
from receiver.mqtt import broker_connection
from receiver.payload import Message
from receiver.sparkplug import SEQ_MODULO, EdgeNode, Publish
from receiver.spool import Spool

log = structlog.get_logger("diode.rx.sparkplug")

DEATH_GRACE_S = 1.0
HISTORY_TOPIC = "history"  # rows of the history spool: [TagInfo, Sample] records
SPOOL_START = -(2**62)  # below any spool message id
SPOOL_END = 2**62  # above any
REFUSED_LOG_INTERVAL_S = 10.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class BdSeqStore:
    """bdSeq kept in a small file: the next session's value is written before it connects."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def last(self) -> int | None:
        try:
            return int(self.path.read_text().strip()) % SEQ_MODULO
        except (OSError, ValueError):
            return None

    def take(self) -> int:
        last = self.last()
        value = 0 if last is None else (last + 1) % SEQ_MODULO
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{value}\n")
        os.replace(tmp, self.path)
        return value


class SparkplugNode:
    """One edge node: its session, the messages its EdgeNode asks for, its commands."""

    def __init__(
        self, broker: MqttBroker, stream_id: int, output: StreamOutput, state_dir: Path
    ) -> None:
        self.broker = broker
        self.stream_id = stream_id
        self.settings = output.sparkplug
        self.bd_seq = BdSeqStore(state_dir / f"sparkplug-{stream_id}.bdseq")
        self.machine = EdgeNode(self.settings, qos=output.qos, bd_seq=0)
        self.history = Spool(
            state_dir / f"sparkplug-{stream_id}.history.sqlite3", self.settings.history_max_samples
        )
        self.client_id = (
            self.settings.client_id
            or (f"{broker.client_id}-spb-{self.settings.edge_node_id}")[:128]
        )
        self.counters: dict[str, int] = {"published": 0, "publish_failed": 0, "sessions": 0}
        self._client: paho.Client | None = None
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._refused_logged_at = 0.0
        self._refused_pending = 0
        self.last_refused: tuple[str, tuple[str, ...]] = ("", ())  # topic, metric names
        self._log = log.bind(
            stream=stream_id, group=self.settings.group_id, node=self.settings.edge_node_id
        )
        self._restore()

    # -- what the router hands over --------------------------------------------------

    def publish_samples(self, items: Sequence[tuple[TagInfo, Sample]]) -> None:
        self._check_session()
        self._send(self.machine.samples(items, _now_ms()))
        kept = self.machine.take_kept()
        if kept:
            rows = [
                Message(HISTORY_TOPIC, encode_records([tag, sample]), 0, False)
                for tag, sample in kept
            ]
            self.history.append(rows, time.time())

    def _restore(self) -> None:
        """History a previous run left on disk, back in the EdgeNode (before any session)."""
        if not len(self.history):
            return
        _, rows = self.history.read(SPOOL_START, len(self.history), time.time())
        entries: list[tuple[TagInfo, Sample]] = []
        for _, row in rows:
            try:
                tag, sample = decode_records(row.payload, 2)
            except (FrameError, ValueError):
                continue
            if isinstance(tag, TagInfo) and isinstance(sample, Sample):
                entries.append((tag, sample))
        self.machine.restore(entries)
        self._log.info("sparkplug history restored from disk", values=len(entries))

    def _history_sent(self) -> None:
        """The births and history are handed over: the disk copy is no longer needed."""
        if not self.machine.history and len(self.history):
            self.history.delete_through(SPOOL_END)

    def publish_status(self, status: dict[str, Any]) -> None:
        self._check_session()
        before = self.machine.link_down
        self._send(self.machine.status(status, _now_ms()))
        if self.machine.link_down != before:
            self._log.info(
                "sparkplug devices " + ("dead: link down" if self.machine.link_down else "reborn"),
                devices=len(self.machine.devices),
            )

    def _check_session(self) -> None:
        """A session paho already knows is gone: values go to history, not into the void."""
        client = self._client
        if client is not None and not client.is_connected():
            self._client = None
            self.machine.on_disconnect()

    def _send(self, messages: list[Publish]) -> None:
        client = self._client
        for m in messages:
            if client is None:
                self.counters["publish_failed"] += 1
                continue
            info = client.publish(m.topic, m.payload, m.qos, m.retain)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.counters["published"] += 1
            else:
                self.counters["publish_failed"] += 1

    # -- the session -----------------------------------------------------------------

    def _connection(self, bd_seq: int) -> aiomqtt.Client:
        broker = self.broker
        v311 = broker.protocol == "3.1.1"
        # Sparkplug 3.0: a clean session (3.1.1 clean session, 5 clean start and no
        # session expiry), the NDEATH as will at QoS 1, not retained.
        return aiomqtt.Client(
            **broker_connection(broker),
            identifier=self.client_id,
            clean_session=True if v311 else None,
            # paho refuses clean_start under 3.1.1 unless it is left at its default
            clean_start=paho.MQTT_CLEAN_START_FIRST_ONLY if v311 else True,
            max_inflight_messages=broker.max_inflight,
            will=aiomqtt.Will(
                self.machine.topic_ndeath, self.machine.will(_now_ms()), qos=1, retain=False
            ),
        )

    async def run(self) -> None:
        """Connect, subscribe, be born, answer; reconnect with a new bdSeq until closed."""
        delay = self.broker.reconnect_initial_s
        try:
            while not self._stopping.is_set():
                self.machine.session(self.bd_seq.take())
                try:
                    await self._session()
                    delay = self.broker.reconnect_initial_s
                except aiomqtt.MqttError as exc:
                    self._log.warning(
                        "sparkplug session lost", error=str(exc), retry_in_s=round(delay, 2)
                    )
                finally:
                    self._client = None
                    self.machine.on_disconnect()
                if self._stopping.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, self.broker.reconnect_max_s)
        finally:
            self._stopped.set()

    async def _session(self) -> None:
        machine = self.machine
        async with self._connection(machine.bd_seq) as client:
            self.counters["sessions"] += 1
            # Sparkplug 3.0: NCMD/DCMD (and STATE) are subscribed before the NBIRTH.
            await client.subscribe(machine.topic_ncmd, qos=1)
            await client.subscribe(machine.topic_dcmd, qos=1)
            if machine.topic_state is not None:
                await client.subscribe(machine.topic_state, qos=1)
            self._client = client._client
            self._log.info(
                "sparkplug session up",
                bd_seq=machine.bd_seq,
                client_id=self.client_id,
                waiting_for_host=machine.primary_host_id if not machine.host_online else None,
            )
            self._send(machine.on_connect(_now_ms()))
            self._history_sent()
            listen = asyncio.ensure_future(self._listen(client))
            stop = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({listen, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                listen.cancel()
            if listen.done() and not listen.cancelled() and listen.exception() is not None:
                raise listen.exception()  # type: ignore[misc]  # checked not None above
            # A clean stop (or the primary host gone): say NDEATH ourselves, then
            # DISCONNECT (which fires no will).
            info = client._client.publish(*machine.death(_now_ms()))
            deadline = time.monotonic() + DEATH_GRACE_S
            # paho gives no awaitable for one message without an on_publish callback
            while time.monotonic() < deadline and info.rc == 0 and not info.is_published():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            self._client = None

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            payload = message.payload
            data = payload if isinstance(payload, bytes | bytearray) else b""
            now = _now_ms()
            if self.machine.topic_state is not None and topic == self.machine.topic_state:
                was = self.machine.host_online
                self._send(self.machine.host_state(bytes(data), now))
                self._history_sent()
                if was and not self.machine.host_online:
                    # Sparkplug 3.0: an edge node whose primary host goes offline
                    # publishes its NDEATH and disconnects; the next session waits
                    # for the host, keeping values meanwhile for after its births.
                    self._log.info(
                        "sparkplug primary host offline: NDEATH, then a new session",
                        host=self.machine.primary_host_id,
                    )
                    return
                if not was and self.machine.host_online:
                    self._log.info(
                        "sparkplug primary host online", host=self.machine.primary_host_id
                    )
            elif self.machine.is_command(topic):
                result = self.machine.command(topic, bytes(data), now)
                self._send(result.messages)
                if result.rebirth:
                    self._log.info("sparkplug rebirth answered from the cache", requester=topic)
                if result.refused or result.malformed:
                    self._refused(topic, result.refused, malformed=result.malformed)

    def _refused(self, topic: str, metrics: tuple[str, ...], *, malformed: bool) -> None:
        """A write (or garbage) on a command topic: refused, counted, logged rate-limited."""
        self._refused_pending += 1
        self.last_refused = (topic, metrics)
        now = time.monotonic()
        if now - self._refused_logged_at >= REFUSED_LOG_INTERVAL_S:
            self._log.warning(
                "sparkplug command refused: the receiver cannot write to the OT side",
                requester_topic=topic,
                metrics=list(metrics[:10]),
                malformed=malformed,
                refused_since_last_log=self._refused_pending,
                refused_total=self.machine.counters["commands_refused"],
            )
            self._refused_pending = 0
            self._refused_logged_at = now

    async def close(self) -> None:
        """NDEATH, then disconnect; values not yet out stay on disk for the next run."""
        self._stopping.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), DEATH_GRACE_S + 2)
        self.history.close()

    def commands_refused(self) -> tuple[int, str, tuple[str, ...]]:
        """Commands refused or malformed so far, and the topic and metrics of the last one."""
        counters = self.machine.counters
        total = counters["commands_refused"] + counters["commands_malformed"]
        return total, *self.last_refused

    def all_counters(self) -> dict[str, int]:
        out = dict(self.machine.counters)
        out.update(self.counters)
        out["history_depth"] = len(self.machine.history)
        out["bd_seq"] = self.machine.bd_seq
        return out


class SparkplugRouting:
    """The router's output when some streams speak Sparkplug: their values go to their node.

    Inventory and status of every stream still go to the JSON output (retained,
    for dashboards); a Sparkplug stream's status also drives its node's DDEATH
    and DBIRTH.
    """

    def __init__(self, output: Any, nodes: dict[int, SparkplugNode], config: RxConfig) -> None:
        self._output = output
        # The router passes each stream's own StreamOutput object: keyed by identity.
        self._nodes = {id(s.output): nodes[s.id] for s in config.streams if s.id in nodes}

    def publish_samples(
        self, stream: StreamOutput, items: Sequence[tuple[TagInfo, Sample]]
    ) -> None:
        node = self._nodes.get(id(stream))
        if node is None:
            self._output.publish_samples(stream, items)
        else:
            node.publish_samples(items)

    def publish_inventory(self, stream: StreamOutput, info: DeviceInfo) -> None:
        self._output.publish_inventory(stream, info)

    def publish_meta(self, stream: StreamOutput, info: TagInfo) -> None:
        # A Sparkplug stream's metadata travels in its DBIRTH's metric properties.
        if id(stream) not in self._nodes:
            self._output.publish_meta(stream, info)

    def publish_status(self, stream: StreamOutput, status: dict[str, Any]) -> None:
        node = self._nodes.get(id(stream))
        if node is not None:
            node.publish_status(status)
        self._output.publish_status(stream, status)


def sparkplug_nodes(config: RxConfig) -> dict[int, SparkplugNode]:
    """An edge node for each stream whose payload is ``sparkplug``, by stream id."""
    return {
        s.id: SparkplugNode(config.mqtt, s.id, s.output, config.receiver.state_dir)
        for s in config.streams
        if s.output.payload == "sparkplug"
    }

"""The receiver's MQTT output: one ordered pipeline from the router to the broker.

::

    router (event loop, non-blocking calls)
      publish_samples / publish_inventory / publish_status
        |  topics + JSON (receiver/payload.py)
        v
      batch --commit(positions)--> SQLite spool (one transaction: the messages and
        |                          the stream positions that cover them; bounded:
        |                          when full the oldest are dropped, counted)
        v
      pump: PUBLISH packets built here (receiver/mqtt_packets.py), one write
        |   per spool read (<= WRITE_BYTES), <= window in flight, one write at a
        |   time waiting for the socket                  <-- spool, oldest first
        v
      aiomqtt connection (MQTT 5 or 3.1.1, last will, TLS, reconnect with backoff) --> broker

Write-through: every message is in the spool before anything is published,
committed together with the receiver's stream positions. A receiver killed at
any moment therefore restarts with exactly the messages its saved position
promised, none lost and none taken twice from a replayed block. Messages leave the
spool only when the broker has them (PUBACK for QoS 1, written to the socket
for QoS 0); on a lost connection the reader starts again at the oldest message.
QoS 1 is at-least-once: a message whose PUBACK was lost with the connection is
sent again, with DUP semantics left to subscribers (the value and ts make it
idempotent). A QoS 1 message the broker refuses (an MQTT 5 PUBACK with a
reason code of 0x80 or more, e.g. 0x87 not authorized by its ACL) is never
retried: it is counted (``refused``) and logged with the reason, rate-limited.
The spool costs about 1.9 us of CPU a message here (append, read, delete, in
batches of 50; 4.3 us when it kept one row per message), the price of
property 3 ("nothing is lost silently"). A message whose MQTT 5 expiry ran
out while spooled is dropped in its turn and counted (``spool_expired``), as
is one whose bytes a power loss took from the spool's data file (counted in
``spool_damaged`` too, and logged: receiver/spool.py).

How to publish fast enough: measured here (CPython 3.11, 2 cores, local
mosquitto 2.0.11, counted by ``mosquitto_sub`` in a child process,
``python -m receiver.bench_mqtt``; 100k messages of ~90 bytes, retained, MQTT 5
content type):

======================================================  ==========  ==========
method (per-tag messages unless said)                   QoS 0       QoS 1
======================================================  ==========  ==========
aiomqtt ``await client.publish`` each (bench)           6.4k/s      3.8k/s
paho ``loop_start`` thread (FIELD.md, not re-measured)  32k/s       -
aiomqtt's paho client, no await, paho Properties        36k/s       26k/s
  same, Properties packed once, no on_publish (raw)     107k/s      28k/s
MqttOutput with a memory queue (before write-through)   43-52k/s    16-23k/s
  batched, 50 samples/device/call: samples/s            294k/s      210k/s
MqttOutput write-through (every message via the spool)  40k/s       20k/s
  batched, 50 samples/device/call: samples/s            166k/s      145k/s
  same, deleting delivered rows 4000 at a time          43k/s       26k/s
  batched, 50 samples/device/call: samples/s            219k/s      189k/s
  same, packets built here, one write per spool read    56-61k/s    30k/s
  batched, 50 samples/device/call: samples/s            206-210k/s  210-217k/s
  same, connection read 64 KiB at a time (quiet box)    97-100k/s   57-60k/s
======================================================  ==========  ==========

(Ranges are over runs on the noisy 2-core machine: mosquitto, mosquitto_sub
and this process share the cores; the last two rows against 39k/s and 18k/s
for the row above them in the same session.) So aiomqtt stays the connection
manager (connect, TLS, will, socket callbacks on our loop, disconnect
detection), and values bypass paho's ``publish``: its per-message
``MQTTMessageInfo`` (a ``threading.Condition`` each) and its one ``send()``
per packet were, by py-spy, a third of the receiver's time at 10 000 updates/s.
The pump builds the PUBLISH packets of a spool read itself and sends them in
one write: straight to the socket when paho has nothing queued ahead of them,
else queued in paho as one packet (:func:`_write`); QoS 0 messages are done
when the whole write is on the socket, QoS 1 messages when their PUBACK
arrives (read by our handler before paho's, which would decode each into
objects and ignore ids it did not issue). Every
completion wakes the pump: no polling, no back-off sleeps between a commit
and its publication. With a backlog the pump refills once a quarter of the
window is free, so acknowledgements do not turn into one small write each.
paho reads a packet a field at a time and one packet per callback; the
connection is read in bulk instead (:class:`_BufferedReads`), which took a
PUBACK from three system calls and a turn of the event loop to a share of one.

paho does not honour the broker's Receive Maximum (a broker with the default
20 would disconnect us for sending more); the window is the smaller of
``max_inflight`` and the Receive Maximum from CONNACK, and never so large that
packet identifiers run out: ours come from paho's own generator, skipping any
still in use by paho (the receiver status) or by us (:data:`MAX_WINDOW`).

A message that cannot be put in a PUBLISH packet (a topic over 65 535 bytes,
empty, not UTF-8, or with ``+``, ``#`` or NUL, which a broker answers by
closing the connection) is refused when it is handed over, before the spool,
and again when read from a spool written by an earlier version: counted
(``unencodable``) and logged, rate-limited, never retried.

The output leans on private members of paho and aiomqtt, for the measured
reasons above. The versions are pinned in pyproject.toml, and
:func:`check_internals` (at start) and :meth:`MqttOutput._client` (at each
connection) check that each member is there and does what the output needs
(a packet queued is written, a PUBACK read reaches our handler with its id,
message ids count up): an upgrade that breaks one fails loudly at start
(:class:`MqttInternalsError`) instead of stalling the window silently.
paho's and aiomqtt's own log lines reach the root logger, which
diode/daemon.py hands to structlog (JSON in production, rate-limited), not as
plain text into the JSON log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import sqlite3
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _package_version
from typing import Any, Literal, TypedDict

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from diode.config.mqtt import MqttBroker, StreamOutput
from diode.errors import DiodeError
from diode.records import DeviceInfo, Sample, TagInfo
from receiver import mqtt_packets
from receiver.payload import (
    CONTENT_TYPE,
    Message,
    Topics,
    encode,
    file_message,
    inventory_message,
    meta_message,
    rfc3339,
    sample_messages,
    status_message,
)
from receiver.spool import Spool, StateChanges

POLL_S = 0.0005  # closing only: how often the drain looks for acknowledgements
READ_SIZE = 65536  # bytes the broker connection reads at once
REFUSED = 0x80  # PUBACK reason codes from here on are failures (MQTT 5 section 2.4)
SPOOL_READ = 1000  # messages read from the spool at once, at most
# ... and bytes of topics and payloads (one message more if it is larger): one write's
# worth. With one write at most waiting for the socket, what the pump holds is bounded in
# bytes, whatever a message weighs (1 000 batched messages of 45 KB were 45 MB at once).
WRITE_BYTES = 1 << 20
DELETE_BATCH = 4000  # delivered messages deleted in one transaction
# With nothing in flight, what the broker has is deleted with the next commit (one
# transaction, not two), or after this long if no commit comes first.
FORGET_AFTER_S = 0.05
DRAIN_GRACE_S = 2.0
CHECKPOINT_S = 0.25  # how often the spool's WAL is folded back, off the event loop
DROP_LOG_INTERVAL_S = 10.0
OUT_OF_BAND = 4  # window slots kept for the receiver status messages
MAX_MID = 65535  # packet identifiers are 1..65535 (MQTT section 2.2.1)
MAX_WINDOW = MAX_MID - 256  # ids left free for paho's own QoS 1 messages (the status)
CURSOR_START = -(2**62)  # below any message id
GOOD_TOPICS_MAX = 1_000_000  # topics checked once; forgotten when there are more

# The private members of paho (and aiomqtt) the output relies on: see check_internals.
PAHO_INTERNALS = (
    "_packet_queue",
    "_mid_generate",
    "_in_packet",
    "_handle_pubackcomp",
    "_sock_recv",
    "_sock",
    "_out_messages",
    "_out_packet",
)
AIOMQTT_INTERNALS = ("_client", "_on_connect")


class MqttInternalsError(DiodeError):
    """The installed paho / aiomqtt lack a private member the output uses, or it changed."""

    reason = "mqtt_internals"


class _PackedProperties(Properties):
    """PUBLISH properties packed once; paho packs them again on every publish otherwise."""

    _packed: bytes

    def __init__(self, expiry_s: int | None) -> None:
        super().__init__(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho: untyped
        self.ContentType = CONTENT_TYPE
        if expiry_s is not None:
            self.MessageExpiryInterval = expiry_s
        packed: bytes = super().pack()  # type: ignore[no-untyped-call]  # paho: untyped
        # Properties.__setattr__ accepts only MQTT property names.
        object.__setattr__(self, "_packed", packed)

    def pack(self) -> bytes:
        return self._packed


_AckCommand = Literal["PUBACK", "PUBCOMP"]
_OK = MQTTErrorCode.MQTT_ERR_SUCCESS


class _Pending:
    """Completion of a write (QoS 0) or of one message (QoS 1); wakes the pump when done.

    paho calls ``_set_as_published`` when a queued packet is on the socket, or
    with ``rc`` set when the connection was lost first (then it is not done).
    """

    __slots__ = ("_wake", "done", "rc", "reason")

    def __init__(self, wake: asyncio.Event) -> None:
        self._wake = wake
        self.done = False
        self.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self.reason = 0  # a PUBACK's reason code

    def _set_as_published(self) -> None:
        self.done = self.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        self._wake.set()


def _write(client: paho.Client, data: bytes, written: _Pending) -> None:
    """Many PUBLISH packets in one ``send()``: on the socket at once when paho has nothing
    queued ahead of them, else (and whatever the socket did not take) queued in paho as one
    packet, which calls ``written._set_as_published()`` when its last byte is on the socket.

    paho's own queueing goes through aiomqtt's writer registration (a
    ``call_soon_threadsafe`` wake-up, ``add_writer`` and ``remove_writer``, two
    more turns of the event loop) for every write: at 10 000 updates/s, one
    write a block, about 100 a second. A connection error is left to paho,
    whose write meets it again and drops the connection.
    """
    if not client._out_packet:  # nothing of paho's (status, PINGREQ) ahead: order kept
        try:
            sent = client._sock.send(data) if client._sock is not None else 0
        except OSError:  # full (BlockingIOError, TLS want-write) or broken: paho's turn
            sent = 0
        if sent == len(data):
            written._set_as_published()
            return
        data = data[sent:]
    client._packet_queue(mqtt_packets.PUBLISH, data, 0, 0, written)  # type: ignore[arg-type]  # duck-typed MQTTMessageInfo


class _BufferedReads:
    """paho's reads of one connection, from a buffer filled 64 KiB at a time.

    paho reads a packet a field at a time (a ``recv`` of 1 byte for the type,
    1 byte at a time for the length, then the rest), and the event loop's
    reader callback reads one packet per call: at QoS 1 every PUBACK cost
    three system calls and a turn of the event loop. Installed on one paho
    client, in place of its ``_sock_recv`` and ``loop_read``: reads come from
    the buffer, and ``loop_read`` goes on until the buffer is empty, so no
    byte waits in it for the socket to become readable again.
    """

    def __init__(self, client: paho.Client) -> None:
        self._buffer = bytearray()
        self._recv = client._sock_recv
        self._loop_read = client.loop_read
        client._sock_recv = self.recv  # type: ignore[method-assign]
        client.loop_read = self.loop_read  # type: ignore[method-assign]

    def recv(self, bufsize: int) -> bytes:
        buffer = self._buffer
        if not buffer:
            data = self._recv(READ_SIZE)  # BlockingIOError and the rest go to paho
            if len(data) <= bufsize:
                return data  # b"" is the peer closing: paho's to see
            buffer += data
        out = bytes(buffer[:bufsize])
        del buffer[:bufsize]
        return out

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = self._loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._buffer:
            rc = self._loop_read(max_packets)
        return rc


def install_puback(client: paho.Client, on_ack: Callable[[int, int], bool]) -> None:
    """Read PUBACKs before paho's handler: ``on_ack(mid, reason)`` True means ours, handled.

    paho does not know the messages the pump wrote, so it would ignore their
    PUBACKs; its own (the receiver status) still go to its handler.
    """
    handle = client._handle_pubackcomp

    def on_puback(command: _AckCommand) -> MQTTErrorCode:
        if command == "PUBACK":
            mid, reason = mqtt_packets.puback(client._in_packet["packet"])
            if on_ack(mid, reason):
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return handle(command)

    client._handle_pubackcomp = on_puback  # type: ignore[method-assign,assignment]  # see above


class BrokerConnection(TypedDict):
    """The arguments of ``aiomqtt.Client`` that say how to reach and log in to the broker."""

    hostname: str
    port: int
    transport: Literal["tcp", "unix"]
    protocol: aiomqtt.ProtocolVersion
    username: str | None
    password: str | None
    keepalive: int
    timeout: float
    tls_context: ssl.SSLContext | None


def broker_connection(broker: MqttBroker) -> BrokerConnection:
    """How every connection this receiver makes to ``broker`` reaches it and logs in (the
    output's, the failover watch's, each Sparkplug edge node's): over TCP, with TLS if set,
    or over the broker's Unix socket (config refuses TLS there)."""
    tls: ssl.SSLContext | None = None
    if broker.tls:
        tls = ssl.create_default_context(cafile=str(broker.ca_file) if broker.ca_file else None)
        if broker.certfile is not None:
            tls.load_cert_chain(broker.certfile, broker.keyfile)
    password = None
    if broker.password_file is not None:
        password = broker.password_file.read_text().rstrip("\r\n")
    return BrokerConnection(
        # paho connects a "unix" transport to its host, the socket's path; the port
        # is not used but must be a valid one (paho checks it at each connect).
        hostname=str(broker.socket) if broker.socket is not None else broker.host,
        port=broker.port,
        transport="unix" if broker.socket is not None else "tcp",
        protocol=(
            aiomqtt.ProtocolVersion.V311
            if broker.protocol == "3.1.1"
            else aiomqtt.ProtocolVersion.V5
        ),
        username=broker.username,
        password=password,
        keepalive=broker.keepalive_s,
        timeout=broker.connect_timeout_s,
        tls_context=tls,
    )


def _version(package: str) -> str:
    try:
        return _package_version(package)
    except PackageNotFoundError:
        return "?"


@functools.cache  # once per process; a failure is not cached, it ends the receiver
def check_internals() -> None:
    """Check that paho's private members the output uses are there and behave; raise if not.

    Run on a paho client over a socket pair, no broker: a PUBLISH queued with
    ``_packet_queue`` must reach the socket and complete its info; a PUBACK
    written to the socket must reach :func:`install_puback`'s hook through
    ``_in_packet`` and the buffered ``_sock_recv``; ``_mid_generate`` must count up.
    """
    problems: list[str] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    missing = [name for name in PAHO_INTERNALS if not hasattr(client, name)]
    if missing:
        problems.append(f"paho.Client lacks {', '.join(missing)}")
    else:
        ours, theirs = socket.socketpair()
        try:
            ours.setblocking(False)
            theirs.settimeout(1.0)
            client._sock = ours
            first, second = client._mid_generate(), client._mid_generate()
            counts_up = isinstance(first, int) and second == first % MAX_MID + 1
            if not (counts_up and 1 <= first <= MAX_MID):
                problems.append(f"_mid_generate gave {first!r}, {second!r}")
            wake = asyncio.Event()
            written = _Pending(wake)
            packet = mqtt_packets.publish(b"diode/check", b"{}", qos=0, retain=False)
            client._packet_queue(mqtt_packets.PUBLISH, packet, 0, 0, written)  # type: ignore[arg-type]  # duck-typed MQTTMessageInfo
            if theirs.recv(len(packet) + 16) != packet or not written.done:
                problems.append("_packet_queue did not write the packet and complete it")
            if not isinstance(client._out_packet, deque) or client._out_packet:
                problems.append("_out_packet is not paho's queue of unwritten packets")
            acks: list[tuple[int, int]] = []

            def on_ack(mid: int, reason: int) -> bool:
                acks.append((mid, reason))
                return True

            install_puback(client, on_ack)
            _BufferedReads(client)
            theirs.sendall(b"\x40\x03\x12\x34\x87")  # PUBACK, id 0x1234, reason 0x87
            client.loop_read()
            if acks != [(0x1234, 0x87)]:
                problems.append(f"a PUBACK read gave {acks!r} to the handler, not [(4660, 135)]")
        except Exception as exc:  # any failure here is the finding
            problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            client._sock = None
            ours.close()
            theirs.close()
    if problems:
        raise MqttInternalsError(
            "the installed paho-mqtt / aiomqtt do not behave as the MQTT output needs "
            f"(paho-mqtt {_version('paho-mqtt')}, aiomqtt {_version('aiomqtt')}; "
            "the versions checked are pinned in pyproject.toml): " + "; ".join(problems)
        )


def _free_mid(
    generate: Callable[[], int], ours: Mapping[int, object], theirs: Mapping[int, object]
) -> int:
    """The next packet identifier of ``generate`` that is in neither ``ours`` nor ``theirs``.

    A window near 65 535 wraps the counter onto identifiers still in flight;
    two messages in flight under one identifier would leave one of them
    waiting for an acknowledgement that never comes. The window is kept
    below :data:`MAX_WINDOW`, so a free identifier always exists.
    """
    for _ in range(MAX_MID):
        mid = generate()
        if mid not in ours and mid not in theirs:
            return mid
    raise MqttInternalsError("no free MQTT packet identifier: every one is in flight")


@dataclass(slots=True)
class _Sent:
    """Spooled messages handed to paho, waiting for one completion; the last one's id."""

    pending: _Pending
    count: int
    last_id: int
    expired: int = 0  # messages whose expiry ran out in the spool: dropped, not sent
    unsendable: int = 0  # messages that cannot be put in a PUBLISH: dropped, not sent


class MqttOutput:
    """Publishes what the router hands over; keeps every message until the broker has it.

    The ``publish_*`` methods never block and never raise for broker trouble;
    :meth:`run` owns the connection until cancelled or :meth:`close` is awaited.
    """

    def __init__(self, broker: MqttBroker, *, log: Any = None) -> None:
        check_internals()
        self._broker = broker
        self._log = log if log is not None else structlog.get_logger("diode.rx.mqtt")
        self._spool = Spool(broker.spool_path, broker.spool_max_records, checkpoints_apart=True)
        self._batch: list[Message] = []
        self._state = StateChanges()
        self._good_topics: set[str] = set()
        self._unencodable_pending = 0
        self._unencodable_logged_at = float("-inf")
        self._commit_soon: asyncio.Handle | None = None
        self._held = False  # the receiver commits next, with the positions (hold())
        self._inflight: deque[_Sent] = deque()
        self._unwritten: _Pending | None = None  # the last write, until it is on the socket
        self._inflight_messages = 0
        self._acks: dict[int, _Pending] = {}  # packet identifier -> its QoS 1 message
        self._done_id: int | None = None  # the broker has every message up to this id
        self._done_count = 0  # messages it has that are still in the spool
        self._forget_soon: asyncio.TimerHandle | None = None
        self._backlog_at_connect = 0
        self._cursor = CURSOR_START
        self._window = min(broker.max_inflight, MAX_WINDOW)
        self._topics: dict[int, Topics] = {}
        self._packets = mqtt_packets.PublishBuilder(GOOD_TOPICS_MAX)
        self._properties: dict[int | None, _PackedProperties] = {}
        self._refused_pending = 0
        self._refused_logged_at = float("-inf")
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._connected = False
        self._running = False
        self._closed = False
        self._ever_connected = False
        self._drop_pending = 0
        self._drop_logged_at = float("-inf")
        self.counters: dict[str, int] = {
            "published": 0,
            "spooled": 0,
            "spool_depth": len(self._spool),
            "spool_dropped": 0,
            "spool_expired": 0,
            "spool_damaged": 0,  # of those expired: their bytes lost from a data file
            "refused": 0,
            "unencodable": 0,
            "connected": 0,
            "reconnects": 0,
            "dropped_closed": 0,
        }
        if len(self._spool):
            self._log.info("mqtt spool has messages from before", spool_depth=len(self._spool))

    # -- what the router calls (non-blocking) ---------------------------------------

    def publish_samples(
        self, stream: StreamOutput, items: Sequence[tuple[TagInfo, Sample]]
    ) -> None:
        """Values: one message per sample, or one per device (``payload = "batched"``)."""
        if items:
            self._submit(sample_messages(self._topics_of(stream), items))

    def publish_inventory(self, stream: StreamOutput, info: DeviceInfo) -> None:
        """Retained ``{prefix}/{site}/{device}/$inventory``."""
        self._submit([inventory_message(self._topics_of(stream), info)])

    def publish_meta(self, stream: StreamOutput, info: TagInfo) -> None:
        """Retained ``{tag topic}/$meta``: what the catalogue says of the tag."""
        self._submit([meta_message(self._topics_of(stream), info)])

    def publish_status(self, stream: StreamOutput, status: dict[str, Any]) -> None:
        """Retained ``{prefix}/{site}/$status``: the dict as the router built it."""
        self._submit([status_message(self._topics_of(stream), status)])

    def publish_events(self, stream: StreamOutput, payloads: Sequence[bytes]) -> None:
        """``{prefix}/{site}/$events``: log records and security events as ECS JSON (QoS 1)."""
        topic = f"{self._topics_of(stream).root}/$events"
        self._submit([Message(topic, payload, 1, False) for payload in payloads])

    def publish_file(self, stream: StreamOutput, result: dict[str, Any]) -> None:
        """``{prefix}/{site}/$files``: one file received or failed (receiver/files.py)."""
        self._submit([file_message(self._topics_of(stream), result)])

    def persist(self, changes: StateChanges) -> None:
        """Keep the router's ``changes`` with the next commit (one transaction with it)."""
        if self._closed:
            return
        self._state.merge(changes)
        if self._commit_soon is None and not self._held:
            self._commit_soon = asyncio.get_running_loop().call_soon(self.commit)

    def hold(self) -> None:
        """Leave what is handed over for the next :meth:`commit` call, not the next turn.

        The receiver groups its commits when blocks arrive faster than it wants
        to commit (receiver/app.py): the messages of a block delivered meanwhile
        must reach the disk with the stream positions that cover them, never
        before, or a receiver killed in between would publish that block again
        when it reads it back from the socket. Until the receiver's commit,
        everything handed over (status, stale values, events) waits with them.
        """
        self._held = True
        if self._commit_soon is not None:
            self._commit_soon.cancel()
            self._commit_soon = None

    def saved_state(self) -> list[tuple[int, int, int, bytes]]:
        """The router's state as the last commit left it."""
        return self._spool.state()

    def publish_message(
        self, topic: str, obj: object, *, qos: int = 1, retain: bool = True
    ) -> None:
        """Any JSON message, in the spool's order: after every message handed over before it.

        The failover announcement (receiver/failover.py) relies on that order.
        """
        self._submit([Message(topic, encode(obj), qos, retain)])

    @property
    def backlog(self) -> int:
        """Messages not yet handed to the broker."""
        return len(self._batch) + len(self._spool)

    def commit(self, meta: Mapping[str, bytes] | None = None) -> None:
        """Put the messages handed over so far on disk, with ``meta``, in one transaction.

        The receiver calls it with its stream positions; messages handed over
        otherwise (status, stale values) are committed at the next turn of the loop.
        """
        if self._commit_soon is not None:
            self._commit_soon.cancel()
            self._commit_soon = None
        self._held = False
        if self._closed or not (self._batch or meta or self._state or self._done_id is not None):
            return
        batch, self._batch = self._batch, []
        state, self._state = self._state, StateChanges()
        now = time.time()
        done, self._done_id, self._done_count = self._done_id, None, 0
        if self._forget_soon is not None:
            self._forget_soon.cancel()
            self._forget_soon = None
        dropped = self._spool.append(batch, now, meta, state, delete_through=done)
        self.counters["spooled"] += len(batch)
        self.counters["spool_depth"] = len(self._spool)
        if done is not None:
            self._backlog_delivered()
        if dropped:
            self.counters["spool_dropped"] += dropped
            self._drop_pending += dropped
        self._flush_drop_log()
        if batch and not self._wake.is_set():
            self._wake.set()

    def saved(self, key: str) -> bytes | None:
        """What the last commit stored under ``key`` (the receiver's positions)."""
        return self._spool.meta(key)

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        """Connect, publish, reconnect with backoff; until cancelled or closed."""
        if self._closed:
            return
        self._running = True
        # Owned by this call and awaited before it returns (not a TaskGroup: the
        # connection's errors must reach the caller as they are, not in a group).
        checkpoints = asyncio.create_task(self._checkpoints())
        try:
            await self._connections()
        finally:
            checkpoints.cancel()
            await asyncio.wait([checkpoints])
            self._running = False
            self._stopped.set()

    async def _checkpoints(self) -> None:
        """Fold the spool's WAL into its file from a worker thread, not in a COMMIT on the loop.

        See receiver/spool.py: SQLite's own checkpoint ran inside the COMMIT that
        crossed its threshold, 6 ms with its fsyncs, holding every message of the
        moment. A failure is logged (rate-limited); SQLite's own stays as the backstop.
        """
        failed_at = float("-inf")
        while True:
            await asyncio.sleep(CHECKPOINT_S)
            try:
                await asyncio.to_thread(self._spool.checkpoint)
            except sqlite3.Error as exc:
                now = time.monotonic()
                if now - failed_at >= DROP_LOG_INTERVAL_S:
                    self._log.warning("mqtt spool checkpoint failed", error=str(exc))
                    failed_at = now

    async def _connections(self) -> None:
        delay = self._broker.reconnect_initial_s
        failing = False
        while not self._stopping.is_set():
            try:
                client = self._client()
                async with client:
                    self._attached(client)
                    delay = self._broker.reconnect_initial_s
                    failing = False
                    await self._serve(client)
            except* aiomqtt.MqttError as group:
                reason = "; ".join(str(e) for e in group.exceptions)
                if self._connected:
                    self._log.warning("mqtt disconnected", reason=reason)
                elif not failing:
                    self._log.warning(
                        "mqtt broker unreachable, spooling",
                        broker=self._broker.address,
                        reason=reason,
                    )
                failing = True
            else:
                return  # only a close() ends _serve without an error
            finally:
                self._detached()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, self._broker.reconnect_max_s)

    async def close(self) -> None:
        """Drain briefly, mark the receiver offline, disconnect; keep the rest in the spool."""
        if self._closed:
            return
        self._stopping.set()
        self._wake.set()
        if self._running:
            await self._stopped.wait()
        self.commit()
        self._closed = True
        self._flush_drop_log(force=True)
        self._spool.close()

    # -- the pipeline ----------------------------------------------------------------

    def _topics_of(self, stream: StreamOutput) -> Topics:
        topics = self._topics.get(id(stream))
        if topics is None or topics.stream is not stream:
            topics = Topics(stream)
            self._topics[id(stream)] = topics
        return topics

    def _submit(self, messages: list[Message]) -> None:
        if self._closed:
            if not self.counters["dropped_closed"]:
                self._log.warning("mqtt output closed: messages dropped from now on")
            self.counters["dropped_closed"] += len(messages)
            return
        good = self._good_topics
        for m in messages:
            if m.topic not in good:
                messages = [m for m in messages if self._encodable(m)]
                break
        self._batch.extend(messages)
        if self._commit_soon is None and not self._held:
            self._commit_soon = asyncio.get_running_loop().call_soon(self.commit)

    def _encodable(self, m: Message) -> bool:
        """Can ``m`` be sent at all? If not: counted, logged (rate-limited), never retried."""
        if m.topic in self._good_topics:
            return True
        problem = mqtt_packets.topic_problem(m.topic)
        if problem is None:
            if len(self._good_topics) >= GOOD_TOPICS_MAX:
                self._good_topics.clear()
            self._good_topics.add(m.topic)
            return True
        self.counters["unencodable"] += 1
        self._unencodable_pending += 1
        now = time.monotonic()
        if now - self._unencodable_logged_at >= DROP_LOG_INTERVAL_S:
            self._log.warning(
                "mqtt message refused: it cannot be published",
                problem=problem,
                topic_start=m.topic[:80],
                topic_bytes=len(m.topic.encode(errors="replace")),
                refused=self._unencodable_pending,
                refused_total=self.counters["unencodable"],
            )
            self._unencodable_pending = 0
            self._unencodable_logged_at = now
        return False

    def _flush_drop_log(self, *, force: bool = False) -> None:
        if not self._drop_pending:
            return
        now = time.monotonic()
        if force or now - self._drop_logged_at >= DROP_LOG_INTERVAL_S:
            self._log.warning(
                "mqtt spool full, oldest messages dropped",
                dropped=self._drop_pending,
                dropped_total=self.counters["spool_dropped"],
                spool_max_records=self._broker.spool_max_records,
            )
            self._drop_pending = 0
            self._drop_logged_at = now

    def _props(self, expiry_s: int | None) -> _PackedProperties | None:
        if self._broker.protocol == "3.1.1":
            return None  # MQTT 3.1.1 has no properties
        props = self._properties.get(expiry_s)
        if props is None:
            if len(self._properties) > 4096:  # spooled expiries count down: keep this small
                self._properties.clear()
            props = self._properties[expiry_s] = _PackedProperties(expiry_s)
        return props

    def _props_packed(self, expiry_s: int | None) -> bytes | None:
        props = self._props(expiry_s)
        return None if props is None else props.pack()

    def _release(self) -> None:
        """Forget, in order, what the broker has (QoS 1: acknowledged; QoS 0: written)."""
        inflight = self._inflight
        done = refused = expired = unsendable = 0
        last_id: int | None = None
        while inflight and inflight[0].pending.done:
            sent = inflight.popleft()
            done += sent.count
            expired += sent.expired
            unsendable += sent.unsendable
            last_id = sent.last_id
            if sent.pending.reason >= REFUSED:
                refused += 1
                self._refused(sent.pending.reason)
        if done:
            self._inflight_messages -= done
            self.counters["published"] += done - refused - expired - unsendable
            self.counters["spool_expired"] += expired
        if last_id is not None:
            self._done_id = last_id
            self._done_count += done
        # Deleting what the broker has is batched: one transaction per few thousand
        # messages, not per pump turn. A crash in between re-sends them (at least once).
        if self._done_count >= DELETE_BATCH:
            self._forget_done()
        elif not inflight and self._done_id is not None and self._forget_soon is None:
            # The next commit deletes these in its own transaction; a timer in case
            # none comes. A crash before either re-sends them (at least once).
            self._forget_soon = asyncio.get_running_loop().call_later(
                FORGET_AFTER_S, self._forget_done
            )

    def _refused(self, reason: int) -> None:
        """A PUBACK with a failure reason: the broker will never take that message."""
        self.counters["refused"] += 1
        self._refused_pending += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= DROP_LOG_INTERVAL_S:
            self._log.warning(
                "mqtt broker refused messages",
                refused=self._refused_pending,
                refused_total=self.counters["refused"],
                last_reason=f"0x{reason:02x}",
            )
            self._refused_pending = 0
            self._refused_logged_at = now

    def _forget_done(self) -> None:
        if self._forget_soon is not None:
            self._forget_soon.cancel()
            self._forget_soon = None
        if self._done_id is not None and not self._closed:
            self._spool.delete_through(self._done_id)
            self._done_id, self._done_count = None, 0
            self.counters["spool_depth"] = len(self._spool)
            self._backlog_delivered()

    def _backlog_delivered(self) -> None:
        if self._backlog_at_connect and not len(self._spool):
            self._log.info("mqtt spool delivered", messages=self._backlog_at_connect)
            self._backlog_at_connect = 0

    def _fill(self, client: paho.Client) -> bool:
        """Hand the broker what the window allows of the spool, in one write.

        True when it read messages (more may follow), False when there is nothing to do
        until a commit, a write or an acknowledgement sets ``_wake``.
        """
        self._release()
        last_write = self._unwritten
        if last_write is not None and not last_write.done and last_write.rc == _OK:
            return False  # the last write is not all on the socket yet: it wakes the pump
        room = self._window - self._inflight_messages
        spool = self._spool
        # Everything up to the cursor is in flight, or done and not yet deleted.
        waiting = len(spool) - self._inflight_messages - self._done_count
        # With a backlog, wait for a quarter of the window to come free: refilling
        # at every acknowledgement makes many small writes.
        if waiting <= 0 or room < min(waiting, self._window // 4 or 1) or client._sock is None:
            return False
        last, messages = spool.read(
            self._cursor, min(room, SPOOL_READ), time.time(), max_bytes=WRITE_BYTES
        )
        self._cursor = last
        self.counters["spool_depth"] = len(spool)
        if spool.damaged != self.counters["spool_damaged"]:  # a power loss: see spool.py
            self._log.error(
                "mqtt spool messages lost from a data file, dropped as expired",
                lost=spool.damaged - self.counters["spool_damaged"],
                lost_total=spool.damaged,
            )
            self.counters["spool_damaged"] = spool.damaged
        if not messages:
            return False
        # QoS 0 messages are done when paho has written the whole run to the socket;
        # each QoS 1 message when its PUBACK comes (see _on_ack).
        written = self._unwritten = _Pending(self._wake)
        packets: list[bytes] = []
        inflight, acks, props = self._inflight, self._acks, self._props_packed
        good, add = self._good_topics, self._packets.add
        plain = props(None)  # the properties of a message without expiry
        run: _Sent | None = None
        for message_id, m in messages:
            qos, expiry_s = m.qos, m.expiry_s
            expired = expiry_s is not None and expiry_s <= 0
            # Spooled by an earlier version that let an unencodable topic in: dropped
            # in its turn (and counted as such), as an expired message is.
            unsendable = not expired and m.topic not in good and not self._encodable(m)
            mid = 0
            if qos and not expired and not unsendable:
                pending = _Pending(self._wake)
                mid = self._mid(client)
                acks[mid] = pending
                inflight.append(_Sent(pending, 1, message_id))
                run = None
            else:
                # QoS 0, or expired while spooled (the broker would discard it: dropped
                # in its turn and counted): done when the write is.
                if run is None:
                    run = _Sent(written, 0, message_id)
                    inflight.append(run)
                run.count += 1
                run.last_id = message_id
                if expired:
                    run.expired += 1
                    continue
                if unsendable:
                    run.unsendable += 1
                    continue
            add(
                packets,
                m.topic,
                m.payload,
                qos=qos,
                retain=m.retain,
                mid=mid,
                properties=plain if expiry_s is None else props(expiry_s),
            )
        self._inflight_messages += len(messages)
        if packets:
            _write(client, b"".join(packets), written)
        else:
            written._set_as_published()  # only expired messages: nothing to write
        return True

    def _mid(self, client: paho.Client) -> int:
        """A packet identifier neither we nor paho (the receiver status) have in flight."""
        return _free_mid(client._mid_generate, self._acks, client._out_messages)

    def _on_ack(self, mid: int, reason: int) -> bool:
        pending = self._acks.pop(mid, None)
        if pending is None:
            return False  # one of paho's own
        pending.reason = reason
        pending.done = True
        self._wake.set()
        return True

    async def _pump(self, client: paho.Client) -> None:
        # Driven by events only: a commit, a write done, an acknowledgement all set _wake.
        while not self._stopping.is_set():
            if self._fill(client):
                await asyncio.sleep(0)  # let the writer callback flush and acks come in
            else:
                self._wake.clear()
                await self._wake.wait()
        # Closing: what is in flight gets a short chance to be acknowledged.
        self.commit()
        deadline = time.monotonic() + DRAIN_GRACE_S
        while self._inflight and time.monotonic() < deadline:
            self._release()
            await asyncio.sleep(POLL_S)

    # -- the connection --------------------------------------------------------------

    def _receiver_status(self, *, online: bool) -> bytes:
        return encode(
            {
                "online": online,
                "client_id": self._broker.client_id,
                "ts": rfc3339(time.time_ns()),
                "counters": dict(self.counters),
            }
        )

    def _client(self) -> aiomqtt.Client:
        broker = self._broker
        client = aiomqtt.Client(
            **broker_connection(broker),
            identifier=broker.client_id,
            # 0: paho queues nothing and never scans its queue per ack; our window limits.
            max_inflight_messages=0,
            will=aiomqtt.Will(
                broker.status_topic,
                encode({"online": False, "client_id": broker.client_id, "reason": "lost"}),
                qos=1,
                retain=True,
                properties=self._props(None),
            ),
        )
        missing = [name for name in AIOMQTT_INTERNALS if not hasattr(client, name)]
        inner = getattr(client, "_client", None)
        if missing or not isinstance(inner, paho.Client) or inner.on_connect != client._on_connect:
            raise MqttInternalsError(
                f"aiomqtt {_version('aiomqtt')} does not keep a paho client in _client with "
                f"_on_connect as its on_connect (missing: {', '.join(missing) or 'none'}); "
                "the versions checked are pinned in pyproject.toml"
            )
        inner.on_publish = None  # see the module docstring: per-write callbacks cost ~17 us

        def on_connect(
            c: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any = None
        ) -> None:
            receive_maximum = getattr(properties, "ReceiveMaximum", None)
            window = min(broker.max_inflight, MAX_WINDOW)
            if isinstance(receive_maximum, int):
                window = min(window, max(1, receive_maximum - OUT_OF_BAND))
            self._window = window
            client._on_connect(c, userdata, flags, reason, properties)

        inner.on_connect = on_connect
        # paho's own publishes (the receiver status) skip the identifiers the pump
        # has in flight, as the pump's skip paho's.
        generate = inner._mid_generate
        inner._mid_generate = lambda: _free_mid(generate, self._acks, inner._out_messages)  # type: ignore[method-assign]  # see _free_mid
        install_puback(inner, self._on_ack)
        _BufferedReads(inner)
        return client

    def _attached(self, client: aiomqtt.Client) -> None:
        if self._ever_connected:
            self.counters["reconnects"] += 1
        self._ever_connected = True
        self._connected = True
        self.counters["connected"] = 1
        sock = client._client.socket()
        # An SSLSocket is a socket.socket too; a Unix socket has no Nagle to turn off.
        if isinstance(sock, socket.socket) and sock.family != socket.AF_UNIX:
            # paho leaves Nagle on. The pump writes whole spool reads at once, so
            # Nagle saves nothing and holds each write behind the broker's delayed
            # ACK of the one before (p99 of the 10 000/s benchmark: see BENCHMARKS).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._cursor = CURSOR_START
        self._backlog_at_connect = len(self._spool)
        self._log.info(
            "mqtt connected",
            broker=self._broker.address,
            window=self._window,
            spool_depth=len(self._spool),
        )
        self._flush_drop_log(force=True)
        self._publish_receiver_status(client._client, online=True)

    def _publish_receiver_status(
        self, client: paho.Client, *, online: bool
    ) -> paho.MQTTMessageInfo:
        return client.publish(
            self._broker.status_topic,
            self._receiver_status(online=online),
            1,
            True,
            self._props(None),
        )

    def _detached(self) -> None:
        """The connection is gone: read the spool again from its oldest message."""
        if not self._connected and not self._inflight:
            return
        self._release()
        self._forget_done()
        self._inflight.clear()
        self._inflight_messages = 0
        self._acks.clear()
        self._unwritten = None
        self._cursor = CURSOR_START
        self._connected = False
        self.counters["connected"] = 0

    async def _serve(self, client: aiomqtt.Client) -> None:
        inner = client._client
        async with asyncio.TaskGroup() as group:
            watch = group.create_task(self._watch(client))
            status = group.create_task(self._status_loop(inner))
            await self._pump(inner)
            status.cancel()
            watch.cancel()
        # Closing: a clean DISCONNECT does not fire the will, so say offline first.
        info = self._publish_receiver_status(inner, online=False)
        deadline = time.monotonic() + 1.0
        # paho gives no awaitable for one message without an on_publish callback (see top)
        while time.monotonic() < deadline and info.rc == 0 and not info.is_published():  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        self._detached()
        self._log.info("mqtt closed", spool_depth=len(self._spool))

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        """Raise MqttError as soon as the connection drops (nothing is subscribed)."""
        async for _ in client.messages:
            pass

    async def _status_loop(self, client: paho.Client) -> None:
        while True:
            await asyncio.sleep(self._broker.status_interval_s)
            self._publish_receiver_status(client, online=True)
            self._flush_drop_log()

"""Syslog in, on the OT side: listeners, allow-list, per-source rate limit, the log lane.

The pipeline, stage by stage::

    OT devices --UDP/TCP/TLS--> listeners (OT addresses only) --> allow-list --> rate limit
        --> parse_syslog --> LogLane (bounded deque, lane seq) --(framer, within its
        share of the link, beside telemetry)--> Encoder --> SendQueue --> link

Property 1 is untouched: these sockets listen on OT addresses given in the
config (a wildcard or a link address is refused when the config loads); the
link socket is still never read. Property 5: a chatty or hostile source costs
a dictionary lookup and a token; it cannot take telemetry's part of the link,
because the lane is framed only within ``link_share`` of the link's rate. That
share it gets even while telemetry exceeds the link (the framer frames the
lane each turn, waiting values or not): the SOC feed never starves.

Loss accounting: every message that enters the lane gets the next lane
sequence number; one that does not (not allowed, over its rate, lane full) is
counted here and the counts ride on every heartbeat. Once numbered, a message
is either delivered or inside a gap the receiver counts exactly
(``log_seq_framed`` on the heartbeat closes a gap at the tail).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable

import structlog

from diode import startup
from diode.config.link import IPV4_UDP_OVERHEAD, LinkSettings
from diode.config.syslog import SyslogListener, SyslogSection
from diode.encoder import Encoder
from diode.errors import DiodeError, FrameError, SettingError
from diode.records import LogFormat, LogRecord
from diode.syslog import (
    Deframer,
    Parsed,
    SourceLimiter,
    TokenBucket,
    event_record,
    parse_syslog,
)
from diode.wire import BLOCK_OVERHEAD, symbol_size

log = structlog.get_logger("diode.tx.syslog")

UDP_RCVBUF = 4 * 1024 * 1024
# getsockopt(SOL_SOCKET, SO_MEMINFO) (Linux 3.x+; not in Python's socket module): the
# socket's sk_meminfo array, whose SK_MEMINFO_DROPS (index 8, Linux 4.6+) is sk_drops.
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8
SK_MEMINFO_VARS = 9
DROPS_LOG_INTERVAL_S = 10.0
READ_CHUNK = 65536
FRAME_CHUNK = 2048
RECORD_OVERHEAD = 48  # msgpack array, seq, ts, numbers: a bound on what a record adds
LANE_BURST_S = 0.05  # the lane's bucket holds this much of its share at least
LANE_BURST_BYTES = 65536.0  # and at least this many bytes
ALLOW_CACHE = 4096


def socket_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped on ``sock`` since it opened (its queue was full).

    SO_MEMINFO's SK_MEMINFO_DROPS is the socket's own ``sk_drops``, the very
    counter /proc/net/udp shows in its drops column: one getsockopt, where the
    /proc table must be read and searched whole (one line per UDP socket on the
    host) each time; SO_RXQ_OVFL would say the same only on the next datagram
    received, and only through recvmsg, which asyncio's datagram transport does
    not use. None where the kernel does not say (not Linux, or older than 4.6).
    """
    try:
        info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * SK_MEMINFO_VARS)
    except OSError:
        return None
    if len(info) < 4 * (SK_MEMINFO_DROPS + 1):
        return None
    return int.from_bytes(info[4 * SK_MEMINFO_DROPS : 4 * SK_MEMINFO_DROPS + 4], sys.byteorder)


def lane_bytes_per_s(link: LinkSettings, rate_mbps: float, share: float) -> float:
    """Record bytes per second that fill ``share`` of the link once FEC and headers are paid.

    At the cost of the largest block sent alone (k - 1 symbols with the whole burst
    repair, when full blocks go in groups): a group's blocks cost less, so the lane
    never takes more than its share, whether or not the link is busy enough for groups.
    """
    symbol = symbol_size(link.datagram_size)
    k = link.fec.k_alone
    n = k + link.fec.repair_for(k)
    efficiency = (k * symbol - BLOCK_OVERHEAD) / (n * (link.datagram_size + IPV4_UDP_OVERHEAD))
    return share * rate_mbps * 1e6 / 8 * efficiency


def _size(record: LogRecord) -> int:
    return (
        RECORD_OVERHEAD
        + len(record.msg)
        + len(record.sd)
        + len(record.source)
        + len(record.hostname)
        + len(record.app_name)
        + len(record.timestamp)
    )


class LogLane:
    """Numbered log records waiting for their share of the link; sans I/O but for ``now``."""

    def __init__(
        self,
        *,
        limit: int,
        bytes_per_s: float,
        now: float,
        burst_s: float = LANE_BURST_S,
        on_queue: Callable[[], None] = lambda: None,
    ) -> None:
        self._limit = limit
        self._queue: deque[LogRecord] = deque()
        self._next_seq = 0
        # ``burst_s`` covers the longest wait of the framer at the send queue's limit:
        # tokens the lane earns meanwhile are spent when the framer goes on, so it
        # gets its share of the link however long the queue holds (``queue_ms``).
        burst = max(bytes_per_s * max(burst_s, LANE_BURST_S), LANE_BURST_BYTES)
        self._bucket = TokenBucket(bytes_per_s, burst, now)
        self._on_queue = on_queue
        self.counters = {
            "log_queued": 0,
            "log_framed": 0,
            "log_dropped_full": 0,
            "log_seq_framed": 0,  # every record numbered below this is in a block
            "log_queue": 0,
        }

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, make: Callable[[int], LogRecord]) -> bool:
        """Number and queue the record ``make(seq)`` builds; False (counted) when full."""
        if len(self._queue) >= self._limit:
            self.counters["log_dropped_full"] += 1
            return False
        self._queue.append(make(self._next_seq))
        self._next_seq += 1
        self.counters["log_queued"] += 1
        self._on_queue()
        return True

    def notify(self) -> None:
        """Wake the framer (after :meth:`put_parsed`, once per batch)."""
        self._on_queue()

    def put_parsed(self, parsed: Parsed, ts_ns: int, source: str) -> bool:
        """:meth:`put` for a message from a device (the hot path: no closure per message)."""
        if len(self._queue) >= self._limit:
            self.counters["log_dropped_full"] += 1
            return False
        self._queue.append(parsed.record(seq=self._next_seq, ts_ns=ts_ns, source=source))
        self._next_seq += 1
        self.counters["log_queued"] += 1
        return True

    def ready(self, now: float) -> bool:
        """A record waits and its share of the link has room for it."""
        return bool(self._queue) and self._bucket.ready_at(_size(self._queue[0])) <= now

    def deadline(self) -> float | None:
        """When the next waiting record may go, or None when none waits."""
        return self._bucket.ready_at(_size(self._queue[0])) if self._queue else None

    def frame(self, encoder: Encoder, now: float, limit: int = FRAME_CHUNK) -> None:
        """Move records into the encoder within the lane's share; stop when a block closes."""
        queue, bucket = self._queue, self._bucket
        for _ in range(min(limit, len(queue))):
            record = queue[0]
            if not bucket.take(now, _size(record)):
                break
            queue.popleft()
            try:
                encoder.add(record, now)
            except DiodeError as exc:  # cannot happen within LOG_LIMITS at sane settings
                log.warning("log record dropped", reason=exc.reason, seq=record.seq)
            self.counters["log_framed"] += 1
            self.counters["log_seq_framed"] = record.seq + 1
            if encoder.blocks_ready:
                break
        self.counters["log_queue"] = len(queue)

    def frame_all(self, encoder: Encoder, now: float) -> None:
        """Everything waiting into the encoder, share or not (shutdown)."""
        while self._queue:
            record = self._queue.popleft()
            with contextlib.suppress(DiodeError):
                encoder.add(record, now)
            self.counters["log_framed"] += 1
            self.counters["log_seq_framed"] = record.seq + 1
        self.counters["log_queue"] = 0


class Allowed:
    """The allow-list: addresses and networks, with a bounded cache of verdicts."""

    def __init__(self, networks: list[str]) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._cache: dict[str, bool] = {}

    def __call__(self, source: str) -> bool:
        verdict = self._cache.get(source)
        if verdict is None:
            try:
                address = ipaddress.ip_address(source)
            except ValueError:
                verdict = False
            else:
                if address.version == 6 and address.ipv4_mapped is not None:
                    address = address.ipv4_mapped
                verdict = any(address in net for net in self._networks)
            if len(self._cache) >= ALLOW_CACHE:
                self._cache.clear()
            self._cache[source] = verdict
        return verdict


class _UdpIn(asyncio.DatagramProtocol):
    def __init__(self, ingest: Callable[[bytes, str, str], None]) -> None:
        self._ingest = ingest

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._ingest(data, str(addr[0]), "udp")


class SyslogIn:
    """The listeners and the lane of one transmitter."""

    def __init__(
        self,
        section: SyslogSection,
        *,
        link: LinkSettings,
        rate_mbps: float,
        burst_s: float = LANE_BURST_S,
        on_queue: Callable[[], None] = lambda: None,
    ) -> None:
        self.section = section
        now = time.monotonic()
        self.lane = LogLane(
            limit=section.queue_messages,
            bytes_per_s=lane_bytes_per_s(link, rate_mbps, section.link_share),
            now=now,
            burst_s=burst_s,
            on_queue=on_queue,
        )
        self._allowed = Allowed(section.allow)
        self._limiter = SourceLimiter(section.rate_per_source, section.burst_per_source)
        self._servers: list[asyncio.Server] = []
        self._transports: list[asyncio.BaseTransport] = []
        self._udp: list[socket.socket] = []
        self._drops_logged = 0
        self._drops_logged_at = float("-inf")
        self._connections = 0
        self.bound: list[tuple[str, int, str]] = []  # address, port, protocol once listening
        self.counters = {
            "syslog_received": 0,
            "syslog_denied": 0,
            "syslog_rate_dropped": 0,
            "syslog_truncated": 0,
            "syslog_raw": 0,
            "syslog_framing_errors": 0,
            "syslog_connections": 0,
            "syslog_connections_refused": 0,
            "syslog_kernel_drops": 0,  # UDP datagrams the kernel dropped: the queue was full
        }

    @property
    def udp_sockets(self) -> list[socket.socket]:
        """The UDP listeners' sockets (their kernel drop counters are read from them)."""
        return list(self._udp)

    def counters_all(self) -> dict[str, int]:
        self._count_kernel_drops()
        return self.counters | self.lane.counters

    def _count_kernel_drops(self) -> None:
        """Read the UDP listeners' kernel drop counters; say so in the log when they grow.

        These messages never reached diode, so no lane number covers them: the
        count rides on the heartbeat (the receiver's ``$status`` and metrics show
        it) beside the ones the allow-list and the rate limit dropped.
        """
        drops = [socket_drops(sock) for sock in self._udp]
        if not drops or any(d is None for d in drops):
            return
        total = sum(d for d in drops if d is not None)
        self.counters["syslog_kernel_drops"] = total
        now = time.monotonic()
        if total > self._drops_logged and now - self._drops_logged_at >= DROPS_LOG_INTERVAL_S:
            log.warning(
                "syslog datagrams dropped by the kernel: the UDP queue was full",
                dropped=total - self._drops_logged,
                total=total,
            )
            self._drops_logged, self._drops_logged_at = total, now

    # -- the one entry of every message ------------------------------------------------

    def ingest(self, data: bytes, source: str, transport: str) -> None:
        self.ingest_many([data], source, transport)

    def ingest_many(self, messages: list[bytes], source: str, transport: str) -> None:
        """Messages from one source that arrived together (one datagram, one TCP read).

        The allow-list, the rate limit and the clock are asked once for all of
        them: per message only the parse and the record remain.
        """
        counters = self.counters
        count = len(messages)
        if not self._allowed(source):
            counters["syslog_denied"] += count
            return
        allowed = self._limiter.allow_many(source, time.monotonic(), count)
        if allowed < count:
            counters["syslog_rate_dropped"] += count - allowed
            del messages[allowed:]
        counters["syslog_received"] += allowed
        ts_ns = time.time_ns()
        lane = self.lane
        truncated = raw = 0
        for data in messages:
            parsed = parse_syslog(data)
            truncated += parsed.truncated
            raw += parsed.format is LogFormat.RAW
            lane.put_parsed(parsed, ts_ns, source)
        counters["syslog_truncated"] += truncated
        counters["syslog_raw"] += raw
        if messages:
            self.lane.notify()

    def event(
        self, action: str, severity: int, message: str, params: dict[str, str] | None = None
    ) -> None:
        """A security event of the transmitter's own, on the same lane (counted alike)."""
        log.info("security event", action=action, severity=severity, detail=message)
        ts_ns = time.time_ns()
        self.lane.put(
            lambda seq: event_record(
                seq=seq,
                ts_ns=ts_ns,
                source="diode-tx",
                app_name="diode-tx",
                action=action,
                severity=severity,
                message=message,
                params=params,
            )
        )

    def rate_dropped(self) -> dict[str, int]:
        """Per source, messages lost to the rate limit so far."""
        return dict(self._limiter.dropped)

    # -- sockets ---------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        section = self.section
        assert section.certfile is not None
        assert section.keyfile is not None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(section.certfile, section.keyfile)
        if section.client_ca_file is not None:
            context.load_verify_locations(section.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def start(self) -> None:
        """Open every listener; a listener that cannot open is an error (exit, not half up)."""
        for i, listener in enumerate(self.section.listeners):
            key = f"syslog.listeners[{i}]"
            try:
                await self._open(listener)
            except ssl.SSLError as exc:
                self.close()
                raise SettingError("syslog.certfile", f"cannot use the TLS files: {exc}") from exc
            except OSError as exc:
                self.close()
                raise startup.bind_error(
                    exc,
                    address_key=f"{key}.address",
                    port_key=f"{key}.port",
                    address=listener.address,
                    port=listener.port,
                ) from exc

    async def _open(self, listener: SyslogListener) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
        if listener.protocol == "udp":
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
                sock.bind((listener.address, listener.port))
            except OSError:
                sock.close()
                raise
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpIn(self.ingest), sock=sock
            )
            self._transports.append(transport)
            self._udp.append(sock)
            port = sock.getsockname()[1]
        else:
            context = self._tls_context() if listener.protocol == "tls" else None
            server = await asyncio.start_server(
                lambda r, w: self._connection(r, w, listener.protocol),
                host=listener.address,
                port=listener.port,
                ssl=context,
                reuse_address=True,
            )
            self._servers.append(server)
            port = server.sockets[0].getsockname()[1]
        self.bound.append((listener.address, port, listener.protocol))
        log.info("syslog listening", address=listener.address, port=port, proto=listener.protocol)

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, transport: str
    ) -> None:
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else ""
        if not self._allowed(source) or self._connections >= self.section.max_connections:
            self.counters["syslog_connections_refused"] += 1
            writer.close()
            return
        self._connections += 1
        self.counters["syslog_connections"] += 1
        deframer = Deframer()
        try:
            while data := await reader.read(READ_CHUNK):
                batch: list[bytes] = []
                try:
                    batch.extend(deframer.feed(data))
                finally:  # what came whole before a framing error is taken
                    if batch:
                        self.ingest_many(batch, source, transport)
        except FrameError as exc:
            self.counters["syslog_framing_errors"] += 1
            log.warning("syslog connection closed: framing", source=source, detail=str(exc))
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the sender went away; what it sent whole was taken
        finally:
            self.counters["syslog_truncated"] += deframer.truncated
            self._connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
        self._transports.clear()
        self._servers.clear()
        self._udp.clear()

"""Out to the SOC, on the IT side: syslog and security events to a collector and to MQTT.

The pipeline, stage by stage, with the queue between each pair::

    Decoder events --> Soc.handle --+--> render_5424 --> SOC spool --> forwarder --> collector
    (Delivered, Gap,   (lane seq,   |    (RFC 5424)      (SQLite,      (TCP or TLS,  (rsyslog ...)
     EpochStarted)      gaps)       |                     bounded)      octet counted)
                                    +--> to_ecs --> MqttOutput.publish_events
                                                    --> {prefix}/{site}/$events
    Soc.tick (0.5 s): the receiver's own events (rejected datagrams, link, spools) --^

The SOC spool is committed before the stream positions that cover its messages.

**Nothing the collector does reaches telemetry.** Messages for the collector
wait in a spool of their own (the same :class:`~receiver.spool.Spool` the MQTT
output uses, in another file); the forwarder is one task that alone waits for
the collector's TCP window. A collector that is down or slow only makes that
spool grow; past ``spool_max_messages`` the oldest go, counted and reported
(an event on MQTT). A message leaves the spool once the kernel took all of it
(``drain``): what a collector loses after that, in its own socket buffer when
it crashes, TCP cannot say (RELP could; rsyslog's plain TCP input has no
acknowledgement).

**Exact loss accounting.** Each log record carries its lane sequence number.
The receiver expects them in order (blocks are delivered in order); a jump is
``log-messages-lost`` with the exact count and range. The transmitter's
heartbeat carries ``log_seq_framed`` (every record numbered below it is in a
block sent before the heartbeat), which closes a gap at the tail of a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog

from diode.config.mqtt import StreamOutput
from diode.config.syslog import SocSection
from diode.decoder import Delivered, EpochStarted, Event, Gap
from diode.records import Heartbeat, LogFormat, LogRecord
from diode.syslog import event_record, octet_counted, render_5424, rfc3339_us, to_ecs
from receiver.payload import Message
from receiver.spool import Spool

log = structlog.get_logger("diode.rx.soc")

SOC_LANES = "soc_lanes"  # the key of lanes_state() in the receiver's commit
READ_BATCH = 1024
READS_PER_TURN = 16  # READ_BATCH each: what the forwarder writes per turn of the loop, at most
SEND_BUFFER = 256 * 1024
FORGED = ("unknown_key", "wrong_stream", "bad_block", "bad_signature", "bad_decrypt")
# Replays the decoder rejected, and those the kernel steered to the replays' quarantine
# (receiver/steer.py): an older epoch, or further behind than a late copy can be.
REPLAYED = ("replay", "steered_replay")
MALFORMED = ("short", "bad_magic", "bad_version", "bad_checksum", "malformed", "bad_record")
CRITICAL, WARNING, NOTICE, INFO = 2, 4, 5, 6


class Events(Protocol):
    def publish_events(self, stream: StreamOutput, payloads: Sequence[bytes]) -> None: ...


@dataclass(slots=True)
class _Lane:
    """One stream's log lane as the receiver sees it."""

    output: StreamOutput
    epoch: int | None = None
    expected: int | None = None  # the next lane sequence number
    last_ns: int | None = None  # when the last message delivered entered the diode
    link_up: bool = False
    counters: dict[str, int] = field(
        default_factory=lambda: {"logs": 0, "logs_lost": 0, "log_gaps": 0}
    )


class Soc:
    """The receiver's SOC feed: collector forwarding, MQTT events, and its own events."""

    def __init__(
        self,
        section: SocSection,
        streams: dict[int, StreamOutput],
        events: Events,
        state_dir: Path,
        saved: bytes | None = None,
    ) -> None:
        self.section = section
        self._events = events
        self._lanes = {sid: _Lane(out) for sid, out in streams.items()}
        if saved is not None:
            self._restore(saved)
        self._spool = (
            Spool(state_dir / "soc-spool.sqlite", section.spool_max_messages)
            if section.collector_host
            else None
        )
        self._batch: list[Message] = []
        self._documents: dict[int, tuple[StreamOutput, list[bytes]]] = {}  # id(output) ->
        self._wake = asyncio.Event()
        self._run_epoch = time.time_ns() // 1_000_000  # numbers the receiver's own events
        self._own_seq = 0
        self._rejected_at: dict[str, int] = {}
        self._rejected_since = 0.0
        self._seen: dict[str, int] = {}
        self._delta_at: dict[str, float] = {}  # when each counter's last event went out
        self._commands_at: dict[int, float] = {}
        self.counters = {
            "soc_logs": 0,
            "soc_logs_lost": 0,
            "soc_log_gaps": 0,
            "soc_events": 0,
            "soc_forwarded": 0,
            "soc_spool_depth": len(self._spool) if self._spool else 0,
            "soc_spool_dropped": 0,
            "soc_collector_connects": 0,
            "soc_collector_errors": 0,
        }

    # -- from the decoder (synchronous, in the receive path) ---------------------------------

    def handle(self, events: Sequence[Event], now: float) -> None:
        for event in events:
            lane = self._lanes.get(event.stream_id)
            if lane is None:
                continue
            match event:
                case Delivered():
                    for record in event.records:
                        if type(record) is LogRecord:
                            self._log(event.stream_id, lane, event.epoch, record)
                        elif type(record) is Heartbeat:
                            self._heartbeat(event.stream_id, lane, event.epoch, record)
                case Gap():
                    self._own(
                        "records-lost",
                        WARNING,
                        f"stream {event.stream_id}: {event.records_lost} records lost in blocks "
                        f"{event.first_seq}..{event.last_seq} of epoch {event.epoch}"
                        + ("" if event.exact else " (count from unsigned hints)"),
                        {
                            "stream": str(event.stream_id),
                            "epoch": str(event.epoch),
                            "first_block": str(event.first_seq),
                            "last_block": str(event.last_seq),
                            "records_lost": str(event.records_lost),
                            "exact": str(event.exact).lower(),
                        },
                        stream_id=event.stream_id,
                    )
                case EpochStarted():
                    lane.epoch, lane.expected = event.epoch, None
                    if event.previous is not None:
                        self._own(
                            "epoch-changed",
                            NOTICE,
                            f"stream {event.stream_id}: transmitter restarted "
                            f"(epoch {event.previous} -> {event.epoch})",
                            {
                                "stream": str(event.stream_id),
                                "epoch": str(event.epoch),
                                "previous": str(event.previous),
                            },
                            stream_id=event.stream_id,
                        )
        self.commit()

    # -- where each lane stands, kept with the stream positions ---------------------------

    def lanes_state(self) -> bytes:
        """Each lane's epoch, next sequence number and last time, for the receiver's commit.

        Committed in the same transaction as the stream positions: a receiver
        killed and started again expects the lane where the positions it resumes
        from left it, so the messages lost while it was away (the socket's
        queue went with the process) are a ``log-messages-lost`` event with
        their exact count, not only records in a gap.
        """
        return orjson.dumps(
            {
                str(sid): [lane.epoch, lane.expected, lane.last_ns]
                for sid, lane in self._lanes.items()
                if lane.epoch is not None and lane.expected is not None
            }
        )

    def _restore(self, saved: bytes) -> None:
        try:
            lanes = orjson.loads(saved)
            for sid, (epoch, expected, last_ns) in lanes.items():
                lane = self._lanes.get(int(sid))
                if lane is not None:
                    lane.epoch, lane.expected, lane.last_ns = int(epoch), int(expected), last_ns
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("saved log lane positions unreadable: counting from the next", error=exc)

    def _log(self, stream_id: int, lane: _Lane, epoch: int, record: LogRecord) -> None:
        if lane.epoch != epoch:
            lane.epoch, lane.expected = epoch, None
        if lane.expected is not None and record.seq > lane.expected:
            self._lost(stream_id, lane, epoch, lane.expected, record.seq - 1, until_ns=record.ts_ns)
        if lane.expected is None or record.seq >= lane.expected:
            lane.expected = record.seq + 1
            lane.last_ns = record.ts_ns
        lane.counters["logs"] += 1
        self.counters["soc_logs"] += 1
        self._emit(record, stream_id, epoch, lane.output)

    def _heartbeat(self, stream_id: int, lane: _Lane, epoch: int, beat: Heartbeat) -> None:
        framed = beat.counters.get("log_seq_framed")
        if framed is None or lane.epoch != epoch:
            return
        if lane.expected is None:
            lane.expected = framed  # joined mid-epoch: count from here
        elif framed > lane.expected:
            self._lost(stream_id, lane, epoch, lane.expected, framed - 1, until_ns=beat.ts_ns)
            lane.expected = framed

    def _lost(
        self, stream_id: int, lane: _Lane, epoch: int, first: int, last: int, *, until_ns: int
    ) -> None:
        """``first``..``last`` of the lane are missing: one event with the count and the times.

        The times are the transmitter's, when messages entered the diode: the
        last one delivered before the gap and the first record after it (a
        message, or the heartbeat that closed a gap at the tail).
        """
        count = last - first + 1
        lane.counters["logs_lost"] += count
        lane.counters["log_gaps"] += 1
        self.counters["soc_logs_lost"] += count
        self.counters["soc_log_gaps"] += 1
        until = rfc3339_us(until_ns)
        after = rfc3339_us(lane.last_ns) if lane.last_ns is not None else None
        when = f"between {after} and {until}" if after else f"before {until}"
        self._own(
            "log-messages-lost",
            WARNING,
            f"stream {stream_id}: {count} syslog messages lost {when} "
            f"(lane seq {first}..{last}, epoch {epoch})",
            {
                "stream": str(stream_id),
                "epoch": str(epoch),
                "first_seq": str(first),
                "last_seq": str(last),
                "lost": str(count),
                **({"after": after} if after else {}),
                "before": until,
            },
            stream_id=stream_id,
        )

    # -- the receiver's own events ------------------------------------------------------------

    def _own(
        self,
        action: str,
        severity: int,
        message: str,
        params: dict[str, str],
        *,
        stream_id: int | None = None,
    ) -> None:
        log.info("security event", action=action, severity=severity, detail=message)
        record = event_record(
            seq=self._own_seq,
            ts_ns=time.time_ns(),
            source="diode-rx",
            app_name="diode-rx",
            action=action,
            severity=severity,
            message=message,
            params=params,
        )
        self._own_seq += 1
        self.counters["soc_events"] += 1
        if stream_id is not None and stream_id in self._lanes:
            targets = [(stream_id, self._lanes[stream_id].output)]
        else:
            roots: dict[str, tuple[int, StreamOutput]] = {}
            for sid, lane in self._lanes.items():
                roots.setdefault(f"{lane.output.prefix}/{lane.output.site}", (sid, lane.output))
            targets = list(roots.values())
        for index, (sid, output) in enumerate(targets):
            # To the collector once; to MQTT under each site it concerns.
            self._emit(record, sid, self._run_epoch, output, collector=index == 0)

    def _emit(
        self,
        record: LogRecord,
        stream_id: int,
        epoch: int,
        output: StreamOutput,
        *,
        collector: bool = True,
    ) -> None:
        if self._spool is not None and collector:
            line = render_5424(record, stream_id=stream_id, epoch=epoch)
            self._batch.append(Message("", octet_counted(line), 0, False))
        if self.section.mqtt_events and (
            self.section.mqtt_syslog or record.format is LogFormat.EVENT
        ):
            doc = to_ecs(record, site=output.site, stream_id=stream_id, epoch=epoch)
            entry = self._documents.get(id(output))
            if entry is None:
                entry = self._documents[id(output)] = (output, [])
            entry[1].append(orjson.dumps(doc))

    def tick(
        self,
        now: float,
        *,
        decoder_counters: dict[str, int],
        links: dict[int, bool],
        output_counters: dict[str, int],
        commands: dict[int, tuple[int, str, tuple[str, ...]]] | None = None,
    ) -> None:
        """Periodic: rejected datagrams as rates, link state, spools overflowing, commands."""
        for sid, up in links.items():
            lane = self._lanes.get(sid)
            if lane is not None and up != lane.link_up:
                lane.link_up = up
                self._own(
                    "link-up" if up else "link-down",
                    NOTICE if up else WARNING,
                    f"stream {sid}: link {'up' if up else 'down (no heartbeat)'}",
                    {"stream": str(sid)},
                    stream_id=sid,
                )
        self._rejections(now, decoder_counters)
        self._commands(now, commands or {})
        for key, action in (("spool_dropped", "mqtt-spool-overflow"), ("refused", "mqtt-refused")):
            self._delta_event(now, key, action, output_counters.get(key, 0))
        self._delta_event(
            now, "soc_spool_dropped", "soc-spool-overflow", self.counters["soc_spool_dropped"]
        )
        self.commit()

    def _delta_event(self, now: float, key: str, action: str, total: int) -> None:
        """Messages a spool dropped (or the broker refused) since the last event, as one event.

        The first at once, then at most one per ``rejected_report_s`` with the count
        since the last: a full spool's own event takes a place in it and pushes out
        one more message, so an event per tick would feed itself for as long as
        the spool stays full. The counts of the events add up to the counter.
        """
        before = self._seen.get(key, 0)
        if total < before:
            self._seen[key] = total  # the output started again and counts from 0
            return
        since = self._delta_at.get(key)
        if total == before or (since is not None and now - since < self.section.rejected_report_s):
            return
        self._seen[key], self._delta_at[key] = total, now
        self._own(
            action,
            WARNING,
            f"{total - before} messages ({key.replace('_', ' ')}), {total} in all",
            {"count": str(total - before), "total": str(total)},
        )

    def _commands(self, now: float, commands: dict[int, tuple[int, str, tuple[str, ...]]]) -> None:
        """Sparkplug NCMD/DCMD refused: a write attempt from the IT side, reported as a rate.

        The first one at once; then at most one event per ``rejected_report_s``
        per stream, with the count since the last one, so a host (or an
        attacker) flooding command topics costs the SOC one line per period.
        """
        for sid, (total, topic, metrics) in commands.items():
            key = f"commands_{sid}"
            before = self._seen.get(key, 0)
            if total <= before:
                self._seen[key] = total  # a node started again counts from 0
                continue
            since = self._commands_at.get(sid)
            if since is not None and now - since < self.section.rejected_report_s:
                continue  # counted; said with the next event
            self._seen[key] = total
            self._commands_at[sid] = now
            count = total - before
            period = f" in {now - since:.0f} s" if since is not None else ""
            names = ",".join(metrics[:10])
            self._own(
                "mqtt-command-refused",
                WARNING,
                f"stream {sid}: {count} Sparkplug command(s) refused{period} "
                f"(the diode writes nothing to the OT side); last on {topic}"
                + (f" for {names}" if names else ""),
                {
                    "stream": str(sid),
                    "count": str(count),
                    "total": str(total),
                    "topic": topic,
                    "metrics": names,
                    **({"period_s": f"{now - since:.1f}"} if since is not None else {}),
                },
                stream_id=sid,
            )

    def _since_last(self, reason: str, total: int) -> int:
        """How much a rejection counter grew since the last period."""
        before = self._rejected_at.get(reason, 0)
        self._rejected_at[reason] = total
        # A decoder replaced (failover, restart) starts its counters again at 0.
        return total - before if total >= before else total

    def _rejections(self, now: float, counters: dict[str, int]) -> None:
        if now - self._rejected_since < self.section.rejected_report_s:
            return
        period = now - self._rejected_since if self._rejected_since else None
        self._rejected_since = now
        for kind, reasons, severity in (
            ("forged", FORGED, WARNING),
            ("replayed", REPLAYED, WARNING),
            ("malformed", MALFORMED, NOTICE),
        ):
            deltas = {}
            for reason in reasons:
                delta = self._since_last(reason, counters.get(f"rejected_{reason}", 0))
                if delta:
                    deltas[reason] = delta
            if not deltas or period is None:
                continue  # the first call only takes the counters as they are
            count = sum(deltas.values())
            self._own(
                f"datagrams-{kind}",
                severity,
                f"{count} {kind} datagrams rejected in {period:.0f} s "
                f"({count / period:.1f}/s): "
                + ", ".join(f"{r} {n}" for r, n in sorted(deltas.items())),
                {
                    "count": str(count),
                    "period_s": f"{period:.1f}",
                    "rate_per_s": f"{count / period:.2f}",
                    **{r: str(n) for r, n in deltas.items()},
                },
            )

    # -- the collector -------------------------------------------------------------------------

    def commit(self) -> None:
        """The collector's messages on disk (called before the positions are committed).

        The MQTT documents go to the MQTT output here too, in one call per site,
        so they join the same commit as the positions.
        """
        documents, self._documents = self._documents, {}
        for output, payloads in documents.values():
            self._events.publish_events(output, payloads)
        if self._spool is None or not self._batch:
            return
        batch, self._batch = self._batch, []
        dropped = self._spool.append(batch, time.time())
        if dropped:
            self.counters["soc_spool_dropped"] += dropped
            log.warning("soc spool full, oldest messages dropped", dropped=dropped)
        self.counters["soc_spool_depth"] = len(self._spool)
        self._wake.set()

    def status(self) -> dict[str, Any]:
        return {
            **self.counters,
            "lanes": {sid: dict(lane.counters) for sid, lane in self._lanes.items()},
        }

    def _context(self) -> ssl.SSLContext | None:
        section = self.section
        if not section.tls:
            return None
        context = ssl.create_default_context(
            cafile=str(section.ca_file) if section.ca_file else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if section.certfile and section.keyfile:
            context.load_cert_chain(section.certfile, section.keyfile)
        if section.server_name is None:
            context.check_hostname = False  # the collector is named by address: trust the CA
        return context

    async def run(self) -> None:
        """Forward the spool to the collector, reconnecting, until cancelled."""
        if self._spool is None:
            return
        section = self.section
        context = self._context()
        while True:
            writer: asyncio.StreamWriter | None = None
            try:
                reader, connected = await asyncio.wait_for(
                    asyncio.open_connection(
                        section.collector_host,
                        section.collector_port,
                        ssl=context,
                        server_hostname=section.server_name if context else None,
                    ),
                    10,
                )
                writer = connected
                sock = connected.get_extra_info("socket")
                if sock is not None:
                    # Bound what is in flight: what a collector that dies takes with it
                    # unread (plain TCP has no acknowledgement of messages).
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                self.counters["soc_collector_connects"] += 1
                log.info("collector connected", host=section.collector_host)
                await self._forward(reader, connected)  # returns only by raising
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                self.counters["soc_collector_errors"] += 1
                log.warning("collector unavailable", error=str(exc) or repr(exc))
            finally:
                if writer is not None:
                    # Abort, not close: a stalled collector would hold a graceful close
                    # (and a shutdown) forever. What was not acknowledged as written
                    # is still in the spool and goes again on the next connection.
                    writer.transport.abort()
            await asyncio.sleep(section.reconnect_s)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        spool = self._spool
        assert spool is not None
        transport = writer.transport
        # drain() returns only once the kernel took every byte: a message leaves the
        # spool then, and not while it still sits in this process's write buffer.
        transport.set_write_buffer_limits(high=0)
        cursor = -1
        while True:
            if reader.at_eof():
                raise ConnectionError("collector closed the connection")
            last, items = spool.read(cursor, READ_BATCH, time.time())
            if not items:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            # Everything waiting, up to a bound, in one turn of the loop: the receive
            # path can hold the loop for a while at a time (a thousand datagrams), and
            # one read per turn let the spool grow by seconds at 20 000 messages/s.
            sent = 0
            for _ in range(READS_PER_TURN):
                writer.write(b"".join(m.payload for _, m in items))
                cursor = last
                sent += len(items)
                if transport.get_write_buffer_size():
                    break  # the kernel's buffer is full: the collector sets the pace
                last, items = spool.read(cursor, READ_BATCH, time.time())
                if not items:
                    break
            await writer.drain()  # the collector's back-pressure stops here, and only here
            spool.delete_through(cursor)
            self.counters["soc_forwarded"] += sent
            self.counters["soc_spool_depth"] = len(spool)
            await asyncio.sleep(0)  # drain() does not yield when the kernel took it all

    def close(self) -> None:
        self.commit()
        if self._spool is not None:
            self._spool.close()

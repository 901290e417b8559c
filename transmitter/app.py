"""diode-tx: the transmitter daemon (OT side).

The pipeline, stage by stage, with the queue between each pair::

    ModbusPoller -+                  Outbox                 Encoder           PacedSender
    OpcuaPoller  -+--sample()--> (report by    --framer-->  (blocks on  --+   (token bucket
    timers -------+              exception,                 size/linger,  |    on monotonic
    (heartbeat, refresh,         bounded deque)             sign, FEC)    |    clock) --> UDP
     catalogue carousel)                                                  v         ^
                                        SendQueue (bounded in time, interleaved)

Every queue is bounded and a full one drops and counts (the heartbeat carries
the counts): the pollers never wait for the link. The framer does: while the
send queue holds ``[link] queue_ms`` of the link it frames nothing, and the
records wait in the outbox, which drops the newest past its bounds. Nothing
here listens or reads from the link. SIGTERM stops the pollers, closes the
open block and sends what is queued within a grace period.

SIGHUP re-reads the config file and applies its sources (``[modbus]``,
``[opcua]``, ``[synthetic]``): a device whose settings did not change keeps
its poller and its connections (no PLC sees a reconnect for a reload); a
changed one is restarted, a removed one stopped, a new one started; the
catalogue goes out at once. Tag ids stay those of the (device, tag) names, so
the receiver's streams carry on. A file that fails validation is logged and
the running config kept. ``[transmitter]``, ``[link]`` and ``[log]`` (keys,
epoch, stream, sockets) need a restart: a change there is logged and not applied.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import structlog

from diode import daemon, startup
from diode.config import load
from diode.config.modbus import ModbusDevice
from diode.config.opcua import OpcuaServer
from diode.config.synthetic import SyntheticSource
from diode.config.tx import TxConfig
from diode.encoder import Encoder, SendQueue
from diode.errors import DiodeError, KeyFileError, SettingError
from diode.keys import SigningKey, load_psk, load_signing_key
from diode.records import Heartbeat, Quality, Record, Sample, TagInfo
from diode.replay import next_epoch
from transmitter import certs
from transmitter.files import FileLane, LaneQueue
from transmitter.modbus import ModbusPoller
from transmitter.opcua import OpcuaPoller
from transmitter.outbox import Outbox
from transmitter.security import SecurityMonitor
from transmitter.sender import PacedSender, deaf_udp_socket
from transmitter.synthetic import SyntheticPoller
from transmitter.syslog_in import SyslogIn

log = structlog.get_logger("diode.tx")

FRAMER_CHUNK = 2048
LANE_BLOCKS_PER_TURN = 4
SHUTDOWN_GRACE_S = 5.0
DROP_LOG_INTERVAL_S = 5.0
# The integrity refresh goes out a tenth at a time. (The catalogue carousel stays whole:
# its records make no MQTT messages, and a receiver that starts late needs every name.)
PERIODIC_SLICES = 10
REMOVED = "removed from the transmitter's config"


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Poller(Protocol):
    catalogue: list[TagInfo]
    deadbands: dict[int, float]
    counters: dict[str, int]

    async def run(self) -> None: ...


Source = ModbusDevice | OpcuaServer | SyntheticSource


def sources_of(config: TxConfig) -> dict[tuple[str, str], Source]:
    """Every polled source of a config, by (kind, device name)."""
    out: dict[tuple[str, str], Source] = {}
    out.update((("modbus", d.name), d) for d in config.modbus.devices)
    out.update((("opcua", s.name), s) for s in config.opcua.servers)
    out.update((("synthetic", s.name), s) for s in config.synthetic.sources)
    return out


def take_epoch(state_dir: Path, now_ms: int) -> int:
    """This run's epoch, strictly above the last one used, persisted before first use."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "epoch"
    try:
        last: int | None = int(path.read_text().strip())
    except (OSError, ValueError):
        last = None
    epoch = next_epoch(last, now_ms)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{epoch}\n")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return epoch


class Transmitter:
    """One transmitter: its pollers, its outbox, its encoder and its sender."""

    def __init__(
        self,
        config: TxConfig,
        *,
        key: SigningKey,
        psk: bytes | None = None,
        epoch: int | None = None,
        sock: socket.socket | None = None,
        config_path: Path | None = None,
        file_key: SigningKey | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path  # re-read on request_reload() (SIGHUP)
        section = config.transmitter
        self.epoch = (
            epoch
            if epoch is not None
            else take_epoch(section.state_dir, time.time_ns() // 1_000_000)
        )
        self._ids: dict[tuple[str, str], int] = {}
        self._deadbands: dict[int, float] = {}
        self.outbox = Outbox(
            catalogue=self._catalogue,
            deadbands=self._deadbands,
            limit=section.queue_records,
            limit_bytes=section.queue_mb << 20,
            on_queue=self._samples_waiting,
        )
        # Syslog from OT devices and our own security events: the log lane (issue 19).
        self.syslog = SyslogIn(
            config.syslog,
            link=config.link,
            rate_mbps=config.link.rate_mbps,
            burst_s=config.link.queue_s(),  # owed while the framer waits at the queue's limit
            on_queue=self._records_waiting,
        )
        self.security: SecurityMonitor | None = None
        if config.syslog.security_events:
            self.security = SecurityMonitor(
                state_dir=section.state_dir,
                raise_event=self.syslog.event,
                catalogue=self._catalogue,
                exception_burst=config.syslog.exception_burst,
            )
            self.outbox.on_device = self.security.device
            self.outbox.on_quality = self.security.quality_changed
        # The pollers by source, with the config each was built from.
        self._sources: dict[tuple[str, str], tuple[Source, Poller]] = {}
        for name, source in sources_of(config).items():
            self._sources[name] = (source, self._poller(source))
        self._update_deadbands()
        self._group: asyncio.TaskGroup | None = None
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._reload_wanted = asyncio.Event()
        self.reloads = {"applied": 0, "failed": 0}
        self.encoder = Encoder(
            link=config.link, key=key, stream_id=section.stream_id, epoch=self.epoch, psk=psk
        )
        self.files: FileLane | None = None
        # Bounded in time at the link's rate: past the limit the framer waits (_framer).
        limit, resume = config.link.queue_limit(), config.link.queue_resume()
        if config.file_lane is None:
            self.queue = SendQueue(
                capacity=config.link.queue_datagrams,
                interleave=config.link.interleave,
                limit=limit,
                resume=resume,
            )
        else:
            self.queue = lanes = LaneQueue(
                capacity=config.link.queue_datagrams,
                interleave=config.link.interleave,
                limit=limit,
                resume=resume,
                file_capacity=config.link.queue_datagrams,
            )
        self.sock = sock or deaf_udp_socket(config.link)
        lane = config.file_lane
        self.sender = PacedSender(
            config.link,
            self.queue,
            self.sock,
            lane_port=(lane.stream_id, lane.port) if lane is not None and lane.port else None,
            on_room=self._room,
        )
        if config.file_lane is not None:
            self.files = FileLane(
                config.file_lane,
                config.files,
                link=config.link,
                key=file_key or load_signing_key(config.file_lane.private_key),
                epoch=self.epoch,
                queue=lanes.files,
                notify=self.sender.notify,
                psk=psk,
            )
        # The framer waiting for records: a bare future, set by the first record queued.
        # An Event under wait_for cost a task and a timer per wait, and the framer
        # waits once per poller batch (2 000 times a second at 10 000 updates/s).
        self._waiter: asyncio.Future[None] | None = None
        # Since when the framer waits for the send queue to have room (None: it does not).
        self._held_since: float | None = None
        self._held_s = 0.0
        self._started = time.monotonic()
        self._drops_logged_at = float("-inf")
        self._drops_logged = (0, 0)
        self._refused_logged_at = float("-inf")
        self.ready = asyncio.Event()

    @property
    def pollers(self) -> list[Poller]:
        return [poller for _, poller in self._sources.values()]

    def _poller(self, source: Source) -> Poller:
        if isinstance(source, ModbusDevice):
            return ModbusPoller(source, tag_id=self._tag_id, sink=self.outbox)
        if isinstance(source, OpcuaServer):
            return OpcuaPoller(
                source,
                tag_id=self._tag_id,
                sink=self.outbox,
                state_dir=self.config.transmitter.state_dir,
            )
        return SyntheticPoller(source, tag_id=self._tag_id, sink=self.outbox)

    def _update_deadbands(self) -> None:
        self._deadbands.clear()
        for poller in self.pollers:
            self._deadbands.update(poller.deadbands)

    # -- SIGHUP: the sources re-read ------------------------------------------------

    def request_reload(self) -> None:
        """Re-read the config file soon (the SIGHUP handler; safe from a signal)."""
        self._reload_wanted.set()

    async def _reloads(self, path: Path) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            await self.reload(path)

    async def reload(self, path: Path) -> bool:
        """Apply the sources of the config at ``path``; keep the running one if it is bad."""
        try:
            config = await asyncio.to_thread(load, TxConfig, path)
            config = config.resolve(path)
            # What a start checks (OPC UA certificates and password files, paths).
            await asyncio.to_thread(preflight, config, create=False)
        except Exception as exc:  # a reload must never take the transmitter down
            self.reloads["failed"] += 1
            # One line naming the file and the key: a traceback would bury it.
            log.error("config reload failed: the running config is kept", error=str(exc))  # noqa: TRY400
            if self.security is not None:
                self.syslog.event(
                    "config-reload-failed",
                    4,
                    f"diode-tx configuration reload refused, running config kept: {exc}",
                    {"error": str(exc)[:500]},
                )
            return False
        kept = [
            name
            for name in ("transmitter", "link", "log")
            if getattr(config, name) != getattr(self.config, name)
        ]
        if kept:
            log.warning(
                "config reload: these sections change only at a restart, not applied",
                sections=kept,
            )
        await self._apply(sources_of(config))
        self.config = config.model_copy(
            update={name: getattr(self.config, name) for name in ("transmitter", "link", "log")}
        )
        self.reloads["applied"] += 1
        return True

    async def _apply(self, wanted: dict[tuple[str, str], Source]) -> None:
        """Stop removed and changed sources' pollers, start changed and new ones."""
        running = self._sources
        before = {tag.tag_id for tag in self._catalogue()}
        removed = [key for key in running if key not in wanted]
        changed = [key for key in running if key in wanted and wanted[key] != running[key][0]]
        added = [key for key in wanted if key not in running]
        for key in (*removed, *changed):
            task = self._tasks.pop(key, None)
            if task is not None:
                await _cancel(task)
            del running[key]
        for key in (*changed, *added):
            running[key] = (wanted[key], self._poller(wanted[key]))
        self._update_deadbands()
        after = {tag.tag_id for tag in self._catalogue()}
        # A tag no longer polled must not stay "good" at its last value on MQTT.
        now = time.time_ns()
        for tag_id in sorted(before - after):
            self.outbox.sample(
                Sample(tag_id=tag_id, ts_ns=now, value=None, quality=Quality.BAD, reason=REMOVED)
            )
        self.outbox.keep_only(after)
        self.outbox.carousel()  # new and changed tags are named before their first value
        if self._group is not None:
            for key in (*changed, *added):
                self._tasks[key] = self._group.create_task(running[key][1].run())
        log.info(
            "config reloaded",
            added=[name for _, name in added],
            changed=[name for _, name in changed],
            removed=[name for _, name in removed],
            unchanged=len(running) - len(changed) - len(added),
            tags=sum(len(p.catalogue) for p in self.pollers),
        )
        self.config_reloaded(
            [f"added {kind} {name}" for kind, name in added]
            + [f"changed {kind} {name}" for kind, name in changed]
            + [f"removed {kind} {name}" for kind, name in removed]
        )

    # -- tag ids and the catalogue ---------------------------------------------

    def _tag_id(self, device: str, tag: str) -> int:
        return self._ids.setdefault((device, tag), len(self._ids) + 1)

    def _catalogue(self) -> Iterator[TagInfo]:
        for poller in self.pollers:
            yield from poller.catalogue

    def _records_waiting(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            _wake(waiter)

    def _samples_waiting(self) -> None:
        """Wake the framer for the outbox, unless the open block's linger timer will.

        While a block is open the framer sleeps until its linger is up; records
        that cannot fill it before then wait in the outbox (its estimate of a
        record, ``outbox.cost``, is above the record's encoded size, so a block
        that would fill wakes the framer early, never late). Waking once per
        poller batch instead cost a turn of the loop each, 2 000 a second at
        10 000 updates/s, for records that then waited for the timer anyway.
        """
        if self._held_since is not None or (
            self.encoder.pending_records and self.outbox.queued_bytes < self.encoder.room
        ):
            return  # held, the pacer wakes the framer (_room); else the linger timer will
        self._records_waiting()

    def _room(self) -> None:
        """The pacer left the send queue under its resume mark: a framer held goes on."""
        if self._held_since is not None:
            self._records_waiting()

    # -- counters ---------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        out = dict(self.outbox.counters)
        out.update(self.sender.counters)
        out.update(self.syslog.counters_all())
        out["blocks_dropped"] = self.queue.blocks_dropped
        out["records_dropped_link"] = self.queue.records_dropped
        out["queue_datagrams"] = len(self.queue)
        held = self._held_s
        if self._held_since is not None:
            held += time.monotonic() - self._held_since
        out["queue_full_ms"] = int(held * 1000)
        out["tags"] = len(self._ids)
        out["uptime_s"] = int(time.monotonic() - self._started)
        out["config_reloads"] = self.reloads["applied"]
        out["config_reload_failures"] = self.reloads["failed"]
        for poller in self.pollers:
            for name, value in poller.counters.items():
                out[f"poll_{name}"] = out.get(f"poll_{name}", 0) + value
        if self.files is not None:
            out.update(self.files.counters)
        return out

    # -- the tasks ----------------------------------------------------------------------

    def _frame(self, limit: int) -> None:
        """Move up to ``limit`` records into blocks; stop early when a block closes.

        Synchronous on purpose: a record leaves the Outbox only as it enters the
        encoder, so no record is ever held across an await (and lost to a cancel).
        A closed block costs about a millisecond (sign, FEC), so the caller hands
        it to the pacer at once: framing a whole chunk first starved the pacer,
        whose bucket holds only a few ms of tokens (see docs/BENCHMARKS.md).
        """
        encoder, outbox = self.encoder, self.outbox
        now = time.monotonic()
        for _ in range(min(limit, len(outbox))):
            record = outbox.pop()
            try:
                encoder.add(record, now)
            except DiodeError as exc:
                self._unencodable(record, exc, now)
            if encoder.blocks_ready:
                break
        self._ship()
        # The log lane after telemetry's block, within its share of the link, whether
        # or not telemetry waits: the lane's bucket holds it to ``link_share``, so
        # telemetry keeps the rest. Framed only once the outbox was empty, the lane
        # starved while telemetry exceeded the link (the outbox never empties then).
        # A few blocks per turn, each handed to the pacer as it closes: one block a
        # turn framed fewer messages than one TCP read brings in (64 KiB, ~400
        # messages), and at 20 000 messages/s the lane's queue, and its latency, grew.
        lane = self.syslog.lane
        for _ in range(LANE_BLOCKS_PER_TURN):
            if self.queue.full or not lane.ready(now):
                break
            lane.frame(encoder, now)
            if not encoder.blocks_ready:
                break
            self._ship()
        encoder.poll(now)
        self._ship()

    def _unencodable(self, record: Record, exc: DiodeError, now: float) -> None:
        """A record the encoder refused: a sample becomes BAD saying why; anything else is dropped.

        The outbox already replaces what it knows cannot travel; this catches
        the rest (a value too large for a block), so that it costs that value only.
        """
        now_log = time.monotonic()
        if now_log - self._refused_logged_at >= DROP_LOG_INTERVAL_S:
            self._refused_logged_at = now_log
            log.warning("record refused by the encoder", reason=exc.reason, detail=str(exc)[:200])
        if isinstance(record, Sample) and record.value is not None:
            self.encoder.add(self.outbox.unrepresentable(record, exc.reason), now)
            return
        self.outbox.counters["records_dropped"] += 1

    async def _framer(self) -> None:
        """Outbox -> Encoder -> SendQueue, closing blocks on size or linger.

        Backpressure: while the send queue is full (``[link] queue_ms`` of the
        link, :meth:`TxLink.queue_limit`) no record is framed. Records wait in
        the outbox, whose bounds drop the newest and count them, and the pacer
        wakes the framer once the queue is under its resume mark, half the limit
        (:meth:`_room`). Meanwhile the open block waits with them, past its
        linger: it fills when the framer goes on, where closing it on the linger
        sent a small block, and a timer woke the framer every few ms. Framing on
        and dropping framed blocks at the queue's end cost the core their
        signature and FEC, held up to 98 MB at 1 Gb/s, and lost values the
        outbox had already marked as sent, which report-by-exception would not
        send again before they changed.
        """
        encoder, outbox, queue = self.encoder, self.outbox, self.queue
        while True:
            if not queue.full:
                self._frame(FRAMER_CHUNK)
            lane = self.syslog.lane
            held = queue.full
            if not held and (len(outbox) or lane.ready(time.monotonic())):
                await asyncio.sleep(0)
                continue
            deadlines = () if held else (encoder.deadline(), lane.deadline())
            deadline = min((d for d in deadlines if d is not None), default=None)
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = (
                None
                if deadline is None
                else loop.call_later(max(deadline - time.monotonic(), 0.0), _wake, waiter)
            )
            if held:
                self._held_since = time.monotonic()
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
                if self._held_since is not None:
                    self._held_s += time.monotonic() - self._held_since
                    self._held_since = None

    def _ship(self) -> None:
        blocks = self.encoder.take()
        for block in blocks:
            if self.queue.push(block):
                self._log_drops()
        if blocks:
            self.sender.notify()

    def _log_drops(self) -> None:
        """Say records were dropped: at once the first time, then every few seconds.

        The outbox drops the newest records when it is full (the link, or the
        framer, cannot keep up with the sources); the send queue drops the oldest
        blocks past ``queue_datagrams`` (a shutdown framing everything at once).
        """
        now = time.monotonic()
        dropped = (self.outbox.counters["records_dropped"], self.queue.blocks_dropped)
        if dropped == self._drops_logged or now - self._drops_logged_at < DROP_LOG_INTERVAL_S:
            return
        self._drops_logged_at, self._drops_logged = now, dropped
        log.warning(
            "link cannot keep up: records dropped",
            records_dropped=dropped[0],
            blocks_dropped=dropped[1],
            records_dropped_link=self.queue.records_dropped,
            rate_mbps=self.config.link.rate_mbps,
        )

    @staticmethod
    async def _sliced(period_s: float, action: Callable[[int, int], None]) -> None:
        """``action(i, SLICES)`` for each slice in turn, all of them once per period.

        The first round starts one period after the start, like an unsliced timer:
        everything was just sent live.
        """
        await asyncio.sleep(period_s * (PERIODIC_SLICES - 1) / PERIODIC_SLICES)
        part = 0
        while True:
            await asyncio.sleep(period_s / PERIODIC_SLICES)
            action(part, PERIODIC_SLICES)
            part = (part + 1) % PERIODIC_SLICES

    @staticmethod
    async def _every(period_s: float, action: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(period_s)
            action()

    def _event(self, action: str, severity: int, message: str) -> None:
        if self.security is not None:
            self.syslog.event(
                action, severity, message, {"stream": str(self.config.transmitter.stream_id)}
            )

    def config_reloaded(self, changed: list[str]) -> None:
        """Say to the SOC that the configuration was reloaded, and what changed (SIGHUP)."""
        if self.security is not None:
            self.syslog.event(
                "config-reloaded",
                5,
                f"diode-tx configuration reloaded: {', '.join(changed) or 'no key changed'}",
                {"stream": str(self.config.transmitter.stream_id), "changed": ",".join(changed)},
            )

    def _watch_exceptions(self) -> None:
        if self.security is None:
            return
        now = time.monotonic()
        for poller in self.pollers:
            if isinstance(poller, ModbusPoller):
                self.security.exceptions(poller.device.name, poller.counters["errors"], now)

    def heartbeat(self) -> None:
        self._log_drops()
        self.outbox.put(Heartbeat(ts_ns=time.time_ns(), counters=self.counters()))
        if self.files is not None:
            self.files.heartbeat()

    async def run(self, stop: asyncio.Event) -> None:
        section = self.config.transmitter
        log.info(
            "transmitter starting",
            stream_id=section.stream_id,
            epoch=self.epoch,
            destination=f"{self.config.link.destination}:{self.config.link.port}",
            rate_mbps=self.config.link.rate_mbps,
            tags=sum(len(p.catalogue) for p in self.pollers),
        )
        await self.syslog.start()
        self._event("daemon-start", 5, f"diode-tx started, epoch {self.epoch}")
        # Catalogue first: every tag is named before its first sample.
        self.outbox.carousel()
        self.heartbeat()
        async with asyncio.TaskGroup() as group:
            self._group = group
            self._tasks = {
                key: group.create_task(poller.run()) for key, (_, poller) in self._sources.items()
            }
            helpers = [
                group.create_task(self._framer()),
                group.create_task(self.sender.run()),
                group.create_task(self._every(section.heartbeat_interval_s, self.heartbeat)),
                group.create_task(self._every(section.catalogue_period_s, self.outbox.carousel)),
                group.create_task(self._sliced(section.integrity_period_s, self.outbox.refresh)),
                group.create_task(daemon.watchdog()),
                group.create_task(self._every(1.0, self._watch_exceptions)),
            ]
            # Stopped with the pollers: a file not sent whole is sent again next run.
            files_task = group.create_task(self.files.run()) if self.files is not None else None
            if self.config_path is not None:
                helpers.append(group.create_task(self._reloads(self.config_path)))
            daemon.sd_notify("READY=1")
            self.ready.set()
            await stop.wait()
            daemon.sd_notify("STOPPING=1")
            if self.config_path is not None:
                helpers[-1].cancel()  # no reload starts pollers during the shutdown
            for task in self._tasks.values():
                task.cancel()
            if files_task is not None:
                files_task.cancel()
            self.syslog.close()
            self._event("daemon-stop", 5, "diode-tx stopping")
            self.syslog.lane.frame_all(self.encoder, time.monotonic())
            self.heartbeat()
            # Everything the pollers handed over gets a record number now, so the
            # receiver can account for it even if the grace period runs out.
            while len(self.outbox):
                self._frame(len(self.outbox))
            self.encoder.flush()
            self._ship()
            await self.sender.drain(SHUTDOWN_GRACE_S)
            unsent = self.queue.clear()
            if unsent:
                log.warning("shutdown grace over: datagrams not sent", datagrams=unsent)
            for task in helpers:
                task.cancel()
        self.sock.close()
        log.info("transmitter stopped", **self.counters())


def preflight(config: TxConfig, *, create: bool) -> None:
    """What the transmitter checks before it starts (``diode check-config`` runs it too).

    The host checks of :mod:`diode.startup`, and the OPC UA certificate files,
    which the pollers would otherwise only meet at each connect, failing
    forever instead of once with a line naming the setting.
    """
    startup.check_tx(config, create=create)
    for i, server in enumerate(config.opcua.servers):
        for key in ("server_certificate", "trust_list", "certificate"):
            path: Path | None = getattr(server, key)
            if path is None:
                continue
            try:
                found = certs.load_trust_list(path)
            except KeyFileError as exc:
                raise SettingError(f"opcua.servers[{i}].{key}", str(exc)) from None
            if not found:
                raise SettingError(
                    f"opcua.servers[{i}].{key}", f"{path} holds no certificate: it trusts nothing"
                )


def build(config: TxConfig, config_path: Path | None = None) -> Transmitter:
    section = config.transmitter
    key = load_signing_key(section.private_key)
    psk = load_psk(section.psk_file) if section.psk_file else None
    return Transmitter(config, key=key, psk=psk, config_path=config_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diode-tx", description="the transmitter (OT side)")
    parser.add_argument("--config", type=Path, default=Path("/etc/diode/tx.toml"))
    args = parser.parse_args(argv)
    config = daemon.load_config(TxConfig, args.config)
    daemon.setup_logging(config.log.level, config.log.format)

    async def _main(stop: asyncio.Event) -> None:
        preflight(config, create=True)
        transmitter = build(config, args.config)
        daemon.freeze_heap()
        # SIGHUP re-reads the config (before: it terminated the daemon).
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, transmitter.request_reload)
        await transmitter.run(stop)

    return daemon.run(_main, args.config)


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every second.

    One cancellation can be swallowed: a poller whose request ends at the moment
    it is cancelled (asyncio.wait_for on Python 3.11, or a watchdog's cancel
    taken for a timeout) goes on polling, and a reload awaiting it hung for good
    (seen once in the suite, in a SOC reload test, the event loop idle).
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if not task.cancelled():
        task.result()  # what the poller raised, as awaiting it gave

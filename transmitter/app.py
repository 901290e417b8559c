"""diode-tx: the transmitter daemon (OT side).

The pipeline, stage by stage, with the queue between each pair::

    ModbusPoller -+                  Outbox                 Encoder           PacedSender
    OpcuaPoller  -+--sample()--> (report by    --framer-->  (blocks on  --+   (token bucket
    timers -------+              exception,                 size/linger,  |    on monotonic
    (heartbeat, refresh,         bounded deque)             sign, FEC)    |    clock) --> UDP
     catalogue carousel)                                                  v         ^
                                                    SendQueue (bounded, interleaved)

Every queue is bounded and a full one drops and counts (the heartbeat carries
the counts): the pollers never wait for the link. Nothing here listens or
reads from the link. SIGTERM stops the pollers, closes the open block and
sends what is queued within a grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import structlog

from diode import daemon, startup
from diode.config.tx import TxConfig
from diode.encoder import Encoder, SendQueue
from diode.errors import DiodeError, KeyFileError, SettingError
from diode.keys import SigningKey, load_psk, load_signing_key
from diode.records import Heartbeat, TagInfo
from diode.replay import next_epoch
from transmitter import certs
from transmitter.modbus import ModbusPoller
from transmitter.opcua import OpcuaPoller
from transmitter.outbox import Outbox
from transmitter.security import SecurityMonitor
from transmitter.sender import PacedSender, deaf_udp_socket
from transmitter.synthetic import SyntheticPoller
from transmitter.syslog_in import SyslogIn

log = structlog.get_logger("diode.tx")

FRAMER_CHUNK = 2048
SHUTDOWN_GRACE_S = 5.0
DROP_LOG_INTERVAL_S = 5.0
# The integrity refresh goes out a tenth at a time. (The catalogue carousel stays whole:
# its records make no MQTT messages, and a receiver that starts late needs every name.)
PERIODIC_SLICES = 10


class Poller(Protocol):
    catalogue: list[TagInfo]
    deadbands: dict[int, float]
    counters: dict[str, int]

    async def run(self) -> None: ...


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
    ) -> None:
        self.config = config
        section = config.transmitter
        self.epoch = (
            epoch
            if epoch is not None
            else take_epoch(section.state_dir, time.time_ns() // 1_000_000)
        )
        self._ids: dict[tuple[str, str], int] = {}
        self.pollers: list[Poller] = []
        deadbands: dict[int, float] = {}
        self.outbox = Outbox(
            catalogue=self._catalogue,
            deadbands=deadbands,
            limit=section.queue_records,
            on_queue=self._records_waiting,
        )
        # Syslog from OT devices and our own security events: the log lane (issue 19).
        self.syslog = SyslogIn(
            config.syslog,
            link=config.link,
            rate_mbps=config.link.rate_mbps,
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
        for device in config.modbus.devices:
            self.pollers.append(ModbusPoller(device, tag_id=self._tag_id, sink=self.outbox))
        for server in config.opcua.servers:
            self.pollers.append(
                OpcuaPoller(
                    server, tag_id=self._tag_id, sink=self.outbox, state_dir=section.state_dir
                )
            )
        for source in config.synthetic.sources:
            self.pollers.append(SyntheticPoller(source, tag_id=self._tag_id, sink=self.outbox))
        for poller in self.pollers:
            deadbands.update(poller.deadbands)
        self.encoder = Encoder(
            link=config.link, key=key, stream_id=section.stream_id, epoch=self.epoch, psk=psk
        )
        self.queue = SendQueue(
            capacity=config.link.queue_datagrams, interleave=config.link.interleave
        )
        self.sock = sock or deaf_udp_socket(config.link)
        self.sender = PacedSender(config.link, self.queue, self.sock)
        self._wake = asyncio.Event()
        self._started = time.monotonic()
        self._drops_logged_at = float("-inf")
        self.ready = asyncio.Event()

    # -- tag ids and the catalogue ---------------------------------------------

    def _tag_id(self, device: str, tag: str) -> int:
        return self._ids.setdefault((device, tag), len(self._ids) + 1)

    def _catalogue(self) -> Iterator[TagInfo]:
        for poller in self.pollers:
            yield from poller.catalogue

    def _records_waiting(self) -> None:
        self._wake.set()

    # -- counters ---------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        out = dict(self.outbox.counters)
        out.update(self.sender.counters)
        out.update(self.syslog.counters_all())
        out["blocks_dropped"] = self.queue.blocks_dropped
        out["records_dropped_link"] = self.queue.records_dropped
        out["queue_datagrams"] = len(self.queue)
        out["tags"] = len(self._ids)
        out["uptime_s"] = int(time.monotonic() - self._started)
        for poller in self.pollers:
            for name, value in poller.counters.items():
                out[f"poll_{name}"] = out.get(f"poll_{name}", 0) + value
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
            try:
                encoder.add(outbox.pop(), now)
            except DiodeError as exc:
                log.warning("record dropped", reason=exc.reason, detail=str(exc))
                outbox.counters["records_dropped"] += 1
            if encoder.blocks_ready:
                break
        if not len(outbox) and not encoder.blocks_ready:
            # The log lane after telemetry, within its share of the link.
            self.syslog.lane.frame(encoder, now)
        encoder.poll(now)
        self._ship()

    async def _framer(self) -> None:
        """Outbox -> Encoder -> SendQueue, closing blocks on size or linger."""
        encoder, outbox = self.encoder, self.outbox
        while True:
            self._frame(FRAMER_CHUNK)
            lane = self.syslog.lane
            if len(outbox) or lane.ready(time.monotonic()):
                await asyncio.sleep(0)
                continue
            self._wake.clear()
            deadline = min(
                (d for d in (encoder.deadline(), lane.deadline()) if d is not None), default=None
            )
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _ship(self) -> None:
        blocks = self.encoder.take()
        for block in blocks:
            if self.queue.push(block):
                self._log_drops()
        if blocks:
            self.sender.notify()

    def _log_drops(self) -> None:
        """Say the link cannot keep up: at once the first time, then every few seconds."""
        now = time.monotonic()
        if now - self._drops_logged_at < DROP_LOG_INTERVAL_S:
            return
        self._drops_logged_at = now
        log.warning(
            "link cannot keep up: oldest queued blocks dropped",
            blocks_dropped=self.queue.blocks_dropped,
            records_dropped=self.queue.records_dropped,
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
        """Say to the SOC that the configuration was reloaded, and which keys changed.

        For the reload path (SIGHUP) to call once a new config is in force.
        """
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
        self.outbox.put(Heartbeat(ts_ns=time.time_ns(), counters=self.counters()))

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
            pollers = [group.create_task(p.run()) for p in self.pollers]
            helpers = [
                group.create_task(self._framer()),
                group.create_task(self.sender.run()),
                group.create_task(self._every(section.heartbeat_interval_s, self.heartbeat)),
                group.create_task(self._every(section.catalogue_period_s, self.outbox.carousel)),
                group.create_task(self._sliced(section.integrity_period_s, self.outbox.refresh)),
                group.create_task(daemon.watchdog()),
                group.create_task(self._every(1.0, self._watch_exceptions)),
            ]
            daemon.sd_notify("READY=1")
            self.ready.set()
            await stop.wait()
            daemon.sd_notify("STOPPING=1")
            for task in pollers:
                task.cancel()
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


def build(config: TxConfig) -> Transmitter:
    section = config.transmitter
    key = load_signing_key(section.private_key)
    psk = load_psk(section.psk_file) if section.psk_file else None
    return Transmitter(config, key=key, psk=psk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diode-tx", description="the transmitter (OT side)")
    parser.add_argument("--config", type=Path, default=Path("/etc/diode/tx.toml"))
    args = parser.parse_args(argv)
    config = daemon.load_config(TxConfig, args.config)
    daemon.setup_logging(config.log.level, config.log.format)

    async def _main(stop: asyncio.Event) -> None:
        preflight(config, create=True)
        await build(config).run(stop)

    return daemon.run(_main, args.config)

"""diode-rx: the receiver daemon (IT side).

The pipeline, stage by stage, with the queue between each pair::

    UDP socket        drain (reader       Decoder            Router           MqttOutput
    (SO_RCVBUF  ----> callback: recv --> (rebuild, verify, -> (catalogue, --> (SQLite spool,
     sized, read      until empty)        order, gaps)        stale, status)   then the broker)
     back)
    Messages and the stream positions that cover them are committed to the
    spool in one transaction before anything is published.

The socket is drained in a tight loop whenever it is readable: a full
socket queue is the main cause of loss on a one-way link. The receiver never
sends anything towards the transmitter: the link socket is only read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sqlite3
import time
from pathlib import Path

import structlog

from diode import daemon, startup
from diode.config.rx import RxConfig
from diode.decoder import Decoder, DecoderSettings
from diode.errors import FrameError, SettingError
from diode.keys import Keyring, TrustedKey, load_psk, load_public_key
from diode.replay import StreamState, pack_states, unpack_states
from receiver.metrics import Metrics
from receiver.mqtt import MqttOutput
from receiver.router import Router
from receiver.soc import Soc

log = structlog.get_logger("diode.rx")

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not exported by Python 3.11
DRAIN_BUDGET = 1024  # datagrams per reader callback: bounds what a catch-up holds at once
STATUS_PERIOD_S = 5.0


def size_receive_buffer(sock: socket.socket, wanted: int, *, force: bool = True) -> int:
    """Ask for ``wanted`` bytes of receive buffer, read back what was granted, warn if capped."""
    forced = False
    if force:
        # Root (CAP_NET_ADMIN) may go past net.core.rmem_max; others get an EPERM.
        with contextlib.suppress(PermissionError):
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, wanted)
            forced = True
    if not forced:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux reports double
    if granted < wanted:
        log.warning(
            "receive buffer capped by the kernel",
            asked=wanted,
            granted=granted,
            fix=f"sysctl -w net.core.rmem_max={wanted} (systemd/99-diode-rx.conf)",
        )
    return granted


def open_link_socket(
    listen: str, port: int, rcvbuf: int, interface: str | None = None
) -> socket.socket:
    """Bind the link socket with the receive buffer asked for (read back, warned if capped).

    With ``interface`` the socket takes datagrams arriving on that interface only
    (SO_BINDTODEVICE): a host on the IT side that can route to ``listen`` still
    cannot reach the port. A failure names the setting to change (SettingError).
    """
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        size_receive_buffer(sock, rcvbuf)
        if interface is not None:
            startup.bind_to_device(sock, interface, "receiver.interface")
        sock.bind((listen, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise startup.bind_error(
            exc, address_key="receiver.listen", port_key="receiver.port", address=listen, port=port
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


def kernel_drops(sock: socket.socket) -> int:
    """Datagrams the kernel dropped for this socket (its queue was full)."""
    try:
        inode = os.fstat(sock.fileno()).st_ino
        for table in ("/proc/net/udp", "/proc/net/udp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[9]) == inode:
                    return int(fields[12])
    except (OSError, ValueError, IndexError):
        pass
    return 0


POSITIONS = "positions"


def load_positions(output: MqttOutput) -> dict[int, StreamState]:
    """The stream positions the last commit stored beside the messages they cover."""
    saved = output.saved(POSITIONS)
    if saved is None:
        return {}
    try:
        return unpack_states(saved)
    except FrameError as exc:
        # A damaged record must not stop the receiver; replays of old epochs stay
        # rejected by the next authentic epoch, and the event is loud.
        log.warning("stream positions unreadable, starting without them", error=str(exc))
        return {}


class Receiver:
    def __init__(self, config: RxConfig, *, sock: socket.socket | None = None) -> None:
        self.config = config
        section = config.receiver
        keys: list[TrustedKey] = []
        for stream in config.streams:
            psk = load_psk(stream.psk_file) if stream.psk_file else None
            keys.extend(
                TrustedKey(stream_id=stream.id, public=load_public_key(path), psk=psk)
                for path in stream.public_keys
            )
        try:
            self.output = MqttOutput(config.mqtt)
        except sqlite3.Error as exc:  # a file that is not our spool, or a damaged one
            raise SettingError(
                "mqtt.spool_path", f"{config.mqtt.spool_path} is not a usable spool: {exc}"
            ) from None
        self.decoder = Decoder(
            Keyring(keys),
            DecoderSettings(
                reorder_timeout_s=section.reorder_timeout_s,
                max_assembly_bytes=int(section.max_assembly_mb * 1024 * 1024),
            ),
            state=load_positions(self.output),
        )
        self.router = Router({s.id: s.output for s in config.streams}, self.output)
        self.soc = Soc(
            config.soc, {s.id: s.output for s in config.streams}, self.output, section.state_dir
        )
        self.sock = sock or open_link_socket(
            section.listen, section.port, section.rcvbuf_bytes, section.interface
        )
        self.metrics = Metrics(self) if section.metrics_port else None
        self._timer: asyncio.TimerHandle | None = None
        self.ready = asyncio.Event()

    # -- the receive path -------------------------------------------------------------

    def _readable(self) -> None:
        sock, decoder = self.sock, self.decoder
        now = time.monotonic()
        for _ in range(DRAIN_BUDGET):
            try:
                datagram = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                decoder.counters["socket_errors"] += 1
                break
            decoder.receive(datagram, now)
        self._after(now)

    def _after(self, now: float) -> None:
        decoder = self.decoder
        events = decoder.events()
        if events:
            self.router.handle(events, now)
            # Log records reach the SOC spool before the positions that cover them commit.
            self.soc.handle(events, now)
        if decoder.state_changed:
            # The messages and the positions that cover them reach the disk in one
            # transaction, before anything is published: a receiver killed at any
            # moment loses nothing unreported and takes no replayed block twice.
            self.output.commit({POSITIONS: pack_states(decoder.positions())})
        self._arm()

    def _arm(self) -> None:
        deadline = self.decoder.deadline()
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(deadline - time.monotonic(), 0.0)
        if self._timer is not None and self._timer.when() <= loop.time() + delay:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = time.monotonic()
        self.decoder.poll(now)
        self._after(now)

    async def _supervise(self) -> None:
        last_status = 0.0
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            self.decoder.poll(now)
            self._after(now)
            self.router.tick(now)
            self.soc.tick(
                now,
                decoder_counters=self.decoder.counters,
                links={sid: view.link_up for sid, view in self.router.streams.items()},
                output_counters=self.output.counters,
            )
            self.decoder.counters["kernel_drops"] = kernel_drops(self.sock)
            if now - last_status >= STATUS_PERIOD_S:
                self.router.publish_all_status(now)
                last_status = now

    def counters(self) -> dict[str, int]:
        out = dict(self.decoder.counters)
        for key, value in self.output.counters.items():
            out[f"mqtt_{key}"] = int(value)
        out.update(self.soc.counters)
        return out

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        section = self.config.receiver
        if self.metrics is not None:
            try:
                self.metrics.serve(section.metrics_address, section.metrics_port)
            except OSError as exc:
                raise startup.bind_error(
                    exc,
                    address_key="receiver.metrics_address",
                    port_key="receiver.metrics_port",
                    address=section.metrics_address,
                    port=section.metrics_port,
                ) from None
        log.info(
            "receiver starting",
            listen=f"{section.listen}:{self.sock.getsockname()[1]}",
            interface=section.interface,
            streams=[s.id for s in self.config.streams],
        )
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self.output.run()),
                group.create_task(self._supervise()),
                group.create_task(daemon.watchdog()),
                group.create_task(self.soc.run()),
            ]
            loop.add_reader(self.sock, self._readable)
            daemon.sd_notify("READY=1")
            self.ready.set()
            await stop.wait()
            daemon.sd_notify("STOPPING=1")
            loop.remove_reader(self.sock)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.output.close(), 5)
            for task in tasks:
                task.cancel()
        self.soc.close()
        if self.metrics is not None:
            self.metrics.close()
        self.sock.close()
        log.info("receiver stopped", **self.counters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diode-rx", description="the receiver (IT side)")
    parser.add_argument("--config", type=Path, default=Path("/etc/diode/rx.toml"))
    args = parser.parse_args(argv)
    config = daemon.load_config(RxConfig, args.config)
    daemon.setup_logging(config.log.level, config.log.format)

    async def _main(stop: asyncio.Event) -> None:
        startup.check_rx(config, create=True)
        await Receiver(config).run(stop)

    return daemon.run(_main, args.config)

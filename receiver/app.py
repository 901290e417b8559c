"""diode-rx: the receiver daemon (IT side).

The pipeline, stage by stage, with the queue between each pair::

    UDP socket        drain (reader       Decoder            Router           MqttOutput
    (SO_RCVBUF  ----> callback: recv --> (rebuild, verify, -> (catalogue, --> (SQLite spool,
     sized, read      until empty)        order, gaps)        stale, status)   then the broker)
     back)
    Messages and the stream positions that cover them are committed to the
    spool in one transaction before anything is published.

The socket is drained in a tight loop whenever it is readable: a full
socket queue is the main cause of loss on a one-way link. Replays and late
copies (a block below the committed positions) never reach it: a BPF program
on the port's SO_REUSEPORT group sends them to two quarantine sockets, counted
and never read (receiver/steer.py). The receiver never
sends anything towards the transmitter: the link socket is only read.

Restarts lose nothing (receiver/link.py): the socket may be passed in by
systemd (``diode-rx.socket``) and outlive the process, and a datagram leaves
its queue only once the positions committed with its records cover it.
SIGHUP checks the config and, if it is good, executes the receiver again in
this process with the socket passed on (:func:`reexec`). With ``[failover]``
the receiver is one of a pair (receiver/failover.py): while standby its router
publishes nowhere and the drain follows the active receiver's positions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import os
import signal
import socket
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from diode import daemon, startup
from diode.config import load
from diode.config.rx import RxConfig
from diode.decoder import Decoder, DecoderSettings, Gap, LinkProfile
from diode.errors import DiodeError, FrameError, SettingError
from diode.keys import Keyring, TrustedKey, load_psk, load_public_key
from diode.replay import StreamState, pack_states, unpack_states
from receiver.failover import (
    ANNOUNCE_S,
    Failover,
    NullOutput,
    announcement_topic,
    merged,
    pack_positions,
)
from receiver.files import FileReceiver
from receiver.link import (
    SD_LISTEN_FDS_START,
    Drain,
    FloodMeter,
    kernel_drops,
    open_link_socket,
)
from receiver.metrics import Metrics
from receiver.mqtt import MqttOutput
from receiver.rejections import RejectionMeter
from receiver.router import Output, Router
from receiver.soc import SOC_LANES, Soc
from receiver.sparkplug_node import SparkplugRouting, sparkplug_nodes
from receiver.steer import Steering, link_sockets

log = structlog.get_logger("diode.rx")

DRAIN_BUDGET = 1024  # datagrams per reader callback: bounds what a catch-up holds at once
# Under a flood (receiver/link.py, FloodMeter), a read that emptied the link socket's queue
# is followed by the next one this long after, not at the next wake-up: each wake-up costs
# the event loop, two system calls and the bookkeeping around them, and a receiver woken
# for every few forged datagrams paid that for each few (epoll_wait alone was 17 % of its
# CPU under a flood of tiny datagrams); a millisecond later a flood has queued full batches
# (docs/RELIABILITY.md, "Floods of forged datagrams"). The real stream waits that
# millisecond more in the queue. A read that stopped at its budget is followed at once.
FLOOD_READ_EVERY_S = 0.001
# A link socket whose queue holds only what the journal keeps (a block waiting for its
# missing datagrams, a standby's uncommitted stream) stays readable with nothing new in it:
# epoll would wake the receiver at every turn of the loop for a read of nothing (120 000
# a second here, a core). After such a read it is read again this long after, or at the
# grouped commit due. A datagram that arrives meanwhile waits that much more.
HELD_READ_EVERY_S = 0.001
# File datagrams per turn, read only once the link socket is empty: a tag datagram that
# arrives meanwhile waits for at most this many (two blocks' worth at the default FEC).
FILE_BUDGET = 112
# Group commits: at most one commit of the positions per this long. A block that
# completes sooner after the last commit waits for the next one (its messages and
# datagrams held meanwhile), so at high rate one COMMIT covers several blocks; a
# block that arrives after a quiet spell is committed at once, adding no latency.
COMMIT_EVERY_S = 0.005
STATUS_PERIOD_S = 5.0
FILE_DROPS_LOG_S = 60.0  # at most one warning a minute about the file socket overflowing


POSITIONS = "positions"
ROLE = "failover_role"  # in a pair: what this receiver was when it last committed
ACTIVE, STANDBY = b"active", b"standby"


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


def keyring(config: RxConfig) -> Keyring:
    """Every stream's accepted keys, read from their files (a bad file raises KeyFileError)."""
    keys: list[TrustedKey] = []
    for stream in config.streams:
        psk = load_psk(stream.psk_file) if stream.psk_file else None
        keys.extend(
            TrustedKey(stream_id=stream.id, public=load_public_key(path), psk=psk)
            for path in stream.public_keys
        )
    return Keyring(keys)


def validated(path: Path) -> RxConfig:
    """The config at ``path`` checked as a start would check it: schema, files, keys, and
    what this host can tell before binding (startup.check_rx)."""
    config = load(RxConfig, path).resolve(path)
    config.check_files(path)
    keyring(config)
    startup.check_rx(config, create=True)
    return config


class Receiver:
    def __init__(
        self,
        config: RxConfig,
        *,
        sock: socket.socket | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        section = config.receiver
        try:
            self.output = MqttOutput(config.mqtt)
        except sqlite3.Error as exc:  # a file that is not our spool, or a damaged one
            raise SettingError(
                "mqtt.spool_path", f"{config.mqtt.spool_path} is not a usable spool: {exc}"
            ) from None
        self._keyring = keyring(config)
        self._settings = DecoderSettings(
            reorder_timeout_s=section.reorder_timeout_s,
            max_assembly_bytes=int(section.max_assembly_mb * 1024 * 1024),
            verify_budget_per_s=section.verify_budget_per_s,
            max_start_age_s=section.max_start_age_s,
            clock_skew_s=section.clock_skew_s,
        )
        self._stream_outputs = {s.id: s.output for s in config.streams}
        self.files = FileReceiver(
            {s.id: s.files for s in config.streams if s.files is not None}, self._announce_file
        )
        self._profiles = {
            s.id: LinkProfile.of(s.link.datagram_size, s.link.fec)
            for s in config.streams
            if s.link is not None
        }
        self.rejections = RejectionMeter()
        saved = load_positions(self.output)
        self.decoder = self._decoder(saved)
        # A pair of receivers (receiver/failover.py): this one starts as the standby.
        self.failover = (
            Failover(config.mqtt, config.failover, was_active=self.output.saved(ROLE) == ACTIVE)
            if config.failover.peer_status_topic is not None
            else None
        )
        self.active = self.failover is None
        self.since = time.time()  # when this receiver became the active one
        self._tick = time.monotonic()  # the failover loop's last turn
        self._retired: Counter[str] = Counter()  # counts of the decoders it replaced
        # Sparkplug streams publish through an edge node of their own (receiver/sparkplug_node.py).
        self.sparkplug = sparkplug_nodes(config)
        self._publisher: Output = (
            SparkplugRouting(self.output, self.sparkplug, config) if self.sparkplug else self.output
        )
        self.router = self._router(self._publisher if self.active else NullOutput())
        self.soc = Soc(
            config.soc,
            {s.id: s.output for s in config.streams},
            self.output,
            section.state_dir,
            saved=self.output.saved(SOC_LANES),
        )
        # The positions last committed with the messages they cover: what the drain may
        # take out of the kernel's queue (receiver/link.py).
        self._committed = self.decoder.positions()
        self.sock, self.steering, passed = self._link_sockets(config, sock)
        streams = {s.id for s in config.streams}
        self.drain = Drain(self.sock, streams, journal=True, counters=self.decoder.counters)
        self.openings = self._openings(streams)
        self.file_sock, self.file_drain = self._file_socket(config)
        if self.failover is not None:
            for drain in self._drains():
                drain.hold_longer(config.failover.takeover_after_s + 2.0)
            self.output.commit({ROLE: STANDBY})
        self.passed_socket = passed
        self.metrics = Metrics(self) if section.metrics_port else None
        self._timer: asyncio.TimerHandle | None = None
        self._armed: tuple[Decoder, int] | None = None  # decoder, symbols when last armed
        self._commit_timer: asyncio.TimerHandle | None = None  # a grouped commit due
        self._reading = False  # the sockets are watched (between start and stop)
        self._link_paused = False  # the link socket not watched: a flood, or a commit due
        self._resume: asyncio.TimerHandle | None = None  # reading again after a flood's pause
        self._last_commit = float("-inf")
        self._file_drops_logged_at = float("-inf")
        self._flood = FloodMeter()
        self.ready = asyncio.Event()
        self.handover = False  # set by a reload: the socket goes to the next process

    def _openings(self, streams: set[int]) -> list[Drain]:
        """Attach the steering program; quarantines passed in may hold real datagrams (a
        group without a program): their drains, read journaled until they are empty."""
        if self.steering is None:
            return []
        openings = []
        if self.steering.opening:
            counters = self.decoder.counters
            openings = [
                Drain(quarantine, streams, journal=True, counters=counters)
                for quarantine in self.steering.quarantines.values()
            ]
        self.steering.update(self._committed, time.monotonic(), force=True)
        if openings:
            # After the drains read their size (their journals' limits), and after the
            # program: before it, the kernel hashes real datagrams to the quarantines too.
            self.steering.shrink()
        return openings

    @staticmethod
    def _link_sockets(
        config: RxConfig, sock: socket.socket | None
    ) -> tuple[socket.socket, Steering | None, bool]:
        """The link socket given (a test's), else passed in or opened; replays below the
        committed positions go to quarantines beside it (receiver/steer.py)."""
        if sock is not None:
            return sock, None, False
        section = config.receiver
        return link_sockets(
            section.listen,
            section.port,
            section.rcvbuf_bytes,
            section.interface,
            steer=section.steer_replays,
        )

    def _file_socket(self, config: RxConfig) -> tuple[socket.socket | None, Drain | None]:
        """The file lanes' own socket ([receiver] file_port), and its drain, if configured.

        A file can only ever fill its own buffer, and it is read only when the link
        socket is empty (:meth:`_readable_files`). Opened here even when the link socket
        was passed in, so it dies with the process: what its queue held at a restart is
        lost (a gap of the lane, counted), and the lane's repetition or carousel sends it
        again. Keeping datagrams in a queue that does not outlive the process would buy
        nothing: no journal, one recv each.
        """
        section = config.receiver
        if section.file_port is None:
            return None, None
        sock = open_link_socket(
            section.listen,
            section.file_port,
            section.rcvbuf_bytes,
            section.interface,
            port_key="receiver.file_port",
        )
        streams = {s.id for s in config.streams}
        return sock, Drain(sock, streams, journal=False, counters=self.decoder.counters)

    # -- the receive path -------------------------------------------------------------

    def _readable(self) -> None:
        now = time.monotonic()
        if self.failover is not None and self.active:
            self._check_not_frozen(now)
        read = self._feed_link(now)
        self._after(now)
        # Paced only while the reads keep up: a read that stopped at its budget, the queue
        # not empty, is followed by the next at once (a pause would only lose time).
        if self._flood.flooded(now) and self.drain.emptied:
            self._pause_link(FLOOD_READ_EVERY_S)
        elif not read and self.drain.pending:
            self._pause_link(None if self._commit_timer is not None else HELD_READ_EVERY_S)

    def _pause_link(self, for_s: float | None) -> None:
        """Stop reading the link socket: for ``for_s``, or until the grouped commit due.

        Under a flood, a read that emptied the queue is followed by the next
        ``FLOOD_READ_EVERY_S`` later: the flood queues a batch meanwhile, and a
        real datagram waits that long at most. Without a flood, the datagrams the
        journal holds keep the socket readable although every one of them was
        read: until they leave the queue, each turn of the event loop would read
        nothing, again and again (a few hundred times a second at 10 000 updates/s
        before a grouped commit; without end for a block waiting for its missing
        datagrams, or a standby). With a commit due the socket is read again at
        the commit (:meth:`_group`), at most :data:`COMMIT_EVERY_S` later;
        otherwise ``HELD_READ_EVERY_S`` later.
        """
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock)
        self._link_paused = True
        if for_s is not None:
            self._resume = loop.call_later(for_s, self._resume_link)

    def _cancel_resume(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None

    def _resume_link(self) -> None:
        self._cancel_resume()
        if self._link_paused:
            self._link_paused = False
            if self._reading:
                asyncio.get_running_loop().add_reader(self.sock, self._readable)

    def _feed_link(self, now: float) -> int:
        """Decode what the link socket holds, up to a budget; how many datagrams were read."""
        receive_all, active, flood = self.decoder.receive_all, self.active, self._flood

        def needed(datagrams: Sequence[bytes | memoryview]) -> list[bool]:
            taken = receive_all(datagrams, now)
            flood.rejected += taken.count(False)
            # What the active decoder rejected nobody needs again; a standby keeps all
            # that the active receiver's positions do not cover (it may read it again).
            return taken if active else [True] * len(taken)

        if self.openings:
            self._read_openings(now, needed)
        return self.drain.feed(DRAIN_BUDGET, now, needed, self._committed)

    def _read_openings(
        self, now: float, needed: Callable[[Sequence[bytes | memoryview]], list[bool]]
    ) -> None:
        """What the quarantines held when they were passed in, read before the link socket;
        once each is read to its end and committed, the quarantines are counters."""
        assert self.steering is not None
        for opening in self.openings:
            opening.feed(DRAIN_BUDGET, now, needed, self._committed)
        self.openings = [o for o in self.openings if not o.emptied or o.pending]
        if not self.openings:
            self.steering.opened()

    def _readable_files(self) -> None:
        """The file socket: tag datagrams waiting on the link socket first, then a few files'."""
        assert self.file_drain is not None
        now = time.monotonic()
        self._feed_link(now)
        receive = self.decoder.receive
        for datagram in self.file_drain.read(FILE_BUDGET, now):
            receive(datagram, now)
        self._after(now)

    def _read_sockets(self, loop: asyncio.AbstractEventLoop, *, read: bool) -> None:
        """Start (or stop) reading the link socket and the file socket."""
        self._cancel_resume()  # a paused link: watched again now, or never
        self._reading, self._link_paused = read, False
        readers = [(self.sock, self._readable)]
        if self.file_sock is not None:
            readers.append((self.file_sock, self._readable_files))
        for sock, callback in readers:
            if read:
                loop.add_reader(sock, callback)
            else:
                loop.remove_reader(sock)

    def _drains(self) -> list[Drain]:
        drains = [self.drain] if self.file_drain is None else [self.drain, self.file_drain]
        return [*drains, *self.openings]

    def _after(self, now: float) -> None:
        decoder = self.decoder
        events = decoder.events()
        if not self.active:
            # A standby's router only learns (the catalogue, the link): its gaps are not
            # losses, the active receiver's positions are the ones that count.
            events = [e for e in events if not isinstance(e, Gap)]
            if events:
                self.router.handle(events, now)
            decoder.positions()  # nothing of its own to save
            for drain in self._drains():
                drain.release(self._committed, now)
            self._steer(now)
            self._arm()
            return
        if events:
            self.files.handle(events, now)
            self.router.handle(events, now)
            # Log records reach the SOC spool before the positions that cover them commit.
            self.soc.handle(events, now)
        soon = self.drain.worth_committing
        if decoder.state_changed and (self._commit_timer is None or soon):
            wait = self._last_commit + COMMIT_EVERY_S - time.monotonic()
            # The journal deep enough that the drain would let uncommitted datagrams go, or
            # a flood's rejects piling up behind them (receiver/link.py): commit now.
            if wait <= 0 or soon:
                self._commit()
            else:
                self.output.hold()
                self._commit_timer = asyncio.get_running_loop().call_later(wait, self._group)
        # Only now may the datagrams those positions cover leave the kernel's queue.
        for drain in self._drains():
            drain.release(self._committed, now)
        self._steer(now)
        self._arm()

    def _steer(self, now: float) -> None:
        """The steering program follows the committed positions (rate-limited)."""
        if self.steering is not None:
            self.steering.update(self._committed, now)

    def _commit(self) -> None:
        """Commit the decoder's positions with every message handed over since the last one.

        The messages and the positions that cover them reach the disk in one
        transaction, before anything is published: a receiver killed at any
        moment loses nothing unreported and takes no replayed block twice.
        """
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        self._resume_link()
        if self.decoder.state_changed:
            self._committed = self.decoder.positions()
            self.output.commit(
                {POSITIONS: pack_states(self._committed), SOC_LANES: self.soc.lanes_state()}
            )
            self._last_commit = time.monotonic()

    def _group(self) -> None:
        self._commit_timer = None
        if self._link_paused:
            # What arrived while the link was not read joins this commit: read first.
            self._resume_link()
            self._readable()
            return
        self._commit()
        now = time.monotonic()
        for drain in self._drains():
            drain.release(self._committed, now)

    def _announce_file(self, stream_id: int, result: dict[str, object]) -> None:
        self.output.publish_file(self._stream_outputs[stream_id], dict(result))

    def _arm(self) -> None:
        """Set the timer for the decoder's next deadline.

        Skipped when no symbol has reached the decoder's tables since the last
        time and nothing was polled: the deadline cannot have moved. A flood of
        rejected datagrams then costs no deadline search a read (11 % of the
        receiver's CPU at 20 000 forged datagrams/s, docs/RELIABILITY.md).
        """
        mark = (self.decoder, self.decoder.counters["symbols"])
        if mark == self._armed:
            return
        self._armed = mark
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
        self._armed = None
        self._after(now)

    async def _supervise(self) -> None:
        last_status = 0.0
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            self.decoder.poll(now)
            self._armed = None
            self._after(now)
            self.router.tick(now)
            if self.active:  # a standby's view is not the SOC's: the active one reports
                self.soc.tick(
                    now,
                    decoder_counters=self._link_counters(),
                    links={sid: view.link_up for sid, view in self.router.streams.items()},
                    output_counters=self.output.counters,
                    commands={sid: node.commands_refused() for sid, node in self.sparkplug.items()},
                )
            self.files.tick(now)
            self.decoder.counters["kernel_drops"] = kernel_drops(self.sock)
            if self.steering is not None:
                if self.openings:
                    self._feed_link(now)  # quarantines passed in: read them to their end
                    self._after(now)
                self.steering.tally()
            if self.file_sock is not None:
                self._watch_file_drops(now)
            self.decoder.wall_offset_s = time.time() - now  # follows wall-clock steps
            self._watch_rejections(now)
            if now - last_status >= STATUS_PERIOD_S:
                self.router.publish_all_status(now)
                last_status = now

    def _watch_file_drops(self, now: float) -> None:
        """The file socket overflowed: the file lane is faster than this host drains, and
        only the transmitter's [file_lane] rate_mbps can fix that (nothing goes back)."""
        assert self.file_sock is not None
        drops, counters = kernel_drops(self.file_sock), self.decoder.counters
        new = drops - counters["file_kernel_drops"]
        counters["file_kernel_drops"] = drops
        if new > 0 and now - self._file_drops_logged_at >= FILE_DROPS_LOG_S:
            self._file_drops_logged_at = now
            log.warning(
                "file socket overflowed: file chunks lost",
                datagrams=new,
                total=drops,
                fix="lower [file_lane] rate_mbps on the transmitter (docs/OPERATIONS.md §10)",
            )

    def _link_counters(self) -> dict[str, int]:
        """The decoder's counters and the quarantines' (receiver-wide, never merged with
        the link socket's kernel_drops)."""
        counters = dict(self.decoder.counters)
        if self.steering is not None:
            counters.update(self.steering.counters())
        return counters

    def _watch_rejections(self, now: float) -> None:
        self.rejections.update(self._link_counters(), now)
        self.router.rejected = self.rejections.status()
        warning = self.rejections.warning(now)
        if warning is not None:
            log.warning("datagrams rejected", **warning)

    def counters(self) -> dict[str, int]:
        if self.active:
            out = dict(self._retired + self.decoder.counters)
        else:
            out = dict(self._retired)
            out.update({f"standby_{k}": v for k, v in self.decoder.counters.items()})
        for key, value in self.output.counters.items():
            out[f"mqtt_{key}"] = int(value)
        out.update(self.soc.counters)
        if self.failover is not None:
            out.update(self.failover.counters)
        for stream_id, node in self.sparkplug.items():
            for key, value in node.all_counters().items():
                out[f"sparkplug_{stream_id}_{key}"] = value
        out.update(self.files.counters)
        if self.steering is not None:
            out.update(self.steering.counters())
            out["link_steering_swaps"] = self.steering.order_swaps
        return out

    # -- a pair of receivers (receiver/failover.py) ----------------------------------------

    def _check_not_frozen(self, now: float) -> None:
        """An active receiver that has not run for takeover_after_s (frozen, a suspended VM)
        steps down before it reads anything: the standby has taken over by then, and would
        otherwise see everything this one held published a second time."""
        assert self.failover is not None
        stalled = now - self._tick
        if stalled > self.failover.takeover_after_s:
            self._step_down(f"step down: did not run for {stalled:.1f} s")
        self._tick = now

    def _apply_rule(self) -> None:
        assert self.failover is not None
        decision = self.failover.decide(time.monotonic(), active=self.active, since=self.since)
        if decision is not None and decision.startswith("take over"):
            self._take_over(decision)
        elif decision is not None:
            self._step_down(decision)

    async def _failover_loop(self, failover: Failover) -> None:
        announced = saved = 0.0
        failover.on_news = self._apply_rule
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            if self.active:
                self._check_not_frozen(now)
            self._tick = now
            self._apply_rule()
            if self.active:
                if now - announced >= ANNOUNCE_S:
                    self._announce()
                    announced = now
                continue
            # Standby: the active receiver's published positions are ours.
            positions = merged(self._committed, failover.positions())
            if positions != self._committed:
                self._committed = positions
                if now - saved >= ANNOUNCE_S:
                    self.output.commit({POSITIONS: pack_states(positions)})
                    saved = now

    def _announce(self) -> None:
        """The positions of the last commit, through the spool: after what they cover."""
        self.output.publish_message(
            announcement_topic(self.config.mqtt.status_topic),
            {
                "name": self.config.mqtt.client_id,
                "since": self.since,
                "positions": pack_positions(self._committed),
                "ts": time.time(),
            },
        )

    def _take_over(self, reason: str) -> None:
        """Publish from the last published positions on, reading the socket's queue again."""
        assert self.failover is not None
        base = merged(self._committed, self.failover.positions())
        shadow = self.router
        self.decoder = self._decoder(base)
        self.router = self._router(self._publisher, learned_from=shadow)
        for drain in self._drains():
            drain.counters = self.decoder.counters
            drain.hold_normally()
            drain.rewind()
        self.output.commit({POSITIONS: pack_states(base), ROLE: ACTIVE})
        self.active = True
        self.since = time.time()
        self.failover.claiming = self.since
        self.failover.counters["failover_takeovers"] += 1
        self.failover.counters["failover_active"] = 1
        log.warning(
            "failover: taking over",
            reason=reason,
            positions={sid: [p.epoch, p.next_seq] for sid, p in base.items()},
        )
        self._announce()

    def _step_down(self, reason: str) -> None:
        """Another receiver claimed later: stop publishing (the spool still drains)."""
        assert self.failover is not None
        self._commit()  # what this receiver published is covered before it stops
        self._retired.update(self.decoder.counters)
        learned = self.router
        self.decoder = self._decoder(dict(self._committed))
        self.router = self._router(NullOutput(), learned_from=learned)
        for drain in self._drains():
            drain.counters = self.decoder.counters
            drain.hold_longer(self.failover.takeover_after_s + 2.0)
        self.output.commit({ROLE: STANDBY})
        self.active = False
        self.failover.claiming = None
        self.failover.standby_since = time.monotonic()
        self.failover.counters["failover_stepdowns"] += 1
        self.failover.counters["failover_active"] = 0
        log.warning("failover: stepping down", reason=reason)

    def _decoder(self, state: dict[int, StreamState]) -> Decoder:
        """A decoder with this receiver's keys, settings, link profiles and wall clock."""
        decoder = Decoder(self._keyring, self._settings, state=state, profiles=self._profiles)
        decoder.wall_offset_s = time.time() - time.monotonic()
        return decoder

    def _router(self, output: Output, *, learned_from: Router | None = None) -> Router:
        """A router for ``output`` that knows the catalogue another one learned.

        Only the router that publishes keeps its state in the spool (and starts from
        what the spool kept): a standby's last values are what it saw, not what was
        published, and taken for published they would hide the active receiver's
        unpublished tail as repeats after a take-over.
        """
        router = Router(
            {s.id: s.output for s in self.config.streams},
            output,
            store=self.output if output is self._publisher else None,
            receiver_counters=self._link_counters,
        )
        if learned_from is not None:
            for sid, view in router.streams.items():
                view.catalogue.update(learned_from.streams[sid].catalogue)
        return router

    # -- reload (SIGHUP) -----------------------------------------------------------------

    def _warn_unprotected_streams(self) -> None:
        """Said once the receiver is up: a start that fails says one line, the reason."""
        for stream in self.config.streams:
            if stream.link is None and stream.psk_file is None:
                log.warning(
                    "stream has neither a link secret nor a link profile: forged datagrams "
                    "of any shape cost assembly memory and rebuilds",
                    stream=stream.id,
                    fix="set psk_file, or copy the transmitter's [link] into [streams.link]",
                )

    def _config_file(self) -> dict[str, str]:
        """Which file this receiver runs, and a digest of it: what a reload changed shows."""
        if self.config_path is None:
            return {}
        try:
            digest = hashlib.sha256(self.config_path.read_bytes()).hexdigest()[:16]
        except OSError:
            digest = "unreadable"
        return {"config": str(self.config_path), "config_sha256": digest}

    def reload(self, stop: asyncio.Event) -> None:
        """SIGHUP: check the config file; if it is good, hand the socket to a new process.

        A config that fails is logged and the running one kept. A good one stops this
        process as SIGTERM would (output flushed, positions committed) but keeps the
        link socket open; :func:`main` then executes the receiver again in this same
        process (same pid for systemd), passing the socket as LISTEN_FDS does. The
        kernel queues what arrives meanwhile, and nothing uncommitted left its queue.
        """
        if self.config_path is None:
            log.warning("reload asked, but no config file to read: ignored")
            return
        refused = None
        try:
            validated(self.config_path)
        except DiodeError as exc:
            refused = str(exc)
        if refused is not None:
            log.error(
                "config reload refused, the running config is kept",
                config=str(self.config_path),
                error=refused,
            )
            return
        log.info(
            "config reload: handing the link socket to a new process",
            pending=self.drain.pending,
        )
        daemon.sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        self.handover = True
        stop.set()

    # -- life cycle ------------------------------------------------------------------------

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
        address = self.sock.getsockname()
        log.info(
            "receiver starting",
            listen=f"{address[0]}:{address[1]}",
            interface=section.interface,
            socket="passed in" if self.passed_socket else "opened",
            steering=self.steering is not None and self.steering.enabled,
            streams=[s.id for s in self.config.streams],
            **self._config_file(),
        )
        self._warn_unprotected_streams()
        self.files.resume(time.monotonic())
        async with asyncio.TaskGroup() as group:
            supervise = group.create_task(self._supervise())
            tasks = [
                group.create_task(self.output.run()),
                supervise,
                group.create_task(daemon.watchdog()),
                group.create_task(self.soc.run()),
                *(group.create_task(node.run()) for node in self.sparkplug.values()),
            ]
            if self.failover is not None:
                tasks.append(group.create_task(self.failover.run()))
                watch = group.create_task(self._failover_loop(self.failover))
                tasks.append(watch)
            self._read_sockets(loop, read=True)
            daemon.sd_notify("READY=1")
            self.ready.set()
            await stop.wait()
            if not self.handover:
                daemon.sd_notify("STOPPING=1")
            # Nothing decodes or commits past this point, so nothing more leaves the
            # kernel's queue: what is uncommitted stays there for the next process.
            if self._link_paused:
                self._readable()  # what came while the link was not read joins the commit
            self._read_sockets(loop, read=False)  # and no pause outlives the receiver
            self._commit()  # a grouped commit still due
            await self.files.wait_idle()
            self.files.close()
            self.router.save(time.monotonic())  # the last values, with the final commit
            supervise.cancel()
            if self.failover is not None:
                watch.cancel()
            if self._timer is not None:
                self._timer.cancel()
            for node in self.sparkplug.values():
                await node.close()  # NDEATH: the edge node leaves the broker
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.output.close(), 5)
            for task in tasks:
                task.cancel()
        self.soc.close()
        if self.metrics is not None:
            self.metrics.close()
        self._close_sockets()
        log.info("receiver stopped", handover=self.handover, **self.counters())

    def _close_sockets(self) -> None:
        """Close the sockets, but for those a reload hands to the next process."""
        if not self.handover:
            self.sock.close()
            if self.steering is not None:
                self.steering.close()
        if self.file_sock is not None:
            self.file_sock.close()


def reexec(socks: Sequence[socket.socket]) -> None:
    """Execute this receiver again in this process, the link socket passed as fd 3 (and
    its quarantines as fds 4 and 5).

    ``sys.orig_argv`` is the interpreter's own command line, so the same program
    starts with the same arguments; the pid stays, so systemd sees no new process.
    Returns only if the exec failed.
    """
    fds = [sock.detach() for sock in socks]
    # Out of the way first, above the fds they must become: fd 4 may be the one that
    # must become fd 3, or fd 3 free (a plain dup could land there and be closed below).
    above = SD_LISTEN_FDS_START + len(fds)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, above) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(moved):
        os.dup2(fd, SD_LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
    env = dict(os.environ, LISTEN_FDS=str(len(socks)), LISTEN_PID=str(os.getpid()))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # kept across exec until the new loop runs
    failed = ""
    try:
        # The interpreter's own command line, run again: no shell, nothing user-supplied.
        os.execve(sys.executable, sys.orig_argv, env)  # noqa: S606
    except OSError as exc:
        failed = str(exc)
    log.error("re-executing the receiver failed", error=failed, argv=sys.orig_argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diode-rx", description="the receiver (IT side)")
    parser.add_argument("--config", type=Path, default=Path("/etc/diode/rx.toml"))
    args = parser.parse_args(argv)
    # Until the event loop takes SIGHUP over, a reload must not kill the receiver.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = daemon.load_config(RxConfig, args.config)
    daemon.setup_logging(config.log.level, config.log.format)
    handover: list[socket.socket] = []

    async def _main(stop: asyncio.Event) -> None:
        startup.check_rx(config, create=True)
        receiver = Receiver(config, config_path=args.config)
        daemon.freeze_heap()
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, receiver.reload, stop)
        await receiver.run(stop)
        if receiver.handover:
            handover.append(receiver.sock)
            if receiver.steering is not None:
                handover.extend(receiver.steering.quarantines.values())

    code = daemon.run(_main, args.config)
    if handover:
        reexec(handover)
        return 1
    return code

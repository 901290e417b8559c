"""The receiver's end of the link: the socket, and a drain that loses nothing across a restart.

Where the socket comes from, in order:

1. **Passed in** by systemd (``diode-rx.socket``), by ``systemd-socket-activate``,
   or by this receiver re-executing itself on SIGHUP: the ``LISTEN_FDS`` protocol
   of sd_listen_fds(3): ``LISTEN_PID`` is our pid, ``LISTEN_FDS`` = 1, the socket
   is file descriptor 3; or ``LISTEN_FDS`` = 3, the link socket and the
   quarantines of late copies and of replays (fds 4 and 5), which share the port
   (receiver/steer.py); 2, the link socket and the replays' quarantine. The socket then outlives the
   process: while the receiver restarts, the kernel keeps queuing datagrams in it.
2. **Opened here** from ``[receiver] listen`` and ``port`` when nothing was passed
   (started by hand, or a unit without the socket), with the quarantines beside it
   unless ``[receiver] steer_replays = false`` (receiver/steer.py).

A socket that outlives the process is only worth something if the process
never takes a datagram out of the kernel's queue before what it carries is
safe on disk. So the drain *peeks* (``SO_PEEK_OFF``: each ``MSG_PEEK`` read
walks one datagram further down the queue) and takes datagrams off the head
of the queue only once they are **covered**: their block is below the stream
position the receiver last committed to its spool (with the messages it
produced, in one transaction), or they can never be (garbage, an unknown
stream). The kernel queue is the journal::

    kernel queue:  [covered | covered | block 41 (held) | block 42 | ...]
                     released after each commit ^ stops here until 41 is committed

A receiver killed at any moment (SIGKILL included) leaves every datagram whose
records are not yet in its spool in the queue; the next process reads them
again from the head. Blocks already committed that it meets again are
counted as ``rejected_late`` by the decoder and dropped.

Nothing can pin the queue: a datagram that stays uncovered for ``HOLD_S``
(a block lost beyond the FEC budget the decoder has not given up yet), or
once the datagrams kept pass an eighth of the receive buffer or half of
``MAX_HELD`` after a commit, is released anyway and counted (``link_released_uncommitted``):
a crash at that moment can lose that much, never the receiver's liveness.
What the active receiver's decoder rejected (a forgery, a replay, garbage)
is never kept: it leaves the queue as soon as its batch is judged, when
nothing is held ahead of it (a standby keeps what the active one has not
covered); held behind an uncommitted datagram, it makes the receiver commit
without waiting for the group's time (``Drain.worth_committing``).

The price: each datagram passes the kernel twice, once peeked and once taken
off the queue. Where the C library has recvmmsg(2) (Linux), both are batched:
one call peeks up to 64 datagrams, one call takes the leading run nobody
needs off the head (receiver/recvmmsg.py); elsewhere one ``recv`` each, 2.0
against 1.2 us for a plain ``recv`` at the head of the queue. Batching saves
the Python around the calls, not the kernel's work: the drain and the decoder
together cost 2.3-2.7 us per cheap forgery (garbage, tiny), 5.9 us per one
that must pay the link tag (``python -m tests.faults.forgeries --drain``,
2026-12-06 23:17 UTC, load 1.1; 3.7-5.6 and 7.0 us one recv a datagram). And
each peek walks the queue from its head to the peek offset, about 10 ns per
datagram held ahead (1 000 deep: 9 us a peek): forgeries held like real
datagrams once made a flood cost 120-150 us per datagram in the drain; now
what is held is the real stream's unfinished blocks and what arrived behind
them until the next commit (docs/RELIABILITY.md, "Floods of forged datagrams").
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path

import structlog

from diode import startup
from diode.errors import LinkError
from diode.replay import StreamState
from receiver.recvmmsg import batch_reader

log = structlog.get_logger("diode.rx")

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not exported by Python 3.11
SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)  # Linux
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)  # Linux
IFNAMSIZ = 16
SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed sockets start at fd 3
MAX_DATAGRAM = 65535
# Longest a datagram stays in the queue uncovered (see the module docstring).
HOLD_S = 2.0
# Most datagrams the active receiver peeks ahead before it commits: each peek walks
# the queue from its head, so a deeper journal makes every datagram dearer (see
# Drain.feed). After a commit, what is still uncovered beyond half of it is released.
# 128, not 512: at the 1000 Mb/s cap the walk cost a receiver that kept up 565-581 us a
# block at 0.96 core (and 1 run in 3 fell behind for good); at 128, 531 us at 0.89 core.
# The price is the journal's reach at line rate: there about half the datagrams leave
# the queue before their block is committed (17 % at 512; none at the tag rates), so a
# receiver killed at that rate loses the blocks then in progress, reported as a gap
# (docs/BENCHMARKS.md and docs/OPERATIONS.md, fourth session).
MAX_HELD = 128
# Rejected datagrams held behind an uncommitted one past which a commit is worth making at
# once rather than at the group's time: under a flood they pile up at the flood's rate,
# and every peek walks them (see Drain.worth_committing).
REJECTED_HELD = 64
# Where a datagram names its block: stream id at 4, epoch at 16, sequence at 24
# (diode/wire.py, the datagram header); nothing else is read here.
_WHERE = struct.Struct(">4xI8xQQ")
_GARBAGE = (-1, 0, 0)
# A datagram in the journal: stream, epoch, sequence, what it costs the buffer, when peeked.
_Held = tuple[int, int, int, int, float]


def _where(datagram: bytes | memoryview) -> tuple[int, int, int]:
    """The block a datagram names (stream, epoch, sequence), or _GARBAGE if it is too short."""
    return _WHERE.unpack_from(datagram) if len(datagram) >= _WHERE.size else _GARBAGE


# --- the socket -------------------------------------------------------------------------


def size_receive_buffer(sock: socket.socket, wanted: int, *, force: bool = True) -> int:
    """Ask for ``wanted`` bytes of receive buffer, read back what was granted, warn if capped.

    A buffer already at least ``wanted`` (one systemd set with ReceiveBuffer=) is
    left alone: asking again without privileges could only shrink it to rmem_max.
    """
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux reports double
    if granted >= wanted:
        return granted
    forced = False
    if force:
        # Root (CAP_NET_ADMIN) may go past net.core.rmem_max; others get an EPERM.
        with contextlib.suppress(PermissionError):
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, wanted)
            forced = True
    if not forced and min(wanted, _rmem_max()) > granted:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    if granted < wanted:
        log.warning(
            "receive buffer capped by the kernel",
            asked=wanted,
            granted=granted,
            fix=f"sysctl -w net.core.rmem_max={wanted} (systemd/99-diode-rx.conf), "
            "or ReceiveBuffer= in diode-rx.socket",
        )
    return granted


def _rmem_max() -> int:
    try:
        return int(Path("/proc/sys/net/core/rmem_max").read_text())
    except (OSError, ValueError):
        return 2**31 - 1


def open_link_socket(
    listen: str,
    port: int,
    rcvbuf: int,
    interface: str | None = None,
    *,
    port_key: str = "receiver.port",
    reuse_port: bool = False,
) -> socket.socket:
    """Bind the link socket with the receive buffer asked for (read back, warned if capped).

    With ``interface`` the socket takes datagrams arriving on that interface only
    (SO_BINDTODEVICE): a host on the IT side that can route to ``listen`` still
    cannot reach the port. With ``reuse_port`` it may share the port with the
    quarantine (receiver/steer.py). A failure names the setting to change (SettingError).
    """
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        size_receive_buffer(sock, rcvbuf)
        if interface is not None:
            startup.bind_to_device(sock, interface, "receiver.interface")
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((listen, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise startup.bind_error(
            exc, address_key="receiver.listen", port_key=port_key, address=listen, port=port
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


def passed_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The sockets passed by the LISTEN_FDS protocol: [] if none was passed to us, else
    the link socket, then its quarantines if there are more (receiver/steer.py).

    The variables are removed from the environment (as sd_listen_fds(1) does), so
    that nothing this process starts believes the sockets are its own.
    """
    env = os.environ if environ is None else environ
    pid, count = env.pop("LISTEN_PID", None), env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []  # meant for another process (a parent that did not clean up)
        n = int(count)
    except ValueError as exc:
        raise LinkError(f"LISTEN_PID={pid} LISTEN_FDS={count}: not numbers") from exc
    if n not in (1, 2, 3):
        raise LinkError(
            f"LISTEN_FDS={n}: the receiver takes one socket (the link), or three (the "
            "link, then the quarantines of late copies and of replays), or two (the "
            "link and the replays' quarantine)"
        )
    return [_passed_udp(SD_LISTEN_FDS_START + i) for i in range(n)]


def _passed_udp(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise LinkError(f"LISTEN_FDS names fd {fd}, which is no socket: {exc}") from exc
    if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        kind = f"{sock.family.name}/{sock.type.name}"
        sock.detach()
        raise LinkError(
            f"the socket passed in is {kind}; the link needs UDP "
            "(ListenDatagram= in diode-rx.socket)"
        )
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def adopt_passed(
    sock: socket.socket, listen: str, port: int, rcvbuf: int, interface: str | None = None
) -> socket.socket:
    """The link socket passed in: its buffer checked, address and interface compared
    with the config (a difference is warned about, the socket used)."""
    size_receive_buffer(sock, rcvbuf)
    bound = sock.getsockname()
    device = sock.getsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, IFNAMSIZ).rstrip(b"\0").decode()
    if (bound[0], bound[1], device or None) != (listen, port, interface):
        log.warning(
            "the link socket passed in is not the one the config describes; using it",
            bound=f"{bound[0]}:{bound[1]}",
            device=device or None,
            config=f"{listen}:{port}",
            interface=interface,
            fix="the same address, port and interface in diode-rx.socket and [receiver]",
        )
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


# --- the drain ----------------------------------------------------------------------------


# A flood: more datagrams rejected a second than this, over windows of FLOOD_WINDOW_S. No
# real stream comes near it (a 10 MB/s stream with time diversity: about 7 000 late
# repeats a second), and the floods start there (issue 13: 20 000 a second).
FLOOD_REJECTS_PER_S = 20_000
FLOOD_WINDOW_S = 0.1


class FloodMeter:
    """Tells a flood of rejected datagrams from the real stream's odd late copy."""

    def __init__(self) -> None:
        self.rejected = 0  # what the decoder rejected since the window began (the caller adds)
        self._began = float("-inf")
        self._flooded = False

    def flooded(self, now: float) -> bool:
        """Was the last whole window a flood? Judged again once a window has passed."""
        elapsed = now - self._began
        if elapsed >= FLOOD_WINDOW_S:
            self._flooded = self.rejected > FLOOD_REJECTS_PER_S * elapsed
            self.rejected = 0
            self._began = now
        return self._flooded


# The receive buffer a queued datagram costs beyond its payload (its skb; about 768 bytes
# on x86-64 for a small datagram, rounded up): held datagrams are counted at that price, so
# a flood of tiny forged datagrams cannot fill the socket's queue while they are held.
SKB_OVERHEAD = 1024


class Drain:
    """Reads the link socket; with ``journal``, leaves uncommitted datagrams in the kernel.

    ``read`` hands out the next datagrams (peeked when journaling); ``release``
    takes off the head of the queue every datagram the committed ``positions``
    cover. Without ``journal`` it is a plain recv loop and ``release`` does nothing.
    """

    def __init__(
        self,
        sock: socket.socket,
        streams: set[int],
        *,
        journal: bool,
        counters: MutableMapping[str, int],
    ) -> None:
        self.sock = sock
        self.journal = journal
        self._streams = streams
        self.counters = counters
        self.hold_s = HOLD_S
        self._pending: deque[_Held] = deque()
        self._pending_bytes = 0
        self._rejected = 0  # held datagrams nobody needs (behind one that is needed)
        self._sink = bytearray(1)
        # Batched reads where the C library has recvmmsg (Linux); one recv a datagram elsewhere.
        self._batch = batch_reader(sock)
        self._buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.limit = self._buffer // 8
        self.depth = MAX_HELD
        self.emptied = False  # the last feed read the queue to its end
        if journal:
            # The offset belongs to the socket, not the process: a predecessor's is stale.
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)

    @property
    def pending(self) -> int:
        """Datagrams read but still in the kernel's queue."""
        return len(self._pending)

    @property
    def worth_committing(self) -> bool:
        """Would a commit now free much of the queue? The journal is past half its depth,
        or rejected datagrams (a flood's) pile up behind an uncommitted one: each peek
        walks them, so waiting for the group's commit time makes every datagram dearer."""
        return len(self._pending) > self.depth // 2 or self._rejected > REJECTED_HELD

    def read(self, budget: int, now: float) -> list[bytes]:
        """Up to ``budget`` datagrams, as many as are there, all kept in the journal until
        :meth:`release` (a reader that judges nothing itself: the tests, the bench)."""
        out: list[bytes] = []
        while len(out) < budget:
            most = budget - len(out)
            datagrams = self._take(most)
            out += datagrams
            if self.journal:
                for datagram in datagrams:
                    self._keep(datagram, now)
            if self._emptied(datagrams, most):
                break
        return out

    def feed(
        self,
        budget: int,
        now: float,
        judge: Callable[[Sequence[bytes | memoryview]], list[bool]],
        positions: Mapping[int, StreamState],
    ) -> int:
        """Hand up to ``budget`` datagrams to ``judge``, a batch at a time; how many were read.

        ``judge`` says of each datagram of a batch whether the journal must keep it (False:
        the decoder rejected it, nothing will ever need it). It is handed views of the batch
        reader's buffer where there is one, good until it returns: what it keeps it copies
        (the decoder copies what passes its gate). The datagrams are peeked a batch at a
        time (one recvmmsg); the leading run of a batch that nobody needs, or that the
        committed ``positions`` already cover, leaves the queue at once when nothing is
        held ahead of it (one recvmmsg more). Under a flood the queue then stays short,
        and a peek stays cheap: the kernel walks the queue from its head to the peek
        offset on every peek, about 10 ns a datagram (a peek 1 000 datagrams deep costs
        9 us, at the head 1.2 us; docs/RELIABILITY.md, "Floods of forged datagrams").
        """
        pending, journal, count = self._pending, self.journal, 0
        self.emptied = False
        while count < budget:
            # Never peek past what the journal may hold: the caller commits first.
            most = budget - count if not journal else min(budget - count, self.depth - len(pending))
            if most <= 0:
                return count
            datagrams = self._take_views(most)
            if not datagrams:
                self.emptied = True
                return count
            count += len(datagrams)
            if journal:
                self._journal(datagrams, judge(datagrams), now, positions)
            else:
                judge(datagrams)
            if len(pending) >= self.depth:
                # Deep enough: the caller commits what was read (and releases it)
                # before this peeks further. Nothing uncommitted leaves the queue here.
                return count
            if self._emptied(datagrams, most):
                # The queue was empty: the event loop wakes us when more comes.
                self.emptied = True
                return count
        return count

    def _journal(
        self,
        datagrams: Sequence[bytes | memoryview],
        needed: list[bool],
        now: float,
        positions: Mapping[int, StreamState],
    ) -> None:
        """Journal what must stay of a judged batch, and take the leading run nobody needs
        off the head of the queue in one call."""
        pending = self._pending
        if not pending and not any(needed):
            # At the head of the queue, and nobody wants any of it: what a flood of
            # forgeries or replays pays, besides the peek and the decoder.
            self._discard(len(datagrams))
            return
        # The leading run nobody needs (nothing held ahead of it) leaves the queue; from
        # the first datagram kept on, every one is journaled, in the queue's order.
        run = 0
        if not pending:
            releasable = self._releasable
            for datagram, wanted in zip(datagrams, needed, strict=True):
                if wanted and not releasable(_where(datagram), positions):
                    break
                run += 1
        if run < len(datagrams):
            self._keep_all(datagrams[run:], needed[run:], now)
        if run:
            self._discard(run)

    def _keep_all(
        self, datagrams: Sequence[bytes | memoryview], needed: list[bool], now: float
    ) -> None:
        """:meth:`_keep` for each datagram of a run, in one loop (the journal's cost per
        datagram at line rate: 80 000 a second)."""
        keep, unpack, size = self._pending.append, _WHERE.unpack_from, _WHERE.size
        charged_all = rejected = 0
        for datagram, wanted in zip(datagrams, needed, strict=True):
            length = len(datagram)
            # What the kernel charges the buffer for it (see _keep).
            charged = length + SKB_OVERHEAD
            charged_all += charged
            if wanted and length >= size:
                keep((*unpack(datagram), charged, now))
            else:
                rejected += not wanted
                keep((*_GARBAGE, charged, now))
        self._pending_bytes += charged_all
        self._rejected += rejected

    def _emptied(self, datagrams: Sequence[bytes | memoryview], most: int) -> bool:
        """Did the last batch find the queue empty (fewer than asked for)? Then asking
        again now is a system call for nothing (about 2 us here, each wake-up)."""
        return not datagrams or (
            self._batch is not None and len(datagrams) < min(most, self._batch.count)
        )

    def release(self, positions: Mapping[int, StreamState], now: float) -> int:
        """Take covered datagrams off the head of the queue; how many were taken."""
        pending = self._pending
        if not pending:
            return 0
        left, left_bytes, released, garbage = len(pending), self._pending_bytes, 0, 0
        streams = self._streams
        for held in pending:
            stream = held[0]
            if stream in streams:
                # Inline _releasable (one call less per datagram, 80 000 a second at line rate).
                position = positions.get(stream)
                if (
                    position is None
                    or held[1] > position.epoch
                    or (held[1] == position.epoch and held[2] >= position.next_seq)
                ):
                    if not self._over(now, held[4], left, left_bytes):
                        break
                    self.counters["link_released_uncommitted"] += 1
            elif stream == _GARBAGE[0]:
                garbage += 1
            released += 1
            left -= 1
            left_bytes -= held[3]
        if not released or not self._discard(released):
            return 0
        if left:
            for _ in range(released):
                pending.popleft()
        else:
            pending.clear()
        self._pending_bytes = left_bytes
        # max: read() keeps short datagrams as garbage too, never counted as rejected.
        self._rejected = max(self._rejected - garbage, 0)
        return released

    def _take(self, most: int) -> list[bytes]:
        """Up to ``most`` next datagrams (peeked when journaling); [] when the queue is empty."""
        if self._batch is None:
            datagram = self._next()
            return [] if datagram is None else [datagram]
        try:
            return self._batch.read(most, peek=self.journal)
        except OSError:
            self.counters["socket_errors"] += 1
            return []

    def _take_views(self, most: int) -> Sequence[bytes | memoryview]:
        """:meth:`_take` without the copies where a batch reader reads: views of its
        buffer, good until the next read."""
        if self._batch is None:
            return self._take(most)
        try:
            return self._batch.views(most, peek=self.journal)
        except OSError:
            self.counters["socket_errors"] += 1
            return []

    def _next(self) -> bytes | None:
        """The next datagram (peeked when journaling), or None when the queue is empty."""
        try:
            return self.sock.recv(MAX_DATAGRAM, socket.MSG_PEEK if self.journal else 0)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self.counters["socket_errors"] += 1
            return None

    def _discard(self, count: int) -> bool:
        """Take ``count`` datagrams off the head of the queue unread (the journal's oldest
        are the queue's head). False, and the journal read afresh, when the queue held
        fewer: a second reader of a shared socket took them."""
        batch = self._batch
        while count:
            if batch is None:
                try:
                    taken = self.sock.recv_into(self._sink, 1, socket.MSG_TRUNC) and 1
                except (BlockingIOError, InterruptedError):
                    taken = 0
            else:
                try:
                    taken = batch.discard(count)
                except OSError:
                    taken = 0
            if not taken:
                self._reset()
                return False
            count -= taken
        return True

    def _keep(
        self, datagram: bytes | memoryview, now: float, where: tuple[int, int, int] | None = None
    ) -> None:
        """Journal a peeked datagram: the block it names, what it costs the buffer, when."""
        if where is None:
            where = _where(datagram)
        # What the kernel charges the buffer for it, not its length: a small
        # datagram's skb costs about a kilobyte of the receive buffer.
        charged = len(datagram) + SKB_OVERHEAD
        self._pending.append((*where, charged, now))
        self._pending_bytes += charged

    def _releasable(
        self, held: tuple[int, int, int] | _Held, positions: Mapping[int, StreamState]
    ) -> bool:
        """Nothing needs it: garbage, another stream, or a block the positions cover."""
        stream, epoch, seq = held[0], held[1], held[2]
        if stream not in self._streams:
            return True
        position = positions.get(stream)
        return position is not None and (
            epoch < position.epoch or (epoch == position.epoch and seq < position.next_seq)
        )

    def _over(self, now: float, at: float, held: int, held_bytes: int) -> bool:
        """Must the head go uncovered? Held too long, or the journal is past its limits."""
        return at <= now - self.hold_s or held_bytes > self.limit or held > self.depth // 2

    def hold_longer(self, hold_s: float) -> None:
        """A standby's drain: it keeps datagrams until the active receiver's positions cover
        them, which can take the whole hand-over time, in up to a quarter of the buffer."""
        self.hold_s = hold_s
        self.limit = self._buffer // 4
        self.depth = self._buffer  # no count limit: the active receiver's positions decide

    def hold_normally(self) -> None:
        self.hold_s = HOLD_S
        self.limit = self._buffer // 8
        self.depth = MAX_HELD

    def rewind(self) -> None:
        """Read again from the head of the queue (a standby taking over)."""
        if self.journal:
            self._reset()

    def _reset(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0
        self._rejected = 0
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)

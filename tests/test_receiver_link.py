"""The receiver's end of the link: buffer sizing, kernel drops, the socket systemd passes,
and the drain that leaves every uncommitted datagram in the kernel's queue."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import shutil
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from diode.config import validate
from diode.config.rx import RxConfig
from diode.errors import LinkError
from diode.keys import write_keypair, write_psk
from diode.loopback import free_port
from diode.replay import StreamState
from diode.wire import DatagramHeader, pack_datagram
from receiver.app import DRAIN_BUDGET, FLOOD_READ_EVERY_S, Receiver
from receiver.link import (
    FLOOD_REJECTS_PER_S,
    FLOOD_WINDOW_S,
    HOLD_S,
    REJECTED_HELD,
    SO_RCVBUFFORCE,
    Drain,
    FloodMeter,
    kernel_drops,
    open_link_socket,
    passed_sockets,
    size_receive_buffer,
)
from tests.core_support import delivered, encode_blocks, new_decoder, samples
from tests.faults.forgeries import Target, k1

ROOT = Path(__file__).resolve().parent.parent


def test_a_capped_buffer_is_read_back_and_the_sysctl_named() -> None:
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, capture_logs() as logs:
        granted = size_receive_buffer(sock, rmem_max * 4, force=False)
    assert granted < rmem_max * 4
    (warning,) = [e for e in logs if e["event"] == "receive buffer capped by the kernel"]
    assert warning["granted"] == granted
    assert "net.core.rmem_max" in warning["fix"]


def test_as_root_the_buffer_asked_for_is_granted() -> None:
    sock = open_link_socket("127.0.0.1", 0, 8 * 1024 * 1024)
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 >= 8 * 1024 * 1024


def test_kernel_drops_are_counted_when_the_queue_overflows() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sink.bind(("127.0.0.1", 0))
        assert kernel_drops(sink) == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as source:
            for _ in range(200):
                source.sendto(b"x" * 1400, sink.getsockname())
        assert kernel_drops(sink) > 0


# --- the socket passed in (LISTEN_FDS) --------------------------------------------------

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate is not installed (apt-get install systemd)"
)
SHOW_PASSED = (
    "from receiver.link import passed_sockets\n"
    "import os, socket\n"
    "(s,) = passed_sockets()\n"
    "print(s.getsockname()[1], s.type == socket.SOCK_DGRAM, 'LISTEN_FDS' in os.environ)\n"
    "print(s.recv(100))\n"
)


def _activated(code: str, *, datagram: bool = True) -> tuple[int, str, str, int]:
    """Run ``python -c code`` under systemd-socket-activate, woken by one datagram."""
    assert ACTIVATE is not None
    kind = socket.SOCK_DGRAM if datagram else socket.SOCK_STREAM
    port = free_port(kind)
    argv = [ACTIVATE, *(["--datagram"] if datagram else []), "-l", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [*argv, sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        listening = proc.stderr.readline()  # "Listening on 127.0.0.1:PORT as 3."
        assert "Listening on" in listening, listening
        if datagram:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"wake", ("127.0.0.1", port))
        else:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err, port


@needs_activate
def test_the_socket_systemd_passes_is_adopted_and_keeps_what_was_queued() -> None:
    code, out, err, port = _activated(SHOW_PASSED)
    assert code == 0, err
    first, second = out.splitlines()
    # The port systemd bound, a datagram socket, the variables gone from the environment.
    assert first == f"{port} True False"
    assert second == "b'wake'"  # the datagram that woke it waited in the queue


@needs_activate
def test_a_stream_socket_passed_in_is_refused_with_the_setting_named() -> None:
    code, _, err, _ = _activated(SHOW_PASSED, datagram=False)
    assert code != 0
    assert "ListenDatagram=" in err


def test_listen_fds_for_another_process_or_too_many_sockets() -> None:
    assert passed_sockets({"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}) == []
    assert passed_sockets({}) == []
    with pytest.raises(LinkError, match="one socket \\(the link\\), or three"):
        passed_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "4"})
    with pytest.raises(LinkError, match="not numbers"):
        passed_sockets({"LISTEN_PID": "x", "LISTEN_FDS": "1"})


def test_a_buffer_set_larger_by_systemd_is_not_shrunk() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 * 1024 * 1024)  # as root
        assert size_receive_buffer(sock, 1024 * 1024, force=False) >= 16 * 1024 * 1024
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 >= 16 * 1024 * 1024


# --- the drain: the kernel queue as the journal -------------------------------------------

STREAM = 7


def _datagram(seq: int, *, stream: int = STREAM, epoch: int = 5, index: int = 0) -> bytes:
    header = DatagramHeader(
        flags=0,
        stream_id=stream,
        key_id=b"k" * 8,
        epoch=epoch,
        seq=seq,
        index=index,
        k=2,
        n=3,
        block_length=100,
        records=1,
    )
    return pack_datagram(header, b"s" * 64)


@pytest.fixture(params=["recvmmsg", "recv"])
def read_way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every drain test twice: batched reads, and one recv a datagram (where the C library
    has no recvmmsg) -- the journal's guarantees must not depend on which."""
    if request.param == "recv":
        monkeypatch.setattr("receiver.link.batch_reader", lambda _sock: None)
    return str(request.param)


@pytest.fixture
def link(read_way: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    sink = open_link_socket("127.0.0.1", 0, 1024 * 1024)
    source = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    source.connect(sink.getsockname())
    yield sink, source
    sink.close()
    source.close()


def _queued(sink: socket.socket) -> list[bytes]:
    """Everything still in the kernel's queue, read by a fresh reader (a new process)."""
    reader = Drain(socket.socket(fileno=os.dup(sink.fileno())), {STREAM}, journal=True,
                   counters=Counter())  # fmt: skip
    try:
        return reader.read(1000, 0.0)
    finally:
        reader.sock.close()


def test_nothing_uncommitted_leaves_the_kernel_queue(
    link: tuple[socket.socket, socket.socket],
) -> None:
    sink, source = link
    sent = [_datagram(seq, index=i) for seq in range(4) for i in range(2)]
    for d in sent:
        source.send(d)
    drain = Drain(sink, {STREAM}, journal=True, counters=Counter())
    assert drain.read(100, 0.0) == sent
    # Nothing committed yet: a process killed now leaves all of it queued.
    assert drain.release({}, 0.1) == 0
    assert _queued(sink) == sent
    # Blocks 0 and 1 committed: their datagrams leave, blocks 2 and 3 stay.
    assert drain.release({STREAM: StreamState(epoch=5, next_seq=2, next_record=2)}, 0.2) == 4
    assert _queued(sink) == sent[4:]
    assert drain.pending == 4
    # The reader's own peek offset is still right: new datagrams come next, not old ones.
    source.send(_datagram(4))
    assert drain.read(100, 0.3) == [_datagram(4)]


def test_garbage_other_streams_and_older_epochs_never_wait(
    link: tuple[socket.socket, socket.socket],
) -> None:
    sink, source = link
    for d in (b"x", _datagram(0, stream=99), _datagram(9, epoch=4), _datagram(0)):
        source.send(d)
    drain = Drain(sink, {STREAM}, journal=True, counters=Counter())
    assert len(drain.read(100, 0.0)) == 4
    assert drain.release({STREAM: StreamState(epoch=5, next_seq=0, next_record=0)}, 0.0) == 3
    assert _queued(sink) == [_datagram(0)]


def test_a_datagram_nothing_will_cover_cannot_pin_the_queue(
    link: tuple[socket.socket, socket.socket],
) -> None:
    sink, source = link
    forged, real = _datagram(10**9), _datagram(0)
    source.send(forged)
    source.send(real)
    counters: Counter[str] = Counter()
    drain = Drain(sink, {STREAM}, journal=True, counters=counters)
    drain.read(100, 100.0)
    covered = {STREAM: StreamState(epoch=5, next_seq=1, next_record=1)}
    assert drain.release(covered, 100.0 + HOLD_S / 2) == 0  # the forgery heads the queue
    assert drain.release(covered, 100.0 + HOLD_S + 0.01) == 2
    assert counters["link_released_uncommitted"] == 1
    assert _queued(sink) == []


def test_held_datagrams_are_charged_what_the_kernel_charges_not_their_length(
    link: tuple[socket.socket, socket.socket],
) -> None:
    """Tiny forged datagrams each cost the receive buffer about a kilobyte: held at their
    length, a flood of them filled the socket's queue before the limit released any, and
    the real stream was dropped by the kernel (the short no-secret flood, after the merge
    of the journal)."""
    sink, source = link
    drain = Drain(sink, {STREAM}, journal=True, counters=Counter())
    tiny = [_datagram(10**9 + i)[:49] for i in range(drain.limit // 1024 + 8)]
    for d in tiny:
        source.send(d)
    assert len(drain.read(len(tiny), 0.0)) == len(tiny)
    # Nothing covers them and nothing is overdue; only the limit can release them, and does.
    assert drain.release({}, 0.0) > 0


def test_only_the_leading_run_nobody_needs_leaves_the_queue(
    link: tuple[socket.socket, socket.socket],
) -> None:
    """A batch is peeked at once, then what heads it unneeded (rejected, or covered) is
    taken off in one call; from the first datagram kept on, everything stays queued, the
    rejected ones too, until the head before them is committed."""
    sink, source = link
    covered = {STREAM: StreamState(epoch=5, next_seq=2, next_record=2)}
    sent = [b"forged", _datagram(0), b"forged 2", _datagram(7), b"forged 3", _datagram(8)]
    for d in sent:
        source.send(d)
    drain = Drain(sink, {STREAM}, journal=True, counters=Counter())
    seen: list[bytes] = []

    def judge(datagrams: Sequence[bytes | memoryview]) -> list[bool]:
        seen.extend(bytes(datagram) for datagram in datagrams)  # views: good until it returns
        return [not bytes(datagram).startswith(b"forged") for datagram in datagrams]

    assert drain.feed(100, 0.0, judge, covered) == len(sent)
    assert seen == sent
    # forged, block 0 (covered), forged 2: off; block 7 heads the queue with the rest.
    assert _queued(sink) == sent[3:]
    assert drain.pending == 3
    assert drain.release({STREAM: StreamState(epoch=5, next_seq=8, next_record=8)}, 0.1) == 2
    assert _queued(sink) == sent[5:]


def test_rejects_piling_up_behind_a_held_datagram_ask_for_a_commit(
    link: tuple[socket.socket, socket.socket],
) -> None:
    """Under a flood, every forgery read after a real datagram waits in the queue until
    that one is committed, and every peek walks them: past REJECTED_HELD of them the
    receiver commits at once instead of at the group's time."""
    sink, source = link
    source.send(_datagram(0))
    for i in range(REJECTED_HELD + 1):
        source.send(b"forged %d" % i)
    drain = Drain(sink, {STREAM}, journal=True, counters=Counter())

    def judge(datagrams: Sequence[bytes | memoryview]) -> list[bool]:
        return [not bytes(datagram).startswith(b"forged") for datagram in datagrams]

    drain.feed(REJECTED_HELD, 0.0, judge, {})
    assert drain.pending == REJECTED_HELD
    assert not drain.worth_committing
    drain.feed(100, 0.0, judge, {})
    assert drain.worth_committing
    assert drain.release({STREAM: StreamState(epoch=5, next_seq=1, next_record=1)}, 0.1) == (
        REJECTED_HELD + 2
    )
    assert not drain.worth_committing
    assert _queued(sink) == []


def test_without_the_journal_datagrams_are_taken_at_once(
    link: tuple[socket.socket, socket.socket],
) -> None:
    sink, source = link
    source.send(_datagram(0))
    drain = Drain(sink, {STREAM}, journal=False, counters=Counter())
    assert drain.read(100, 0.0) == [_datagram(0)]
    assert _queued(sink) == []


# --- the receiver's drain under a flood (issue 13) -----------------------------------------


def _gated_receiver(tmp_path: Path) -> tuple[Receiver, bytes]:
    """A receiver of one stream with a link secret, on a socket of its own; and the key id."""
    _, public, key_id = write_keypair(tmp_path / "keys", "tx")
    write_psk(tmp_path / "link.psk")
    data = {
        "receiver": {"listen": "127.0.0.1", "port": free_port(kind=2),
                     "state_dir": str(tmp_path / "rx-state")},
        "mqtt": {"host": "127.0.0.1", "port": free_port(),
                 "spool_path": str(tmp_path / "rx-state" / "spool.sqlite")},
        "streams": [{"id": STREAM, "public_keys": [str(public)],
                     "psk_file": str(tmp_path / "link.psk"), "output": {"prefix": "diode"}}],
    }  # fmt: skip
    return Receiver(validate(RxConfig, data, "rx.toml")), key_id


async def test_forged_datagrams_never_wait_in_the_kernel_queue(
    tmp_path: Path, read_way: str
) -> None:
    """Forgeries that name blocks the stream has not reached (a wrong link tag) were kept
    in the socket's queue as if they could be the stream's next blocks, until they were
    2 s old or an eighth of the buffer; every peek walks the queue from its head, so a
    flood of them made each datagram cost 20 to 57 us of receiver CPU instead of a few.
    What the decoder rejects leaves the queue as it is read."""
    receiver, key_id = _gated_receiver(tmp_path)
    source = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        source.connect(receiver.sock.getsockname())
        target = Target(stream_id=STREAM, key_id=key_id, epoch=1_700_000_000_000, seq=10,
                        gated=True, window=1000)  # fmt: skip
        for datagram in itertools.islice(k1(target, random.Random(1)), 300):
            source.send(datagram)
        receiver._readable()
        assert receiver.decoder.counters["rejected_bad_tag"] == 300
        assert _queued(receiver.sock) == []
        assert receiver.drain.pending == 0
        assert receiver.counters().get("link_released_uncommitted", 0) == 0
    finally:
        source.close()
        receiver.sock.close()


async def test_rejected_datagrams_do_not_search_for_the_next_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After every read the receiver set its timer for the decoder's next deadline, a search
    over the stream's waiting blocks (11 % of its CPU under a flood of 20 000 forgeries a
    second). Datagrams rejected before the decoder's tables cannot move it: no search; a
    poll can, and the timer's next arming searches again."""
    receiver, key_id = _gated_receiver(tmp_path)
    searches = []
    deadline = receiver.decoder.deadline
    monkeypatch.setattr(receiver.decoder, "deadline", lambda: searches.append(1) or deadline())
    source = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        source.connect(receiver.sock.getsockname())
        target = Target(stream_id=STREAM, key_id=key_id, epoch=1_700_000_000_000, seq=10,
                        gated=True, window=1000)  # fmt: skip
        forged = k1(target, random.Random(2))
        for _ in range(3):
            for datagram in itertools.islice(forged, 100):
                source.send(datagram)
            receiver._readable()
        assert receiver.decoder.counters["rejected_bad_tag"] == 300
        assert len(searches) == 1  # the first arming only
        receiver._fire()  # what the timer or the supervisor's poll runs
        assert len(searches) == 2
    finally:
        source.close()
        receiver.sock.close()


async def test_a_paused_read_watches_the_link_again_and_a_stop_ends_the_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a flood a read that emptied the link socket's queue stops watching it for
    FLOOD_READ_EVERY_S. The socket must be watched again after the pause (else a flood
    would stall the receiver for good), a read that stopped at its budget must not pause,
    a stop during a pause must not watch the socket again (on a reload it belongs to the
    next process), and once the flood is over nothing pauses."""
    receiver, key_id = _gated_receiver(tmp_path)
    loop = asyncio.get_running_loop()
    flood = [True]
    monkeypatch.setattr(receiver._flood, "flooded", lambda _now: flood[0])
    source = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rejected = receiver.decoder.counters

    def send(count: int) -> None:
        for datagram in itertools.islice(forged, count):
            source.send(datagram)

    try:
        source.connect(receiver.sock.getsockname())
        target = Target(stream_id=STREAM, key_id=key_id, epoch=1_700_000_000_000, seq=10,
                        gated=True, window=1000)  # fmt: skip
        forged = k1(target, random.Random(3))
        receiver._read_sockets(loop, read=True)
        send(DRAIN_BUDGET + 10)
        receiver._readable()
        assert receiver._resume is None, "a read stopped at its budget is followed at once"
        receiver._readable()
        assert receiver._resume is not None, "a read that emptied the queue pauses"
        await asyncio.sleep(FLOOD_READ_EVERY_S * 10)  # a later timer: the pause has ended
        send(5)
        await asyncio.sleep(FLOOD_READ_EVERY_S * 10)
        assert rejected["rejected_bad_tag"] == DRAIN_BUDGET + 15, "watched again"
        receiver._readable()
        assert receiver._resume is not None
        receiver._read_sockets(loop, read=False)  # a stop (or a reload) during the pause
        send(5)
        await asyncio.sleep(FLOOD_READ_EVERY_S * 10)
        assert rejected["rejected_bad_tag"] == DRAIN_BUDGET + 15, "not watched after a stop"
        flood[0] = False
        receiver._read_sockets(loop, read=True)
        await asyncio.sleep(FLOOD_READ_EVERY_S * 10)
        assert rejected["rejected_bad_tag"] == DRAIN_BUDGET + 20
        assert receiver._resume is None, "no pause once the flood is over"
    finally:
        receiver._read_sockets(loop, read=False)
        source.close()
        receiver.sock.close()


def test_a_flood_is_told_from_the_real_streams_late_copies() -> None:
    """More than FLOOD_REJECTS_PER_S rejected datagrams a second over a window is a flood
    (the receiver then reads the link once a millisecond); the time diversity's late
    repeats of a fast real stream are not; judged again each window, so a flood's end is
    seen one window later."""
    meter = FloodMeter()
    assert not meter.flooded(0.0)  # the first window begins
    meter.rejected = int(7_000 * FLOOD_WINDOW_S)  # a 10 MB/s stream's late repeats
    assert not meter.flooded(FLOOD_WINDOW_S)
    meter.rejected = int(FLOOD_REJECTS_PER_S * FLOOD_WINDOW_S) + 1
    assert not meter.flooded(FLOOD_WINDOW_S * 1.5), "judged once the window has passed"
    assert meter.flooded(FLOOD_WINDOW_S * 2)
    assert meter.flooded(FLOOD_WINDOW_S * 2.5), "until the next judgement"
    assert not meter.flooded(FLOOD_WINDOW_S * 3)


@pytest.mark.parametrize("gated", [False, True], ids=["no secret", "link secret"])
def test_the_decoder_keeps_nothing_of_the_buffer_a_batch_is_read_into(
    link: tuple[socket.socket, socket.socket], gated: bool
) -> None:
    """The drain hands the decoder views of the batch reader's buffer, which the next read
    overwrites: a real stream read in small batches, forgeries between its datagrams,
    must deliver every record (a symbol kept as a view would be another datagram's bytes
    by the time its block is rebuilt, and its signature would fail)."""
    sink, source = link
    psk = bytes(range(32)) if gated else None
    records = samples(120)
    real = [d for b in encode_blocks(records, psk=psk, per_block=10) for d in b]
    decoder = new_decoder(psk=psk)
    drain = Drain(sink, {STREAM}, journal=True, counters=decoder.counters)
    for datagram in real:
        source.send(datagram)
        source.send(datagram[:40] + bytes(len(datagram) - 40))  # garbage the same size

    def judge(datagrams: Sequence[bytes | memoryview]) -> list[bool]:
        return decoder.receive_all(datagrams, 0.0)

    while drain.feed(7, 0.0, judge, decoder.positions()):
        drain.release(decoder.positions(), 0.0)
    decoder.poll(10.0)
    assert delivered(decoder.events()) == records
    assert decoder.counters["rejected_bad_tag" if gated else "rejected_bad_checksum"] > 0


def test_a_feed_says_whether_it_read_the_queue_to_its_end(
    link: tuple[socket.socket, socket.socket],
) -> None:
    """What the receiver paces its reads by under a flood: only a read that emptied the
    queue may be followed by a pause; one that stopped at its budget is followed at once."""
    sink, source = link
    for i in range(10):
        source.send(b"forged %d" % i)
    drain = Drain(sink, {STREAM}, journal=True, counters=Counter())

    def judge(datagrams: Sequence[bytes | memoryview]) -> list[bool]:
        return [False] * len(datagrams)

    assert drain.feed(4, 0.0, judge, {}) == 4
    assert not drain.emptied
    assert drain.feed(100, 0.0, judge, {}) == 6
    assert drain.emptied
    assert _queued(sink) == []

"""Replays stopped in the kernel (receiver/steer.py): real sockets, a real receiver, real keys.

Every datagram below a stream's committed position goes to a quarantine and is
counted there exactly, late copies and replays apart (``rejected_steered_late``,
``rejected_steered_replay``); the kernel's program sorts exactly as its Python
twin (``classify``) at every word boundary; everything else still reaches the
drain; a commit moves the threshold; the group's order is checked and mended;
the sockets systemd would pass (``LISTEN_FDS=3``, or 2 from an older unit) are
taken, and quarantines passed in full of real datagrams are read before they
become counters. Each test but the "steering off" ones fails with
``[receiver] steer_replays = false``.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from diode.config import validate
from diode.config.rx import RxConfig
from diode.errors import SettingError
from diode.keys import load_psk, write_psk
from diode.loopback import free_port
from diode.replay import StreamState
from diode.wire import DatagramHeader, pack_datagram
from receiver.app import Receiver
from receiver.link import kernel_drops
from receiver.metrics import Metrics
from receiver.steer import (
    LATE,
    LINK,
    REATTACH_EVERY_S,
    RECENT_BLOCKS,
    REPLAY,
    Steering,
    attach,
    classify,
    everything_to,
    open_group,
    program,
    supported,
)
from tests.core_support import STREAM, encode_blocks, fixed_key, samples

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not supported(), reason="SO_REUSEPORT steering is Linux only")

# The wire generations a receiver accepts: 1 (version 1), 2 and 3 (version 3), gated (6).
WIRES = {"generation 1": (1, False), "generation 3": (3, False), "gated": (3, True)}


def _config(tmp_path: Path, *, gated: bool, steer: bool = True, port: int = 0) -> dict[str, Any]:
    public = tmp_path / "tx.pub"
    public.write_bytes(
        fixed_key()
        .private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    stream: dict[str, Any] = {"id": STREAM, "public_keys": [str(public)],
                              "output": {"prefix": "diode"}}  # fmt: skip
    if gated:
        write_psk(tmp_path / "link.psk")
        stream["psk_file"] = str(tmp_path / "link.psk")
    return {
        "receiver": {"listen": "127.0.0.1", "port": port or free_port(socket.SOCK_DGRAM),
                     "state_dir": str(tmp_path / "rx-state"), "steer_replays": steer},
        "mqtt": {"host": "127.0.0.1", "port": free_port(),
                 "spool_path": str(tmp_path / "rx-state" / "spool.sqlite")},
        "streams": [stream],
    }  # fmt: skip


def _blocks(tmp_path: Path, wire: str, count: int = 8) -> list[list[bytes]]:
    generation, gated = WIRES[wire]
    psk = load_psk(tmp_path / "link.psk") if gated else None
    # A fresh epoch: an old one waits for a heartbeat when the receiver has no position.
    epoch = int(time.time() * 1000)
    blocks = encode_blocks(
        samples(count * 4), per_block=4, generation=generation, psk=psk, epoch=epoch
    )
    assert len(blocks) >= count
    return blocks


@pytest.fixture(params=list(WIRES))
def wire(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def source() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        yield s


@pytest.fixture
def group() -> Iterator[tuple[socket.socket, Steering]]:
    """A link socket and its quarantines on a free port, as a receiver opens them."""
    link, steering = open_group("127.0.0.1", 0, 1 << 20)
    assert steering is not None
    try:
        yield link, steering
    finally:
        link.close()
        steering.close()


def _receiver(tmp_path: Path, *, gated: bool, steer: bool = True) -> Receiver:
    return Receiver(validate(RxConfig, _config(tmp_path, gated=gated, steer=steer), "rx.toml"))


def _send(source: socket.socket, to: tuple[str, int], datagrams: list[bytes]) -> None:
    for datagram in datagrams:
        source.sendto(datagram, to)


async def _read(receiver: Receiver, rounds: int = 3) -> None:
    """What the event loop would do: read, commit, release; the steering follows."""
    for _ in range(rounds):
        receiver._readable()
        receiver._commit()
        receiver._after(time.monotonic())


def _steered(receiver: Receiver, role: str = LATE) -> int:
    assert receiver.steering is not None, "steering is off"
    receiver.steering.tally()
    return receiver.counters()[f"rejected_steered_{role}"]


def _no_steering_counters(counters: dict[str, Any]) -> bool:
    return not any(key.startswith("rejected_steered") for key in counters)


def _close(receiver: Receiver) -> None:
    receiver.sock.close()
    if receiver.steering is not None:
        receiver.steering.close()


async def test_copies_below_the_position_go_to_a_quarantine_and_are_counted_exactly(
    tmp_path: Path, wire: str, source: socket.socket
) -> None:
    """Blocks 0-3 delivered and committed; then 3 000 copies of them (more than the
    quarantine's tiny buffer holds: its kernel drops count), garbage, and block 4. The
    drain sees block 4 and the garbage only; the late copies' quarantine counts every
    copy (they are at most RECENT_BLOCKS behind: late, not replays); the link socket's
    overflow counter does not move."""
    receiver = _receiver(tmp_path, gated=WIRES[wire][1])
    blocks = _blocks(tmp_path, wire)
    to = receiver.sock.getsockname()
    try:
        _send(source, to, [d for block in blocks[:4] for d in block])
        await _read(receiver)
        assert receiver.decoder.counters["blocks_delivered"] == 4
        await asyncio.sleep(REATTACH_EVERY_S)
        await _read(receiver, 1)  # the program follows the commit
        before = receiver.counters()
        old = [d for block in blocks[:4] for d in block]
        replays = [old[i % len(old)] for i in range(3000)]
        garbage = [b"x", b"\xd1\x0d" + bytes(20), os.urandom(300)]
        _send(source, to, replays + garbage + blocks[4])
        await asyncio.sleep(0.05)
        await _read(receiver)
        counters = receiver.counters()
        assert counters["blocks_delivered"] == 5
        # The drain got block 4 and the garbage, nothing else.
        assert counters["datagrams"] - before["datagrams"] == len(blocks[4]) + len(garbage)
        assert _steered(receiver) == len(replays)
        assert _steered(receiver, REPLAY) == 0
        # In $status and in Prometheus like the other rejection counters.
        receiver._watch_rejections(time.monotonic())
        assert receiver.router.rejected["total"]["steered_late"] == len(replays)
        registry = Metrics(receiver).registry
        labels = {"reason": "steered_late"}
        assert registry.get_sample_value("diode_rx_datagrams_rejected_total", labels) == len(
            replays
        )
        # No replay reached the decoder.
        for reason in ("rejected_late", "rejected_replay"):
            assert counters.get(reason, 0) - before.get(reason, 0) <= len(blocks[4]), reason
        assert kernel_drops(receiver.sock) == 0
    finally:
        _close(receiver)


async def test_a_commit_moves_the_threshold(tmp_path: Path, source: socket.socket) -> None:
    """Block 2 sent before it is delivered is the stream's next block: it reaches the
    drain. Once delivered and committed, the program is attached again (at most every
    REATTACH_EVERY_S) and a copy of it goes to the quarantine; in between, a copy is
    rejected by the decoder as before (a stale program is sound: it steers less)."""
    receiver = _receiver(tmp_path, gated=False)
    blocks = _blocks(tmp_path, "generation 3")
    to = receiver.sock.getsockname()
    try:
        _send(source, to, blocks[0] + blocks[1])
        await _read(receiver)
        await asyncio.sleep(REATTACH_EVERY_S)
        await _read(receiver, 1)
        steered = _steered(receiver)
        _send(source, to, blocks[0])  # below the position: steered
        _send(source, to, blocks[2])  # the next block: the drain's
        await asyncio.sleep(0.02)
        await _read(receiver)
        assert receiver.decoder.counters["blocks_delivered"] == 3
        assert _steered(receiver) == steered + len(blocks[0])
        # Within REATTACH_EVERY_S of the last attach: a copy of block 2 still reaches the
        # decoder, which rejects it.
        late = receiver.decoder.counters["rejected_late"]
        _send(source, to, blocks[2][:1])
        await _read(receiver)
        assert receiver.decoder.counters["rejected_late"] == late + 1
        await asyncio.sleep(REATTACH_EVERY_S)
        await _read(receiver, 1)  # attached again: block 2 is below the threshold now
        _send(source, to, blocks[2])
        await asyncio.sleep(0.02)
        await _read(receiver)
        assert _steered(receiver) == steered + len(blocks[0]) + len(blocks[2])
        assert receiver.decoder.counters["rejected_late"] == late + 1
    finally:
        _close(receiver)


async def test_a_few_replays_among_many_late_copies_are_each_counted_as_replays(
    tmp_path: Path, source: socket.socket
) -> None:
    """The transmitter restarted (a newer epoch); 3 datagrams of the old epoch, replayed
    among 500 late copies of the new one, are counted as replays, each of them, however
    few and however mixed: the SOC reports them (receiver/soc.py). The late copies stay
    late copies. The new epoch's program is attached at once, not REATTACH_EVERY_S
    later: the old one would count the old epoch's datagrams as late copies."""
    receiver = _receiver(tmp_path, gated=False)
    old = _blocks(tmp_path, "generation 3")
    epoch = int(time.time() * 1000) + 1000  # the transmitter restarted: a newer epoch
    new = encode_blocks(samples(8), per_block=4, epoch=epoch)
    to = receiver.sock.getsockname()
    try:
        _send(source, to, old[0] + old[1])
        await _read(receiver)
        await asyncio.sleep(REATTACH_EVERY_S)
        await _read(receiver, 1)  # the old epoch's position attached
        _send(source, to, new[0] + new[1])
        await _read(receiver)  # no wait: a new epoch is attached at once
        late = [new[i % 2][i % len(new[0])] for i in range(500)]
        mixed = late[:100] + old[0][:1] + late[100:300] + old[1][:2] + late[300:]
        _send(source, to, mixed)
        await asyncio.sleep(0.02)
        assert _steered(receiver, REPLAY) == 3
        assert _steered(receiver, LATE) == len(late)
        assert receiver.decoder.counters["rejected_replay"] == 0
    finally:
        _close(receiver)


async def test_a_stranger_joining_the_group_gets_nothing(
    tmp_path: Path, source: socket.socket
) -> None:
    """SO_REUSEPORT lets another socket of the same user bind the port; the program names
    indices 0, 1 and 2 only, so a fourth socket of the group gets no datagram."""
    receiver = _receiver(tmp_path, gated=False)
    blocks = _blocks(tmp_path, "generation 3")
    to = receiver.sock.getsockname()
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stranger.bind(to)
        stranger.setblocking(False)
        for port_user in range(20):  # flows from 20 source ports: no hash decides here
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.sendto(blocks[port_user % 4][0], to)
        await asyncio.sleep(0.02)
        with pytest.raises(BlockingIOError):
            stranger.recv(2000)
        await _read(receiver)
        assert receiver.decoder.counters["datagrams"] == 20
    finally:
        stranger.close()
        _close(receiver)


def test_a_port_another_receiver_holds_is_refused_as_without_steering() -> None:
    """A second receiver on the same port (started by mistake, same user) would join the
    first one's reuseport group; it fails to bind instead, naming the setting."""
    port = free_port(socket.SOCK_DGRAM)
    link, steering = open_group("127.0.0.1", port, 1 << 20)
    try:
        with pytest.raises(SettingError, match=r"receiver\.port"):
            open_group("127.0.0.1", port, 1 << 20)
    finally:
        link.close()
        if steering is not None:
            steering.close()


async def test_with_steering_off_the_receiver_reads_everything_as_before(
    tmp_path: Path, source: socket.socket
) -> None:
    """``steer_replays = false``: one socket, not shared (no SO_REUSEPORT: nobody else can
    bind the port), and replays reach the decoder, which rejects them."""
    receiver = _receiver(tmp_path, gated=False, steer=False)
    blocks = _blocks(tmp_path, "generation 3")
    to = receiver.sock.getsockname()
    try:
        assert receiver.steering is None
        assert not receiver.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError, match="in use"):
                other.bind(to)
        _send(source, to, blocks[0] + blocks[1])
        await _read(receiver)
        before = receiver.counters()
        _send(source, to, blocks[0])
        await _read(receiver)
        counters = receiver.counters()
        assert _no_steering_counters(counters)
        assert counters["datagrams"] - before["datagrams"] == len(blocks[0])
        assert counters["rejected_late"] - before["rejected_late"] == len(blocks[0])
    finally:
        _close(receiver)


def _header_only(stream: int, epoch: int, seq: int) -> bytes:
    header = DatagramHeader(flags=0, stream_id=stream, key_id=b"k" * 8, epoch=epoch, seq=seq,
                            index=0, k=1, n=1, block_length=10, records=1)  # fmt: skip
    return pack_datagram(header, b"s" * 64)


def _probes(positions: dict[int, StreamState]) -> list[bytes]:
    """Datagrams on both sides of every number the program compares, high and low words:
    the position's epoch and next block, and the floor RECENT_BLOCKS below it."""
    out = [b"x", b"\xd1\x0d" + bytes(40), _header_only(99, 1, 1)]  # short, bad magic, unnamed
    for stream, p in positions.items():
        floor = p.next_seq - RECENT_BLOCKS
        epochs = {p.epoch + d for d in (-(1 << 32), -1, 0, 1, 1 << 32)}
        seqs = {n + d for n in (p.next_seq, floor) for d in (-(1 << 32), -1, 0, 1, 1 << 32)}
        seqs |= {0, (1 << 63) + 5}
        out += [
            _header_only(stream, epoch, seq)
            for epoch in sorted(epochs)
            for seq in sorted(seqs)
            if 0 <= epoch < 1 << 64 and 0 <= seq < 1 << 64
        ]
    return out


@pytest.mark.parametrize(
    "index",
    [{LINK: 0, LATE: 1, REPLAY: 2}, {LINK: 2, LATE: 0, REPLAY: 1}, {LINK: 1, REPLAY: 0}],
    ids=["unit order", "another order", "no late quarantine"],
)
def test_the_kernels_program_sorts_as_classify_does_at_every_word_boundary(
    source: socket.socket, index: dict[str, int]
) -> None:
    """Each probe sent to a group running :func:`program` lands in the socket the Python
    rule names (a class without a socket goes to the link's); the positions put the
    epoch, the next block and the floor across 32-bit word boundaries."""
    port = free_port(socket.SOCK_DGRAM)
    group = _group(port, len(index))
    positions = {
        STREAM: StreamState(epoch=(1 << 32) + 7, next_seq=(1 << 32) + 100, next_record=0),
        5: StreamState(epoch=5, next_seq=3, next_record=0),  # no floor yet: nothing a replay
        6: StreamState(epoch=1 << 40, next_seq=(1 << 33) + RECENT_BLOCKS, next_record=0),
    }
    try:
        attach(group[0], program(positions, index))
        probes = _probes(positions)
        sorted_into: dict[str, int] = {}
        for probe in probes:
            source.sendto(probe, ("127.0.0.1", port))
            ready, _, _ = select.select(group, [], [], 2.0)
            assert len(ready) == 1, probe
            assert ready[0].recv(2000) == probe
            kind = classify(probe, positions)
            expected = index.get(kind, index[LINK])
            assert group.index(ready[0]) == expected, (kind, probe[:32].hex())
            sorted_into[kind] = sorted_into.get(kind, 0) + 1
        assert min(sorted_into[k] for k in (LINK, LATE, REPLAY)) >= 5, sorted_into
    finally:
        for sock in group:
            sock.close()


def test_more_streams_than_the_kernel_takes_steers_the_first_ones(
    source: socket.socket, group: tuple[socket.socket, Steering]
) -> None:
    """A program for 400 streams is past what the kernel takes (its size, and the
    socket's option memory): the first streams are steered, the others reach the link
    socket (sound: the decoder rejects them), and it is said once."""
    link, steering = group
    positions = {s: StreamState(epoch=9, next_seq=5, next_record=0) for s in range(400)}
    with capture_logs() as logs:
        steering.update(positions, 0.0, force=True)
    assert 0 < steering.max_streams < 400
    assert [e["event"] for e in logs if e["log_level"] == "warning"] in (
        [],
        ["the kernel refused the steering program: fewer streams steered"],
    )
    to = link.getsockname()
    source.sendto(_header_only(0, 9, 4), to)  # named by the program: steered
    source.sendto(_header_only(399, 9, 4), to)  # past it: the link socket's
    time.sleep(0.02)
    assert link.recv(2000) == _header_only(399, 9, 4)
    assert steering.tally() == {LATE: 1, REPLAY: 0}


def test_a_stream_without_a_position_for_a_while_keeps_its_threshold_and_the_order(
    source: socket.socket, group: tuple[socket.socket, Steering]
) -> None:
    """A transmitter restarted and the new epoch's block 0 was lost: for up to
    reorder_timeout_s the decoder has no position for that stream, and a commit
    then names none. The program then names the start of the next epoch for it, at
    once: the whole old epoch is replays, as the decoder counts them, and any new
    epoch is above it. The late copy steered before is no proof of a wrong order,
    and the stream's new epoch still reaches the link socket."""
    link, steering = group
    to = link.getsockname()
    before = {s: StreamState(epoch=100, next_seq=500, next_record=0) for s in (1, 2)}
    steering.update(before, 0.0, force=True)
    source.sendto(_header_only(2, 100, 499), to)  # a late copy of stream 2
    time.sleep(0.02)
    one = {1: StreamState(epoch=100, next_seq=510, next_record=0)}
    assert steering.update(one, 0.01)  # within REATTACH_EVERY_S: attached at once
    assert not steering.update(dict(one), 0.02)  # and only once
    assert steering.tally() == {LATE: 1, REPLAY: 0}
    assert steering.order_swaps == 0
    assert steering.index == {LINK: 0, LATE: 1, REPLAY: 2}
    source.sendto(_header_only(2, 101, 0), to)  # the new epoch: the link's
    source.sendto(_header_only(2, 100, 300), to)  # the old one: a replay now
    source.sendto(_header_only(2, 99, 7), to)  # an older one: a replay
    time.sleep(0.02)
    assert link.recv(2000) == _header_only(2, 101, 0)
    assert steering.tally() == {LATE: 1, REPLAY: 2}


def test_a_stream_the_program_stops_naming_proves_no_wrong_order(
    source: socket.socket, group: tuple[socket.socket, Steering]
) -> None:
    """Fewer streams fit (the kernel refused a bigger program): the program stops
    naming the last ones, and what their earlier programs steered and still waits in
    a quarantine is of no class now; it is counted, and proves nothing."""
    link, steering = group
    to = link.getsockname()
    positions = {s: StreamState(epoch=9, next_seq=50, next_record=0) for s in (1, 2)}
    steering.update(positions, 0.0, force=True)
    source.sendto(_header_only(2, 9, 40), to)  # steered while stream 2 is named
    time.sleep(0.02)
    steering.max_streams = 1  # as update() does when the kernel refuses the program
    steering.update(dict(positions), 1.0, force=True)
    assert steering.tally() == {LATE: 1, REPLAY: 0}
    assert steering.order_swaps == 0
    source.sendto(_header_only(1, 9, 50), to)
    time.sleep(0.02)
    assert link.recv(2000) == _header_only(1, 9, 50)


def test_a_bad_steer_replays_value_names_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "rx.toml"
    data = _config(tmp_path, gated=False)
    data["receiver"]["steer_replays"] = "yes"
    config.write_text(
        "[receiver]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in data["receiver"].items())
        + f"[mqtt]\nhost = '127.0.0.1'\nport = {data['mqtt']['port']}\n"
        + f"[[streams]]\nid = {STREAM}\npublic_keys = [{json.dumps(str(tmp_path / 'tx.pub'))}]\n"
        + "[streams.output]\nprefix = 'diode'\n"
    )
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "diode-rx"), "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "rx.toml" in proc.stderr
    assert "receiver.steer_replays" in proc.stderr


# --- the sockets systemd passes (LISTEN_FDS=3) ---------------------------------------------

# A receiver in a child process, given the sockets at fds 3, 4 and 5 as systemd passes them;
# it reads for a while, then prints its counters and its steering's state.
CHILD = """
import asyncio, json, os, sys, time
fds = [int(fd) for fd in sys.argv[2].split(",")]
moved = [os.dup(fd) for fd in fds]
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)))
from structlog.testing import capture_logs
from diode.config import validate
from diode.config.rx import RxConfig
from receiver.app import Receiver

async def main():
    with capture_logs() as logs:
        rx = Receiver(validate(RxConfig, json.loads(sys.argv[1]), "rx.toml"))
        print("ready", flush=True)
        end = time.monotonic() + float(sys.argv[3])
        while time.monotonic() < end:
            rx._readable(); rx._commit(); rx._after(time.monotonic())
            if rx.steering is not None and not rx.openings:
                rx.steering.tally()
            elif rx.steering is not None:
                rx._feed_link(time.monotonic())
            await asyncio.sleep(0.01)
    out = {k: v for k, v in rx.counters().items() if not k.startswith("mqtt_")}
    out["opening_done"] = not rx.openings
    out["index"] = None if rx.steering is None else rx.steering.index
    out["events"] = [e["event"] for e in logs if e["log_level"] in ("warning", "error")]
    print(json.dumps(out), flush=True)

asyncio.run(main())
"""


def _group(port: int, count: int = 3) -> list[socket.socket]:
    """The sockets a unit with ``count`` ListenDatagram= lines and ReusePort=yes creates,
    in the group's order."""
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        s.bind(("127.0.0.1", port))
        socks.append(s)
    return socks


def _start_child(
    tmp_path: Path, passed: list[socket.socket], *, seconds: float, steer: bool = True
) -> subprocess.Popen[str]:
    port = passed[0].getsockname()[1]
    config = _config(tmp_path, gated=False, steer=steer, port=port)
    fds = [s.fileno() for s in passed]
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(config), ",".join(map(str, fds)), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        pass_fds=fds,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr and proc.stderr.read()
    return proc


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def test_quarantines_passed_in_full_of_real_datagrams_are_read_then_count(
    tmp_path: Path, source: socket.socket
) -> None:
    """Before any program, the group spreads flows over its sockets by a hash: real
    datagrams can wait in the quarantines systemd holds (here blocks 0-1 in one, 2-3 in
    the other, put there by programs sending everything to index 1, then 2). The
    receiver reads them, journaled, before the quarantines become counters; then copies
    of them are steered."""
    port = free_port(socket.SOCK_DGRAM)
    group = _group(port)
    blocks = _blocks(tmp_path, "generation 3")
    try:
        attach(group[0], everything_to(1))
        _send(source, ("127.0.0.1", port), [d for block in blocks[:2] for d in block])
        attach(group[0], everything_to(2))
        _send(source, ("127.0.0.1", port), [d for block in blocks[2:4] for d in block])
        proc = _start_child(tmp_path, group, seconds=1.5)
        time.sleep(0.8)  # read, committed, the program attached
        _send(source, ("127.0.0.1", port), blocks[0] * 10 + blocks[4])
        result = _result(proc)
        assert result["blocks_delivered"] == 5
        assert result["opening_done"]
        assert result["rejected_steered_late"] == 10 * len(blocks[0])
        assert result["rejected_steered_replay"] == 0
        assert result["link_steering_swaps"] == 0
        assert result["index"] == {LINK: 0, LATE: 1, REPLAY: 2}
    finally:
        for sock in group:
            sock.close()


@pytest.mark.parametrize(
    "order",
    [(1, 0, 2), (0, 2, 1), (2, 0, 1)],
    ids=["link and late swapped", "late and replay swapped", "all three moved"],
)
def test_the_order_is_checked_and_a_wrong_one_mended(
    tmp_path: Path, source: socket.socket, order: tuple[int, int, int]
) -> None:
    """The program names sockets by their index in the group. Passed in another order
    (``order``: the group index of the sockets given as link, late, replay), the real
    stream or the late copies land in a quarantine that the program would not have sent
    them to: that proves it, the indices are swapped (an error logged) until they are
    the group's, and the stream flows again."""
    port = free_port(socket.SOCK_DGRAM)
    group = _group(port)
    blocks = _blocks(tmp_path, "generation 3")
    to = ("127.0.0.1", port)
    try:
        proc = _start_child(tmp_path, [group[i] for i in order], seconds=2.5)
        for _ in range(4):  # the stream, and late copies of what it delivered
            time.sleep(0.3)
            _send(source, to, blocks[0] + blocks[1] + blocks[2])
        result = _result(proc)
        assert result["index"] == dict(zip((LINK, LATE, REPLAY), order, strict=True))
        assert result["link_steering_swaps"] >= 1
        assert any("indices swapped" in e for e in result["events"])
        assert result["blocks_delivered"] == 3
    finally:
        for sock in group:
            sock.close()


def test_two_sockets_passed_in_steer_replays_only(tmp_path: Path, source: socket.socket) -> None:
    """A unit from before the late copies had their own quarantine: late copies reach the
    decoder (rejected_late), a replay of an older epoch the replays' quarantine; said once."""
    port = free_port(socket.SOCK_DGRAM)
    group = _group(port, 2)
    old = _blocks(tmp_path, "generation 3")
    new = encode_blocks(samples(8), per_block=4, epoch=int(time.time() * 1000) + 1000)
    to = ("127.0.0.1", port)
    try:
        proc = _start_child(tmp_path, group, seconds=1.5)
        _send(source, to, old[0] + new[0] + new[1])
        time.sleep(0.5)  # delivered, committed, the program attached
        _send(source, to, new[0] + old[0][:2])
        result = _result(proc)
        assert result["blocks_delivered"] == 3
        assert result["rejected_late"] >= len(new[0])
        assert result["rejected_steered_replay"] == 2
        assert "rejected_steered_late" not in result
        assert result["index"] == {LINK: 0, REPLAY: 1}
        assert (
            result["events"].count(
                "two sockets passed in (LISTEN_FDS=2): replays are steered, late copies are "
                "read and rejected by the receiver"
            )
            == 1
        )
    finally:
        for sock in group:
            sock.close()


def test_one_socket_passed_in_still_works_without_steering(
    tmp_path: Path, source: socket.socket
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    (link,) = _group(port, 1)
    blocks = _blocks(tmp_path, "generation 3")
    try:
        proc = _start_child(tmp_path, [link], seconds=0.8)
        _send(source, ("127.0.0.1", port), blocks[0] + blocks[1] + blocks[0])
        result = _result(proc)
        assert result["blocks_delivered"] == 2
        assert _no_steering_counters(result)
        assert (
            result["events"].count("one socket passed in (LISTEN_FDS=1): replays are not steered")
            == 1
        )
    finally:
        link.close()


def test_sockets_passed_in_with_steering_off_send_everything_to_the_link(
    tmp_path: Path, source: socket.socket
) -> None:
    """systemd keeps the quarantines in the group whatever the receiver does with them:
    with steer_replays = false the program sends every datagram to the link socket."""
    port = free_port(socket.SOCK_DGRAM)
    group = _group(port)
    blocks = _blocks(tmp_path, "generation 3")
    try:
        proc = _start_child(tmp_path, group, seconds=1.0, steer=False)
        time.sleep(0.3)
        for i in range(30):  # 30 flows: without a program, about 2 in 3 would hash elsewhere
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.sendto(blocks[i % 3][0], ("127.0.0.1", port))
        result = _result(proc)
        assert result["datagrams"] == 30
        assert result["rejected_steered_late"] == result["rejected_steered_replay"] == 0
    finally:
        for sock in group:
            sock.close()

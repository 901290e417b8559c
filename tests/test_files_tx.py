"""The transmitter's side of files: when a file is complete, after-send actions, the lane's
queue, ``diode send-file`` and ``diode demo --files``."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from diode.config import validate
from diode.config.files import FILE_LANE_MBPS, RECEIVER_FILE_MBPS, FilesWatch
from diode.config.files import FileLane as FileLaneConfig
from diode.config.link import IPV4_UDP_OVERHEAD
from diode.config.tx import TxLink
from diode.encoder import EncodedBlock
from diode.keys import SigningKey
from tests.test_demo import TRACEBACK, diode_command, run_demo
from transmitter.files import (
    FileLane,
    LanePacer,
    LaneQueue,
    Watcher,
    place_file,
    rate_warning,
)
from transmitter.sender import PacedSender, deaf_udp_socket


def _watch(folder: Path, **overrides: object) -> FilesWatch:
    return validate(FilesWatch, {"directory": str(folder), **overrides}, "tx.toml")


class _Ready:
    def __init__(self) -> None:
        self.paths: list[Path] = []

    def __call__(self, _watch: FilesWatch, path: Path) -> None:
        self.paths.append(path)


def test_unchanged_rule_waits_for_quiet_and_restarts_on_every_change(tmp_path: Path) -> None:
    ready = _Ready()
    watcher = Watcher(_watch(tmp_path, complete_when="unchanged", unchanged_s=5.0), ready)
    growing = tmp_path / "export.csv"
    growing.write_bytes(b"a")
    assert watcher.scan(100.0) == 105.0  # not before 5 s of quiet
    assert watcher.scan(104.0) == 105.0
    with growing.open("ab") as f:
        f.write(b"b")  # still being written: the clock starts again
    assert watcher.scan(104.5) == 109.5
    assert ready.paths == []
    assert watcher.scan(109.5) is None
    assert ready.paths == [growing]
    assert watcher.scan(200.0) is None  # handed over once, not again while being sent
    assert ready.paths == [growing]


def test_renamed_rule_pattern_hidden_and_sent_folder(tmp_path: Path) -> None:
    ready = _Ready()
    watcher = Watcher(_watch(tmp_path, complete_when="renamed", pattern="*.csv"), ready)
    (tmp_path / ".report.csv.tmp").write_bytes(b"being written")
    (tmp_path / "notes.txt").write_bytes(b"other pattern")
    (tmp_path / "sent").mkdir()
    (tmp_path / "sent" / "old.csv").write_bytes(b"sent before")
    (tmp_path / "report.csv").write_bytes(b"done")
    os.symlink("/etc/passwd", tmp_path / "link.csv")  # never followed out of the folder
    watcher.scan(0.0)
    assert ready.paths == [tmp_path / "report.csv"]


def test_a_kept_file_is_not_sent_again_until_it_changes(tmp_path: Path) -> None:
    ready = _Ready()
    watcher = Watcher(_watch(tmp_path, complete_when="renamed"), ready)
    path = tmp_path / "a.bin"
    path.write_bytes(b"1")
    watcher.scan(0.0)
    st = path.stat()
    watcher.done(path, st.st_size, st.st_mtime_ns, kept=True)
    watcher.scan(1.0)
    assert ready.paths == [path]
    path.write_bytes(b"22")
    watcher.scan(2.0)
    assert ready.paths == [path, path]


def test_lane_queue_serves_tag_datagrams_first() -> None:
    queue = LaneQueue(capacity=100, interleave=1, file_capacity=100)
    queue.files.push(EncodedBlock(seq=0, records=1, datagrams=(b"f1", b"f2")))
    queue.push(EncodedBlock(seq=0, records=1, datagrams=(b"t1",)))
    assert len(queue) == 3
    assert queue.pop() == b"t1"
    queue.push(EncodedBlock(seq=1, records=1, datagrams=(b"t2",)))
    assert [queue.pop(), queue.pop(), queue.pop(), queue.pop()] == [b"t2", b"f1", b"f2", None]


def test_place_file_copies_with_mtime_and_refuses_what_would_never_be_sent(
    tmp_path: Path,
) -> None:
    source = tmp_path / "src" / "recipe 7.csv"
    source.parent.mkdir()
    source.write_bytes(b"x" * 3_000_000)
    os.utime(source, ns=(1, 1_600_000_000_000_000_000))
    folder = tmp_path / "out"
    placed = place_file(source, _watch(folder, pattern="*.csv"))
    assert placed == folder / "recipe 7.csv"
    assert placed.read_bytes() == source.read_bytes()
    assert placed.stat().st_mtime_ns == 1_600_000_000_000_000_000
    assert sorted(os.listdir(folder)) == ["recipe 7.csv"]  # no temporary left
    with pytest.raises(FileExistsError):
        place_file(source, _watch(folder, pattern="*.csv"))
    with pytest.raises(ValueError, match="pattern"):
        place_file(source, _watch(folder, pattern="*.txt"))


def _tx_toml(tmp_path: Path, files: str) -> Path:
    keys = tmp_path / "keys"
    subprocess.run(
        [*diode_command(), "keygen", str(keys), "--name", "tx"], check=True, capture_output=True
    )
    subprocess.run(
        [*diode_command(), "keygen", str(keys), "--name", "files"], check=True, capture_output=True
    )
    path = tmp_path / "tx.toml"
    path.write_text(
        f"""
[transmitter]
stream_id = 1
private_key = "keys/tx.key"

[link]
destination = "127.0.0.1"

[file_lane]
stream_id = 2
private_key = "keys/files.key"
{files}
"""
    )
    return path


def test_send_file_command(tmp_path: Path) -> None:
    config = _tx_toml(tmp_path, '[[files]]\ndirectory = "outbox"\npattern = "*.csv"\n')
    source = tmp_path / "day 1.csv"
    source.write_text("a;b\n")
    done = subprocess.run(
        [*diode_command(), "send-file", str(source), "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "outbox" / "day 1.csv").read_text() == "a;b\n"
    wrong = subprocess.run(
        [*diode_command(), "send-file", str(source), "--config", str(config), "--name", "x.bin"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert wrong.returncode == 1
    assert "pattern" in wrong.stderr
    assert not TRACEBACK.search(wrong.stderr)


def test_send_file_with_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = _tx_toml(tmp_path, '[[files]]\ndirectory = "outbox"\nafter_send = "shred"\n')
    done = subprocess.run(
        [*diode_command(), "send-file", str(tmp_path / "x"), "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "files[0].after_send" in done.stderr
    assert not TRACEBACK.search(done.stderr)


def test_files_without_a_lane_is_a_config_error(tmp_path: Path) -> None:
    config = _tx_toml(tmp_path, "")
    text = config.read_text().split("[file_lane]")[0] + '[[files]]\ndirectory = "outbox"\n'
    config.write_text(text)
    done = subprocess.run(
        [*diode_command(), "check-config", str(config)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "file_lane" in done.stderr


def test_demo_with_files() -> None:
    summary, _ = run_demo("--files", duration=8.0)
    files = summary["files"]
    assert files["dropped"] >= 3
    assert files["ok"] >= 2
    assert files["identical"] == files["ok"]


def test_the_file_lane_needs_a_key_of_its_own(tmp_path: Path) -> None:
    config = _tx_toml(tmp_path, "")
    config.write_text(config.read_text().replace("keys/files.key", "keys/tx.key"))
    done = subprocess.run(
        [*diode_command(), "check-config", str(config)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "file_lane.private_key" in done.stderr
    assert "its own" in done.stderr


# -- the lane's own rate ([file_lane] rate_mbps) ---------------------------------------------


def _lane(**overrides: object) -> FileLaneConfig:
    return validate(
        FileLaneConfig, {"stream_id": 2, "private_key": "files.key", **overrides}, "tx.toml"
    )


def test_the_lanes_rate_is_its_share_at_most_its_own_ceiling() -> None:
    assert _lane(share=1.0).wire_mbps(1000.0) == FILE_LANE_MBPS  # the default ceiling
    assert _lane(share=0.1).wire_mbps(1000.0) == 100.0  # the share is lower
    assert _lane(share=1.0, rate_mbps=400).wire_mbps(1000.0) == 400.0
    assert _lane(share=0.5).wire_mbps(100.0) == 50.0  # the link's default rate: as before
    assert rate_warning(_lane(share=1.0), 1000.0) is None
    assert rate_warning(_lane(share=1.0, rate_mbps=RECEIVER_FILE_MBPS), 1000.0) is None
    warning = rate_warning(_lane(share=1.0, rate_mbps=800), 1000.0)
    assert warning is not None
    assert warning["wire_mbps"] == 800.0
    assert "rate_mbps" in warning["fix"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_lane_pacer_never_passes_its_rate_whatever_the_wake_ups(seed: int) -> None:
    """An injected clock: the lane wakes on time, late (a loaded host), or much too early;
    over every window it queues at most rate x window plus its credit of blocks, and
    over the run it keeps its rate (late wake-ups made up for within the credit)."""
    rate, wire, block, credit = 1e6, 1500, 56, 4
    pacer = LanePacer(bytes_per_s=rate, wire=wire, credit_blocks=credit)
    rng = random.Random(seed)
    now, admitted = 0.0, []
    while now < 60.0:
        wait = pacer.delay(now)
        if wait <= 0:
            pacer.admit(now, block)
            admitted.append(now)
            continue
        now += rng.choice([wait, wait + rng.uniform(0, 0.3), wait * rng.uniform(0, 1)])
    per_block = block * wire
    bound_blocks = (credit + 1) * per_block
    for i, start in enumerate(admitted):
        for span in (0.01, 0.1, 1.0, 10.0):
            inside = sum(1 for t in admitted[i:] if t < start + span)
            assert inside * per_block <= rate * span + bound_blocks, (start, span, inside)
    assert len(admitted) * per_block >= 0.95 * rate * 60.0


async def test_the_lane_keeps_to_its_rate_on_a_real_socket(tmp_path: Path) -> None:
    """A 4 MB file on a lane of 8 Mb/s under a link of 400 Mb/s, into a real UDP socket:
    the bytes that arrive over the window stay under the lane's rate (plus its credit of
    blocks), not the link's; at the link's rate the whole file would be there in 0.2 s.
    A loaded host can only send less: the bound is an upper one, with room to spare."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    link = validate(
        TxLink,
        {"destination": "127.0.0.1", "port": rx.getsockname()[1], "rate_mbps": 400.0},
        "tx.toml",
    )
    lane_config = _lane(share=1.0, rate_mbps=8.0)
    watch = _watch(tmp_path / "ot", complete_when="renamed")
    queue = LaneQueue(capacity=65536, interleave=1, file_capacity=65536)
    sock = deaf_udp_socket(link)
    sender = PacedSender(link, queue, sock)
    lane = FileLane(
        lane_config,
        [watch],
        link=link,
        key=SigningKey(Ed25519PrivateKey.generate()),
        epoch=1,
        queue=queue.files,
        notify=sender.notify,
    )
    watch.directory.mkdir()
    path = watch.directory / "big.bin"
    path.write_bytes(os.urandom(4_000_000))
    received, window_s = 0, 1.5
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(sender.run()),
                group.create_task(lane.send_file(watch, path)),
            ]
            first: float | None = None
            while first is None or loop.time() < first + window_s:
                try:
                    data = rx.recv(65535)
                except BlockingIOError:
                    await asyncio.sleep(0.002)
                    continue
                first = loop.time() if first is None else first
                received += len(data) + IPV4_UDP_OVERHEAD
            for task in tasks:
                task.cancel()
    finally:
        rx.close()
        sock.close()
    fec = link.fec  # the lane's blocks: the link's FEC, k 32 + 24 repair
    per_block = (fec.k + fec.repair_for(fec.k)) * (link.datagram_size + IPV4_UDP_OVERHEAD)
    bound = 8e6 / 8 * window_s + (lane_config.queue_blocks + 1) * per_block
    assert 0 < received <= bound, (received, bound)
    assert received < 4_000_000  # at the link's rate the whole file would have come

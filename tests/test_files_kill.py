"""Files across a SIGKILL: the real daemons as child processes, killed mid-file.

``diode-tx`` and ``diode-rx`` run as processes of their own (the configs of
``diode bench files``: a tag stream and a file lane on its own port, on
loopback at 40 Mb/s), with a mosquitto the test started. A file is dropped
into the watched folder, and one daemon is killed with SIGKILL once the
receiver's part file holds some of it. Whatever the moment, the file is
never renamed into place half-written: it arrives whole and byte for byte
equal after the restart (the receiver resumes its part file from the chunk
map, the transmitter sends the file again and the receiver merges the
rounds, the carousel sends what a dead receiver missed), and nothing else is
left in the target folder.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from diode.benchmarks import harness as h
from diode.benchmarks.files import configs
from diode.loopback import free_port, free_udp_port
from receiver.files import PART_PREFIX
from tests.support.mosquitto import Mosquitto

SIZE = 6_000_000  # about 130 chunks: 1.5-3 s a round at 40 Mb/s


def _wait(predicate: Callable[[], bool], within: float, *daemons: h.Daemon) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        for daemon in daemons:
            daemon.check()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _part_with_data(it: Path) -> bool:
    """A part file with at least 1 MB written into it: the receiver is mid-file."""
    for path in it.glob(f"{PART_PREFIX}*"):
        if not path.name.endswith((".map", ".tmp")):
            try:
                if path.stat().st_blocks * 512 >= 1_000_000:
                    return True
            except OSError:
                pass
    return False


def _setup(tmp_path: Path, mosquitto: Mosquitto, watch: dict[str, object]) -> tuple[Path, Path]:
    return configs(
        tmp_path,
        port=free_udp_port(),
        broker_port=mosquitto.port,
        metrics=free_port(),
        rate_mbps=40,
        telemetry_hz=0,
        share=1.0,
        file_port=free_udp_port(),
        watch=watch,
    )


def _drop(tmp_path: Path, name: str) -> tuple[bytes, Path]:
    data = random.Random(name).randbytes(SIZE)
    staged = tmp_path / f".{name}"
    staged.write_bytes(data)
    source = tmp_path / "ot" / name
    staged.replace(source)
    return data, source


def _received_ok(rx: h.Daemon, name: str) -> list[dict[str, object]]:
    return [e for e in rx.log_events("file received") if e.get("name") == name]


def test_receiver_killed_mid_file_never_places_it_half_written_and_completes_it(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # Sent once, then on the carousel: a receiver that was dead for part of the
    # round gets what it missed from the next one.
    tx_conf, rx_conf = _setup(tmp_path, mosquitto, {"carousel_s": 600})
    it = tmp_path / "it"
    rx = h.Daemon.rx(rx_conf)
    tx = h.Daemon.tx(tx_conf)
    try:
        time.sleep(1.0)
        data, _ = _drop(tmp_path, "historian.csv")
        _wait(lambda: _part_with_data(it), 60, rx, tx)
        rx.proc.kill()  # SIGKILL: no chunk map saved, no part closed
        rx.proc.wait()
        assert not (it / "historian.csv").exists()
        time.sleep(1.0)  # the chunks sent now are lost to it
        rx = h.Daemon.rx(rx_conf)
        _wait(lambda: bool(_received_ok(rx, "historian.csv")), 90, rx, tx)
        assert (it / "historian.csv").read_bytes() == data
        assert sorted(p.name for p in it.iterdir()) == ["historian.csv"]
    finally:
        tx.stop()
        rx.stop()


def test_transmitter_killed_mid_file_never_places_it_half_written_and_sends_it_again(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    tx_conf, rx_conf = _setup(tmp_path, mosquitto, {"after_send": "delete"})
    it = tmp_path / "it"
    rx = h.Daemon.rx(rx_conf)
    tx = h.Daemon.tx(tx_conf)
    try:
        time.sleep(1.0)
        data, source = _drop(tmp_path, "camera.png")
        _wait(lambda: _part_with_data(it), 60, rx, tx)
        tx.proc.kill()
        tx.proc.wait()
        time.sleep(0.5)
        assert source.exists()  # not sent whole: not deleted
        assert not (it / "camera.png").exists()
        tx = h.Daemon.tx(tx_conf)  # a new epoch; the same file id, so the receiver merges
        _wait(lambda: bool(_received_ok(rx, "camera.png")), 90, rx, tx)
        assert (it / "camera.png").read_bytes() == data
        assert sorted(p.name for p in it.iterdir()) == ["camera.png"]
        _wait(lambda: not os.path.exists(source), 30, rx, tx)  # deleted once sent whole
    finally:
        tx.stop()
        rx.stop()

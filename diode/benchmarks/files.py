"""``diode bench files``: file goodput beside pydiode and udpcast, RSS and telemetry latency.

Both daemons as child processes on loopback, 1472-byte datagrams, ``rate_mbps``
(1000) as the link cap of every tool, the file lane at share 1.0 with its own
FEC (``FILES_FEC``) and its own rate (``[file_lane] rate_mbps``, by default
its default: what the receiver drains; the link cap alone would overrun it):

- **goodput**, ``rounds`` rounds alternating diode / pydiode 1472 B / pydiode
  64 KB / udpcast, medians reported: a file of ``size_mb`` random bytes is
  renamed into the watched folder; the time runs from the rename until the
  receiver renamed the verified file into place. Goodput = file bytes x 8 /
  that time. pydiode 1.0 (redundancy 2, its default) carries the same bytes at
  the same cap with its default 64 KB datagrams and patched to 1472-byte
  ones; udpcast (``--async --fec 8x32/128``) in a network namespace of its own.
- **beside telemetry**: a synthetic source generates ``telemetry_hz`` tag
  updates/s into MQTT (per tag, QoS 0; ``mosquitto_sub`` stamps each
  arrival). ``seconds`` without a file, then a file of ``big_gb`` random
  bytes is dropped and ``seconds`` more are measured while it flows; the p99
  latency of each window, the file's goodput, and the peak RSS (VmHWM) of
  both daemons over the whole transfer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from diode.benchmarks import harness as h
from diode.benchmarks.link import DEFAULT_PYDIODE_VENV, pydiode_venv
from diode.benchmarks.tags import _pct, _Subscriber, parse
from diode.config.files import FILE_LANE_MBPS
from diode.keys import write_keypair
from diode.loopback import free_port, free_udp_port

LANE = 2
_PYDIODE_1472 = (
    "import sys, pydiode.common as c, pydiode.send as s, pydiode.pydiode as p\n"
    "c.UDP_MAX_BYTES = 1472; c.MAX_PAYLOAD = 1472 - c.PACKET_HEADER.size\n"
    "for m in (s, p):\n"
    "    for n in ('UDP_MAX_BYTES', 'MAX_PAYLOAD'):\n"
    "        if hasattr(m, n): setattr(m, n, getattr(c, n))\n"
    "sys.argv[0] = 'pydiode'; sys.exit(p.main())\n"
)


def configs(
    work: Path,
    *,
    port: int,
    broker_port: int,
    metrics: int,
    rate_mbps: float,
    telemetry_hz: int,
    share: float,
    file_port: int | None,
    watch: dict[str, Any] | None = None,
    lane_fec: dict[str, Any] | None = None,
    lane_rate_mbps: float | None = None,
) -> tuple[Path, Path]:
    """tx.toml and rx.toml in ``work``: a tag stream, a file lane, ``work/ot`` -> ``work/it``;
    ``watch`` overrides the ``[[files]]`` settings."""
    tx_key, tx_pub = h.keys(work)
    lane_key, lane_pub, _ = write_keypair(work, "files")
    tx: dict[str, Any] = {
        "transmitter": {
            "stream_id": h.STREAM,
            "private_key": tx_key,
            "state_dir": work / "tx-state",
        },
        "link": {"destination": "127.0.0.1", "port": port, "rate_mbps": rate_mbps},
        "file_lane": {
            "stream_id": LANE,
            "private_key": lane_key,
            "share": share,
            **({"port": file_port} if file_port else {}),
            **({"fec": lane_fec} if lane_fec else {}),
            **({"rate_mbps": lane_rate_mbps} if lane_rate_mbps else {}),
        },
        "files": [
            {"directory": work / "ot", "complete_when": "renamed", "poll_s": 0.05, **(watch or {})}
        ],
        "log": {"level": "info", "format": "json"},
    }
    if telemetry_hz:
        tx["synthetic"] = {
            "sources": [{"name": "plc0", "tags": 100, "rate_hz": telemetry_hz, "batch_ms": 5.0}]
        }
    rx = {
        "receiver": {
            "listen": "127.0.0.1",
            "port": port,
            "state_dir": work / "rx-state",
            "metrics_port": metrics,
            **({"file_port": file_port} if file_port else {}),
        },
        "mqtt": {
            "host": "127.0.0.1",
            "port": broker_port,
            "client_id": "diode-bench-rx",
            "spool_path": work / "rx-state" / "spool.sqlite3",
        },
        "streams": [
            {"id": h.STREAM, "public_keys": [tx_pub], "output": {"prefix": "bench", "site": "s"}},
            {
                "id": LANE,
                "public_keys": [lane_pub],
                "output": {"prefix": "bench", "site": "s"},
                "files": {"directory": work / "it"},
            },
        ],
        "log": {"level": "info", "format": "json"},
    }
    (work / "ot").mkdir()
    tx_path, rx_path = work / "tx.toml", work / "rx.toml"
    tx_path.write_text(h.to_toml(tx))
    rx_path.write_text(h.to_toml(rx))
    return tx_path, rx_path


def _write_random(path: Path, nbytes: int) -> None:
    with path.open("wb") as f:
        left = nbytes
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            left -= len(chunk)


def _write_sparse(path: Path, nbytes: int) -> None:
    """Mostly a hole, with 1 MiB of random data every 256 MiB so it is not all zeros."""
    with path.open("wb") as f:
        f.truncate(nbytes)
        for offset in range(0, nbytes - (1 << 20), 256 << 20):
            f.seek(offset)
            f.write(os.urandom(1 << 20))


def _drop(work: Path, source: Path) -> tuple[Path, float]:
    """Rename ``source`` into the watched folder; (where it will arrive, when)."""
    target = work / "it" / source.name
    start = time.monotonic()
    source.replace(work / "ot" / source.name)
    return target, start


def _wait_arrival(target: Path, rx: h.Daemon, tx: h.Daemon, timeout_s: float) -> tuple[float, str]:
    """(when, result): the file in place (``ok``), or the receiver's verdict on it."""
    deadline = time.monotonic() + timeout_s
    looked = time.monotonic()
    while not target.exists():
        rx.check()
        tx.check()
        now = time.monotonic()
        if now > deadline:
            return now, "timeout"
        if now - looked > 0.5:
            looked = now
            failed = rx.log_events("file not received")
            if failed:
                return now, str(failed[-1].get("result"))
        time.sleep(0.01)
    return time.monotonic(), "ok"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# A lane FEC for files: 128 source symbols a block (a chunk of 181 KB), 8 + 4 repair:
# 91 % of the datagrams carry file bytes, against 57 % at the link's default (k 32,
# 8 + 16 repair), and the Reed-Solomon encoder, whose cost per byte grows with the repair
# symbols per block (the transmitter's largest cost, docs/BENCHMARKS.md §7), does half
# the work; a loss beyond it is the carousel's (or repeat's) to cover.
FILES_FEC = {"k": 128, "repair_ratio": 0.0625, "repair_burst": 4}


def diode_goodput(
    *,
    size_mb: float,
    rate_mbps: float,
    share: float = 1.0,
    own_port: bool = True,
    lane_fec: dict[str, Any] | None = None,
    lane_rate_mbps: float | None = None,
) -> dict[str, Any]:
    """One file through both daemons; ``lane_rate_mbps`` None: ``[file_lane] rate_mbps``'s
    default (what one receiver core drains), the link itself at ``rate_mbps``."""
    nbytes = int(size_mb * 1e6)
    with tempfile.TemporaryDirectory(prefix="diode-bench-files-") as tmp:
        work = Path(tmp)
        port, metrics = free_udp_port(), free_port()
        broker = h.Broker(work)
        with h.stopping(broker):
            tx_conf, rx_conf = configs(
                work, port=port, broker_port=broker.port, metrics=metrics,
                rate_mbps=rate_mbps, telemetry_hz=0, share=share,
                file_port=free_udp_port() if own_port else None, lane_fec=lane_fec,
                lane_rate_mbps=lane_rate_mbps,
            )  # fmt: skip
            source = work / "payload.bin"
            _write_random(source, nbytes)
            rx = h.Daemon.rx(rx_conf)
            with h.stopping(rx):
                h.wait_metrics(metrics, rx)
                tx = h.Daemon.tx(tx_conf)
                with h.stopping(tx):
                    time.sleep(1.0)
                    load = _load()
                    c0 = (tx.cpu_s(), rx.cpu_s())
                    target, start = _drop(work, source)
                    end, result = _wait_arrival(target, rx, tx, 600)
                    c1 = (tx.cpu_s(), rx.cpu_s())
                    hwm = (tx.hwm_mb(), rx.hwm_mb())
                    intact = result == "ok" and _same(work / "ot" / source.name, target)
                    m = h.rx_metrics(metrics)
    elapsed = end - start
    return {
        "bytes": nbytes,
        "lane_fec": lane_fec or "link default",
        "lane_wire_mbps": min(share * rate_mbps, lane_rate_mbps or FILE_LANE_MBPS),
        "seconds": round(elapsed, 2),
        "goodput_mbps": round(nbytes * 8 / elapsed / 1e6, 1) if result == "ok" else 0.0,
        "result": result,
        "intact": intact,
        "records_lost": int(m.get("records_lost", 0)),
        "kernel_drops": int(m.get("kernel_drops", 0)),
        "file_kernel_drops": int(m.get("file_kernel_drops", 0)),
        "tx_cpu_share": round((c1[0] - c0[0]) / elapsed, 2),
        "rx_cpu_share": round((c1[1] - c0[1]) / elapsed, 2),
        "tx_rss_peak_mb": round(hwm[0], 1),
        "rx_rss_peak_mb": round(hwm[1], 1),
        "load_before": load,
        "load_after": _load(),
    }


def _same(a: Path, b: Path) -> bool:
    done = subprocess.run(["cmp", "-s", str(a), str(b)], check=False)  # noqa: S603, S607
    return done.returncode == 0


def pydiode_goodput(exe: Path, *, nbytes: int, rate_mbps: float, small: bool) -> dict[str, Any]:
    """pydiode send | receive over loopback; ``small``: patched to 1472-byte datagrams."""
    port = free_udp_port()
    python = exe.parent / "python"
    prefix = [str(python), "-c", _PYDIODE_1472] if small else [str(exe)]
    with tempfile.TemporaryDirectory(prefix="diode-bench-pydiode-") as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        _write_random(src, nbytes)
        with dst.open("wb") as out:
            receiver = subprocess.Popen(  # noqa: S603
                [*prefix, "receive", "127.0.0.1", "--port", str(port)], stdout=out
            )
            time.sleep(0.5)
            load = _load()
            start = time.monotonic()
            with src.open("rb") as inp:
                subprocess.run(  # noqa: S603
                    [*prefix, "send", "127.0.0.1", "127.0.0.1", "--port", str(port),
                     "--max-bitrate", str(int(rate_mbps * 1e6))],
                    stdin=inp,
                    check=True,
                )  # fmt: skip
            try:
                receiver.wait(timeout=max(60.0, nbytes * 8 / 20e6))
            except subprocess.TimeoutExpired:
                receiver.kill()
                receiver.wait()
            elapsed = time.monotonic() - start
        intact = _same(src, dst)
    return {
        "datagram_bytes": 1472 if small else 65507,
        "bytes": nbytes,
        "seconds": round(elapsed, 2),
        "goodput_mbps": round(nbytes * 8 / elapsed / 1e6, 1),
        "intact": intact,
        "load_before": load,
    }


_UDPCAST = """
set -e
ip link set lo up
ip link set lo multicast on
ip route add 224.0.0.0/4 dev lo
udp-receiver --interface lo --nokbd --file "$2" --mcast-rdv-address 224.0.0.1 2>"$3.rx" &
receiver=$!
sleep 0.5
start=$(date +%s.%N)
udp-sender --interface lo --nokbd --file "$1" --async --fec "$5" --max-bitrate "$4" \
    --autostart 1 --mcast-rdv-address 224.0.0.1 --mcast-data-address 224.0.0.2 2>"$3.tx"
wait $receiver
end=$(date +%s.%N)
echo "$start $end"
"""


def udpcast_goodput(*, nbytes: int, rate_mbps: float, fec: str = "8x8/128") -> dict[str, Any]:
    """udp-sender --async --fec | udp-receiver (udpcast 20120424), in a network namespace
    of its own (``unshare -n``: loopback with multicast on and a 224/4 route, which the
    host's loopback does not have; udpcast sends its data and its one-way "hello" to
    multicast groups, and over the host's loopback the receiver got 0 bytes).

    1456-byte payloads (udpcast's largest), FEC ``fec`` (8x8/128: 8 stripes, 8 repair
    per 128 data blocks in each, its manual's example); the time runs from
    udp-sender's start (its hello, ``--autostart 1``) to udp-receiver's exit.
    """
    with tempfile.TemporaryDirectory(prefix="diode-bench-udpcast-") as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        _write_random(src, nbytes)
        load = _load()
        done = subprocess.run(  # noqa: S603
            ["unshare", "-n", "bash", "-c", _UDPCAST, "udpcast",  # noqa: S607
             str(src), str(dst), str(Path(tmp) / "log"), f"{int(rate_mbps)}m", fec],
            capture_output=True, text=True, check=False, timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            logs = [Path(tmp) / f"log.{side}" for side in ("rx", "tx")]
            said = " | ".join(p.read_text(errors="replace")[-300:] for p in logs if p.exists())
            return {
                "error": f"exit {done.returncode}: {done.stderr[-200:]} {said}",
                "load_before": load,
            }
        start, end = (float(x) for x in done.stdout.split()[-2:])
        intact = dst.exists() and _same(src, dst)
    elapsed = end - start
    return {
        "payload_bytes": 1456,
        "fec": fec,
        "bytes": nbytes,
        "seconds": round(elapsed, 2),
        "goodput_mbps": round(nbytes * 8 / elapsed / 1e6, 1) if intact else 0.0,
        "intact": intact,
        "load_before": load,
    }


def beside_telemetry(
    *,
    big_gb: float,
    rate_mbps: float,
    telemetry_hz: int,
    seconds: float,
    share: float = 1.0,
    own_port: bool = True,
    wait_file: bool = True,
    dense: bool = False,
    lane_fec: dict[str, Any] | None = None,
    lane_rate_mbps: float | None = None,
) -> dict[str, Any]:
    """Tag latency without, then with a file flowing; ``wait_file``: until it arrives
    (its goodput and the peak RSS over the whole transfer), else only the two windows.
    ``dense``: random bytes instead of a sparse file, whose holes cross in a few records
    (FileHoles) and so would not keep the lane busy through the window."""
    nbytes = int(big_gb * 1e9)
    with tempfile.TemporaryDirectory(prefix="diode-bench-files-") as tmp:
        work = Path(tmp)
        port, metrics = free_udp_port(), free_port()
        broker = h.Broker(work)
        with h.stopping(broker):
            sub = _Subscriber(broker.port, 0, work / "sub.txt")
            try:
                tx_conf, rx_conf = configs(
                    work, port=port, broker_port=broker.port, metrics=metrics,
                    rate_mbps=rate_mbps, telemetry_hz=telemetry_hz, share=share,
                    file_port=free_udp_port() if own_port else None,
                    lane_fec=lane_fec, lane_rate_mbps=lane_rate_mbps,
                )  # fmt: skip
                source = work / "big.bin"
                (_write_random if dense else _write_sparse)(source, nbytes)
                rx = h.Daemon.rx(rx_conf)
                with h.stopping(rx):
                    h.wait_metrics(metrics, rx)
                    tx = h.Daemon.tx(tx_conf)
                    with h.stopping(tx):
                        time.sleep(2.0)  # the first deliveries, the catalogue
                        quiet = (time.time(), time.time() + seconds)
                        load_quiet = _load()
                        time.sleep(seconds)
                        target, start = _drop(work, source)
                        flowing = (time.time() + 0.5, time.time() + 0.5 + seconds)
                        time.sleep(seconds + 0.5)
                        load_flowing = _load()
                        end, result = (
                            _wait_arrival(target, rx, tx, 1800)
                            if wait_file
                            else (time.monotonic(), "not waited for")
                        )
                        hwm = (tx.hwm_mb(), rx.hwm_mb())
                        size = target.stat().st_size if result == "ok" else 0
                        m = h.rx_metrics(metrics)
                sub.settle()
            finally:
                sub.stop()
            latencies = _by_window(sub.path, [quiet, flowing])
    elapsed = end - start
    return {
        "telemetry_hz": telemetry_hz,
        "file_bytes": nbytes,
        "file_result": result,
        "file_arrived_bytes": size,
        "file_seconds": round(elapsed, 1),
        "file_goodput_mbps": round(nbytes * 8 / elapsed / 1e6, 1) if result == "ok" else 0.0,
        "file_still_flowing_at_window_end": elapsed > seconds + 0.5,
        "records_lost": int(m.get("records_lost", 0)),
        "kernel_drops": int(m.get("kernel_drops", 0)),
        "file_kernel_drops": int(m.get("file_kernel_drops", 0)),
        "own_port": own_port,
        "lane_fec": lane_fec or "link default",
        "lane_wire_mbps": min(share * rate_mbps, lane_rate_mbps or FILE_LANE_MBPS),
        "latency_ms_without_file": _summary(latencies[0]),
        "latency_ms_with_file": _summary(latencies[1]),
        "tx_rss_peak_mb": round(hwm[0], 1),
        "rx_rss_peak_mb": round(hwm[1], 1),
        "load_without_file": load_quiet,
        "load_with_file": load_flowing,
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "updates": len(values),
        "p50": _pct(values, 0.5),
        "p99": _pct(values, 0.99),
        "max": round(max(values), 2) if values else 0.0,
    }


def _by_window(path: Path, windows: list[tuple[float, float]]) -> list[list[float]]:
    """Latencies of updates that arrived inside each (start, end) wall-clock window."""
    out: list[list[float]] = [[] for _ in windows]
    lines = path.read_bytes().splitlines()
    for i, (start, end) in enumerate(windows):
        part = path.with_suffix(f".{i}")
        part.write_bytes(
            b"".join(line + b"\n" for line in lines if start <= float(line.split(b" ", 1)[0]) < end)
        )
        _, out[i] = parse(part)
    return out


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose goodput is the median (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: float(r.get("goodput_mbps", 0.0)))
    return ordered[(len(ordered) - 1) // 2]


def _udpcast_here() -> bool:
    """udpcast installed, and root for its network namespace (``unshare -n``)."""
    return shutil.which("udp-sender") is not None and os.geteuid() == 0


def files(
    *,
    size_mb: float = 200.0,
    big_gb: float = 2.0,
    rate_mbps: float = 1000.0,
    telemetry_hz: int = 1000,
    seconds: float = 10.0,
    share: float = 1.0,
    rounds: int = 3,
    lane_fec: dict[str, Any] | None = FILES_FEC,
    lane_rate_mbps: float | None = None,
    pydiode: Path | None = DEFAULT_PYDIODE_VENV,
    udpcast: bool = True,
) -> dict[str, Any]:
    """Goodput side by side, ``rounds`` rounds alternating diode / pydiode 1472 B /
    pydiode 64 KB / udpcast, all at the link cap ``rate_mbps``; the medians; then the
    tags' latency without and with a dense file of ``big_gb`` flowing, and the peak
    RSS of both daemons over its whole transfer."""
    nbytes = int(size_mb * 1e6)
    exe = pydiode_venv(pydiode) if pydiode is not None else None
    with_udpcast = udpcast and _udpcast_here()
    runs: dict[str, list[dict[str, Any]]] = {"diode": []}
    for _ in range(rounds):
        runs["diode"].append(
            diode_goodput(
                size_mb=size_mb, rate_mbps=rate_mbps, share=share,
                lane_fec=lane_fec, lane_rate_mbps=lane_rate_mbps,
            )
        )  # fmt: skip
        if exe is not None:
            for key, small in (("pydiode_1472", True), ("pydiode_64k", False)):
                runs.setdefault(key, []).append(
                    pydiode_goodput(exe, nbytes=nbytes, rate_mbps=rate_mbps, small=small)
                )
        if with_udpcast:
            runs.setdefault("udpcast", []).append(
                udpcast_goodput(nbytes=nbytes, rate_mbps=rate_mbps, fec="8x32/128")
            )
    report: dict[str, Any] = {
        "settings": {
            "rate_mbps": rate_mbps,
            "datagram_size": 1472,
            "lane_fec": lane_fec or "link default (k 32, repair 0.25 + 16)",
            "file_lane_share": share,
            "lane_rate_mbps": lane_rate_mbps or FILE_LANE_MBPS,
            "rounds": rounds,
            "cpus": os.cpu_count(),
        },
        "runs": {key: [r.get("goodput_mbps", 0.0) for r in value] for key, value in runs.items()},
        "diode_all_intact": all(r["intact"] for r in runs["diode"]),
    }
    for key, value in runs.items():
        report[key] = _median_run(value)
    ours = report["diode"]["goodput_mbps"]
    for key in ("pydiode_1472", "pydiode_64k"):
        theirs = report.get(key, {}).get("goodput_mbps")
        if theirs:
            report[f"ratio_vs_{key}"] = round(ours / theirs, 2)
    if big_gb > 0:
        report["beside_telemetry"] = beside_telemetry(
            big_gb=big_gb,
            rate_mbps=rate_mbps,
            telemetry_hz=telemetry_hz,
            seconds=seconds,
            share=share,
            dense=True,
            lane_fec=lane_fec,
            lane_rate_mbps=lane_rate_mbps,
        )
    return report

"""How long a receiver restart the link socket's buffer covers (``diode bench restart``).

While diode-rx restarts on a socket systemd holds (``diode-rx.socket``), the
kernel queues what arrives until the buffer is full, then drops. This
benchmark stands where the dead receiver would: a UDP socket with the buffer
of the socket unit (``ReceiveBuffer=32M``, set with SO_RCVBUFFORCE as systemd
does), bound and never read, and a real diode-tx sending a synthetic source at
each rate. Every ``SAMPLE_S`` it reads the socket's queue (``rx_queue`` of
/proc/net/udp: what the kernel charges the buffer, datagram payload plus its
own per-packet overhead) and drop count.

Per rate it reports the fill rate (bytes charged per second, fitted after the
first seconds), the restart that buffer covers (the buffer's limit divided by
the fill rate), and, when the run was long enough to fill it, the seconds until
the first drop, measured.

``repeat_cost`` (``diode bench repeat``) measures what time diversity costs the
transmitter: its CPU and the bytes it puts on the wire at each rate, without
and with ``repeat_after_s``, a thread keeping the far socket empty.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diode.benchmarks.harness import Daemon, keys, stopping, tx_config
from diode.loopback import free_udp_port

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SOCKET_UNIT_BUFFER = 32 * 1024 * 1024  # diode-rx.socket ReceiveBuffer=32M
SAMPLE_S = 0.1
WARMUP_S = 2.0


def _queue(sock: socket.socket) -> tuple[int, int]:
    """(bytes charged to the receive buffer, datagrams dropped) for this socket."""
    inode = os.fstat(sock.fileno()).st_ino
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[9]) == inode:
            return int(fields[4].split(":")[1], 16), int(fields[12])
    raise RuntimeError("socket not in /proc/net/udp")


def _slope(points: Sequence[tuple[float, int]]) -> float:
    """Least-squares bytes per second."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_b = sum(b for _, b in points) / n
    num = sum((t - mean_t) * (b - mean_b) for t, b in points)
    den = sum((t - mean_t) ** 2 for t, _ in points)
    return num / den if den else 0.0


def one_rate(rate: int, *, seconds: float, tags: int, batch_ms: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="diode-bench-restart-") as d:
        workdir = Path(d)
        private, _ = keys(workdir)
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sink.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_UNIT_BUFFER)
        except PermissionError:
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_UNIT_BUFFER)
        sink.bind(("127.0.0.1", free_udp_port()))
        limit = sink.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # what the kernel allows
        source = {"name": "plc", "tags": tags, "rate_hz": float(rate), "batch_ms": batch_ms}
        config = tx_config(
            workdir,
            private=private,
            port=sink.getsockname()[1],
            rate_mbps=100.0,
            sources=[source],
            extra={},
        )
        tx = Daemon.tx(config)
        points: list[tuple[float, int]] = []
        first_drop_s = None
        with stopping(tx), sink:
            start = None
            while True:
                charged, drops = _queue(sink)
                now = time.monotonic()
                if start is None:
                    if charged == 0:
                        time.sleep(0.01)
                        tx.check()
                        continue
                    start = now  # the first datagram: the receiver "died" here
                t = now - start
                points.append((t, charged))
                if drops:
                    first_drop_s = t
                    break
                if t >= seconds:
                    break
                time.sleep(SAMPLE_S)
        warmup = min(WARMUP_S, seconds / 2)  # short runs (--quick) fit their second half
        fitted = [(t, b) for t, b in points if t >= warmup]
        slope = _slope(fitted)
        return {
            "updates_per_s": rate,
            "buffer_limit_bytes": limit,
            "fill_bytes_per_s": round(slope),
            "covers_s": round(limit / slope, 1) if slope > 0 else None,
            "first_drop_s": None if first_drop_s is None else round(first_drop_s, 1),
            "observed_s": round(points[-1][0], 1),
        }


def restart_buffer(
    *,
    rates: Sequence[int] = (1000, 10_000, 50_000),
    seconds: float = 20.0,
    tags: int = 1000,
    batch_ms: float = 100.0,
) -> dict[str, Any]:
    return {
        "settings": {
            "buffer": "ReceiveBuffer=32M (diode-rx.socket), SO_RCVBUFFORCE",
            "source": f"synthetic, {tags} tags, batches every {batch_ms} ms",
            "link": "default datagram size and FEC, rate_mbps 100",
            "load_average": os.getloadavg()[0],
        },
        "runs": [one_rate(r, seconds=seconds, tags=tags, batch_ms=batch_ms) for r in rates],
    }


# --- what time diversity costs -------------------------------------------------------------


def _drain_forever(sock: socket.socket, stop: threading.Event, seen: list[int]) -> None:
    """Keep the socket empty; ``seen`` = [bytes, datagrams] so far."""
    sock.settimeout(0.1)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            seen[0] += len(sock.recv(65535))
            seen[1] += 1


def repeat_cost_one(
    rate: int, repeat_after_s: float, *, seconds: float, tags: int, batch_ms: float
) -> dict[str, Any]:
    """diode-tx at ``rate`` into a socket a thread keeps empty: its CPU and what it sent."""
    with tempfile.TemporaryDirectory(prefix="diode-bench-repeat-") as d:
        workdir = Path(d)
        private, _ = keys(workdir)
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sink.bind(("127.0.0.1", free_udp_port()))
        stop = threading.Event()
        seen = [0, 0]
        reader = threading.Thread(target=_drain_forever, args=(sink, stop, seen), daemon=True)
        reader.start()
        source = {"name": "plc", "tags": tags, "rate_hz": float(rate), "batch_ms": batch_ms}
        config = tx_config(
            workdir,
            private=private,
            port=sink.getsockname()[1],
            rate_mbps=100.0,
            sources=[source],
            link={"repeat_after_s": repeat_after_s},
        )
        tx = Daemon.tx(config)
        try:
            # Past the first repeat_after_s: the repeats run at their steady rate.
            time.sleep(repeat_after_s + 2.0)
            tx.check()
            cpu0, t0, seen0 = tx.cpu_s(), time.monotonic(), list(seen)
            time.sleep(seconds)
            cpu = tx.cpu_s() - cpu0
            elapsed = time.monotonic() - t0
            wire = [b - a for a, b in zip(seen0, seen, strict=True)]
        finally:
            tx.stop()
            stop.set()
            reader.join()
            sink.close()
        (final,) = tx.log_events("transmitter stopped")[-1:]
        return {
            "updates_per_s": rate,
            "repeat_after_s": repeat_after_s,
            "tx_cpu_percent": round(100 * cpu / elapsed, 1),
            "tx_us_per_update": round(cpu / elapsed / rate * 1e6, 2),
            "datagrams_per_s": round(wire[1] / elapsed),
            "udp_payload_mbps": round(wire[0] * 8 / elapsed / 1e6, 2),
            "datagrams_sent": final["datagrams_sent"],
            "repeats_sent": final.get("repeats_sent", 0),
            "repeats_dropped": final.get("repeats_dropped", 0),
        }


def repeat_cost(
    *,
    rates: Sequence[int] = (1000, 10_000),
    repeat_after_s: float = 5.0,
    seconds: float = 10.0,
    tags: int = 1000,
    batch_ms: float = 100.0,
) -> dict[str, Any]:
    """Each rate without and with ``repeat_after_s``, the transmitter alone."""
    runs = [
        repeat_cost_one(rate, after, seconds=seconds, tags=tags, batch_ms=batch_ms)
        for rate in rates
        for after in (0.0, repeat_after_s)
    ]
    return {
        "settings": {
            "source": f"synthetic, {tags} tags, batches every {batch_ms} ms",
            "link": "default datagram size and FEC, rate_mbps 100",
            "measured_s": seconds,
            "load_average": os.getloadavg()[0],
        },
        "runs": runs,
    }

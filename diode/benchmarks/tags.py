"""``diode bench tags`` and ``diode bench cost``: tag updates end to end into MQTT.

A synthetic plant inside diode-tx (``[[synthetic.sources]]``: the pollers'
sending path, sink, report by exception, encoder, pacer) generates counting
values at a set total rate over ``devices`` devices; diode-rx publishes them
into a local mosquitto; ``mosquitto_sub`` (C, in a child process) writes every
message with its receipt time (``%U``) to a file, parsed after the run.

- Loss: every update is a new value of its tag, so the updates received are
  the distinct (tag, value) pairs; loss = generated (the transmitter's own
  count, from its final log line) - received. QoS 1 duplicates count once.
- Latency: receipt time - the sample's ``ts`` (the generation time; same host
  clock), over every update received.
- Cost: CPU seconds of each daemon over the steady window (after the first
  delivery) divided by the records the receiver delivered in that window (its
  ``records_delivered`` counter: what the receiving end counted, integrity
  refreshes included, not the nominal rate); peak RSS (VmHWM).

``tags`` raises the rate per payload mode until a run loses an update or its
p99 latency passes ``max_p99_ms``; ``cost`` runs per-tag QoS 0 at 10k and 50k.

Sparkplug (``sparkplug:0``, ``sparkplug:1``): the subscriber takes
``spBv1.0/#`` with hex payloads (``%x``), the births give the aliases, and
every DBIRTH and DDATA metric is an update, historical ones included
(Sparkplug timestamps are in milliseconds: latencies are accurate to 1 ms).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from diode.benchmarks import harness as h
from diode.loopback import free_port, free_udp_port

PROBE = "bench/probe"
DEVICES = 10
TAGS_PER_DEVICE = 100
DEFAULT_SWEEPS: dict[str, tuple[int, ...]] = {
    "per_tag:0": (10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000),
    "per_tag:1": (5_000, 10_000, 20_000, 30_000, 40_000),
    "batched:0": (50_000, 100_000, 200_000, 250_000, 300_000),
    "sparkplug:0": (50_000, 100_000, 200_000, 250_000, 300_000),
}


class _Subscriber:
    def __init__(self, port: int, qos: int, path: Path, *, sparkplug: bool = False) -> None:
        self.path = path
        topic, fmt = ("spBv1.0/#", "%U %t %x") if sparkplug else ("bench/#", "%U %t %p")
        self.proc = subprocess.Popen(  # noqa: S603
            ["mosquitto_sub", "-p", str(port), "-t", topic, "-t", PROBE,  # noqa: S607
             "-q", str(qos), "-F", fmt],
            stdout=path.open("wb"),
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            subprocess.run(  # noqa: S603
                ["mosquitto_pub", "-p", str(port), "-t", PROBE, "-m", "x", "-q", "1"],  # noqa: S607
                check=False,
            )
            time.sleep(0.1)
            if path.stat().st_size:
                return
        raise RuntimeError("the subscriber did not see the probe")

    def settle(self, quiet_s: float = 1.5, timeout_s: float = 60.0) -> None:
        """Wait until the file stopped growing for ``quiet_s``."""
        deadline = time.monotonic() + timeout_s
        size, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_size = self.path.stat().st_size
            if now_size != size:
                size, since = now_size, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_seconds_cache: dict[str, float] = {}


def _ts_s(ts: str) -> float:
    """RFC 3339 UTC with microseconds (receiver/payload.py) to Unix seconds."""
    head, frac = ts[:19], ts[20:26]
    base = _seconds_cache.get(head)
    if base is None:
        base = datetime.fromisoformat(head + "+00:00").timestamp()
        _seconds_cache[head] = base
    return base + int(frac) / 1e6


def parse_sparkplug(path: Path) -> tuple[int, list[float]]:
    """As :func:`parse`, for Sparkplug B: aliases from the births, every metric an update."""
    from receiver.sparkplug_payload import decode, value_of  # noqa: PLC0415 - sparkplug runs only

    seen: set[tuple[str, object]] = set()
    latencies: list[float] = []
    names: dict[int, tuple[str, int]] = {}
    with path.open("rb") as f:
        for raw in f:
            stamp, topic, hexed = raw.decode(errors="replace").rstrip("\n").split(" ", 2)
            parts = topic.split("/")
            if len(parts) != 5 or parts[2] not in ("DBIRTH", "DDATA"):
                continue
            received = float(stamp)
            for metric in decode(bytes.fromhex(hexed)).metrics:
                if parts[2] == "DBIRTH":
                    names[metric.alias] = (f"{parts[4]}/{metric.name}", metric.datatype)
                known = names.get(metric.alias)
                if known is None:
                    continue
                # Historical metrics are updates too (values older than a birth that
                # carried a later one): delivered, so counted.
                key = (known[0], value_of(metric, known[1]))
                if key not in seen:
                    seen.add(key)
                    latencies.append((received - metric.timestamp / 1000) * 1000)
    return len(seen), latencies


def parse(path: Path) -> tuple[int, list[float]]:
    """(distinct updates received, latencies in ms) from the subscriber's file.

    Latency is taken at an update's first arrival only: the transmitter's
    integrity refresh re-sends every tag's last value with its original source
    timestamp, and a QoS 1 repeat is the same update; timing those would measure
    the refresh period, not the pipeline.
    """
    seen: set[tuple[str, object]] = set()
    latencies: list[float] = []

    def take(key: tuple[str, object], ts: str, received: float) -> None:
        if key not in seen:
            seen.add(key)
            latencies.append((received - _ts_s(ts)) * 1000)

    with path.open("rb") as f:
        for raw in f:
            stamp, topic, payload = raw.decode(errors="replace").rstrip("\n").split(" ", 2)
            if "$" in topic or topic == PROBE:
                continue
            received = float(stamp)
            try:
                data = json.loads(payload)
            except ValueError:
                continue
            if "samples" in data:
                for s in data["samples"]:
                    take((f"{topic}/{s['tag']}", s["value"]), s["ts"], received)
            else:
                take((topic, data["value"]), data["ts"], received)
    return len(seen), latencies


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def run(  # noqa: PLR0915 - one flat run, step by step
    *,
    rate_hz: int,
    payload: str = "per_tag",
    qos: int = 0,
    seconds: float = 10.0,
    devices: int = DEVICES,
    tags_per_device: int = TAGS_PER_DEVICE,
    stall_s: float = 0.0,
) -> dict[str, Any]:
    """One run at one rate; the figures of loss, latency and cost.

    ``stall_s``: the receiver is stopped (SIGSTOP) that long, 2 s into the
    window, as a host that froze or a process descheduled: its backlog waits in
    the kernel's socket buffer, and the run shows what catching up costs
    (peak RSS, latency) and that nothing is lost.
    """
    with tempfile.TemporaryDirectory(prefix="diode-bench-tags-") as tmp:
        work = Path(tmp)
        private, public = h.keys(work)
        port, metrics = free_udp_port(), free_port()
        broker = h.Broker(work)
        sparkplug = payload == "sparkplug"
        output: dict[str, Any] = {"payload": payload, "qos": qos}
        if sparkplug:
            output["sparkplug"] = {"group_id": "bench", "edge_node_id": "rx"}
        with h.stopping(broker):
            sub = _Subscriber(broker.port, qos, work / "sub.txt", sparkplug=sparkplug)
            try:
                rx = h.Daemon.rx(
                    h.rx_config(
                        work,
                        public=public,
                        port=port,
                        broker_port=broker.port,
                        metrics_port=metrics,
                        output=output,
                    )
                )
                with h.stopping(rx):
                    h.wait_metrics(metrics, rx)
                    sources = [
                        {
                            "name": f"plc{d}",
                            "tags": tags_per_device,
                            "rate_hz": rate_hz / devices,
                            "batch_ms": 5.0,
                        }
                        for d in range(devices)
                    ]
                    tx = h.Daemon.tx(
                        h.tx_config(
                            work, private=private, port=port, rate_mbps=1000.0, sources=sources
                        )
                    )
                    with h.stopping(tx):
                        deadline = time.monotonic() + 30
                        while h.rx_metrics(metrics).get("records_delivered", 0) == 0:
                            tx.check()
                            if time.monotonic() > deadline:
                                raise RuntimeError("nothing arrived at the receiver")
                            time.sleep(0.05)
                        t0, c0 = time.monotonic(), (tx.cpu_s(), rx.cpu_s())
                        m0 = h.rx_metrics(metrics)
                        d0 = m0.get("records_delivered", 0)
                        if stall_s:
                            time.sleep(2.0)
                            os.kill(rx.proc.pid, signal.SIGSTOP)
                            time.sleep(stall_s)
                            os.kill(rx.proc.pid, signal.SIGCONT)
                            time.sleep(max(seconds - 2.0 - stall_s, 0.0))
                        else:
                            time.sleep(seconds)
                        t1, c1 = time.monotonic(), (tx.cpu_s(), rx.cpu_s())
                        m1 = h.rx_metrics(metrics)
                        d1 = m1.get("records_delivered", 0)
                        hwm = (tx.hwm_mb(), rx.hwm_mb())
                        tx.check()
                    rx.check()
                    sub.settle()
                    m = h.rx_metrics(metrics)
                    hwm = (hwm[0], max(hwm[1], rx.hwm_mb()))
            finally:
                sub.stop()
            stopped = tx.log_events("transmitter stopped")
            generated = int(stopped[-1]["poll_generated"]) if stopped else -1
            received, latencies = (parse_sparkplug if sparkplug else parse)(sub.path)
    # Per update means per record the receiver counted in the window, never the
    # nominal rate: a transmitter that fell behind would otherwise look cheap.
    updates = max(d1 - d0, 1)
    return {
        "rate_hz": rate_hz,
        "payload": payload,
        "qos": qos,
        "seconds": round(t1 - t0, 2),
        "generated": generated,
        "received": received,
        "lost": generated - received,
        "rx_delivered_in_window": int(d1 - d0),
        # Per-block costs: how many datagrams and blocks carried those records.
        "rx_datagrams_in_window": int(m1.get("datagrams", 0) - m0.get("datagrams", 0)),
        "rx_blocks_in_window": int(
            m1.get("blocks_whole", 0)
            + m1.get("blocks_rebuilt", 0)
            - m0.get("blocks_whole", 0)
            - m0.get("blocks_rebuilt", 0)
        ),
        "tx_dropped": (stopped[-1]["records_dropped"] if stopped else None),
        "rx_records_lost": int(m.get("records_lost", 0)),
        "rx_mqtt_spooled": int(m.get("mqtt_spooled", 0)),
        "latency_ms": {
            "p50": _pct(latencies, 0.50),
            "p99": _pct(latencies, 0.99),
            "max": round(max(latencies), 2) if latencies else 0.0,
        },
        "tx_us_per_update": round((c1[0] - c0[0]) / updates * 1e6, 2),
        "rx_us_per_update": round((c1[1] - c0[1]) / updates * 1e6, 2),
        "tx_cpu_share": round((c1[0] - c0[0]) / (t1 - t0), 2),
        "rx_cpu_share": round((c1[1] - c0[1]) / (t1 - t0), 2),
        "tx_rss_peak_mb": round(hwm[0], 1),
        "rx_rss_peak_mb": round(hwm[1], 1),
        "rx_stalled_s": stall_s,
    }


def tags(
    *,
    modes: Sequence[str] = tuple(DEFAULT_SWEEPS),
    rates: Sequence[int] | None = None,
    seconds: float = 10.0,
    max_p99_ms: float = 100.0,
) -> dict[str, Any]:
    """Per mode ("per_tag:0" = payload:qos), raise the rate until loss or latency breaks."""
    report: dict[str, Any] = {
        "settings": {
            "devices": DEVICES,
            "tags_per_device": TAGS_PER_DEVICE,
            "seconds": seconds,
            "max_p99_ms": max_p99_ms,
            "linger_ms": 5.0,
        },
        "modes": {},
    }
    for mode in modes:
        payload, qos = mode.split(":")
        measure = functools.partial(
            _judged, payload=payload, qos=int(qos), seconds=seconds, max_p99_ms=max_p99_ms
        )
        best, runs = h.sweep(rates or DEFAULT_SWEEPS.get(mode, (10_000,)), measure)
        report["modes"][mode] = {"max_rate_ok": best, "runs": runs}
    return report


def _judged(
    rate: int, *, payload: str, qos: int, seconds: float, max_p99_ms: float
) -> dict[str, Any]:
    """One run, ``ok`` when nothing was lost and the p99 latency held."""
    result = run(rate_hz=rate, payload=payload, qos=qos, seconds=seconds)
    result["ok"] = result["lost"] == 0 and result["latency_ms"]["p99"] <= max_p99_ms
    return result


def cost(
    *, rates: Sequence[int] = (10_000, 50_000), seconds: float = 10.0, stall_s: float = 0.0
) -> dict[str, Any]:
    """Per-tag topics at QoS 0: CPU per update, peak RSS and latency at each rate.

    ``stall_s``: the receiver stopped that long in each run (see :func:`run`).
    """
    return {
        "settings": {
            "payload": "per_tag",
            "qos": 0,
            "devices": DEVICES,
            "seconds": seconds,
            "rx_stalled_s": stall_s,
        },
        "runs": [
            run(rate_hz=r, payload="per_tag", qos=0, seconds=seconds, stall_s=stall_s)
            for r in rates
        ],
    }

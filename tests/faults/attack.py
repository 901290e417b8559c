"""Scenario 7: floods of forged datagrams, one kind at a time, while a real stream flows.

A real stream of 1 000 updates/s runs transmitter -> relay -> receiver ->
mosquitto -> subscriber. For each kind of forgery (tests/faults/forgeries.py)
a separate process sends unique datagrams straight to the receiver's port for
``flood_s`` seconds, as fast as it can (or at ``rate`` a second). Measured per
kind, from the receiver's own reports and /proc:

- forged datagrams sent, and received (the receiver's datagram count during
  the flood minus the real ones the relay forwarded);
- receiver CPU per forged datagram: its CPU time during the flood, minus its
  rate before the flood, divided by the forged datagrams it took in;
- the real stream's latency (source timestamp to subscriber) during the flood;
- peak RSS (VmHWM) against the bound: the receiver's size before the first
  flood + ``max_assembly_mb`` + 16 MB;
- ``$status`` messages published during the flood, and its rejection figures;
- recovery: from the flood's end to the first value generated after it
  arriving at the subscriber.

Over the whole run, real records lost are counted twice and must agree: what
the receiver reported (its gaps) and what never reached MQTT.

``python -m tests.faults.attack [--flood-s 20] [--rate 0]`` prints the
table docs/RELIABILITY.md quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diode.keys import load_psk, write_psk
from receiver.app import STATUS_PERIOD_S
from tests.faults.flood import write_capture
from tests.faults.forgeries import KINDS
from tests.faults.harness import STREAM, Plant, Subscriber, synthetic_sent, wait_until
from tests.faults.scenarios import SEED, Result, _counted_run, _epoch, exact_accounting, reference
from tests.support.mosquitto import Mosquitto

REAL = [{"name": "plc", "tags": 50, "rate_hz": 1000.0, "batch_ms": 20.0}]
MAX_ASSEMBLY_MB = 16
FEC = {"k": 32, "repair_ratio": 0.25, "repair_burst": 16}  # the defaults, said out loud
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


@dataclass
class KindFigures:
    kind: str
    gated: bool
    sent: int = 0
    received: int = 0
    cpu_us: float = 0.0
    baseline_p50_ms: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    latency_max_ms: float = 0.0
    peak_rss_mb: float = 0.0
    bound_mb: float = 0.0
    statuses: int = 0
    recovery_s: float = 0.0
    kernel_drops: int = 0
    steered: int = 0  # taken by the quarantines in the kernel (receiver/steer.py), never read
    rejected: dict[str, int] = field(default_factory=dict)
    status_rejected: dict[str, Any] = field(default_factory=dict)


def _fresh_value_arrival(sub: Subscriber, after_ns: int) -> int | None:
    """Arrival (wall ns) of the first good value generated at or after ``after_ns``."""
    best = None
    with sub.lock:
        for seen in sub.values.values():
            for s in seen:
                if s.quality == "good" and s.at_ns >= after_ns and _ts_ns(s.ts) >= after_ns:
                    best = s.at_ns if best is None else min(best, s.at_ns)
    return best


def _ts_ns(ts: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1e9)


def _latencies(sub: Subscriber, start_ns: int, end_ns: int) -> list[float]:
    out = []
    with sub.lock:
        for seen in sub.values.values():
            for s in seen:
                if s.quality == "good" and start_ns <= s.at_ns <= end_ns:
                    out.append((s.at_ns - _ts_ns(s.ts)) / 1e6)
    return sorted(out)


def _pct(values: list[float], q: float) -> float:
    return round(values[min(len(values) - 1, int(q * len(values)))], 1) if values else 0.0


async def _one_kind(
    plant: Plant,
    sub: Subscriber,
    kind: str,
    *,
    gated: bool,
    flood_s: float,
    rate: float,
    baseline_kb: int,
    flooders: int = 1,
    seed: int,
) -> KindFigures:
    assert plant.rx is not None
    assert plant.relay is not None
    figures = KindFigures(kind, gated)
    counters = plant.rx_counters()
    seq = counters.get("blocks_delivered", 0) + counters.get("blocks_lost", 0)
    target = {
        "stream_id": STREAM,
        "key_id": plant.signing_key().key_id.hex(),
        "epoch": _epoch(plant),
        "seq": seq,
        "datagram_size": 1472,
        "fec": FEC,
        "gated": gated,
        "window": 2000,
    }
    capture = plant.tmp / "capture.bin"
    write_capture(capture, list(plant.relay.capture))
    # The receiver's CPU rate with the real stream only, just before the flood.
    cpu0, t0, calm_ns = cpu_s(plant.rx.pid), time.monotonic(), time.time_ns()
    await asyncio.sleep(2.0)
    figures.baseline_p50_ms = _pct(_latencies(sub, calm_ns, time.time_ns()), 0.5)
    cpu1, t1 = cpu_s(plant.rx.pid), time.monotonic()
    idle_rate = (cpu1 - cpu0) / (t1 - t0)
    before = plant.rx_counters()
    forwarded = plant.relay.stats.forwarded
    statuses = len(sub.status)
    start_ns = time.time_ns()
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 - polled below without blocking
            [
                sys.executable,
                "-m",
                "tests.faults.flood",
                kind,
                str(plant.rx_port),
                str(flood_s),
                json.dumps(target),
                str(capture),
                str(seed + 1000 * i),
                str(rate),
            ],
            stdout=subprocess.PIPE,
        )
        for i in range(flooders)
    ]
    while any(proc.poll() is None for proc in procs):
        await asyncio.sleep(0.25)
        assert plant.rx.alive(), "the receiver died under the flood"
        plant.rx_memory()
    outs = [proc.communicate()[0] for proc in procs]
    end_ns = time.time_ns()
    cpu2, t2 = cpu_s(plant.rx.pid), time.monotonic()
    figures.sent = sum(int(out.strip() or 0) for out in outs)
    figures.statuses = len(sub.status) - statuses
    # Recovery: the first value generated after the flood, published.
    await wait_until(
        lambda: _fresh_value_arrival(sub, end_ns) is not None,
        within=30,
        step=0.05,
        what=f"a fresh value after the {kind} flood",
    )
    arrival = _fresh_value_arrival(sub, end_ns)
    assert arrival is not None
    figures.recovery_s = round((arrival - end_ns) / 1e9, 2)
    await asyncio.sleep(1.0)
    after = plant.rx_counters()
    real = plant.relay.stats.forwarded - forwarded
    taken = after.get("datagrams", 0) - before.get("datagrams", 0)
    # Datagrams still queued in the socket at the flood's end are taken in during recovery.
    figures.received = max(taken - real, 0) if kind != "control" else 0
    # Steered datagrams reached the receiver's host and cost it the kernel's receive path,
    # but never the receiver: its CPU is divided by both (receiver/steer.py).
    figures.steered = sum(
        after.get(key, 0) - before.get(key, 0)
        for key in ("rejected_steered_late", "rejected_steered_replay")
    )
    spent = cpu_s(plant.rx.pid) - cpu1 - idle_rate * (time.monotonic() - t1)
    del cpu2, t2
    arrived = figures.received + figures.steered
    figures.cpu_us = round(spent / arrived * 1e6, 2) if arrived else 0.0
    figures.kernel_drops = after.get("kernel_drops", 0) - before.get("kernel_drops", 0)
    figures.rejected = {
        k[9:]: v - before.get(k, 0)
        for k, v in after.items()
        if k.startswith("rejected_") and v != before.get(k, 0)
    }
    lat = _latencies(sub, start_ns, end_ns)
    figures.latency_p50_ms, figures.latency_p99_ms = _pct(lat, 0.5), _pct(lat, 0.99)
    figures.latency_max_ms = round(lat[-1], 1) if lat else 0.0
    figures.peak_rss_mb = round(plant.rx_memory() / 1024, 1)
    figures.bound_mb = round(baseline_kb / 1024 + MAX_ASSEMBLY_MB + 16, 1)
    last = sub.last_status()
    figures.status_rejected = last.get("rejected", {})
    return figures


async def flood(
    tmp: Path,
    broker: Mosquitto,
    *,
    gated: bool,
    kinds: tuple[str, ...] = KINDS,
    flood_s: float = 20.0,
    rate: float = 0.0,
    flooders: int = 1,
    seed: int = SEED,
) -> tuple[Result, list[KindFigures]]:
    name = f"7. flood ({'link secret' if gated else 'no secret'}): {', '.join(kinds)}"
    result = Result(name, seed=seed)
    psk_file = tmp / "link.psk"
    stream: dict[str, Any] = {"link": {"datagram_size": 1472, "fec": FEC}}
    tx_section: dict[str, Any] = {}
    if gated:
        write_psk(psk_file)
        stream["psk_file"] = tx_section["psk_file"] = str(psk_file)
    plant = Plant(
        tmp,
        broker,
        REAL,
        receiver={"max_assembly_mb": float(MAX_ASSEMBLY_MB)},
        stream=stream,
        tx_section=tx_section,
        link={"fec": FEC},
        capture=True,
    )
    sub = Subscriber(broker.port)
    all_figures: list[KindFigures] = []

    async def attack() -> None:
        await asyncio.sleep(3.0)
        baseline_kb = plant.rx_memory()
        for i, kind in enumerate(kinds):
            figures = await _one_kind(
                plant,
                sub,
                kind,
                gated=gated,
                flood_s=flood_s,
                rate=rate,
                flooders=flooders,
                baseline_kb=baseline_kb,
                seed=seed + i,
            )
            all_figures.append(figures)
            result.note(
                f"{kind}: sent {figures.sent:,} ({figures.sent / flood_s:,.0f}/s), received "
                f"{figures.received:,}, steered {figures.steered:,}, kernel drops "
                f"{figures.kernel_drops:,}, {figures.cpu_us} us CPU each, latency before "
                f"{figures.baseline_p50_ms} ms, during p50/p99/max "
                f"{figures.latency_p50_ms}/{figures.latency_p99_ms}/{figures.latency_max_ms} ms, "
                f"peak RSS {figures.peak_rss_mb} MB (bound {figures.bound_mb} MB), "
                f"{figures.statuses} $status during, back {figures.recovery_s} s after; "
                f"rejected {figures.rejected}"
            )

    try:
        await _counted_run(plant, sub, result, 0, during=attack)
        assert plant.relay is not None
        psk = load_psk(psk_file) if gated else None
        ref = reference(plant, list(plant.relay.capture), psk=psk)
        sent = synthetic_sent(REAL, {"plc": result.sent})
        t, lost_records, _ = exact_accounting(plant, sub, sent, ref)
        result.published, result.lost = t.published, t.missing
        result.note(
            f"real records lost {lost_records} of {result.sent} "
            f"({100 * lost_records / max(result.sent, 1):.2f} %), every one reported"
        )
        assert t.duplicates == 0
        assert t.out_of_order == 0
        for figures in all_figures:
            assert plant.rx_peak_kb / 1024 <= figures.bound_mb, figures
            if flood_s > STATUS_PERIOD_S + 1:
                assert figures.statuses >= 1, f"no $status during the {figures.kind} flood"
        return result, all_figures
    finally:
        sub.close()
        await plant.close()


async def scenario(
    tmp: Path, broker: Mosquitto, *, gated: bool, flood_s: float = 10.0, seed: int = SEED
) -> Result:
    """Every kind in turn in one plant (the report's row; per-kind losses: ``main``)."""
    result, _ = await flood(tmp, broker, gated=gated, flood_s=flood_s, seed=seed)
    return result


def table(rows: list[tuple[KindFigures, Result]]) -> str:
    head = (
        "| link | kind | sent (/s) | received (steered) | rx CPU / forged | real lost (reported = "
        "observed) | latency before; during p50 / p99 / max | peak RSS / bound | "
        "$status during | back after |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for f, r in rows:
        share = 100 * r.reported_lost / max(r.sent, 1)
        lines.append(
            f"| {'secret' if f.gated else 'none'} | {f.kind} | {f.sent:,} "
            f"({f.sent / FLOOD_S_USED[0]:,.0f}) | {f.received:,} ({f.steered:,}) | {f.cpu_us} us | "
            f"{r.reported_lost:,} of {r.sent:,} ({share:.2f} %) | {f.baseline_p50_ms}; "
            f"{f.latency_p50_ms} / "
            f"{f.latency_p99_ms} / {f.latency_max_ms} ms | {f.peak_rss_mb} / {f.bound_mb} MB | "
            f"{f.statuses} | {f.recovery_s} s |"
        )
    return head + "\n".join(lines) + "\n"


FLOOD_S_USED = [20.0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.attack")
    parser.add_argument("--flood-s", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=0.0, help="forged datagrams/s; 0: max")
    parser.add_argument("--kinds", nargs="*", default=["control", *KINDS])
    parser.add_argument(
        "--flooders", type=int, default=1, help="flood processes at once (each --rate)"
    )
    parser.add_argument("--gated", choices=["yes", "no", "both"], default="both")
    args = parser.parse_args(argv)
    FLOOD_S_USED[0] = args.flood_s
    rows: list[tuple[KindFigures, Result]] = []
    modes = {"yes": [True], "no": [False], "both": [True, False]}[args.gated]
    print(f"load average before: {os.getloadavg()}", flush=True)
    for gated in modes:
        for kind in args.kinds:
            # One plant per kind: the real records lost belong to that kind alone.
            with tempfile.TemporaryDirectory(prefix="diode-attack-") as d:
                broker = Mosquitto(Path(d))
                broker.start()
                try:
                    result, figures = asyncio.run(
                        flood(
                            Path(d),
                            broker,
                            gated=gated,
                            kinds=(kind,),
                            flood_s=args.flood_s,
                            rate=args.rate,
                            flooders=args.flooders,
                        )
                    )
                finally:
                    broker.stop()
            rows.append((figures[0], result))
    print(f"load average after: {os.getloadavg()}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

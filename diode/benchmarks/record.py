"""``make bench``: every run of record, again, and one table against the targets.

Each run of record is one ``diode bench ...`` command whose JSON holds the
figures docs/BENCHMARKS.md quotes; each figure has a row id (``T1``, ``L2``
...) that the document names beside it. A run is done ``--rounds`` times
(3 by default), the runs taken in turn round by round so that a slow spell of
the machine does not fall on one run's every repeat; the table gives the
median of each figure, every value it is the median of, and the machine's
load: the 1-minute load average just before each repeat, and the cores busy
during it (all processes, from ``/proc/stat``; the run's own included).

Each repeat runs in a child process (``--one``), which the ``--wrap`` command
can hold the machine for (``tools/benchrun`` on a shared host: it
waits for other runs to end and holds at most one repeat at a time). Results
are appended, one JSON line per repeat, to ``--results``; ``--table`` prints
the table from that file without running anything, so runs taken in several
sittings make one table. The table takes the newest ``--rounds`` repeats of
each run at the commit being measured.

``--daemons TREE`` runs the daemons from another source tree (a worktree of
an older commit) under this benchmark code: the before/after pairs of the
document are the same measurement of two builds.

Runs (``--runs`` picks groups or single runs, comma-separated):

- ``tags``: ``tags-10k`` and ``tags-50k``, per-tag QoS 0 (issue 17's targets);
- ``modes``: per-tag QoS 1 at 20 000/s and batched at 200 000/s (issue 7's);
- ``link``: ``diode bench link`` (root: nftables counts and drops);
- ``polling``, ``opcua``: 200 Modbus devices, 20 000 OPC UA items at 1 Hz;
- ``files``, ``syslog``, ``restart``, ``codec``: the other benches, with the
  figures their sections quote;
- ``gil``: whether zfec and Ed25519 signing release the GIL (diode/benchmarks/gil.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diode.benchmarks.harness import CLK_TCK, DAEMONS_ENV

Check = Callable[[float], bool]


@dataclass(frozen=True, slots=True)
class Figure:
    """One row of the table: where it is in the run's JSON, and its target if it has one."""

    row: str
    name: str
    path: str  # dotted keys and list indexes into the run's JSON
    target: str = ""  # e.g. "< 20", "<= 10", "== 0", ">= 0.9"

    def value(self, report: Any) -> float | None:
        node = report
        for key in self.path.split("."):
            if isinstance(node, list) and key.lstrip("-").isdigit() and node:
                node = node[int(key)] if -len(node) <= int(key) < len(node) else None
            elif isinstance(node, dict):
                node = node.get(key)
            else:
                node = None
            if node is None:
                return None
        return float(node) if isinstance(node, int | float) else None

    def met(self, value: float | None) -> str:
        if not self.target:
            return ""
        if value is None:
            return "?"
        op, bound = self.target.split()
        ok = {
            "<": value < float(bound),
            "<=": value <= float(bound),
            "==": value == float(bound),
            ">=": value >= float(bound),
            ">": value > float(bound),
        }[op]
        return "yes" if ok else "**no**"


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    group: str
    argv: tuple[str, ...]  # after ``diode bench``
    figures: tuple[Figure, ...]
    about: str  # how long one repeat takes, and what it needs


def _tags(
    row: str, rate: int, targets: dict[str, str], mode: str = "per_tag:0", group: str = "tags"
) -> Run:
    base = f"modes.{mode}.runs.0."
    prefix = {"per_tag:0": "tags", "per_tag:1": "tags-qos1", "batched:0": "batched"}[mode]
    return Run(
        name=f"{prefix}-{rate // 1000}k",
        group=group,
        argv=("tags", "--mode", mode, "--rate", str(rate), "--seconds", "10"),
        figures=(
            Figure(f"{row}1", "updates lost", base + "lost", targets.get("lost", "")),
            Figure(f"{row}2", "latency p50 ms", base + "latency_ms.p50"),
            Figure(f"{row}3", "latency p99 ms", base + "latency_ms.p99", targets.get("p99", "")),
            Figure(f"{row}4", "tx µs CPU / update received", base + "tx_us_per_update",
                   targets.get("tx", "")),
            Figure(f"{row}5", "rx µs CPU / update received", base + "rx_us_per_update",
                   targets.get("rx", "")),
            Figure(f"{row}6", "tx CPU s/s", base + "tx_cpu_share"),
            Figure(f"{row}7", "rx CPU s/s", base + "rx_cpu_share"),
            Figure(f"{row}8", "rx peak RSS MB", base + "rx_rss_peak_mb", "< 150"),
        ),
        about="about 20 s",
    )  # fmt: skip


def _link_figures() -> tuple[Figure, ...]:
    out: list[Figure] = []
    for i, loss in enumerate(("0 %", "1 %")):
        d = f"diode.{i}."
        out += [
            Figure(f"L{i}1", f"goodput Mb/s, {loss} loss", d + "goodput_mbps"),
            Figure(f"L{i}2", f"wire Mb/s, {loss} loss", d + "wire_mbps"),
            Figure(f"L{i}3", f"goodput / (wire k/n), {loss} loss",
                   d + "efficiency_vs_wire_k_over_n", ">= 0.9"),
            Figure(f"L{i}4", f"records lost, {loss} loss", d + "rx_records_lost", "== 0"),
            Figure(f"L{i}5", f"tx CPU s/s, {loss} loss", d + "tx_cpu_s_per_s", "<= 1"),
            Figure(f"L{i}6", f"rx CPU s/s, {loss} loss", d + "rx_cpu_s_per_s", "<= 1"),
            Figure(f"L{i}7", f"tx peak RSS MB, {loss} loss", d + "tx_rss_peak_mb", "< 150"),
            Figure(f"L{i}8", f"rx peak RSS MB, {loss} loss", d + "rx_rss_peak_mb", "< 150"),
            Figure(f"L{i}9", f"rx µs CPU per delivered block, {loss} loss",
                   d + "rx_cpu_us_per_block"),
        ]  # fmt: skip
    out += [
        Figure("L21", "pydiode goodput Mb/s (its default)", "pydiode.goodput_mbps"),
        Figure("L22", "goodput / pydiode (its default)", "goodput_ratio_vs_pydiode", ">= 1.5"),
        Figure("L23", "pydiode goodput Mb/s at 1472-byte datagrams", "pydiode_1472.goodput_mbps"),
        Figure("L24", "goodput / pydiode at 1472 bytes", "goodput_ratio_vs_pydiode_1472", ">= 5"),
    ]
    return tuple(out)


RUNS: tuple[Run, ...] = (
    _tags("T", 10_000, {"lost": "== 0", "p99": "< 20", "tx": "<= 10", "rx": "<= 15"}),
    _tags("U", 50_000, {"lost": "== 0", "p99": "< 50"}),
    _tags("Q", 20_000, {"lost": "== 0", "p99": "< 100"}, mode="per_tag:1", group="modes"),
    _tags("B", 200_000, {"lost": "== 0", "p99": "< 100"}, mode="batched:0", group="modes"),
    Run(
        name="link",
        group="link",
        argv=("link",),
        figures=_link_figures(),
        about="about 60 s; root (nftables), pydiode installed in a venv on first use",
    ),
    Run(
        name="files",
        group="files",
        argv=("files",),
        figures=(
            Figure("F1", "file goodput Mb/s", "diode.goodput_mbps"),
            Figure("F2", "goodput / pydiode 1472 B", "ratio_vs_pydiode_1472", ">= 1.5"),
            Figure("F3", "goodput / pydiode 64 KB", "ratio_vs_pydiode_64k"),
            Figure("F4", "tag p99 ms, no file", "beside_telemetry.latency_ms_without_file.p99"),
            Figure(
                "F5",
                "tag p99 ms, a file at full share",
                "beside_telemetry.latency_ms_with_file.p99",
                "< 50",
            ),
            Figure("F6", "tx peak RSS MB, 2 GB file", "beside_telemetry.tx_rss_peak_mb", "< 150"),
            Figure("F7", "rx peak RSS MB, 2 GB file", "beside_telemetry.rx_rss_peak_mb", "< 150"),
        ),
        about="about 6 min (3 rounds of 200 MB with pydiode and udpcast, 2 GB beside tags)",
    ),
    Run(
        name="syslog",
        group="syslog",
        argv=("syslog", "--rate", "20000", "--values-hz", "10000", "--seconds", "10"),
        figures=(
            Figure("S1", "syslog messages/s at the collector", "with_syslog.msgs_per_s"),
            Figure("S2", "syslog lost", "with_syslog.lost", "== 0"),
            Figure("S3", "syslog latency p99 ms", "with_syslog.latency_ms.p99"),
            Figure("S4", "tx µs / syslog message", "with_syslog.tx_us_per_msg"),
            Figure("S5", "rx µs / syslog message", "with_syslog.rx_us_per_msg"),
        ),
        about="about 60 s; rsyslog",
    ),
    Run(
        name="restart",
        group="restart",
        argv=("restart", "--rate", "10000", "--rate", "50000", "--seconds", "20"),
        figures=(
            Figure("R1", "socket buffer covers s, 10 000/s", "runs.0.covers_s"),
            Figure("R2", "socket buffer covers s, 50 000/s", "runs.1.covers_s"),
        ),
        about="about 50 s",
    ),
    Run(
        name="polling",
        group="polling",
        argv=("polling", "--devices", "200"),
        figures=(
            Figure("P1", "tx CPU s/s, 200 Modbus devices at 1 Hz", "runs.0.tx_cpu_share", "< 1"),
            Figure("P2", "poll cycles overrun", "runs.0.poll_overruns", "== 0"),
            Figure("P3", "requests / device-cycle", "runs.0.requests_per_device_cycle"),
            Figure("P4", "tx µs CPU / request", "runs.0.tx_cpu_us_per_request"),
        ),
        about="about 40 s; pymodbus simulator",
    ),
    Run(
        name="opcua",
        group="opcua",
        argv=("opcua", "--items", "20000"),
        figures=(
            Figure("O1", "tx CPU s/s, 20 000 items at 1 Hz", "runs.0.tx_cpu_share", "< 1"),
            Figure("O2", "share of due changes received", "runs.0.received_share", ">= 0.98"),
            Figure("O3", "tx ms CPU / 1 000 changes/s", "runs.0.tx_cpu_ms_per_1000_changes"),
        ),
        about="about 90 s; asyncua server",
    ),
    Run(
        name="gil",
        group="gil",
        argv=("-m", "diode.benchmarks.gil"),
        figures=(
            Figure("G1", "zfec encode µs (one thread)", "zfec_encode_k32_n56.us_per_op_one_thread"),
            Figure("G2", "zfec: two threads speed-up", "zfec_encode_k32_n56.speedup_two_threads"),
            Figure(
                "G3", "Ed25519 sign 45 KB µs (one thread)", "ed25519_sign_45kb.us_per_op_one_thread"
            ),
            Figure("G4", "Ed25519: two threads speed-up", "ed25519_sign_45kb.speedup_two_threads"),
        ),
        about="about 20 s",
    ),
    Run(
        name="codec",
        group="codec",
        argv=("codec",),
        figures=(
            Figure("C1", "encode MB/s of records (CPU)", "encode.mb_per_s_cpu"),
            Figure("C2", "encode µs / datagram (CPU)", "encode.us_per_datagram_cpu"),
            Figure("C3", "decode µs / datagram, 0 % loss", "decode.0.us_per_datagram_cpu"),
            Figure("C4", "decode µs / datagram, 5 % loss", "decode.1.us_per_datagram_cpu"),
        ),
        about="about 15 s",
    ),
)


def select(spec: str) -> list[Run]:
    """``all``, or groups and run names separated by commas, in table order."""
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    if not wanted or "all" in wanted:
        return list(RUNS)
    known = {r.name for r in RUNS} | {r.group for r in RUNS}
    if unknown := wanted - known:
        raise SystemExit(f"error: unknown run(s) {sorted(unknown)}; known: {sorted(known)}")
    return [r for r in RUNS if r.name in wanted or r.group in wanted]


def _busy_ticks() -> tuple[int, int]:
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _diode() -> list[str]:
    installed = Path(sys.executable).parent / "diode"
    if installed.exists():
        return [str(installed)]
    return [sys.executable, "-c", "import sys; from diode.cli import main; sys.exit(main())"]


def _argv(run: Run) -> list[str]:
    """``diode bench ...``, or a module of its own (``-m ...``) under this interpreter."""
    if run.argv[0] == "-m":
        return [sys.executable, *run.argv]
    return [*_diode(), "bench", *run.argv]


def _shown(run: Run) -> list[str]:
    return ["python", *run.argv] if run.argv[0] == "-m" else ["diode", "bench", *run.argv]


def _commit(tree: Path) -> str:
    try:
        out = subprocess.run(  # noqa: S603
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out + ("+dirty" if dirty else "")


def one(run: Run) -> dict[str, Any]:
    """One repeat of ``run`` in this process's machine slot: its JSON and the load around it."""
    load_before = os.getloadavg()[0]
    busy0, t0 = _busy_ticks()[0], time.monotonic()
    proc = subprocess.run(  # noqa: S603
        _argv(run), check=False, capture_output=True, text=True
    )
    busy1, t1 = _busy_ticks()[0], time.monotonic()
    entry: dict[str, Any] = {
        "run": run.name,
        "argv": _shown(run),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (t1 - t0))),
        "seconds": round(t1 - t0, 1),
        "load_before": round(load_before, 2),
        "busy_cores_during": round((busy1 - busy0) / CLK_TCK / (t1 - t0), 2),
        "load_after": round(os.getloadavg()[0], 2),
        "rc": proc.returncode,
    }
    try:
        entry["report"] = json.loads(proc.stdout)
    except ValueError:
        entry["report"] = None
        entry["error"] = (proc.stderr or proc.stdout)[-2000:]
    return entry


def _repeat(run: Run, wrap: Sequence[str], daemons: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    if daemons is not None:
        env[DAEMONS_ENV] = str(daemons)
    argv = [*wrap, sys.executable, "-m", "diode.benchmarks.record", "--one", run.name]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, env=env)  # noqa: S603
    try:
        entry: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        entry = {"run": run.name, "rc": proc.returncode, "report": None}
        entry["error"] = proc.stderr[-2000:]
    entry["wrap_log"] = [line for line in proc.stderr.splitlines() if line.startswith("benchrun:")]
    return entry


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == int(value) and abs(value) >= 100:
        return f"{int(value):,}".replace(",", " ")
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def table(entries: Sequence[dict[str, Any]], runs: Sequence[Run], rounds: int) -> str:
    """The markdown table: per figure, the median of the newest ``rounds`` repeats."""
    lines = [
        "| row | run | figure | target | median | repeats | met? | load before | busy cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        mine = [e for e in entries if e.get("run") == run.name][-rounds:]
        if not mine:
            lines.append(f"| | {run.name} | not run | | | | | | |")
            continue
        loads = "/".join(_fmt(e.get("load_before")) for e in mine)
        busy = "/".join(_fmt(e.get("busy_cores_during")) for e in mine)
        for fig in run.figures:
            values = [fig.value(e.get("report")) for e in mine]
            known = [v for v in values if v is not None]
            median = statistics.median(known) if known else None
            lines.append(
                f"| {fig.row} | {run.name} | {fig.name} | {fig.target} | {_fmt(median)} "
                f"| {', '.join(_fmt(v) for v in values)} | {fig.met(median)} | {loads} | {busy} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diode.benchmarks.record", description=__doc__)
    p.add_argument("--runs", default="all", help="groups or runs, comma-separated (default all)")
    p.add_argument("--rounds", type=int, default=3, help="repeats of each run (median of these)")
    p.add_argument("--wrap", default="", help="command to run each repeat under (benchrun)")
    p.add_argument("--daemons", type=Path, default=None, help="source tree of the daemons")
    p.add_argument("--results", type=Path, default=Path("bench-results.jsonl"))
    p.add_argument("--label", default="", help="a name for these repeats (default: the commit)")
    p.add_argument("--table", action="store_true", help="only print the table of --results")
    p.add_argument("--list", action="store_true", help="the runs, their commands and durations")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(select(args.one)[0])))
        return 0
    runs = select(args.runs)
    if args.list:
        for run in runs:
            print(f"{run.name:10} {' '.join(_shown(run))}  ({run.about})")
        return 0
    tree = Path(args.daemons) if args.daemons else Path(__file__).resolve().parents[2]
    label = args.label or _commit(tree)
    if not args.table:
        wrap = args.wrap.split() if args.wrap else []
        if wrap and shutil.which(wrap[0]) is None:
            raise SystemExit(f"error: --wrap {wrap[0]!r} not found")
        with args.results.open("a") as out:
            for i in range(args.rounds):
                for run in runs:
                    entry = _repeat(run, wrap, args.daemons)
                    entry["label"] = label
                    out.write(json.dumps(entry) + "\n")
                    out.flush()
                    print(
                        f"# {run.name} {i + 1}/{args.rounds} ({label}): rc {entry.get('rc')}, "
                        f"{entry.get('seconds')} s, load {entry.get('load_before')} before, "
                        f"{entry.get('busy_cores_during')} cores busy",
                        file=sys.stderr,
                    )
    entries = []
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("label") == label:
                entries.append(entry)
    print(f"Runs of record at {label} ({args.results}), medians of the newest {args.rounds}:\n")
    print(table(entries, runs, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

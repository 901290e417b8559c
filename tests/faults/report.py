"""Run every fault scenario and the fuzzer; rewrite docs/RELIABILITY.md with the figures.

``make reliability`` (or ``.venv/bin/python -m tests.faults.report [--fuzz-s 60]
[--only NAME ...]``). Each scenario gets a fresh directory and its own
mosquitto; a scenario whose assertion fails is reported as FAILED with the
message, and the command exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.faults import attack, restarts, scenarios
from tests.faults.harness import os_info
from tests.support.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "RELIABILITY.md"

RUNS: list[tuple[str, Any, dict[str, Any]]] = [
    ("trickle", scenarios.loss_and_bursts, {"fast": False}),
    ("fast", scenarios.loss_and_bursts, {"fast": True}),
    ("heavy_loss", scenarios.heavy_loss, {}),
    ("duplicate_reorder", scenarios.duplicate_reorder, {}),
    ("corruption", scenarios.corruption, {}),
    ("replay", scenarios.replay, {}),
    ("forgery", scenarios.forgery, {}),
    ("flood_secret", attack.scenario, {"gated": True}),
    ("flood_no_secret", attack.scenario, {"gated": False}),
    ("broker_outage", scenarios.broker_outage, {}),
    ("receiver_kill", scenarios.receiver_kill, {}),
    ("transmitter_kill", scenarios.transmitter_kill, {}),
    ("plc_faults", scenarios.plc_faults, {}),
    ("activated_1k", restarts.socket_activated_restarts, {"rate": 1000}),
    ("activated_10k", restarts.socket_activated_restarts, {"rate": 10_000}),
    ("diversity_receiver", restarts.time_diversity, {"fault": "receiver"}),
    ("diversity_link", restarts.time_diversity, {"fault": "link"}),
    ("reload", restarts.reload_under_load, {"rate": 10_000}),
    ("standby", restarts.standby_takes_over, {}),
    ("standby_10k", restarts.standby_takes_over, {"rate": 10_000}),
    ("both_killed", restarts.both_killed, {}),
    ("frozen", restarts.active_frozen, {}),
]


async def run_one(name: str, fn: Any, kwargs: dict[str, Any]) -> scenarios.Result:
    with tempfile.TemporaryDirectory(prefix=f"diode-{name}-") as d:
        tmp = Path(d)
        broker = Mosquitto(tmp)
        broker.start()
        started = time.monotonic()
        try:
            result: scenarios.Result = await fn(tmp, broker, **kwargs)
        except AssertionError as exc:
            result = scenarios.Result(f"{name}: FAILED", seed=scenarios.SEED)
            result.note(f"FAILED: {str(exc)[:500]}")
        finally:
            broker.stop()
        result.note(f"ran in {time.monotonic() - started:.0f} s")
        return result


def fuzz(seconds: int) -> str:
    if importlib.util.find_spec("atheris") is None:
        return "atheris is not installed here (`pip install atheris`): fuzzing skipped."
    with tempfile.TemporaryDirectory(prefix="diode-fuzz-") as d:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.faults.fuzz",
                f"-max_total_time={seconds}",
                "-seed=6",
                f"-artifact_prefix={d}/",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        findings = list(Path(d).glob("crash-*")) + list(Path(d).glob("timeout-*"))
    done = re.search(r"Done (\d+) runs in (\d+) second", out.stderr)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out.stderr)
    runs = f"{int(done[1]):,} executions in {done[2]} s" if done else "no summary"
    edges = f", coverage {cov[-1][0]} edges / {cov[-1][1]} features" if cov else ""
    verdict = (
        "no finding"
        if out.returncode == 0 and not findings
        else (f"FINDINGS (exit {out.returncode}): {out.stderr[-1500:]}")
    )
    return (
        f"atheris (libFuzzer), seed 6: {runs}{edges}; each execution feeds 1-64 mutated "
        f"datagrams to a fresh Decoder; {verdict}."
    )


def table(results: list[scenarios.Result]) -> str:
    head = (
        "| scenario | sent | published | lost | reported lost | rejected | peak rx memory |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r.scenario} | {r.sent:,} | {r.published:,} | {r.lost:,} | {r.reported_lost:,} | "
        f"{r.rejected:,} | {r.peak_rx_mb} MB |"
        for r in results
    ]
    return head + "\n".join(rows) + "\n"


def notes(results: list[scenarios.Result]) -> str:
    out = []
    for r in results:
        out.append(f"- **{r.scenario}** (seed {r.seed}): " + "; ".join(r.notes))
    return "\n".join(out) + "\n"


def _kept(doc: str, names: set[str]) -> tuple[list[str], list[str], str, str]:
    """The rows and notes of the current page whose scenarios are not in ``names``,
    its fuzzing paragraph and its "Last run" line."""
    rows = [
        line
        for line in doc.splitlines()
        if line.startswith("| ")
        and not line.startswith("| scenario |")
        and line.split(" | ")[0][2:] not in names
    ]
    kept_notes = [
        line
        for line in doc.splitlines()
        if line.startswith("- **") and line[4:].split("** (seed")[0] not in names
    ]
    fuzzing = re.search(r"## Fuzzing the receiver core\n\n(.*?)\n\n", doc, re.DOTALL)
    last = re.search(r"Last run: (.*?)\.\n", doc, re.DOTALL)
    return (
        rows,
        kept_notes,
        fuzzing[1] if fuzzing else "",
        last[1].replace("\n", " ") if last else "",
    )


def _order(line: str) -> tuple[int, str]:
    """Rows in scenario order: by the number that starts the name (9b after 9)."""
    m = re.match(r"(?:\| |- \*\*)(\d+)(\w?)\.", line)
    return (int(m[1]), m[2]) if m else (1000, "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.report")
    parser.add_argument("--fuzz-s", type=int, default=60)
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="run these scenarios (names in RUNS) and replace only their rows and notes",
    )
    args = parser.parse_args(argv)
    runs = [r for r in RUNS if args.only is None or r[0] in args.only]
    results = [asyncio.run(run_one(*r)) for r in runs]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{os_info()}, {when}"
    rows, note_lines = table(results).splitlines()[2:], notes(results).splitlines()
    if args.only is not None and DOC.exists():
        # A partial run: every other scenario keeps its row, its note and its date.
        old_rows, old_notes, old_fuzz, last = _kept(DOC.read_text(), {r.scenario for r in results})
        rows = sorted(old_rows + rows, key=_order)
        note_lines = sorted(old_notes + note_lines, key=_order)
        fuzzing = fuzz(args.fuzz_s) if args.fuzz_s > 0 else old_fuzz
        machine = f"{last}; scenarios {', '.join(args.only)} rerun {when}"
    else:
        fuzzing = fuzz(args.fuzz_s) if args.fuzz_s > 0 else "not run (--fuzz-s 0)."
    head = table([]).splitlines()[:2]
    text = (ROOT / "tests" / "faults" / "RELIABILITY.template.md").read_text()
    text = text.format(
        machine=machine,
        table="\n".join(head + rows) + "\n",
        notes="\n".join(note_lines) + "\n",
        fuzz=fuzzing,
    )
    DOC.write_text(text)
    print(table(results))
    print(fuzzing)
    return 1 if any("FAILED" in r.scenario for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())

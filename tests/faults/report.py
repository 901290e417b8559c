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

from tests.faults import attack, scenarios
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.report")
    parser.add_argument("--fuzz-s", type=int, default=60)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args(argv)
    runs = [r for r in RUNS if args.only is None or r[0] in args.only]
    results = [asyncio.run(run_one(*r)) for r in runs]
    fuzzing = fuzz(args.fuzz_s) if args.fuzz_s > 0 else "not run (--fuzz-s 0)."
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (ROOT / "tests" / "faults" / "RELIABILITY.template.md").read_text()
    text = text.format(
        machine=f"{os_info()}, {when}",
        table=table(results),
        notes=notes(results),
        fuzz=fuzzing,
    )
    DOC.write_text(text)
    print(table(results))
    print(fuzzing)
    return 1 if any("FAILED" in r.scenario for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())

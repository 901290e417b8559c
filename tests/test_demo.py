"""``diode demo`` end to end, as a user runs it: a child process, its JSON summary, its exit.

Two runs of a few seconds each: one with the broker chosen as a user gets it
(the machine's own at 127.0.0.1:1883 if one answers, else the embedded one)
and one with the embedded amqtt broker forced, so both paths are exercised
whatever the machine has.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TAGS = {
    "diode/demo/plc1/level",
    "diode/demo/plc1/pump",
    "diode/demo/plc1/parts",
    "diode/demo/line1/temperature",
    "diode/demo/line1/flow",
    "diode/demo/line1/batches",
}
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|Task exception was never retrieved")


def diode_command() -> list[str]:
    """The console script next to this interpreter, as installed; the module otherwise."""
    script = Path(sys.executable).with_name("diode")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "diode.cli"]


def run_demo(*extra: str, duration: float = 6.0) -> tuple[dict[str, Any], str]:
    argv = [*diode_command(), "demo", "--duration", str(duration), "--json", "--loss", "0.05"]
    done = subprocess.run(  # our own console script, fixed arguments
        [*argv, *extra],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert not TRACEBACK.search(done.stderr), done.stderr
    assert "neither a link secret" not in done.stderr, "the demo must run as we ask users to"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must be one JSON object, got: {done.stdout!r}"
    summary = json.loads(lines[0])
    assert isinstance(summary, dict)
    return summary, done.stderr


def check_summary(summary: dict[str, Any]) -> None:
    assert summary["sent"] > 0
    assert summary["published"] > 0
    assert set(summary["tags"]) == TAGS, summary["tags"]
    for topic, last in summary["tags"].items():
        assert last["quality"] in ("good", "stale"), (topic, last)
        assert last["messages"] > 0
    assert isinstance(summary["tags"]["diode/demo/plc1/pump"]["value"], bool)
    assert isinstance(summary["tags"]["diode/demo/plc1/parts"]["value"], int)
    assert isinstance(summary["tags"]["diode/demo/line1/temperature"]["value"], float)
    # 5 % of datagrams dropped: FEC rebuilt blocks and nothing was lost.
    assert summary["link"]["relay_dropped"] > 0
    assert summary["rebuilt"] > 0
    assert summary["lost"] == 0
    assert summary["rejected"] == 0


@pytest.mark.slow
def test_demo_with_the_broker_a_user_gets() -> None:
    summary, _ = run_demo()
    check_summary(summary)


@pytest.mark.slow
def test_demo_with_the_embedded_broker() -> None:
    summary, _ = run_demo("--broker", "embedded")
    assert "embedded" in summary["broker"]
    check_summary(summary)


@pytest.mark.slow
def test_demo_speaking_sparkplug() -> None:
    # The embedded broker, so the run does not depend on what the machine has; the
    # view reads the tags back from the DBIRTH and DDATA the edge node published.
    summary, _ = run_demo("--broker", "embedded", "--payload", "sparkplug")
    check_summary(summary)


def test_demo_refuses_a_bad_loss_share() -> None:
    done = subprocess.run(
        [*diode_command(), "demo", "--loss", "1.5", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "--loss" in done.stderr
    assert not TRACEBACK.search(done.stderr)


# -- the parts, without a network --------------------------------------------------------


def test_the_process_fills_drains_and_toggles_the_pump_at_its_thresholds() -> None:
    from diode.demo.process import LEVEL_HIGH_M, LEVEL_LOW_M, Process

    process = Process(seed=3)
    states, parts = [], []
    for step in range(1, 600):
        process.advance(step * 0.1)
        states.append((process.pump_on, process.level_m))
        parts.append(process.parts)
    toggles = [i for i in range(1, len(states)) if states[i][0] != states[i - 1][0]]
    assert len(toggles) >= 2
    for i in toggles:
        pump_on, level = states[i]
        assert level <= LEVEL_LOW_M if pump_on else level >= LEVEL_HIGH_M
    assert parts == sorted(parts)
    assert parts[-1] > 500

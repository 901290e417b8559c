"""The protocol core never touches the network, an event loop or the clock."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = [
    "wire",
    "fec",
    "keys",
    "aead",
    "replay",
    "encoder",
    "decoder",
    "records",
    "syslog",
    *(
        f"protocol.{name}"
        for name in (
            "gate",
            "assembly",
            "budget",
            "authenticator",
            "sequencer",
            "events",
            "decoder",
        )
    ),
]
ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_core_pulls_in_no_event_loop() -> None:
    modules = ", ".join(f"diode.{name}" for name in CORE)
    code = f"import sys, {modules}; print('asyncio' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_core_imports_no_socket_no_clock() -> None:
    for name in CORE:
        tree = ast.parse((ROOT / "diode" / f"{name.replace('.', '/')}.py").read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        imported |= {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & {"socket", "asyncio", "time", "datetime", "selectors"}, name

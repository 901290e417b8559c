"""The daemons freeze their start-up heap (diode/daemon.py, ``freeze_heap``).

What it buys is a figure (the pacer's wire rate, docs/BENCHMARKS.md "Full
collections"); here, that it does what it says: what exists before is out of
the collector's sight, what comes after is still collected, and both daemons
call it once they are built.
"""

from __future__ import annotations

import ast
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from diode.daemon import freeze_heap

ROOT = Path(__file__).resolve().parent.parent


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def frozen() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()


def test_what_exists_is_frozen_and_what_comes_later_is_collected(frozen: None) -> None:
    before = Node()
    kept = weakref.ref(before)
    freeze_heap()
    assert gc.get_freeze_count() > 0
    del before
    gc.collect()
    assert kept() is not None, "frozen: never collected"
    after = Node()
    gone = weakref.ref(after)
    del after
    gc.collect()
    assert gone() is None, "made after the freeze: collected as before"


@pytest.mark.parametrize(
    ("path", "built"), [("transmitter/app.py", "build"), ("receiver/app.py", "Receiver")]
)
def test_each_daemon_freezes_once_it_is_built(path: str, built: str) -> None:
    """In the daemon's ``_main``: the call that builds it, then ``freeze_heap()``."""
    tree = ast.parse((ROOT / path).read_text())
    (main,) = [
        n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef) and n.name == "_main"
    ]
    calls = [n.func for stmt in main.body for n in ast.walk(stmt) if isinstance(n, ast.Call)]
    names = [c.attr if isinstance(c, ast.Attribute) else getattr(c, "id", None) for c in calls]
    assert built in names
    assert "freeze_heap" in names
    assert names.index(built) < names.index("freeze_heap")

"""diode-rx: the receiver daemon (filled in by the receiver work)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("diode-rx: not implemented yet")

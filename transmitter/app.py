"""diode-tx: the transmitter daemon (filled in by the transmitter work)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("diode-tx: not implemented yet")

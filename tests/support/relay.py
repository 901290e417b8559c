"""The fault relay of the tests: the package's, capturing every datagram for replays."""

from __future__ import annotations

from diode.demo.relay import Faults, RelayStats
from diode.demo.relay import Relay as _Relay

__all__ = ["Faults", "Relay", "RelayStats"]


class Relay(_Relay):
    def __init__(self, target: tuple[str, int], faults: Faults | None = None) -> None:
        super().__init__(target, faults, capture=True)

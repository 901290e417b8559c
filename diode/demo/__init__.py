"""``diode demo``: a simulated plant, both daemons, a lossy link and a broker on one machine."""

from __future__ import annotations

from diode.demo.app import main

__all__ = ["main"]

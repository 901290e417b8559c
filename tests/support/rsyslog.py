"""The rsyslog collector of the tests: the benchmarks' own (diode/benchmarks/collector.py)."""

from __future__ import annotations

from diode.benchmarks.collector import Rsyslog, rsyslogd

__all__ = ["Rsyslog", "rsyslogd"]

"""A real rsyslog as the SOC's collector, for tests and benchmarks: own config, a free port.

It listens with imtcp (octet-counted and newline framing, as rsyslog accepts
both by default) and writes every message it receives, raw, one per line, to
a file the caller reads; with ``stamped=True`` each line starts with the time
rsyslog received it (RFC 3339, microseconds), for latency. No system
service, no privileges needed beyond running the binary.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from diode.loopback import free_port
from diode.syslog import parse_sd, parse_syslog

CONFIG = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp" MaxSessions="64")
template(name="raw" type="string" string="{stamp}%rawmsg%\\n")
ruleset(name="collect") {{
  action(type="omfile" file="{out}" template="raw" flushOnTXEnd="on" asyncWriting="off")
}}
input(type="imtcp" port="{port}" address="127.0.0.1" ruleset="collect")
"""


def rsyslogd() -> str | None:
    return shutil.which("rsyslogd") or (
        "/usr/sbin/rsyslogd" if Path("/usr/sbin/rsyslogd").exists() else None
    )


class Rsyslog:
    """rsyslogd -n with a config in ``folder``; :meth:`messages` reads what it wrote."""

    def __init__(self, folder: Path, port: int | None = None, *, stamped: bool = False) -> None:
        self.folder = folder
        self.stamped = stamped
        self.port = port or free_port()
        self.out = folder / "collected.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        binary = rsyslogd()
        if binary is None:
            raise RuntimeError("rsyslogd is missing: make system-deps installs it")
        work = self.folder / "work"
        work.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "rsyslog.conf"
        stamp = "%timegenerated:::date-rfc3339% " if self.stamped else ""
        conf.write_text(CONFIG.format(work=work, out=self.out, port=self.port, stamp=stamp))
        self.process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [binary, "-n", "-f", str(conf), "-i", str(self.folder / "rsyslog.pid")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "rsyslog.err", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("rsyslogd exited: " + (self.folder / "rsyslog.err").read_text())
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("rsyslogd did not start listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def lines(self) -> list[bytes]:
        try:
            return [line for line in self.out.read_bytes().split(b"\n") if line]
        except FileNotFoundError:
            return []

    def messages(self) -> list[tuple[bytes, dict[str, dict[str, str]]]]:
        """Each collected message's body and structured data."""
        out = []
        for line in self.lines():
            parsed = parse_syslog(line)
            out.append((parsed.msg, parse_sd(parsed.sd)))
        return out

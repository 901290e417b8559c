"""A real mosquitto broker on a free loopback port (and a Unix socket), owned by the test."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from diode.loopback import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Mosquitto:
    """Start, stop and restart a broker on the same port, with persistence off.

    ``unix_socket``: a second listener on that path (at most 107 bytes long), the
    same broker for clients of either.
    """

    def __init__(
        self, workdir: Path, port: int | None = None, unix_socket: Path | None = None
    ) -> None:
        self.port = port or free_port()
        self.unix_socket = unix_socket
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + (f"listener 0 {unix_socket}\n" if unix_socket is not None else "")
            + "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 0\n"
            "log_type error\n"
            # Started as root, mosquitto would drop to its own user, which cannot reach
            # the files a test keeps in its private tmp folder (persistence, passwords).
            "user root\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "mosquitto.log").open("ab"),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                self._connect()
                return
            except OSError:
                time.sleep(0.05)
        state = "still running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        log = (self.workdir / "mosquitto.log").read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(
            f"mosquitto did not start on port {self.port} ({state}); its log ends: {log}"
        )

    def _connect(self) -> None:
        """Both listeners answer (a socket file left by the last run does not: refused)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
            pass
        if self.unix_socket is not None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
                unix.settimeout(0.2)
                unix.connect(str(self.unix_socket))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

"""What the end-to-end benchmarks share: configs, child daemons, a broker, loss.

The daemons run as child processes (``diode-tx`` / ``diode-rx`` next to this
interpreter, or ``python -c`` when the scripts are not installed), so CPU time
(``/proc/PID/stat`` utime + stime) and peak memory (``VmHWM``) are per daemon.
A mosquitto is started on a free loopback port. Loss is injected in the kernel
with an nftables rule on the link's port (root only), which costs no CPU of
the processes measured; the same rule counts what was sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from diode.keys import write_keypair
from diode.loopback import free_port

STREAM = 7
CLK_TCK = os.sysconf("SC_CLK_TCK")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
WIRE_OVERHEAD = 28  # IPv4 + UDP headers, counted by the pacer


# -- TOML ------------------------------------------------------------------------


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Enough TOML for our configs: scalars, lists, tables, arrays of tables."""
    lines: list[str] = []
    tail: list[str] = []
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            tail.append(f"\n[{name}]\n" + to_toml(value, name))
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            tail.extend(f"\n[[{name}]]\n" + to_toml(item, name) for item in value)
        else:
            lines.append(f"{key} = {_scalar(value)}")
    return "\n".join(lines) + "\n" + "".join(tail)


# -- a plant of two daemons ------------------------------------------------------------


def keys(workdir: Path) -> tuple[Path, Path]:
    private, public, _ = write_keypair(workdir, "tx")
    return private, public


def tx_config(
    workdir: Path,
    *,
    private: Path,
    port: int,
    rate_mbps: float,
    sources: Sequence[Mapping[str, Any]],
    link: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    data: dict[str, Any] = {
        "transmitter": {
            "stream_id": STREAM,
            "private_key": private,
            "state_dir": workdir / "tx-state",
        },
        "link": {"destination": "127.0.0.1", "port": port, "rate_mbps": rate_mbps, **(link or {})},
        "log": {"level": "info", "format": "json"},
    }
    if sources:
        data["synthetic"] = {"sources": list(sources)}
    data.update(extra or {})
    path = workdir / "tx.toml"
    path.write_text(to_toml(data))
    return path


def polling_tx(workdir: Path, *, private: Path, port: int, plcs: Mapping[str, Any]) -> Daemon:
    """diode-tx polling the PLCs of ``plcs`` (its [modbus]/[opcua] sections), no synthetic load."""
    config = tx_config(workdir, private=private, port=port, rate_mbps=100.0, sources=[], extra=plcs)
    return Daemon.tx(config)


def rx_config(
    workdir: Path,
    *,
    public: Path,
    port: int,
    broker_port: int,
    metrics_port: int,
    output: Mapping[str, Any],
    broker_socket: Path | None = None,
) -> Path:
    """The receiver's config; ``broker_socket``: reach the broker by that Unix socket."""
    broker = (
        {"socket": broker_socket}
        if broker_socket is not None
        else {"host": "127.0.0.1", "port": broker_port}
    )
    data = {
        "receiver": {
            "listen": "127.0.0.1",
            "port": port,
            "state_dir": workdir / "rx-state",
            "metrics_port": metrics_port,
        },
        "mqtt": {
            **broker,
            "client_id": "diode-bench-rx",
            "spool_path": workdir / "rx-state" / "spool.sqlite3",
        },
        "streams": [
            {
                "id": STREAM,
                "public_keys": [public],
                "output": {"prefix": "bench", "site": "s", **output},
            }
        ],
        "log": {"level": "info", "format": "json"},
    }
    path = workdir / "rx.toml"
    path.write_text(to_toml(data))
    return path


def _command(script: str, module: str) -> list[str]:
    installed = Path(sys.executable).parent / script
    if installed.exists():
        return [str(installed)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


# A source tree whose daemons to run instead of this one's (``make bench
# DAEMONS=...``): a before/after pair measured by the same benchmark code.
DAEMONS_ENV = "DIODE_BENCH_DAEMONS"


def _daemon_env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = {**os.environ, **(env or {})}
    if tree := os.environ.get(DAEMONS_ENV):
        out["PYTHONPATH"] = os.pathsep.join(filter(None, (tree, out.get("PYTHONPATH"))))
    return out


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a running process has used; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Daemon:
    """One child daemon; its CPU seconds and peak RSS read from /proc while it runs."""

    def __init__(self, name: str, argv: list[str], log: Path, env: Mapping[str, str] | None = None):
        self.name = name
        self.log = log
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            argv,
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
            env=_daemon_env(env),
        )
        self.final_cpu_s: float | None = None
        self.final_hwm_mb: float | None = None

    @classmethod
    def tx(cls, config: Path, env: Mapping[str, str] | None = None) -> Daemon:
        argv = [*_command("diode-tx", "transmitter.app"), "--config", str(config)]
        return cls("tx", argv, config.parent / "tx.log", env)

    @classmethod
    def rx(cls, config: Path, env: Mapping[str, str] | None = None) -> Daemon:
        argv = [*_command("diode-rx", "receiver.app"), "--config", str(config)]
        return cls("rx", argv, config.parent / "rx.log", env)

    def cpu_s(self) -> float:
        cpu = process_cpu_s(self.proc.pid)
        return (self.final_cpu_s or 0.0) if cpu is None else cpu

    def hwm_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return self.final_hwm_mb or 0.0

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.final_cpu_s, self.final_hwm_mb = self.cpu_s(), self.hwm_mb()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_events(self, event: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict) and item.get("event") == event:
                    out.append(item)
        return out


def rx_metrics(port: int) -> dict[str, float]:
    """The receiver's Prometheus counters (``diode_rx_`` prefix and ``_total`` dropped)."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("diode_rx_") and "{" not in line:
            name, value = line.split()
            out[name.removeprefix("diode_rx_").removesuffix("_total")] = float(value)
    return out


def wait_metrics(port: int, daemon: Daemon, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        daemon.check()
        with contextlib.suppress(OSError):
            rx_metrics(port)
            return
        time.sleep(0.1)
    raise RuntimeError("the receiver's metrics endpoint did not come up")


# -- a broker ---------------------------------------------------------------------------


class Broker:
    """A mosquitto on a free loopback port, persistence off; with ``unix_socket``, also on
    ``workdir/mqtt.sock`` (keep ``workdir`` short: a socket path holds 107 bytes)."""

    def __init__(self, workdir: Path, *, unix_socket: bool = False) -> None:
        self.port = free_port()
        self.socket = workdir / "mqtt.sock" if unix_socket else None
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + (f"listener 0 {self.socket}\n" if self.socket is not None else "")
            + "allow_anonymous true\npersistence false\nmax_queued_messages 0\n"
            "max_inflight_messages 0\nlog_type error\nset_tcp_nodelay true\n"
            # As root, mosquitto would drop to its own user before it binds the
            # socket, in a folder only root may write (no effect when not root).
            "user root\n"
        )
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [MOSQUITTO, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "mosquitto.log").open("ab"),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                if self.socket is not None:
                    with socket.socket(socket.AF_UNIX) as unix:
                        unix.connect(str(self.socket))
            except OSError:
                time.sleep(0.05)
            else:
                return
        self.stop()
        raise RuntimeError("mosquitto did not start")

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid) or 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- loss and wire counting in the kernel ---------------------------------------------------


class LinkTap:
    """nftables on the output hook: counts the link's datagrams and drops a share of them.

    ``hook="input"`` counts and drops where the datagrams arrive instead: the
    output hook sees a segmented send (UDP GSO) as one packet, the input hook
    sees each datagram once the kernel has cut it (see ``software_segmentation``).
    """

    def __init__(self, port: int, loss: float, hook: str = "output") -> None:
        self.table = f"diodebench{port}"
        self.available = shutil.which("nft") is not None and os.geteuid() == 0
        if not self.available:
            if loss:
                raise RuntimeError("loss injection needs nft and root")
            return
        per_10k = round(loss * 10_000)
        rules = [
            f"add table inet {self.table}",
            f"add chain inet {self.table} out {{ type filter hook {hook} priority 0; }}",
            f"add rule inet {self.table} out udp dport {port} counter",
        ]
        if per_10k:
            rules.append(
                f"add rule inet {self.table} out udp dport {port} "
                f"numgen random mod 10000 < {per_10k} counter drop"
            )
        for rule in rules:
            subprocess.run(["nft", *rule.split()], check=True)  # noqa: S603, S607

    def counters(self) -> tuple[int, int, int, int]:
        """(packets sent, bytes sent, packets dropped, bytes dropped) since the start."""
        if not self.available:
            return (0, 0, 0, 0)
        out = subprocess.run(  # noqa: S603
            ["nft", "-j", "list", "table", "inet", self.table],  # noqa: S607
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        found: list[tuple[int, int]] = []
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if not rule:
                continue
            for expr in rule["expr"]:
                if "counter" in expr:
                    found.append((expr["counter"]["packets"], expr["counter"]["bytes"]))
        sent = found[0]
        dropped = found[1] if len(found) > 1 else (0, 0)
        return (sent[0], sent[1], dropped[0], dropped[1])

    def close(self) -> None:
        if self.available:
            subprocess.run(["nft", "delete", "table", "inet", self.table], check=False)  # noqa: S603, S607


@contextlib.contextmanager
def software_segmentation() -> Iterator[None]:
    """Loopback without UDP segmentation offload while the block runs, as most 1 GbE NICs.

    The kernel then cuts a segmented send into its datagrams before the device,
    so every datagram crosses the receiving stack (and nftables' input hook)
    alone, as on a real link. Needs ethtool and root; without them, nothing changes.
    """
    ethtool = shutil.which("ethtool")
    if ethtool is None or os.geteuid() != 0:
        yield
        return
    feature = "tx-udp-segmentation"
    shown = subprocess.run([ethtool, "-k", "lo"], capture_output=True, text=True, check=False)  # noqa: S603
    was_on = f"{feature}: on" in shown.stdout
    if was_on:
        subprocess.run([ethtool, "-K", "lo", feature, "off"], check=True)  # noqa: S603
    try:
        yield
    finally:
        if was_on:
            subprocess.run([ethtool, "-K", "lo", feature, "on"], check=False)  # noqa: S603


@contextlib.contextmanager
def stopping(*things: Daemon | Broker | LinkTap | HeartbeatListener | None) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in things:
            if thing is None:
                continue
            if isinstance(thing, LinkTap):
                thing.close()
            else:
                thing.stop()


class HeartbeatListener:
    """The link's far end, reduced to what a benchmark needs: the transmitter's counters.

    Decodes (and authenticates) everything sent to ``port`` on a thread and
    keeps the counters of the newest heartbeat with the time it arrived.
    """

    def __init__(self, public: Path) -> None:
        from diode.decoder import Decoder, Delivered  # noqa: PLC0415
        from diode.keys import Keyring, TrustedKey, load_public_key  # noqa: PLC0415
        from diode.records import Heartbeat  # noqa: PLC0415

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._decoder = Decoder(
            Keyring([TrustedKey(stream_id=STREAM, public=load_public_key(public))])
        )
        self.latest: tuple[float, dict[str, int]] = (0.0, {})
        self._running = True

        def loop() -> None:
            while self._running:
                try:
                    data = self._sock.recv(65535)
                except TimeoutError:
                    self._decoder.poll(time.monotonic())
                    continue
                except OSError:
                    return
                self._decoder.receive(data, time.monotonic())
                for event in self._decoder.events():
                    if isinstance(event, Delivered):
                        for record in event.records:
                            if isinstance(record, Heartbeat):
                                self.latest = (time.monotonic(), dict(record.counters))

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._thread.join(2)
        self._sock.close()


def sweep(
    loads: Iterable[int], measure: Callable[[int], dict[str, Any]]
) -> tuple[int, list[dict[str, Any]]]:
    """Measure each load in turn until a run is not ``ok``: the largest load served, every run."""
    runs: list[dict[str, Any]] = []
    best = 0
    for load in loads:
        result = measure(load)
        runs.append(result)
        if not result["ok"]:
            break
        best = load
    return best, runs


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    if not ordered:
        return 0.0
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

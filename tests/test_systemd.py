"""The systemd units, the sysctl drop-in and the example configs, as shipped.

* ``systemd-analyze verify`` accepts each unit, run against a scratch root
  that holds the stock units and the console scripts at /usr/bin, because
  verify insists that ExecStart's binary exists and is executable.
* ``systemd-analyze security --offline=true`` rates each unit 2.0 or lower,
  as shipped and with an operator's IPAddressAllow= drop-in applied.
* The exact ExecStart= command line of each unit, binary resolved to the
  venv and config path pointed at a test config, comes up under the
  sd_notify protocol (READY=1, WATCHDOG=1 from the main pid), with
  no-new-privileges and memory-deny-write-execute applied as the unit
  asks, and exits 0 on SIGTERM within a few seconds.
* A bad config exits 2 with one line naming the file and the key.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

from diode.loopback import free_port
from tests.support.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
EXAMPLES = UNITS / "examples"
VENV_BIN = Path(sys.executable).parent
ANALYZE = shutil.which("systemd-analyze")
STOCK_UNITS = next(
    (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
    None,
)
MAX_EXPOSURE = 2.0
PLAIN = ["diode-tx.service", "diode-rx.service"]
TEMPLATES = ["diode-tx@.service", "diode-rx@.service"]
ALL_UNITS = PLAIN + TEMPLATES
SOCKET = "diode-rx.socket"
ACTIVATE = shutil.which("systemd-socket-activate")
# What an operator adds with `systemctl edit`: the PLCs, the far end, the broker.
OPERATOR_DROP_IN = "IPAddressAllow=10.10.1.0/24 192.168.77.1 192.168.77.2\n"


# -- reading unit files ------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given, in order (systemd keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings[key]
    assert len(values) == 1, f"{key} given {len(values)} times"
    return values[0]


def exec_start(unit: str, instance: str = "test") -> list[str]:
    argv = shlex.split(one(unit_settings(UNITS / unit), "Service.ExecStart"))
    return [arg.replace("%i", instance) for arg in argv]


# -- the settings the brief and the threat model ask for ----------------------------------


@pytest.mark.parametrize("unit", ALL_UNITS)
def test_unit_asks_for_notify_watchdog_restart_and_a_sandbox(unit: str) -> None:
    s = unit_settings(UNITS / unit)
    side = "tx" if "-tx" in unit else "rx"
    assert one(s, "Service.Type") == "notify"
    assert one(s, "Service.NotifyAccess") == "main"
    assert one(s, "Service.Restart") == "always"
    assert one(s, "Service.WatchdogSec")
    assert one(s, "Service.User") == "diode"
    assert one(s, "Service.StateDirectory").startswith(f"diode-{side}")
    assert one(s, "Service.ConfigurationDirectory") == "diode"
    assert one(s, "Service.CapabilityBoundingSet") == ""  # no capabilities at all
    assert one(s, "Service.AmbientCapabilities") == ""
    assert one(s, "Service.RestrictAddressFamilies") == "AF_INET AF_INET6 AF_UNIX"
    assert one(s, "Service.UMask") == "0077"
    assert one(s, "Service.IPAddressDeny") == "any"
    assert one(s, "Service.ProtectSystem") == "strict"
    assert one(s, "Service.SystemCallArchitectures") == "native"
    assert "@system-service" in s["Service.SystemCallFilter"]
    for flag in (
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectHome",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictNamespaces",
        "RestrictRealtime",
    ):
        assert one(s, f"Service.{flag}") == "yes", flag
    # The daemons need the host's network: the PLCs, the link, the broker.
    assert "Service.PrivateNetwork" not in s
    argv = exec_start(unit)
    assert argv[0] == f"/usr/bin/diode-{side}"
    assert argv[1] == "--config"
    assert argv[2].startswith(f"/etc/diode/{side}")


@pytest.mark.parametrize("side", ["tx", "rx"])
def test_template_is_the_plain_unit_with_the_instance_in_paths(side: str) -> None:
    plain = unit_settings(UNITS / f"diode-{side}.service")
    template = unit_settings(UNITS / f"diode-{side}@.service")
    differ = {k for k in plain.keys() | template.keys() if plain.get(k) != template.get(k)}
    assert differ == {"Unit.Description", "Service.ExecStart", "Service.StateDirectory"}
    assert one(template, "Service.ExecStart").endswith(f"/etc/diode/{side}-%i.toml")
    assert one(template, "Service.StateDirectory") == f"diode-{side}/%i"


def test_socket_unit_matches_the_example_and_holds_the_buffer() -> None:
    """diode-rx.socket binds what examples/rx.toml listens on, on the link interface."""
    import tomllib

    from diode.config.rx import ReceiverSection

    s = unit_settings(UNITS / SOCKET)
    example_rx = tomllib.loads((EXAMPLES / "rx.toml").read_text())["receiver"]
    # The link socket and its quarantines, one SO_REUSEPORT group (receiver/steer.py).
    address = f"{example_rx['listen']}:{example_rx['port']}"
    assert s["Socket.ListenDatagram"] == [address] * 3
    assert one(s, "Socket.ReusePort") == "yes"
    assert one(s, "Socket.BindToDevice") == example_rx["interface"] == "eth1"
    assert "eth1" in (ROOT / "docs" / "OPERATIONS.md").read_text()
    size = one(s, "Socket.ReceiveBuffer")
    assert size.endswith("M")
    default_rcvbuf = ReceiverSection.model_fields["rcvbuf_bytes"].default
    assert int(size[:-1]) * 1024 * 1024 >= default_rcvbuf == example_rx["rcvbuf_bytes"]
    assert one(s, "Socket.IPAddressDeny") == "any"
    assert one(s, "Install.WantedBy") == "sockets.target"
    # The plain service is the one it activates (same name), and it can be reloaded.
    for unit in ("diode-rx.service", "diode-rx@.service"):
        assert one(unit_settings(UNITS / unit), "Service.ExecReload") == "kill -HUP $MAINPID"


def test_sysctl_drop_in_lets_the_receiver_have_its_buffer() -> None:
    from diode.config.rx import ReceiverSection

    values = {}
    for raw in (UNITS / "99-diode-rx.conf").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            values[key.strip()] = int(value.strip())
    for key in values:
        assert Path("/proc/sys", *key.split(".")).exists(), f"no such sysctl: {key}"
    default_rcvbuf = ReceiverSection.model_fields["rcvbuf_bytes"].default
    assert values["net.core.rmem_max"] >= default_rcvbuf == 32 * 1024 * 1024
    assert values["net.core.rmem_default"] <= values["net.core.rmem_max"]


def test_sysusers_file_creates_the_unit_user(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed (apt-get install systemd)")
    (tmp_path / "etc").mkdir()
    done = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(UNITS / "diode.sysusers")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    users = {
        line.split(":")[0]: line for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    assert users["diode"].endswith(":/usr/sbin/nologin")
    assert "diode:" in (tmp_path / "etc/group").read_text()


# -- systemd-analyze verify ----------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root for ``verify --root``: the stock units, ours, and /usr/bin/diode-{tx,rx}.

    Verify needs the units ours pull in (sysinit.target, network-online.target...)
    and an executable at ExecStart's path; it looks for both under --root.
    """
    if ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    if STOCK_UNITS is None:
        pytest.skip("no stock unit folder (/usr/lib/systemd/system) to verify against")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(STOCK_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in [*ALL_UNITS, SOCKET]:
        shutil.copy(UNITS / unit, units / unit)
    bin_dir = root / "usr/bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("diode-tx", "diode-rx"):
        shutil.copy(VENV_BIN / name, bin_dir / name)
    # ExecReload's kill; /bin is /usr/bin on merged-/usr systems, a folder of its own elsewhere.
    kill = shutil.which("kill") or "/bin/kill"
    for folder in ("bin", "usr/bin"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        if not (root / folder / "kill").exists():
            shutil.copy(kill, root / folder / "kill")
    return root


@pytest.mark.parametrize("unit", ["diode-tx.service", "diode-rx.service", *TEMPLATES, SOCKET])
def test_systemd_analyze_verify_accepts_the_unit(scratch_root: Path, unit: str) -> None:
    assert ANALYZE is not None
    name = unit.replace("@.", "@site1.")
    done = subprocess.run(
        [ANALYZE, "verify", "--man=no", "--generators=no", f"--root={scratch_root}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # Unknown keys and bad values are only warnings to verify: none is allowed here.
    assert done.stderr.strip() == "", done.stderr


def test_verify_would_catch_a_missing_binary(scratch_root: Path) -> None:
    # The control for the test above: the scratch root is what makes ExecStart resolve.
    assert ANALYZE is not None
    binary = scratch_root / "usr/bin/diode-tx"
    saved = binary.read_bytes()
    binary.unlink()
    try:
        done = subprocess.run(
            [ANALYZE, "verify", "--man=no", f"--root={scratch_root}", "diode-tx.service"],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        binary.write_bytes(saved)
        binary.chmod(0o755)
    assert done.returncode != 0
    assert "/usr/bin/diode-tx" in done.stderr


# -- systemd-analyze security --------------------------------------------------------------

OVERALL = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+)")


def exposure(unit_file: Path) -> float:
    assert ANALYZE is not None
    # --threshold is in tenths: 20 = 2.0; the exit status alone says over or not.
    done = subprocess.run(
        [
            ANALYZE,
            "security",
            "--offline=true",
            f"--threshold={round(MAX_EXPOSURE * 10)}",
            "--no-pager",
            str(unit_file),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    match = OVERALL.search(done.stdout)
    assert match, done.stdout + done.stderr
    score = float(match.group(2))
    assert (done.returncode == 0) == (score <= MAX_EXPOSURE), done.stdout
    return score


@pytest.fixture(scope="module")
def analyze_security() -> None:
    if ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    help_text = subprocess.run(
        [ANALYZE, "--help"], capture_output=True, text=True, check=False
    ).stdout
    if "--offline" not in help_text:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")


@pytest.mark.usefixtures("analyze_security")
@pytest.mark.parametrize("unit", ALL_UNITS)
def test_security_exposure_is_at_most_2(unit: str, tmp_path: Path) -> None:
    score = exposure(UNITS / unit)
    print(f"{unit}: {score}")
    assert score <= MAX_EXPOSURE
    # With the operator's allow list of real addresses (what a deployment runs).
    deployed = tmp_path / unit
    deployed.write_text((UNITS / unit).read_text() + "\n[Service]\n" + OPERATOR_DROP_IN)
    assert exposure(deployed) <= MAX_EXPOSURE


# -- the exact ExecStart= command line -----------------------------------------------------

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def _sandbox() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The parts of the unit's sandbox a plain process can apply to itself.

    NoNewPrivileges=yes, and MemoryDenyWriteExecute=yes as the kernel's own
    PR_SET_MDWE (Linux 6.3+: kept across execve, refuses W+X mappings and
    mprotect to executable), so a dependency that needs W^X exceptions fails here.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)  # EINVAL before 6.3


class NotifySocket:
    """The manager's end of sd_notify: a datagram socket that learns the sender's pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, str]] = []

    def wait_for(self, text: str, within: float, of: subprocess.Popen[str] | None = None) -> int:
        """The pid that sent a message with the line ``text``.

        ``of``: the process expected to send it; if it exits first, or the wait
        times out, it is stopped and its stderr is part of the failure.
        """
        started = time.monotonic()
        deadline = started + within
        while time.monotonic() < deadline and (of is None or of.poll() is None):
            for pid, message in self.messages:
                if text in message.splitlines():
                    return pid
            self.sock.settimeout(min(max(deadline - time.monotonic(), 0.01), 0.5))
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            self.messages.append((pid, data.decode()))
        for pid, message in self.messages:
            if text in message.splitlines():
                return pid
        waited = time.monotonic() - started
        failure = f"no {text} after {waited:.1f} s (of {within}); got {self.messages}"
        if of is not None:
            state = "running" if of.poll() is None else f"exited {of.returncode}"
            of.kill()
            _, err = of.communicate()
            failure += f"; the process was {state}, its stderr ends:\n{err[-4000:]}"
        raise AssertionError(failure)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    try:
        yield sock
    finally:
        sock.close()


def resolved_exec_start(unit: str, config: Path) -> list[str]:
    """The unit's ExecStart=, binary taken from the venv and the config path swapped."""
    argv = exec_start(unit)
    binary = VENV_BIN / Path(argv[0]).name
    assert binary.is_file(), f"{binary}: the console script is not installed"
    assert argv[1:] == ["--config", argv[2]]
    return [str(binary), "--config", str(config)]


def spawn(argv: list[str], notify: NotifySocket, tmp_path: Path) -> subprocess.Popen[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "1000000",  # as WatchdogSec=1s would set: pings every 0.5 s
        "HOME": str(tmp_path),
    }
    return subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sandbox,  # noqa: PLW1509 - the test runs no threads that could deadlock
        umask=0o077,
    )


def stop(proc: subprocess.Popen[str], within: float = 10.0) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"still running {within} s after SIGTERM:\n{err}") from None
    assert time.monotonic() - started < within
    return proc.returncode, err


def keygen(directory: Path, name: str) -> None:
    done = subprocess.run(
        [str(VENV_BIN / "diode"), "keygen", str(directory), "--name", name, "--psk"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def example(name: str, replacements: dict[str, str], dest: Path) -> Path:
    """The shipped example with its paths and addresses swapped for the test's."""
    text = (EXAMPLES / name).read_text()
    for old, new in replacements.items():
        assert old in text, f"{old!r} is not in examples/{name}"
        text = text.replace(old, new)
    dest.write_text(text)
    return dest


def tx_example(tmp_path: Path, port: int) -> Path:
    keygen(tmp_path, "tx")
    closed = free_port()  # nothing listens there: the pollers keep reconnecting
    return example(
        "tx.toml",
        {
            'private_key = "/etc/diode/tx.key"': f'private_key = "{tmp_path}/tx.key"',
            '# psk_file = "/etc/diode/tx.psk"': f'psk_file = "{tmp_path}/tx.psk"',
            'state_dir = "/var/lib/diode-tx"': f'state_dir = "{tmp_path}/tx-state"',
            'destination = "192.168.77.2"': 'destination = "127.0.0.1"',
            "port = 5140": f"port = {port}",
            'source = "192.168.77.1"': 'source = "127.0.0.1"',
            'host = "10.10.1.10"\nport = 502': f'host = "127.0.0.1"\nport = {closed}',
            "opc.tcp://10.10.1.20:4840": f"opc.tcp://127.0.0.1:{closed}",
        },
        tmp_path / "tx.toml",
    )


def rx_example(tmp_path: Path, port: int, broker: int, metrics: int) -> Path:
    if not (tmp_path / "tx.pub").exists():
        keygen(tmp_path, "tx")
    return example(
        "rx.toml",
        {
            'listen = "192.168.77.2"': 'listen = "127.0.0.1"',
            'interface = "eth1"': 'interface = "lo"',
            "port = 5140": f"port = {port}",
            'state_dir = "/var/lib/diode-rx"': f'state_dir = "{tmp_path}/rx-state"',
            "metrics_port = 9640": f"metrics_port = {metrics}",
            "port = 1883": f"port = {broker}",
            'public_keys = ["/etc/diode/tx.pub"]': f'public_keys = ["{tmp_path}/tx.pub"]',
            '# psk_file = "/etc/diode/tx.psk"': f'psk_file = "{tmp_path}/tx.psk"',
        },
        tmp_path / "rx.toml",
    )


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "diode"), "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_transmitter_example_passes_check_config(tmp_path: Path) -> None:
    done = check_config(tx_example(tmp_path, 5140))
    assert done.returncode == 0, done.stderr
    assert "transmitter config" in done.stdout


def test_receiver_example_passes_check_config(tmp_path: Path) -> None:
    done = check_config(rx_example(tmp_path, 5140, 1883, 9640))
    assert done.returncode == 0, done.stderr
    assert "receiver config" in done.stdout


def model_keys(model: type[BaseModel]) -> set[str]:
    """Every key name a config model (and the sections inside it) accepts."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        todo = [field.annotation]
        while todo:
            kind = todo.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                keys |= model_keys(kind)
            todo.extend(get_args(kind))
    return keys


@pytest.mark.parametrize(("name", "kind"), [("tx.toml", "tx"), ("rx.toml", "rx")])
def test_example_shows_every_key(name: str, kind: str) -> None:
    model: type[BaseModel]
    if kind == "tx":
        from diode.config.tx import TxConfig

        model = TxConfig
    else:
        from diode.config.rx import RxConfig

        model = RxConfig
    text = (EXAMPLES / name).read_text()
    shown = set(re.findall(r"^#? ?([a-z_]+) = ", text, re.MULTILINE))
    sections = set(re.findall(r"^#? ?\[\[?([a-z_.]+)\]\]?$", text, re.MULTILINE))
    named = shown | {part for s in sections for part in s.split(".")}
    assert model_keys(model) - named == set()
    assert shown - model_keys(model) == set(), "the example shows keys the model does not have"


def wait_for_datagram(sock: socket.socket, within: float) -> bytes:
    sock.settimeout(within)
    return sock.recv(65535)


def test_transmitter_exec_start_runs_and_stops_cleanly(
    tmp_path: Path, notify: NotifySocket
) -> None:
    link = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    link.bind(("127.0.0.1", 0))
    config = tx_example(tmp_path, link.getsockname()[1])
    proc = spawn(resolved_exec_start("diode-tx.service", config), notify, tmp_path)
    try:
        assert notify.wait_for("READY=1", within=20, of=proc) == proc.pid  # NotifyAccess=main
        assert notify.wait_for("WATCHDOG=1", within=5, of=proc) == proc.pid
        assert wait_for_datagram(link, 5)  # the catalogue and heartbeats go out
        time.sleep(2)  # both pollers fail to connect, back off and retry
        assert proc.poll() is None, proc.communicate()[1]
    finally:
        code, err = stop(proc) if proc.poll() is None else (proc.returncode, "")
        link.close()
    assert code == 0, err
    assert notify.wait_for("STOPPING=1", within=1) == proc.pid
    assert "Traceback" not in err
    assert (tmp_path / "tx-state" / "epoch").is_file()


def test_receiver_exec_start_runs_and_stops_cleanly(
    tmp_path: Path, notify: NotifySocket, mosquitto: Mosquitto
) -> None:
    metrics = free_port()
    config = rx_example(tmp_path, free_port(socket.SOCK_DGRAM), mosquitto.port, metrics)
    proc = spawn(resolved_exec_start("diode-rx.service", config), notify, tmp_path)
    try:
        ready = notify.wait_for("READY=1", within=20, of=proc)
        assert ready == proc.pid
        assert notify.wait_for("WATCHDOG=1", within=5, of=proc) == proc.pid
        with socket.create_connection(("127.0.0.1", metrics), timeout=5) as conn:
            conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert conn.recv(64).startswith(b"HTTP/1.0 200")
        time.sleep(1)
        assert proc.poll() is None, proc.communicate()[1]
    finally:
        code, err = stop(proc) if proc.poll() is None else (proc.returncode, "")
    assert code == 0, err
    assert notify.wait_for("STOPPING=1", within=1) == proc.pid
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("unit", "bad", "key"),
    [
        ("diode-tx.service", "rate_mbps = 100.0", "link.rate_mbps"),
        ("diode-tx.service", "stream_id = 1", "transmitter.stream_id"),
        ("diode-rx.service", "port = 5140", "receiver.port"),
        ("diode-rx.service", 'client_id = "diode-rx"', "mqtt.client_id"),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_file_and_key(
    tmp_path: Path, notify: NotifySocket, unit: str, bad: str, key: str
) -> None:
    config = tx_example(tmp_path, 5140) if "-tx" in unit else rx_example(tmp_path, 5140, 1, 0)
    text = config.read_text()
    assert bad in text
    # A string where a number belongs (or the reverse): strict types make it an error.
    name, _, value = bad.partition(" = ")
    wrong = f"{name} = 12" if value.startswith('"') else f'{name} = "{value}"'
    config.write_text(text.replace(bad, wrong, 1))
    proc = spawn(resolved_exec_start(unit, config), notify, tmp_path)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(config) in lines[0]
    assert key in lines[0]
    assert "Traceback" not in err
    assert notify.messages == []  # never said READY


def socket_activated(unit_socket: Path, port: int, argv: list[str]) -> list[str]:
    """``systemd-socket-activate`` standing in for the socket unit: its ListenDatagram=,
    address and port swapped for loopback and a free port."""
    assert ACTIVATE is not None
    listen = unit_settings(unit_socket)["Socket.ListenDatagram"][0]
    assert re.fullmatch(r"[0-9.]+:\d+", listen), listen
    # It passes on only a few variables of its own; systemd would set these two.
    keep = ["--setenv=NOTIFY_SOCKET", "--setenv=WATCHDOG_USEC"]
    return [ACTIVATE, "--datagram", *keep, "-l", f"127.0.0.1:{port}", *argv]


@pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed")
def test_receiver_exec_start_takes_the_socket_unit_socket_and_reloads_on_it(
    tmp_path: Path, notify: NotifySocket, mosquitto: Mosquitto
) -> None:
    """ExecStart= under the socket (systemd-socket-activate executes it on the first
    datagram: same pid), then ExecReload='s SIGHUP: RELOADING=1, READY=1 again from
    the same pid, the socket passed on; a config that fails is refused, the receiver runs on."""
    metrics, port = free_port(), free_port(socket.SOCK_DGRAM)
    config = rx_example(tmp_path, port, mosquitto.port, metrics)
    argv = socket_activated(UNITS / SOCKET, port, resolved_exec_start("diode-rx.service", config))
    proc = spawn(argv, notify, tmp_path)
    try:
        assert proc.stderr is not None
        assert "Listening on" in proc.stderr.readline()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as link:
            link.sendto(b"first", ("127.0.0.1", port))
        assert notify.wait_for("READY=1", within=20, of=proc) == proc.pid
        # The datagram that woke it was queued in the socket and read by the receiver.
        assert wait_scrape(metrics, 'diode_rx_datagrams_rejected_total{reason="short"}') == 1.0
        proc.send_signal(signal.SIGHUP)  # ExecReload=
        assert notify.wait_for("RELOADING=1", within=10, of=proc) == proc.pid
        notify.messages.clear()
        assert notify.wait_for("READY=1", within=20, of=proc) == proc.pid
        # A broken config: refused, logged; the running receiver is kept.
        good = config.read_text()
        config.write_text(good.replace(f"port = {port}", f'port = "{port}"'))
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None
        # Still reading the same socket (the new process's counters start at 0).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as link:
            link.sendto(b"again", ("127.0.0.1", port))
        assert wait_scrape(metrics, 'diode_rx_datagrams_rejected_total{reason="short"}') == 1.0
    finally:
        code, err = stop(proc) if proc.poll() is None else (proc.returncode, "")
    assert code == 0, err
    starts = [line for line in err.splitlines() if '"receiver starting"' in line]
    assert len(starts) == 2
    assert all('"socket": "passed in"' in line for line in starts), starts
    (refused,) = [line for line in err.splitlines() if "config reload refused" in line]
    assert str(config) in refused
    assert "receiver.port" in refused
    assert "Traceback" not in err


def unit_group(unit_socket: Path, port: int) -> list[socket.socket]:
    """The sockets the socket unit creates, in its order, address swapped for loopback:
    one per ListenDatagram= line, SO_REUSEPORT for ReusePort=yes (systemd-socket-activate
    cannot bind two sockets to one port, so the test does, as systemd would)."""
    settings = unit_settings(unit_socket)
    assert one(settings, "Socket.ReusePort") == "yes"
    socks = []
    for _ in settings["Socket.ListenDatagram"]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        socks.append(sock)
    return socks


@pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed")
def test_receiver_takes_the_units_three_sockets_steers_and_passes_them_on_reload(
    tmp_path: Path, notify: NotifySocket, mosquitto: Mosquitto
) -> None:
    """The unit's three sockets passed through systemd-socket-activate (LISTEN_FDS=3):
    the receiver steers with them, and its SIGHUP re-exec passes all three on."""
    metrics, port = free_port(), free_port(socket.SOCK_DGRAM)
    config = rx_example(tmp_path, port, mosquitto.port, metrics)
    group = unit_group(UNITS / SOCKET, port)
    fds = [s.fileno() for s in group]

    def passed() -> None:  # at fds 3, 4 and 5, as systemd passes them
        moved = [os.dup(fd) for fd in fds]
        for i, fd in enumerate(moved):
            os.dup2(fd, 3 + i)
        _sandbox()

    argv = [
        "sh",
        "-c",
        f'LISTEN_PID=$$ LISTEN_FDS={len(fds)} exec "$@"',
        "sh",
        # No -l: it passes on the sockets it was given (LISTEN_FDS) and waits for a datagram.
        str(ACTIVATE),
        "--datagram",
        "--setenv=NOTIFY_SOCKET",
        "--setenv=WATCHDOG_USEC",
        *resolved_exec_start("diode-rx.service", config),
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NOTIFY_SOCKET": str(notify.path),
           "WATCHDOG_USEC": "1000000", "HOME": str(tmp_path)}  # fmt: skip
    proc = subprocess.Popen(  # spawn(), with the group at fds 3, 4 and 5
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=passed, close_fds=False, umask=0o077,  # noqa: PLW1509 - no threads here
    )  # fmt: skip
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as link:
            link.sendto(b"first", ("127.0.0.1", port))
        assert notify.wait_for("READY=1", within=20, of=proc) == proc.pid
        assert wait_scrape(metrics, STEERED_REPLAYS) == 0
        proc.send_signal(signal.SIGHUP)
        assert notify.wait_for("RELOADING=1", within=10, of=proc) == proc.pid
        notify.messages.clear()
        assert notify.wait_for("READY=1", within=20, of=proc) == proc.pid
        assert wait_scrape(metrics, STEERED_REPLAYS) == 0
    finally:
        code, err = stop(proc) if proc.poll() is None else (proc.returncode, "")
        for sock in group:
            sock.close()
    assert code == 0, err
    assert "Received 3 descriptors via the environment" in err
    starts = [json.loads(line) for line in err.splitlines() if '"receiver starting"' in line]
    assert [(s["socket"], s["steering"]) for s in starts] == [("passed in", True)] * 2, starts
    assert "one socket passed in" not in err
    assert "Traceback" not in err


STEERED_REPLAYS = 'diode_rx_datagrams_rejected_total{reason="steered_replay"}'


def wait_scrape(port: int, name: str, within: float = 5.0) -> float:
    deadline = time.monotonic() + within
    while True:
        try:
            return scrape(port, name)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def scrape(port: int, name: str) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        text = b""
        while chunk := conn.recv(65536):
            text += chunk
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics")

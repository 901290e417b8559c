"""A plant of child processes for the fault suite, and the instruments that count.

::

    diode-tx (child) --UDP--> Relay (this process: loss, bursts, duplicates,
        reorder, bit flips; seeded) --UDP--> diode-rx (child) --> mosquitto (child)
        --> Subscriber (paho thread in this process: every value, in arrival order)

The daemons run from TOML files written here, exactly as an operator runs
them. What each side did is read from its own reports: the transmitter's
counters from its "transmitter stopped" log line (SIGTERM), the receiver's
from its Prometheus endpoint and its "records lost" log lines, memory from
``/proc/PID/status`` (VmHWM, the peak resident set).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from diode.benchmarks.harness import to_toml
from diode.keys import load_signing_key, write_keypair
from diode.loopback import free_port
from tests.support.mosquitto import Mosquitto
from tests.support.relay import Faults, Relay

STREAM = 7
PREFIX = "diode/test"
STATUS_TOPIC = f"{PREFIX}/$status"
BIN = Path(sys.executable).parent
SHUTDOWN_S = 20.0

# --- child processes ----------------------------------------------------------------


def vm_kb(pid: int, field_name: str) -> int:
    """A VmXXX line of /proc/PID/status, in kB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Child:
    """A daemon in its own process; stderr (JSON log lines) kept in a file."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("ab"))
        self.peak_kb = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sample_memory(self) -> int:
        """The peak resident set so far (VmHWM), remembered past the process's end."""
        self.peak_kb = max(self.peak_kb, vm_kb(self.pid, "VmHWM"))
        return self.peak_kb

    def terminate(self) -> int:
        self.sample_memory()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(SHUTDOWN_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown path runs."""
        self.sample_memory()
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (optionally only those whose event is ``name``)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and (name is None or entry.get("event") == name):
                    out.append(entry)
        return out

    def tracebacks(self) -> bool:
        return "Traceback" in self.log.read_text(errors="replace")


# --- the subscriber -------------------------------------------------------------------


def sample_number(value: Any) -> int | None:
    """The count a synthetic value carries: 7, or "xxxx7" with ``string_bytes``."""
    if type(value) is int:
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.lstrip("x"))
    return None


@dataclass(slots=True)
class Seen:
    """One value as a subscriber saw it."""

    quality: str
    value: Any
    ts: str
    at_ns: int
    reason: str = ""


class Subscriber:
    """Every value under ``{PREFIX}/#``, per (device, tag), in arrival order (paho thread).

    Understands both payload modes. With ``session`` the broker keeps the
    subscription and queues QoS 1 messages while the subscriber is away
    (a broker with persistence keeps them across its own restart). A session
    the broker still has is not subscribed again: a new SUBSCRIBE would make
    the broker send every retained value again, among the queued ones.
    """

    def __init__(self, port: int, *, session: str | None = None) -> None:
        self.values: dict[tuple[str, str], list[Seen]] = defaultdict(list)
        self.status: list[dict[str, Any]] = []
        self.messages = 0
        self.connects = 0
        self.sessions_resumed = 0
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=session or "",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.connected.clear()
        self.client.reconnect_delay_set(0.05, 0.2)
        props = None
        if session:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=not session, properties=props)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise RuntimeError("subscriber could not connect")

    def _on_connect(self, client: mqtt.Client, _u: object, flags: Any, *_: object) -> None:
        self.connects += 1
        if getattr(flags, "session_present", False):
            self.sessions_resumed += 1
        else:
            client.subscribe(f"{PREFIX}/#", qos=1)
        self.connected.set()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        at = time.time_ns()
        topic = msg.topic
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            self.messages += 1
            if topic == STATUS_TOPIC:
                self.status.append(payload)
                return
            parts = topic[len(PREFIX) + 1 :].split("/")
            if "samples" in payload:  # batched: one message per device per block
                device = parts[0]
                for s in payload["samples"]:
                    self.values[device, s["tag"]].append(
                        Seen(s["quality"], s["value"], s["ts"], at, s.get("reason", ""))
                    )
            elif len(parts) == 2 and not parts[1].startswith("$"):
                self.values[parts[0], parts[1]].append(
                    Seen(
                        payload["quality"],
                        payload["value"],
                        payload["ts"],
                        at,
                        payload.get("reason", ""),
                    )
                )

    def good(self) -> dict[tuple[str, str], list[int]]:
        """Each tag's good synthetic counts, in arrival order."""
        with self.lock:
            return {
                tag: [n for s in seen if s.quality == "good" and (n := sample_number(s.value))]
                for tag, seen in self.values.items()
            }

    def seen(self, device: str, tag: str) -> list[Seen]:
        with self.lock:
            return list(self.values.get((device, tag), []))

    def first_after(self, device: str, tag: str, at_ns: int, quality: str) -> Seen | None:
        """The first value of ``quality`` that arrived at or after ``at_ns`` (wall clock)."""
        return next(
            (s for s in self.seen(device, tag) if s.at_ns >= at_ns and s.quality == quality),
            None,
        )

    def count_good(self) -> int:
        with self.lock:
            return sum(1 for seen in self.values.values() for s in seen if s.quality == "good")

    def last_status(self) -> dict[str, Any]:
        with self.lock:
            return self.status[-1] if self.status else {}

    def latencies_ms(self) -> list[float]:
        """Arrival time minus the sample's own timestamp, for every good value."""
        from datetime import datetime

        cache: dict[str, float] = {}
        out = []
        with self.lock:
            seen = [s for v in self.values.values() for s in v if s.quality == "good"]
        for s in seen:
            head = s.ts[:19]
            base = cache.get(head)
            if base is None:
                base = cache[head] = datetime.fromisoformat(head + "+00:00").timestamp()
            ts = base + int(s.ts[20:26]) / 1e6
            out.append(s.at_ns / 1e6 - ts * 1e3)
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass(slots=True)
class Tally:
    """What a subscriber's good values say about a counted stream."""

    published: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    missing: int = 0
    missing_values: set[tuple[str, str, int]] = field(default_factory=set)

    def assert_none_missing(self) -> None:
        """Every value generated reached MQTT; else how many did not, and the first few."""
        assert self.missing == 0, (
            f"{self.missing} values never published, e.g. {sorted(self.missing_values)[:5]}"
        )


def tally(
    good: dict[tuple[str, str], list[int]], sent: dict[tuple[str, str], int] | None = None
) -> Tally:
    """Per tag: values published, seen twice, seen after a larger one, never seen.

    ``sent`` gives each tag's last generated count (values are 1..last); without
    it the largest value seen is taken as the last sent.
    """
    t = Tally()
    tags = set(good) | set(sent or {})
    for tag in tags:
        values = good.get(tag, [])
        t.published += len(values)
        seen: set[int] = set()
        top = 0
        for v in values:
            if v in seen:
                t.duplicates += 1
            elif v < top:
                t.out_of_order += 1
            seen.add(v)
            top = max(top, v)
        last = sent[tag] if sent is not None else top
        for v in range(1, last + 1):
            if v not in seen:
                t.missing += 1
                t.missing_values.add((tag[0], tag[1], v))
    return t


def synthetic_sent(
    sources: list[dict[str, Any]], generated: dict[str, int]
) -> dict[tuple[str, str], int]:
    """Each tag's last count, from each source's generated total (round robin over tags)."""
    out = {}
    for source in sources:
        n, tags = generated[source["name"]], source["tags"]
        for i in range(tags):
            out[source["name"], f"t{i}"] = n // tags + (1 if i < n % tags else 0)
    return out


# --- the plant --------------------------------------------------------------------


def metrics(port: int) -> dict[str, int]:
    """The receiver's counters from its Prometheus endpoint (names as in Receiver.counters)."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r'diode_rx_datagrams_rejected_total\{reason="(\w+)"\} (\S+)', line)
        if m:
            out[f"rejected_{m[1]}"] = int(float(m[2]))
            continue
        m = re.match(r"diode_rx_(\w+?)(?:_total)? (\S+)$", line)
        if m:
            out[m[1]] = int(float(m[2]))
    return out


BAD_DATAGRAM_REASONS = (
    "short",
    "bad_magic",
    "bad_version",
    "bad_checksum",
    "malformed",
    "unknown_stream",  # a bit flip in the stream id (the gate looks it up first)
    "bad_shape",
    "bad_tag",
    "ungated",
)


def rejected(counters: dict[str, int], reasons: tuple[str, ...] | None = None) -> int:
    return sum(
        v
        for k, v in counters.items()
        if k.startswith("rejected_") and (reasons is None or k[9:] in reasons)
    )


@dataclass
class Plant:
    """Paths, ports, configs and children of one plant; ``sources`` are synthetic sources."""

    tmp: Path
    broker: Mosquitto
    sources: list[dict[str, Any]]
    faults: Faults = field(default_factory=Faults)
    tx_section: dict[str, Any] = field(default_factory=dict)
    link: dict[str, Any] = field(default_factory=dict)
    receiver: dict[str, Any] = field(default_factory=dict)
    mqtt: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)
    stream: dict[str, Any] = field(default_factory=dict)  # more keys of [[streams]] in rx.toml
    plc: dict[str, Any] = field(default_factory=dict)  # [modbus] / [opcua] sections of tx
    capture: bool = False
    relay: Relay | None = None
    rx: Child | None = None
    tx: Child | None = None
    rx_port: int = 0
    metrics_port: int = 0
    rx_peak_kb: int = 0
    tx_counters: dict[str, int] = field(default_factory=dict)
    generated: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _runs: int = 0

    def __post_init__(self) -> None:
        self.keys = self.tmp / "keys"
        if not (self.keys / "tx.key").exists():
            write_keypair(self.keys, "tx")
        self.rx_port = free_port(socket.SOCK_DGRAM)
        self.metrics_port = free_port()

    def signing_key(self) -> Any:
        return load_signing_key(self.keys / "tx.key")

    # -- configs ---------------------------------------------------------------------

    def tx_config(self) -> Path:
        assert self.relay is not None
        data: dict[str, Any] = {
            "transmitter": {
                "stream_id": STREAM,
                "private_key": str(self.keys / "tx.key"),
                "state_dir": str(self.tmp / "tx-state"),
                "heartbeat_interval_s": 0.2,
                "catalogue_period_s": 1.0,
                # No value re-sends: every value on MQTT is then one the source generated.
                "integrity_period_s": 86400.0,
                **self.tx_section,
            },
            "link": {
                "destination": "127.0.0.1",
                "port": self.relay.port,
                "rate_mbps": 200.0,
                **self.link,
            },
            "synthetic": {"sources": self.sources},
            **self.plc,
            "log": {"level": "info", "format": "json"},
        }
        path = self.tmp / "tx.toml"
        path.write_text(to_toml(data))
        return path

    def rx_config(self) -> Path:
        data: dict[str, Any] = {
            "receiver": {
                "listen": "127.0.0.1",
                "port": self.rx_port,
                "state_dir": str(self.tmp / "rx-state"),
                "rcvbuf_bytes": 32 * 1024 * 1024,
                "metrics_port": self.metrics_port,
                **self.receiver,
            },
            "mqtt": {
                "host": "127.0.0.1",
                "port": self.broker.port,
                "client_id": "diode-rx-faults",
                "spool_path": str(self.tmp / "rx-state" / "spool.sqlite"),
                "reconnect_max_s": 2.0,
                **self.mqtt,
            },
            "streams": [
                {
                    "id": STREAM,
                    "public_keys": [str(self.keys / "tx.pub")],
                    "output": {"prefix": "diode", "site": "test", **self.output},
                    **self.stream,
                }
            ],
            "log": {"level": "info", "format": "json"},
        }
        path = self.tmp / "rx.toml"
        path.write_text(to_toml(data))
        return path

    # -- life cycle ------------------------------------------------------------------

    async def start_relay(self) -> Relay:
        self.relay = Relay(("127.0.0.1", self.rx_port), self.faults)
        if not self.capture:
            self.relay.capture = _Discard()
        await self.relay.start()
        return self.relay

    async def start_rx(self) -> Child:
        self.rx = Child(
            "rx", [str(BIN / "diode-rx"), "--config", str(self.rx_config())], self.tmp / "rx.log"
        )
        await wait_until(self._rx_ready, within=20, what="receiver metrics endpoint")
        return self.rx

    def _rx_ready(self) -> bool:
        assert self.rx is not None
        if not self.rx.alive():
            raise AssertionError(f"receiver exited: {self.rx.log.read_text()[-2000:]}")
        try:
            metrics(self.metrics_port)
        except OSError:
            return False
        return True

    async def start_tx(self) -> Child:
        self.tx = Child(
            "tx",
            [str(BIN / "diode-tx"), "--config", str(self.tx_config())],
            self.tmp / f"tx{self._runs}.log",
        )
        self._runs += 1
        await wait_until(
            lambda: self.tx is not None and bool(self.tx.events("transmitter starting")),
            within=20,
            what="transmitter start",
        )
        return self.tx

    async def stop_tx(self) -> dict[str, int]:
        """SIGTERM the transmitter; its final counters (this run) are returned and added up."""
        assert self.tx is not None
        tx = self.tx
        await asyncio.to_thread(tx.terminate)
        stopped = tx.events("transmitter stopped")
        assert stopped, f"transmitter left no final counters: {tx.log.read_text()[-2000:]}"
        counters = {k: v for k, v in stopped[-1].items() if isinstance(v, int)}
        for k, v in counters.items():
            self.tx_counters[k] = self.tx_counters.get(k, 0) + v
        return counters

    def kill_tx(self) -> None:
        assert self.tx is not None
        self.tx.kill()

    def rx_counters(self) -> dict[str, int]:
        return metrics(self.metrics_port)

    def rx_memory(self) -> int:
        if self.rx is not None:
            self.rx_peak_kb = max(self.rx_peak_kb, self.rx.sample_memory())
        return self.rx_peak_kb

    async def stop_rx(self) -> None:
        if self.rx is not None:
            self.rx_memory()
            await asyncio.to_thread(self.rx.terminate)

    def kill_rx(self) -> None:
        if self.rx is not None:
            self.rx_memory()
            self.rx.kill()

    def gaps(self) -> list[dict[str, Any]]:
        """Every gap the receiver reported (its "records lost" log lines, all runs)."""
        return self.rx.events("records lost") if self.rx is not None else []

    async def close(self) -> None:
        for child in (self.tx, self.rx):
            if child is not None and child.alive():
                await asyncio.to_thread(child.terminate)
        if self.relay is not None:
            self.relay.close()


class _Discard(list[bytes]):
    """A capture that keeps nothing (long, fast runs)."""

    def append(self, _item: bytes) -> None:
        return


async def wait_until(
    predicate: Any, within: float = 15.0, step: float = 0.05, what: str = "condition"
) -> float:
    """Poll ``predicate`` until true; the seconds it took. Fails after ``within``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < within:
        if predicate():
            return loop.time() - start
        await asyncio.sleep(step)
    raise AssertionError(f"{what}: not met within {within} s")


def settled(read: Any, quiet_s: float = 1.0) -> Any:
    """A predicate true once ``read()`` has not changed for ``quiet_s``."""
    state: dict[str, Any] = {"value": object(), "since": time.monotonic()}

    def check() -> bool:
        value = read()
        now = time.monotonic()
        if value != state["value"]:
            state["value"], state["since"] = value, now
            return False
        return now - state["since"] >= quiet_s

    return check


def os_info() -> str:
    uname = os.uname()
    return (
        f"{uname.sysname} {uname.release}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )


# --- the broker, the spool and the position on disk -------------------------------------


def persist_broker(broker: Mosquitto) -> None:
    """Persistence on (sessions and queued messages survive a restart), then restart.

    The test broker runs as ``user root`` (tests/support/mosquitto.py), so it can
    write its database into the test's private directory.
    """
    text = broker.conf.read_text()
    if "persistence true" not in text:
        text = text.replace(
            "persistence false",
            f"persistence true\npersistence_location {broker.workdir}/",
        )
        broker.conf.write_text(text)
    broker.restart()


def spooled(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The receiver's MQTT spool as a killed receiver left it: (topic, payload), in order."""
    from receiver.spool import Spool

    spool = Spool(path, 2**62)
    try:
        _, rows = spool.read(-(2**62), len(spool), 0.0)
    finally:
        spool.close()
    return [(m.topic, json.loads(m.payload)) for _, m in rows]


def spooled_values(rows: list[tuple[str, dict[str, Any]]]) -> set[tuple[str, str, int]]:
    """The synthetic (device, tag, count) values in spooled per-tag messages."""
    out = set()
    for topic, payload in rows:
        parts = topic[len(PREFIX) + 1 :].split("/")
        if topic.startswith(PREFIX + "/") and len(parts) == 2 and not parts[1].startswith("$"):
            n = sample_number(payload.get("value"))
            if payload.get("quality") == "good" and n is not None:
                out.add((parts[0], parts[1], n))
    return out


def saved_position(plant: Plant) -> Any:
    """The stream position the receiver saved on disk (a StreamState), beside its spool."""
    import sqlite3

    from diode.replay import unpack_states

    spool = sqlite3.connect(plant.tmp / "rx-state" / "spool.sqlite")
    try:
        (value,) = spool.execute("SELECT value FROM meta WHERE key = 'positions'").fetchone()
    finally:
        spool.close()
    return unpack_states(bytes(value))[STREAM]

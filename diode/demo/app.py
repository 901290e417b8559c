"""``diode demo``: a whole plant on one machine, in one event loop.

::

    Process --> ModbusPlc (pymodbus) --+
     (model)    OpcuaPlc  (asyncua)  --+--> Transmitter --UDP--> LossyRelay (drops --loss P)
                                                                     |
        view <-- Watcher <-- broker (local, or amqtt) <-- Receiver <-+ UDP

Every daemon part is the real one, built from configs validated like the
files in /etc/diode, with keys generated into a temporary folder. The demo
stops after ``--duration`` seconds or at Ctrl-C / SIGTERM, shuts everything
down in the reverse order of starting (transmitter first, so its last blocks
still cross the link), and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from diode.config import validate
from diode.config.rx import RxConfig
from diode.config.tx import TxConfig
from diode.demo.broker import EmbeddedBroker, Watcher, probe
from diode.demo.files import FILE_EVERY_S, DemoFiles
from diode.demo.plant import ModbusPlc, OpcuaPlc
from diode.demo.process import Process
from diode.demo.relay import Faults, Relay
from diode.demo.sparkplug import SparkplugReader
from diode.demo.view import (
    LogTail,
    Snapshot,
    TagRow,
    link_table,
    progress_line,
    render,
    sample_age_s,
    tag_table,
)
from diode.errors import DiodeError
from diode.keys import write_keypair, write_psk
from receiver.app import Receiver
from transmitter.app import Transmitter, build

STREAM_ID = 1
PREFIX, SITE = "diode", "demo"
LOCAL_BROKER = ("127.0.0.1", 1883)
REFRESH_S = 0.25  # the live view's ~4 Hz
PROGRESS_S = 2.0  # a progress line this often when stdout is not a terminal
START_TIMEOUT_S = 15.0
SETTLE_S = 0.6  # after the transmitter stopped: the link's last blocks cross, MQTT delivers
RCVBUF_BYTES = 1024 * 1024
# The decoder counts a symbol of a block it already rebuilt or delivered as
# rejected "late": the repair symbols FEC did not need. That is the price of
# FEC, not a rejection, so the demo shows it apart.
SURPLUS = "rejected_late"

# The plant's tags as the transmitter reads them (see diode/demo/plant.py for the layout).
MODBUS_TAGS: list[dict[str, Any]] = [
    {"name": "level", "table": "holding_register", "address": 0, "type": "float32", "unit": "m"},
    {"name": "pump", "table": "coil", "address": 0, "type": "bool"},
    {"name": "parts", "table": "holding_register", "address": 10, "type": "uint32"},
]
OPCUA_NODES: list[dict[str, Any]] = [
    {"name": "temperature", "node_id": OpcuaPlc.node_id("Temperature"), "type": "float64"},
    {"name": "flow", "node_id": OpcuaPlc.node_id("Flow"), "type": "float32"},
    {"name": "batches", "node_id": OpcuaPlc.node_id("Batches"), "type": "uint32"},
]
TAG_TOPICS = [f"{PREFIX}/{SITE}/plc1/{t['name']}" for t in MODBUS_TAGS] + [
    f"{PREFIX}/{SITE}/line1/{n['name']}" for n in OPCUA_NODES
]


class DemoError(DiodeError):
    """The demo could not set its plant up (a part did not start)."""

    reason = "demo"


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    loss: float = 0.0
    duration_s: float | None = None
    json: bool = False
    broker: str = "auto"  # auto | embedded | HOST:PORT
    seed: int = 1
    payload: str = "json"  # json | sparkplug
    files: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        options = cls(
            loss=float(args.loss),
            duration_s=args.duration,
            json=bool(args.json),
            broker=str(getattr(args, "broker", "auto")),
            seed=int(getattr(args, "seed", 1)),
            payload=str(getattr(args, "payload", "json")),
            files=bool(getattr(args, "files", False)),
        )
        if not 0.0 <= options.loss < 1.0:
            raise ValueError(f"--loss is a share of datagrams, 0 to below 1 (got {options.loss})")
        if options.duration_s is not None and options.duration_s <= 0:
            raise ValueError(f"--duration must be positive (got {options.duration_s})")
        if options.broker not in ("auto", "embedded"):
            host_port(options.broker)
        if options.payload not in ("json", "sparkplug"):
            raise ValueError(f"--payload is json or sparkplug (got {options.payload!r})")
        return options


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--broker is auto, embedded or HOST:PORT (got {text!r})")
    return host, int(port)


def link_socket() -> socket.socket:
    """The receiver's end of the demo link: loopback, a port the kernel picks, read only.

    Opened here rather than by the receiver so the port is known before the
    relay that sends to it starts (and no other process can take it meanwhile).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


class Demo:
    """The plant's parts, started in order and stopped in reverse."""

    def __init__(self, options: Options, workdir: Path, stack: contextlib.AsyncExitStack) -> None:
        self.options = options
        self.workdir = workdir
        self.stack = stack
        self.process = Process(seed=options.seed)
        self.broker_name = ""
        self.broker_addr = LOCAL_BROKER
        self.broker_protocol = "5"  # MQTT version the receiver speaks to the broker
        self.watcher: Watcher | None = None
        self.relay: Relay | None = None
        self.tx: Transmitter | None = None
        self.rx: Receiver | None = None
        self.daemon_tasks: list[asyncio.Task[None]] = []
        self.errors: list[str] = []  # what went wrong while stopping
        self.started = time.monotonic()
        self.stopped_at: float | None = None
        self.files = DemoFiles(workdir) if options.files else None

    # -- starting ----------------------------------------------------------------------

    async def start(self) -> None:
        await self._start_broker()
        await self._start_watcher()
        plc = ModbusPlc(self.process)
        await plc.start()
        self.stack.push_async_callback(plc.stop)
        opcua = OpcuaPlc(self.process)
        await opcua.start()
        self.stack.push_async_callback(opcua.stop)
        await self._start_link(plc, opcua)
        self.started = time.monotonic()

    async def _start_broker(self) -> None:
        choice = self.options.broker
        if choice == "auto" and await probe(*LOCAL_BROKER):
            self.broker_addr = LOCAL_BROKER
            self.broker_name = "{}:{} (local)".format(*LOCAL_BROKER)
            return
        if choice not in ("auto", "embedded"):
            self.broker_addr = host_port(choice)
            if not await probe(*self.broker_addr):
                raise DemoError(f"no MQTT broker accepts a session at {choice}")
            self.broker_name = choice
            return
        broker = EmbeddedBroker()
        await broker.start()
        self.stack.push_async_callback(broker.stop)
        self.broker_addr = (broker.host, broker.port)
        self.broker_protocol = broker.protocol
        self.broker_name = f"{broker.host}:{broker.port} (embedded amqtt)"

    async def _start_watcher(self) -> None:
        watcher = Watcher(
            host=self.broker_addr[0],
            port=self.broker_addr[1],
            topic_filter=f"{PREFIX}/{SITE}/#",
            client_id=f"diode-demo-watch-{os.getpid()}",
            sparkplug=(
                SparkplugReader(f"{PREFIX}/{SITE}") if self.options.payload == "sparkplug" else None
            ),
        )
        await self._background("subscriber", watcher.run(), watcher.subscribed)
        self.watcher = watcher

    async def _start_link(self, plc: ModbusPlc, opcua: OpcuaPlc) -> None:
        keys = self.workdir / "keys"
        write_keypair(keys, "demo")
        write_psk(keys / "demo.psk")  # the link secret, as docs/OPERATIONS.md asks of a real pair
        if self.files is not None:
            write_keypair(keys, "files")
        sock = link_socket()
        rx_port: int = sock.getsockname()[1]
        self.rx = Receiver(self.rx_config(keys, rx_port), sock=sock)
        await self._daemon("receiver", self.rx)

        faults = Faults(loss=self.options.loss, seed=self.options.seed)
        relay = Relay(("127.0.0.1", rx_port), faults)
        await relay.start()
        self.stack.callback(relay.close)
        self.relay = relay

        config = self.tx_config(keys, relay.port, plc, opcua)
        self.tx = build(config)  # its keys and link secret read as the daemon reads them
        await self._daemon("transmitter", self.tx, settle_s=SETTLE_S)
        if self.files is not None:
            ready = asyncio.Event()
            await self._background(
                "file dropper", self.files.drop_every(FILE_EVERY_S, ready), ready
            )

    def tx_config(self, keys: Path, port: int, plc: ModbusPlc, opcua: OpcuaPlc) -> TxConfig:
        data = {
            "transmitter": {
                "stream_id": STREAM_ID,
                "private_key": str(keys / "demo.key"),
                "psk_file": str(keys / "demo.psk"),
                "state_dir": str(self.workdir / "tx-state"),
                "heartbeat_interval_s": 0.5,
                "catalogue_period_s": 2.0,
            },
            "link": {"destination": "127.0.0.1", "port": port, "rate_mbps": 50.0},
            "modbus": {
                "devices": [
                    {
                        "name": "plc1",
                        "host": "127.0.0.1",
                        "port": plc.port,
                        "poll_interval_s": 0.1,
                        "timeout_s": 1.0,
                        "units": [{"id": 1, "tags": MODBUS_TAGS}],
                    }
                ]
            },
            "opcua": {
                "servers": [
                    {
                        "name": "line1",
                        "endpoint": opcua.endpoint,
                        "sampling_interval_ms": 100.0,
                        "publishing_interval_ms": 100.0,
                        "nodes": OPCUA_NODES,
                    }
                ]
            },
        }
        if self.files is not None:
            data |= self.files.tx_sections(keys)
        return validate(TxConfig, data, "demo transmitter")

    def rx_config(self, keys: Path, port: int) -> RxConfig:
        data = {
            "receiver": {
                "listen": "127.0.0.1",
                "port": port,
                "state_dir": str(self.workdir / "rx-state"),
                "rcvbuf_bytes": RCVBUF_BYTES,
            },
            "mqtt": {
                "host": self.broker_addr[0],
                "port": self.broker_addr[1],
                "client_id": f"diode-demo-rx-{os.getpid()}",
                "protocol": self.broker_protocol,
                "spool_path": str(self.workdir / "rx-state" / "spool.sqlite"),
            },
            "streams": [
                {
                    "id": STREAM_ID,
                    "public_keys": [keys / "demo.pub"],
                    "psk_file": keys / "demo.psk",
                    "output": {"prefix": PREFIX, "site": SITE, **self._payload_output()},
                }
            ],
        }
        if self.files is not None:
            lane = self.files.rx_stream(keys, keys / "demo.psk", PREFIX, SITE)
            data["streams"] = [*data["streams"], lane]
        return validate(RxConfig, data, "demo receiver")

    def _payload_output(self) -> dict[str, Any]:
        if self.options.payload != "sparkplug":
            return {}
        # Sparkplug B 3.0 sends births and data at QoS 0; an edge node per stream.
        return {
            "payload": "sparkplug",
            "qos": 0,
            "sparkplug": {"group_id": "diode", "edge_node_id": f"demo-{os.getpid()}"},
        }

    async def _daemon(
        self, name: str, daemon: Transmitter | Receiver, *, settle_s: float = 0.0
    ) -> None:
        stop = asyncio.Event()

        async def halt() -> None:
            ended_by_itself = task.done()  # then failed() has reported it already
            stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), START_TIMEOUT_S)
            except TimeoutError:
                task.cancel()
                self.errors.append(f"the {name} did not stop within {START_TIMEOUT_S:.0f} s")
            except Exception as exc:  # reported after the summary, exit status 1
                if not ended_by_itself:
                    self.errors.append(f"the {name} failed while stopping: {exc!r}")
            if settle_s:
                await asyncio.sleep(settle_s)

        task = asyncio.create_task(daemon.run(stop), name=name)
        self.daemon_tasks.append(task)
        await self._until_ready(name, task, daemon.ready)
        self.stack.push_async_callback(halt)

    async def _background(
        self, name: str, coro: Awaitable[None], ready: asyncio.Event
    ) -> asyncio.Task[None]:
        async def wrap() -> None:
            await coro

        task = asyncio.create_task(wrap(), name=name)
        self.daemon_tasks.append(task)

        async def cancel() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        await self._until_ready(name, task, ready)
        self.stack.push_async_callback(cancel)
        return task

    @staticmethod
    async def _until_ready(name: str, task: asyncio.Task[None], ready: asyncio.Event) -> None:
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait(
            {task, waiter}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        if task in done:
            error = task.exception()
            raise DemoError(f"the {name} stopped while starting: {error!r}")
        if waiter not in done:
            task.cancel()
            raise DemoError(f"the {name} did not start within {START_TIMEOUT_S:.0f} s")

    # -- running -------------------------------------------------------------------------

    def failed(self) -> str | None:
        """A part that stopped by itself, and why."""
        for task in self.daemon_tasks:
            if task.done() and not task.cancelled():
                return f"the {task.get_name()} stopped: {task.exception()!r}"
        return None

    def snapshot(self) -> Snapshot:
        now_mono = time.monotonic()
        now_wall = dt.datetime.now(dt.UTC)
        rx: dict[str, int] = self.rx.counters() if self.rx is not None else {}
        tx: dict[str, int] = self.tx.counters() if self.tx is not None else {}
        rows: list[TagRow] = []
        published = 0
        topics = self.watcher.topics if self.watcher is not None else {}
        for topic in TAG_TOPICS:
            seen = topics.get(topic)
            if seen is None or not isinstance(seen.payload, dict):
                continue
            published += seen.count
            rows.append(
                TagRow(
                    topic=topic,
                    value=seen.payload.get("value"),
                    quality=str(seen.payload.get("quality", "?")),
                    age_s=sample_age_s(seen.payload, now_mono - seen.at, now_wall),
                    messages=seen.count,
                )
            )
        relay = self.relay.stats if self.relay is not None else None
        end = self.stopped_at if self.stopped_at is not None else now_mono
        return Snapshot(
            elapsed_s=max(end - self.started, 0.0),
            broker=self.broker_name,
            loss=self.options.loss,
            sent=tx.get("datagrams_sent", 0),
            relay_received=relay.received if relay else 0,
            relay_dropped=relay.dropped if relay else 0,
            datagrams=rx.get("datagrams", 0),
            blocks_whole=rx.get("blocks_whole", 0),
            blocks_rebuilt=rx.get("blocks_rebuilt", 0),
            records_lost=rx.get("records_lost", 0),
            surplus=rx.get(SURPLUS, 0),
            rejected={
                key.removeprefix("rejected_"): value
                for key, value in rx.items()
                if key.startswith("rejected_") and key != SURPLUS and value
            },
            published=published,
            tags=rows,
            expected_tags=len(TAG_TOPICS),
            files=None if self.files is None else self.files.figures(tx, rx),
        )


async def _wait(stop: asyncio.Event, demo: Demo, seconds: float | None) -> None:
    """Until ``stop``, ``seconds`` or a part failing, whichever comes first."""
    deadline = None if seconds is None else time.monotonic() + seconds
    while not stop.is_set():
        if demo.failed() is not None:
            return
        if deadline is not None and time.monotonic() >= deadline:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), REFRESH_S)


async def _every(period_s: float, action: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(period_s)
        action()


@contextlib.asynccontextmanager
async def _showing(demo: Demo, tail: LogTail, live: bool, json_out: bool) -> AsyncIterator[None]:
    """The live view on a terminal, progress lines otherwise, while the plant runs."""
    if live:
        console = Console()
        with Live(
            render(demo.snapshot(), tail.lines),
            console=console,
            auto_refresh=False,
            redirect_stderr=False,
            transient=True,  # the final summary takes its place
        ) as view:

            def refresh() -> None:
                view.update(render(demo.snapshot(), tail.lines), refresh=True)

            task = asyncio.create_task(_every(REFRESH_S, refresh))
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                refresh()
        return
    out = sys.stderr if json_out else sys.stdout

    def line() -> None:
        print(progress_line(demo.snapshot()), file=out, flush=True)

    task = asyncio.create_task(_every(PROGRESS_S, line))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run(options: Options) -> int:
    live = sys.stdout.isatty() and not options.json
    tail = LogTail(echo=not live)
    tail.install()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="diode-demo-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            demo = Demo(options, Path(tmp), stack)
            if not live:
                print("diode demo: starting the plant...", file=sys.stderr, flush=True)
            await demo.start()
            async with _showing(demo, tail, live, options.json):
                await _wait(stop, demo, options.duration_s)
                failure = demo.failed()
                demo.stopped_at = time.monotonic()
                await stack.aclose()  # stop every part: transmitter first
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        snap = demo.snapshot()  # (--files compares what arrived in the temporary folder)
    if options.json:
        print(json.dumps(snap.summary()))
    else:
        print_summary(snap)
    problems = ([failure] if failure is not None else []) + demo.errors
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def print_summary(snap: Snapshot) -> None:
    console = Console()
    console.print(tag_table(snap))
    console.print(link_table(snap))
    console.print(f"broker {snap.broker}, ran {snap.elapsed_s:.1f} s")


def main(args: argparse.Namespace) -> int:
    """The ``diode demo`` command."""
    try:
        options = Options.from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(options))
    except DiodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port taken, a broker name that does not resolve...
        print(f"error: cannot run the demo: {exc}", file=sys.stderr)
        return 2

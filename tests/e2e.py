"""A whole plant in one event loop, for end-to-end tests and the fault suite.

PLC simulator --> Transmitter --> (Relay: faults) --> Receiver --> mosquitto --> Subscriber

Every part is the real one: a pymodbus server, the transmitter and receiver
daemons' classes, real UDP on loopback, a mosquitto broker the test started,
and a paho subscriber counting what arrives.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from diode.config import validate
from diode.config.rx import RxConfig
from diode.config.tx import TxConfig
from diode.keys import SigningKey, write_keypair
from diode.loopback import free_port
from receiver.app import Receiver
from tests.support.modbus_server import ModbusSimServer
from tests.support.relay import Faults, Relay
from transmitter.app import Transmitter

STREAM = 11


def float_registers(value: float) -> list[int]:
    return list(struct.unpack(">HH", struct.pack(">f", value)))


class Subscriber:
    """Counts every message under a topic filter, in arrival order, on its own thread."""

    def __init__(self, port: int, topic: str = "#") -> None:
        self.messages: list[tuple[str, dict[str, Any] | str, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            payload: dict[str, Any] | str = json.loads(msg.payload)
        except ValueError:
            payload = msg.payload.decode(errors="replace")
        with self.lock:
            self.messages.append((msg.topic, payload, bool(msg.retain)))

    def on(self, topic: str) -> list[dict[str, Any]]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic and isinstance(p, dict)]

    def by_topic(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        with self.lock:
            for t, p, _ in self.messages:
                if isinstance(p, dict):
                    out[t].append(p)
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Plant:
    """Paths, ports and parts of one test plant."""

    tmp: Path
    broker_port: int
    broker_socket: Path | None = None  # set: the receiver reaches the broker through it
    faults: Faults = field(default_factory=Faults)
    tx_overrides: dict[str, Any] = field(default_factory=dict)
    link_overrides: dict[str, Any] = field(default_factory=dict)
    output_overrides: dict[str, Any] = field(default_factory=dict)
    rx_overrides: dict[str, Any] = field(default_factory=dict)
    # The Modbus tags of plc1 (None: a float, a counter and a coil) and other sources.
    tags: list[dict[str, Any]] | None = None
    sources: dict[str, Any] = field(default_factory=dict)
    tx_sections: dict[str, Any] = field(default_factory=dict)  # extra top-level sections
    rx_sections: dict[str, Any] = field(default_factory=dict)
    plc: ModbusSimServer | None = None
    relay: Relay | None = None
    tx: Transmitter | None = None
    rx: Receiver | None = None
    rx_port: int = 0
    _stops: dict[str, tuple[asyncio.Event, asyncio.Task[None]]] = field(default_factory=dict)

    async def start_plc(self) -> ModbusSimServer:
        self.plc = ModbusSimServer(units=[1])
        await self.plc.start()
        return self.plc

    def keys(self) -> Path:
        keydir = self.tmp / "keys"
        if not (keydir / "tx.key").exists():
            write_keypair(keydir, "tx")
        return keydir

    def tx_config(self) -> TxConfig:
        assert self.plc is not None
        assert self.relay is not None
        tags = self.tags or [
            {"name": "level", "table": "holding_register", "address": 0, "type": "float32"},
            {"name": "count", "table": "holding_register", "address": 10, "type": "uint32"},
            {"name": "pump", "table": "coil", "address": 0, "type": "bool"},
        ]
        data = {
            "transmitter": {
                "stream_id": STREAM,
                "private_key": str(self.keys() / "tx.key"),
                "state_dir": str(self.tmp / "tx-state"),
                "heartbeat_interval_s": 0.2,
                "catalogue_period_s": 1.0,
                **self.tx_overrides,
            },
            "link": {
                "destination": "127.0.0.1",
                "port": self.relay.port,
                "rate_mbps": 200.0,
                **self.link_overrides,
            },
            "modbus": {
                "devices": [
                    {
                        "name": "plc1",
                        "host": "127.0.0.1",
                        "port": self.plc.port,
                        "poll_interval_s": 0.05,
                        "timeout_s": 0.5,
                        "units": [{"id": 1, "tags": tags}],
                    }
                ]
            },
            **self.sources,
            **self.tx_sections,
        }
        return validate(TxConfig, data, "tx.toml")

    def rx_config(self) -> RxConfig:
        data = {
            "receiver": {
                "listen": "127.0.0.1",
                "port": self.rx_port,
                "state_dir": str(self.tmp / "rx-state"),
                "rcvbuf_bytes": 8 * 1024 * 1024,
                **self.rx_overrides,
            },
            "mqtt": {
                **(
                    {"socket": str(self.broker_socket)}
                    if self.broker_socket is not None
                    else {"host": "127.0.0.1", "port": self.broker_port}
                ),
                "client_id": "diode-rx-test",
                "spool_path": str(self.tmp / "rx-state" / "spool.sqlite"),
            },
            "streams": [
                {
                    "id": STREAM,
                    "public_keys": [str(self.keys() / "tx.pub")],
                    "output": {"prefix": "diode", "site": "test", **self.output_overrides},
                }
            ],
            **self.rx_sections,
        }
        return validate(RxConfig, data, "rx.toml")

    async def start_rx(self) -> Receiver:
        if not self.rx_port:
            self.rx_port = free_port(kind=2)  # SOCK_DGRAM
        self.rx = Receiver(self.rx_config())
        await self._start("rx", self.rx)
        return self.rx

    async def start_relay(self) -> Relay:
        if not self.rx_port:
            self.rx_port = free_port(kind=2)
        self.relay = Relay(("127.0.0.1", self.rx_port), self.faults)
        await self.relay.start()
        return self.relay

    async def start_tx(self) -> Transmitter:
        from diode.keys import load_signing_key

        config = self.tx_config()
        self.tx = Transmitter(config, key=load_signing_key(config.transmitter.private_key))
        await self._start("tx", self.tx)
        return self.tx

    async def _start(self, name: str, daemon: Transmitter | Receiver) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        await asyncio.wait_for(daemon.ready.wait(), 10)
        self._stops[name] = (stop, task)

    async def stop(self, name: str) -> None:
        entry = self._stops.pop(name, None)
        if entry is not None:
            stop, task = entry
            stop.set()
            await asyncio.wait_for(task, 15)

    def kill(self, name: str) -> None:
        """As close to SIGKILL as one event loop allows: no shutdown path runs."""
        entry = self._stops.pop(name, None)
        if entry is not None:
            _stop, task = entry
            task.cancel()

    async def close(self) -> None:
        for name in list(self._stops):
            await self.stop(name)
        if self.relay is not None:
            self.relay.close()
        if self.plc is not None:
            await self.plc.stop()

    def key(self) -> SigningKey:
        from diode.keys import load_signing_key

        return load_signing_key(self.keys() / "tx.key")


def sockets_die_with(receiver: Receiver) -> None:
    """What a killed receiver process's death does to its sockets (after Plant.kill, which
    runs no shutdown path): the link socket and its quarantines close, their queues with
    them. A quarantine left open would stay in the port's reuseport group with its
    program, and take the next receiver's datagrams."""
    asyncio.get_running_loop().remove_reader(receiver.sock)
    receiver.sock.close()
    if receiver.steering is not None:
        receiver.steering.close()


async def wait_until(predicate: Any, within: float = 15.0, step: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {within} s")

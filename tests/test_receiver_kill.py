"""The receiver killed (SIGKILL) at random moments, 20 times (issue 14, "how it must be shown").

A stand-in transmitter in this process (the real Encoder, a real key, real
UDP on loopback) sends ten tags every 20 ms, a heartbeat every 0.2 s and its
catalogue every :data:`CATALOGUE_PERIOD_S`. The receiver is the real
``diode-rx`` in a child process, publishing to a mosquitto the test started;
a paho subscriber sees everything. The receiver starts after the first
catalogue (so its first samples wait for the next one), and is killed 20
times at random moments, from its first catalogue period on.

Then every sample sent from the first block the receiver took is either
published or inside a gap the receiver reported ("records lost" in its log),
never neither. And once a receiver has named samples, the transmitter stops
its carousel until the end: every later restart must still publish a value
sent after it before the next catalogue goes out, so no restart waited for a
catalogue period (the delays are printed; a restart without the kept
catalogue would wait for the final carousel).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from diode.config.link import FecSettings, LinkSettings
from diode.encoder import Encoder
from diode.keys import load_signing_key, write_keypair
from diode.loopback import free_port
from diode.records import Heartbeat, Record, Sample, TagInfo, ValueType
from tests.support.mosquitto import Mosquitto

STREAM = 21
TAGS = 10
KILLS = 20
TICK_S = 0.02
CATALOGUE_PERIOD_S = 12.0
PHASE_A = 5  # kills before the receiver is let live until the catalogue comes round
UPTIME_S = (0.05, 1.5)  # how long a receiver runs before it is killed, after it started

RX_MAIN = "from receiver.app import main; raise SystemExit(main())"


@dataclass
class Sent:
    """What the stand-in transmitter sent: each sample's block, and when."""

    block_of: dict[int, int] = field(default_factory=dict)  # sample value -> block seq
    sent_at: dict[int, float] = field(default_factory=dict)  # sample value -> wall clock


class Transmitter:
    def __init__(self, key_path: Path, port: int) -> None:
        link = LinkSettings(datagram_size=1200, fec=FecSettings(k=4, repair_ratio=0.5))
        self.encoder = Encoder(
            link=link,
            key=load_signing_key(key_path),
            stream_id=STREAM,
            epoch=int(time.time() * 1000),
        )
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sent = Sent()
        self.counter = 0

    def send(self, records: list[Record]) -> None:
        for record in records:
            self.encoder.add(record, time.monotonic())
        self.encoder.flush()
        values = [r.value for r in records if isinstance(r, Sample)]
        at = time.time()
        for block in self.encoder.take():
            # The records fill the blocks in order: the first ``block.records`` are this one's.
            taken, values = values[: block.records], values[block.records :]
            for v in taken:
                assert isinstance(v, int)
                self.sent.block_of[v] = block.seq
                self.sent.sent_at[v] = at
            for datagram in block.datagrams:
                # Nobody listening (the receiver is dead): the kernel drops it.
                with contextlib.suppress(OSError):
                    self.sock.sendto(datagram, ("127.0.0.1", self.port))

    def catalogue(self) -> list[Record]:
        return [
            TagInfo(tag_id=i, name=f"t{i}", device="plc1", value_type=ValueType.INT64)
            for i in range(TAGS)
        ]

    async def run(
        self, stop: asyncio.Event, samples: asyncio.Event, carousel: asyncio.Event
    ) -> None:
        started = last_catalogue = last_heartbeat = time.monotonic()
        self.send(self.catalogue())
        while not stop.is_set():
            now = time.monotonic()
            records: list[Record] = []
            if carousel.is_set() and now - last_catalogue >= CATALOGUE_PERIOD_S:
                records.extend(self.catalogue())
                last_catalogue = now
            if now - last_heartbeat >= 0.2:
                records.append(Heartbeat(ts_ns=time.time_ns(), counters={}))
                last_heartbeat = now
            if samples.is_set():
                ts = time.time_ns()
                for i in range(TAGS):
                    self.counter += 1
                    records.append(Sample(tag_id=i, ts_ns=ts + i, value=self.counter))
            if records:
                self.send(records)
            await asyncio.sleep(TICK_S)
        del started


class Logs:
    """A receiver's JSON log lines, read on a thread, each with the time it arrived."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        assert proc.stderr is not None
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "not json", "line": line.decode(errors="replace")}
            with self.lock:
                self.events.append((time.time(), event))

    def first(self, name: str) -> float | None:
        with self.lock:
            return next((t for t, e in self.events if e.get("event") == name), None)

    def all(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for _, e in self.events if e.get("event") == name]

    def join(self) -> None:
        self._thread.join(5)


class Subscriber:
    """Every value published, with the time it arrived."""

    def __init__(self, port: int) -> None:
        self.values: list[tuple[float, int]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe("diode/kill/plc1/+", qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        payload = json.loads(msg.payload)
        if payload.get("quality") == "good":
            with self.lock:
                self.values.append((time.time(), int(payload["value"])))

    def published(self) -> set[int]:
        with self.lock:
            return {v for _, v in self.values}

    def first_after(self, sent_at: dict[int, float], since: float) -> float | None:
        """When the first value sent after ``since`` arrived."""
        with self.lock:
            return next((t for t, v in self.values if sent_at.get(v, 0.0) > since), None)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def rx_config(tmp: Path, rx_port: int, broker_port: int) -> Path:
    path = tmp / "rx.toml"
    path.write_text(
        f"""
[receiver]
listen = "127.0.0.1"
port = {rx_port}
state_dir = "{tmp / "rx-state"}"
reorder_timeout_s = 0.1

[mqtt]
host = "127.0.0.1"
port = {broker_port}
client_id = "diode-rx-kill"
spool_path = "{tmp / "rx-state" / "spool.sqlite"}"

[log]
format = "json"

[[streams]]
id = {STREAM}
public_keys = ["{tmp / "keys" / "tx.pub"}"]
output = {{ prefix = "diode", site = "kill", qos = 1 }}
"""
    )
    return path


def start_receiver(config: Path) -> tuple[subprocess.Popen[bytes], Logs]:
    proc = subprocess.Popen(
        [sys.executable, "-c", RX_MAIN, "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc, Logs(proc)


def connected_at(log: Logs) -> float | None:
    """When the receiver said it started, once it is connected to the broker."""
    return log.first("receiver starting") if log.first("mqtt connected") else None


async def wait_for(predicate: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within_s} s")
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_receiver_killed_20_times_loses_nothing_unreported_and_names_at_once(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    seed = int(os.environ.get("DIODE_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    print(f"DIODE_KILL_SEED={seed}")
    write_keypair(tmp_path / "keys", "tx")
    rx_port = free_port(socket.SOCK_DGRAM)
    config = rx_config(tmp_path, rx_port, mosquitto.port)
    subscriber = Subscriber(mosquitto.port)
    assert await asyncio.to_thread(subscriber.ready.wait, 10)
    tx = Transmitter(tmp_path / "keys" / "tx.key", rx_port)
    stop, samples, carousel = asyncio.Event(), asyncio.Event(), asyncio.Event()
    carousel.set()
    sender = asyncio.create_task(tx.run(stop, samples, carousel))
    logs: list[Logs] = []
    restarts: list[tuple[float, Logs]] = []  # (the receiver's start, its log) once named
    proc: subprocess.Popen[bytes] | None = None
    try:
        await asyncio.sleep(0.3)  # the first catalogue has gone: the receiver missed it
        samples.set()
        for kill in range(KILLS + 1):
            proc, log = start_receiver(config)
            logs.append(log)
            await wait_for(lambda lg=log: connected_at(lg) is not None, 30, "receiver start")
            if subscriber.published():  # some receiver named samples: the catalogue is kept
                restarts.append((log.first("receiver starting") or 0.0, log))
            if kill == KILLS:
                break
            if kill == PHASE_A:
                # The kills so far fell in the first catalogue period (samples waiting);
                # this receiver lives until the catalogue comes round and names them.
                await wait_for(subscriber.published, CATALOGUE_PERIOD_S + 10, "first value")
                carousel.clear()  # from now on, no catalogue until the end
            await asyncio.sleep(rng.uniform(*UPTIME_S))
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
        # The last receiver stays. Sampling goes on until it has published a value sent
        # after it started (or 10 s: then it waited for a catalogue, which the check
        # below reports), or the restart would be judged on the few samples sent between
        # its start and here. Then the transmitter stops sampling and sends its catalogue
        # once more (as its carousel would), so nothing waits for a name any more.
        last_start = restarts[-1][0] if restarts else time.time()
        with contextlib.suppress(AssertionError):
            await wait_for(
                lambda: subscriber.first_after(tx.sent.sent_at, last_start) is not None,
                10,
                "a value from the last receiver",
            )
        samples.clear()
        await asyncio.sleep(0.5)
        final_catalogue = time.time()
        tx.send(tx.catalogue())
        sent = tx.sent
        gaps = lambda: [g for lg in logs for g in lg.all("records lost")]  # noqa: E731

        def unaccounted() -> list[int]:
            published = subscriber.published()
            first = min(
                [sent.block_of[v] for v in published] + [g["first_block"] for g in gaps()] + [2**62]
            )
            lost = [(g["first_block"], g["last_block"]) for g in gaps()]
            return [
                v
                for v, seq in sent.block_of.items()
                if seq >= first
                and v not in published
                and not any(lo <= seq <= hi for lo, hi in lost)
            ]

        with contextlib.suppress(AssertionError):
            await wait_for(lambda: not unaccounted(), 30, "every sample accounted for")
        missing = unaccounted()
        print(
            f"{len(sent.block_of)} samples sent, {len(subscriber.published())} published, "
            f"{len(gaps())} gaps reported, {len(missing)} neither; "
            f"{len(restarts)} restarts with the catalogue kept"
        )
        assert not missing, f"{len(missing)} samples neither published nor in a gap: {missing[:10]}"
        assert len(restarts) >= KILLS - PHASE_A
        delays, waited = [], []
        for started, log in restarts:
            first = subscriber.first_after(sent.sent_at, started)
            if first is None or first >= final_catalogue:
                with log.lock:
                    timeline = [(round(t - started, 2), e.get("event")) for t, e in log.events]
                waited.append(timeline)
            else:
                delays.append(first - started)
        delays.sort()
        if delays:
            print(
                f"first value after a restart: median {delays[len(delays) // 2]:.2f} s, "
                f"max {delays[-1]:.2f} s (load average {os.getloadavg()[0]:.1f})"
            )
        assert not waited, f"restarts that waited for a catalogue: {waited}"
        for lg in logs:
            assert not lg.all("not json"), lg.all("not json")[:3]
    finally:
        stop.set()
        await sender
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for lg in logs:
            lg.join()
        subscriber.close()
        tx.sock.close()

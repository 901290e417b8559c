"""Benchmark of the MQTT output against a real broker, counted by ``mosquitto_sub``.

``python -m receiver.bench_mqtt [n]`` starts a mosquitto on a free loopback port
(tests/support) and prints msgs/s for each method; ``python -m
receiver.bench_mqtt sparkplug [n] [rounds]`` compares batched JSON with
Sparkplug DDATA (samples/s and this process's CPU per sample) at QoS 0 and 1.
``bench_publish`` is the entry point ``diode bench`` will call with a broker
already running.

The subscriber is ``mosquitto_sub`` in a child process (C, so it is not the
bottleneck), reading the messages' topics on a pipe; the time is from the
first publish to the last message received.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

from diode.config.mqtt import MqttBroker, StreamOutput
from diode.records import Quality, Sample, TagInfo, ValueType
from receiver.mqtt import MqttOutput, _PackedProperties
from receiver.payload import Topics, sample_messages

DEVICES = 100
TAGS_PER_DEVICE = 100
BLOCK = 50  # samples per publish_samples call, about one block's worth
PROBE = "bench/probe"


async def _subscriber(port: int, topic: str) -> tuple[asyncio.subprocess.Process, asyncio.Event]:
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-p", str(port), "-t", topic, "-t", PROBE, "-q", "1", "-F", "%t",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return proc, asyncio.Event()


async def _count(proc: asyncio.subprocess.Process, ready: asyncio.Event, n: int) -> float:
    """Read topics until ``n`` non-probe messages arrived; the monotonic time of the last."""
    assert proc.stdout is not None
    got = 0
    buffer = b""
    while got < n:
        chunk = await proc.stdout.read(1 << 16)
        if not chunk:
            raise RuntimeError(f"subscriber ended after {got} of {n} messages")
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line == PROBE.encode():
                ready.set()
            else:
                got += 1
    return time.monotonic()


async def _wait_subscribed(port: int, ready: asyncio.Event) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as client:
        while not ready.is_set():
            await client.publish(PROBE, b"x", qos=1)
            with _suppress_timeout():
                await asyncio.wait_for(ready.wait(), 0.1)


class _suppress_timeout:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return exc_type is TimeoutError


def _items(n: int) -> list[tuple[TagInfo, Sample]]:
    tags = [
        TagInfo(
            tag_id=d * TAGS_PER_DEVICE + t,
            name=f"tag{t}",
            device=f"plc{d}",
            value_type=ValueType.FLOAT64,
            unit="degC",
        )
        for d in range(DEVICES)
        for t in range(TAGS_PER_DEVICE)
    ]
    now = time.time_ns()
    return [
        (tags[i % len(tags)], Sample(tag_id=i, ts_ns=now + i, value=i * 0.5, quality=Quality.GOOD))
        for i in range(n)
    ]


async def bench_publish(
    port: int, n: int, qos: int, batched: bool, *, method: str = "output", host: str = "127.0.0.1"
) -> dict[str, Any]:
    """Publish ``n`` samples to the broker at ``host:port``; print and return the rates.

    ``method``: ``output`` (MqttOutput, what the receiver uses), ``aiomqtt_await``
    (await each publish, the baseline).
    """
    site = f"run{time.monotonic_ns()}"  # a fresh subtree: no retained messages of a previous run
    stream = StreamOutput(
        prefix="bench", site=site, qos=1 if qos else 0, payload="batched" if batched else "per_tag"
    )
    items = _items(n)
    messages = [
        m for i in range(0, n, BLOCK) for m in sample_messages(Topics(stream), items[i : i + BLOCK])
    ]
    proc, ready = await _subscriber(port, f"bench/{site}/#")
    counter = asyncio.create_task(_count(proc, ready, len(messages)))
    try:
        await _wait_subscribed(port, ready)
        start, cpu = time.monotonic(), time.process_time()
        if method == "output":
            await _via_output(host, port, stream, items)
        elif method == "aiomqtt_await":
            async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
                props = _PackedProperties(None)
                for m in messages:
                    await client.publish(m.topic, m.payload, m.qos, m.retain, props)
        else:
            raise ValueError(f"unknown method {method!r}")
        end = await asyncio.wait_for(counter, 120)
        cpu = time.process_time() - cpu
    finally:
        counter.cancel()
        proc.terminate()
        await proc.wait()
    seconds = end - start
    result = {
        "method": method,
        "qos": qos,
        "payload": stream.payload,
        "samples": n,
        "messages": len(messages),
        "seconds": round(seconds, 3),
        "msgs_per_s": round(len(messages) / seconds),
        "samples_per_s": round(n / seconds),
        "cpu_us_per_metric": round(cpu / n * 1e6, 2),
    }
    print(result)
    return result


async def _via_output(host: str, port: int, stream: StreamOutput, items: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = MqttBroker(host=host, port=port, spool_path=Path(tmp) / "spool.sqlite3")
        output = MqttOutput(broker)
        task = asyncio.create_task(output.run())
        while not output.counters["connected"]:  # noqa: ASYNC110 - MqttOutput exposes counters
            await asyncio.sleep(0.01)
        for i in range(0, len(items), BLOCK):
            output.publish_samples(stream, items[i : i + BLOCK])
            # The receiver is paced by its link; here, keep the backlog short.
            while output.backlog > 20_000:  # noqa: ASYNC110 - crude producer backpressure
                await asyncio.sleep(0.001)
            await asyncio.sleep(0)
        while output.backlog:  # noqa: ASYNC110 - MqttOutput exposes counters
            await asyncio.sleep(0.005)
        await output.close()
        task.cancel()
        if output.counters["spooled"]:
            print("note: spooled", output.counters["spooled"])


async def bench_sparkplug(
    port: int, n: int, qos: int, *, host: str = "127.0.0.1"
) -> dict[str, Any]:
    """``n`` samples through a Sparkplug edge node (receiver/sparkplug_node.py) into the broker.

    Counted as :func:`bench_publish` counts: ``mosquitto_sub`` in a child process,
    from the first call to the last message received. The messages expected are
    those a sans-I/O EdgeNode makes of the same samples (births, then DDATA).
    ``cpu_us_per_metric`` is this process's CPU time (the node, protobuf, paho),
    not the broker's or the subscriber's.
    """
    from diode.config.sparkplug import SparkplugSettings  # noqa: PLC0415
    from receiver.sparkplug import EdgeNode  # noqa: PLC0415
    from receiver.sparkplug_node import SparkplugNode  # noqa: PLC0415

    group = f"run{time.monotonic_ns()}"
    stream = StreamOutput(
        qos=1 if qos else 0,
        payload="sparkplug",
        sparkplug=SparkplugSettings(group_id=group, edge_node_id="bench"),
    )
    items = _items(n)
    dry = EdgeNode(stream.sparkplug, qos=qos, bd_seq=0)
    expected = len(dry.on_connect(0)) + sum(
        len(dry.samples(items[i : i + BLOCK], 0)) for i in range(0, n, BLOCK)
    )
    proc, ready = await _subscriber(port, f"spBv1.0/{group}/#")
    counter = asyncio.create_task(_count(proc, ready, expected))
    with tempfile.TemporaryDirectory() as tmp:
        broker = MqttBroker(host=host, port=port, client_id=f"bench-spb-{group}")
        node = SparkplugNode(broker, 1, stream, Path(tmp))
        task = asyncio.create_task(node.run())
        try:
            await _wait_subscribed(port, ready)
            while not node.machine.publishing:  # noqa: ASYNC110 - the node exposes its state
                await asyncio.sleep(0.01)
            start, cpu = time.monotonic(), time.process_time()
            client = node._client
            for i in range(0, n, BLOCK):
                node.publish_samples(items[i : i + BLOCK])
                # paho queues what the socket does not take yet: keep that short.
                while client is not None and len(client._out_packet) > 2000:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
                await asyncio.sleep(0)
            end = await asyncio.wait_for(counter, 120)
            cpu = time.process_time() - cpu
        finally:
            counter.cancel()
            proc.terminate()
            await proc.wait()
            await node.close()
            task.cancel()
    seconds = end - start
    result = {
        "method": "sparkplug_node",
        "qos": qos,
        "payload": "sparkplug",
        "samples": n,
        "messages": expected,
        "seconds": round(seconds, 3),
        "msgs_per_s": round(expected / seconds),
        "samples_per_s": round(n / seconds),
        "cpu_us_per_metric": round(cpu / n * 1e6, 2),
    }
    print(result)
    return result


async def _main(n: int) -> None:
    from tests.support.mosquitto import Mosquitto  # noqa: PLC0415 - dev-only helper

    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            for method in ("aiomqtt_await", "output"):
                for qos in (0, 1):
                    count = n if method != "aiomqtt_await" else n // 5
                    await bench_publish(broker.port, count, qos, False, method=method)
            for qos in (0, 1):
                await bench_publish(broker.port, n * 3, qos, True)
                await bench_sparkplug(broker.port, n * 3, qos)
        finally:
            broker.stop()


async def _sparkplug_main(n: int, rounds: int) -> None:
    """Batched JSON against Sparkplug DDATA, QoS 0 and 1, alternating, same broker."""
    from tests.support.mosquitto import Mosquitto  # noqa: PLC0415 - dev-only helper

    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            for _ in range(rounds):
                for qos in (0, 1):
                    await bench_publish(broker.port, n, qos, True)
                    await bench_sparkplug(broker.port, n, qos)
        finally:
            broker.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if len(sys.argv) > 1 and sys.argv[1] == "sparkplug":
        count = int(sys.argv[2]) if len(sys.argv) > 2 else 300_000
        asyncio.run(_sparkplug_main(count, int(sys.argv[3]) if len(sys.argv) > 3 else 2))
    else:
        asyncio.run(_main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))

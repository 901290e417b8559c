"""``diode bench syslog``: syslog messages through the whole path, with values flowing.

The parts, each its own process so CPU is counted per daemon::

    sender (python, TCP, RFC 5424   --> diode-tx (syslog listener, values from
    octet counted, paced, the send      [[synthetic.sources]] at values_hz)
    time in each message)                   | link (UDP)
                                            v
    rsyslog (imtcp, each message   <-- diode-rx (SOC spool, forwarder;
    stamped on receipt)                 values and $events to mosquitto)

- Throughput: messages the collector wrote / the window; the run is ``ok``
  when every message sent reached the collector exactly once (0 lost, 0
  reported lost, no duplicate).
- Latency: rsyslog's receipt time (``%timegenerated``, microseconds) minus the
  send time the sender wrote into the message (same host clock).
- Cost: CPU seconds of diode-tx and diode-rx over the window divided by the
  messages sent in it; the same run without syslog gives the values' own cost,
  and the difference per message is what syslog costs (``*_us_per_msg``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from diode.benchmarks import harness as h
from diode.benchmarks.collector import Rsyslog
from diode.loopback import free_port, free_udp_port
from diode.records import decode_records, encode_record
from diode.syslog import Deframer, octet_counted, parse_syslog, render_5424, to_ecs

# One process, one TCP connection: every 5 ms a batch of messages made from one template
# (the id and the batch's send time filled in) goes out in one sendall. Formatting is
# about 1 us a message, so the sender holds 20 000/s on a quiet host with room to spare;
# what it achieved is reported (``sender_per_s``), as the transmitter's TCP window can
# hold it back.
SENDER = r"""
import socket, sys, time
port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
batch = max(1, int(rate / 200))  # every 5 ms
template = (b"<134>1 2026-12-06T12:00:00.000Z hmi-7 scada 42 AUDIT - "
            b"operator action on line 3 id=%d t=%d")
sock = socket.create_connection(("127.0.0.1", port))
sent, start = 0, time.monotonic()
while time.monotonic() - start < seconds:
    due = start + sent / rate
    delay = due - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    now = time.time_ns()
    parts = [template % (i, now) for i in range(sent, sent + batch)]
    sock.sendall(b"".join([b"%d %b" % (len(m), m) for m in parts]))
    sent += batch
elapsed = time.monotonic() - start
sock.close()
print(sent, elapsed)
"""


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def _collected(collector: Rsyslog) -> tuple[dict[int, int], list[float]]:
    """Message id -> times seen; latencies in ms."""
    seen: dict[int, int] = {}
    latencies: list[float] = []
    for line in collector.lines():
        stamp, _, rest = line.partition(b" ")
        tail = rest.rsplit(b" id=", 1)
        if len(tail) != 2:
            continue
        ident, _, sent = tail[1].partition(b" t=")
        i = int(ident)
        seen[i] = seen.get(i, 0) + 1
        received = datetime.fromisoformat(stamp.decode()).timestamp()
        latencies.append((received - int(sent) / 1e9) * 1000)
    return seen, latencies


def _rx_config(
    work: Path,
    public: Path,
    port: int,
    *,
    broker: int,
    metrics: int,
    collector: int,
    mqtt_syslog: bool = True,
) -> Path:
    path = h.rx_config(
        work,
        public=public,
        port=port,
        broker_port=broker,
        metrics_port=metrics,
        output={"payload": "per_tag", "qos": 0},
    )
    soc = {
        "soc": {
            "collector_host": "127.0.0.1",
            "collector_port": collector,
            "mqtt_syslog": mqtt_syslog,
        }
    }
    with path.open("a") as f:
        f.write(h.to_toml(soc))
    return path


def _tx_config(work: Path, private: Path, port: int, listen: int, values_hz: int) -> Path:
    sources = [
        {"name": f"plc{d}", "tags": 100, "rate_hz": values_hz / 10, "batch_ms": 5.0}
        for d in range(10)
    ]
    syslog = {
        "syslog": {
            "listeners": [{"address": "127.0.0.1", "port": listen, "protocol": "tcp"}],
            "allow": ["127.0.0.1"],
            "rate_per_source": 1e6,
            "burst_per_source": 1e6,
            "queue_messages": 1_000_000,
        }
    }
    return h.tx_config(
        work, private=private, port=port, rate_mbps=1000.0, sources=sources, extra=syslog
    )


def _cpu_s(pid: int) -> float:
    """CPU seconds of any process (the broker, the collector), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / h.CLK_TCK


def _settle(metrics: int, collector: Rsyslog, sent: int) -> dict[str, float]:
    """Let the tail through (30 s at most); the receiver's metrics then."""
    settle = time.monotonic() + 30
    while time.monotonic() < settle:
        m = h.rx_metrics(metrics)
        if len(collector.lines()) >= sent and m.get("soc_spool_depth", 0) == 0:
            break
        time.sleep(0.2)
    return h.rx_metrics(metrics)


def run(
    *, rate: int, values_hz: int, seconds: float = 10.0, mqtt_syslog: bool = True
) -> dict[str, Any]:
    """One run: ``rate`` syslog messages/s (0: values only) with ``values_hz`` updates/s.

    ``mqtt_syslog=False``: the devices' messages go to the collector only (security
    events still to MQTT too), to show what publishing each one on MQTT costs.
    """
    with tempfile.TemporaryDirectory(prefix="diode-bench-syslog-") as tmp:
        work = Path(tmp)
        private, public = h.keys(work)
        port, metrics, listen = free_udp_port(), free_port(), free_port()
        broker = h.Broker(work)
        (work / "rsyslog").mkdir()
        collector = Rsyslog(work / "rsyslog", stamped=True)
        collector.start()
        try:
            with h.stopping(broker):
                rx = h.Daemon.rx(
                    _rx_config(
                        work,
                        public,
                        port,
                        broker=broker.port,
                        metrics=metrics,
                        collector=collector.port,
                        mqtt_syslog=mqtt_syslog,
                    )
                )
                with h.stopping(rx):
                    h.wait_metrics(metrics, rx)
                    tx = h.Daemon.tx(_tx_config(work, private, port, listen, values_hz))
                    with h.stopping(tx):
                        deadline = time.monotonic() + 30
                        while h.rx_metrics(metrics).get("records_delivered", 0) == 0:
                            tx.check()
                            if time.monotonic() > deadline:
                                raise RuntimeError("nothing arrived at the receiver")
                            time.sleep(0.05)
                        time.sleep(1.0)
                        assert collector.process is not None
                        others = (broker.proc.pid, collector.process.pid)
                        t0, c0 = time.monotonic(), (tx.cpu_s(), rx.cpu_s())
                        o0 = [_cpu_s(pid) for pid in others]
                        sent, sender_s = 0, 0.0
                        if rate:
                            done = subprocess.run(  # noqa: S603 - fixed argv, no shell
                                [
                                    sys.executable,
                                    "-c",
                                    SENDER,
                                    str(listen),
                                    str(rate),
                                    str(seconds),
                                ],
                                capture_output=True,
                                text=True,
                                check=True,
                            )
                            words = done.stdout.split()
                            sent, sender_s = int(words[0]), float(words[1])
                        else:
                            time.sleep(seconds)
                        t1, c1 = time.monotonic(), (tx.cpu_s(), rx.cpu_s())
                        o1 = [_cpu_s(pid) for pid in others]
                        m = _settle(metrics, collector, sent)
                        tx.check()
                    rx.check()
            seen, latencies = _collected(collector)
        finally:
            collector.stop()
    window = t1 - t0
    return {
        "rate": rate,
        "values_hz": values_hz,
        "seconds": round(window, 2),
        "sent": sent,
        "sender_per_s": round(sent / sender_s, 1) if sender_s else 0.0,
        "collected": sum(seen.values()),
        "msgs_per_s": round(sum(seen.values()) / window, 1),
        "lost": sent - len(seen),
        "duplicates": sum(n - 1 for n in seen.values() if n > 1),
        "rx_logs_lost_reported": int(m.get("soc_logs_lost", 0)),
        "rx_records_lost": int(m.get("records_lost", 0)),
        "latency_ms": {
            "p50": _pct(latencies, 0.50),
            "p99": _pct(latencies, 0.99),
            "max": round(max(latencies), 2) if latencies else 0.0,
        },
        "tx_cpu_share": round((c1[0] - c0[0]) / window, 3),
        "rx_cpu_share": round((c1[1] - c0[1]) / window, 3),
        "mqtt_syslog": mqtt_syslog,
        "broker_cpu_share": round((o1[0] - o0[0]) / window, 3),
        "collector_cpu_share": round((o1[1] - o0[1]) / window, 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "ok": sent == len(seen) and not any(n > 1 for n in seen.values()),
    }


def core(count: int = 20_000) -> dict[str, float]:
    """CPU per message of the sans-I/O steps, in one process (not skewed by a busy host)."""
    messages = [
        b"<134>1 2026-12-06T12:00:00.000Z hmi-7 scada 42 AUDIT - operator action %d" % i
        for i in range(count)
    ]
    stream = b"".join(octet_counted(m) for m in messages)
    out: dict[str, float] = {}

    def timed(name: str, step: Callable[[], object]) -> Any:
        start = time.process_time()
        result = step()
        out[name] = round((time.process_time() - start) / count * 1e6, 2)
        return result

    deframer = Deframer()
    framed = timed(
        "tx_deframe_us",
        lambda: [
            m for i in range(0, len(stream), 65536) for m in deframer.feed(stream[i : i + 65536])
        ],
    )
    records = timed(
        "tx_parse_us",
        lambda: [
            parse_syslog(m).record(seq=i, ts_ns=i, source="10.0.0.1") for i, m in enumerate(framed)
        ],
    )
    encoded = timed("tx_encode_us", lambda: [encode_record(r) for r in records])
    payload, per = b"".join(encoded[:300]), 300
    timed("rx_decode_us", lambda: [decode_records(payload, per) for _ in range(count // per)])
    timed("rx_rfc5424_us", lambda: [render_5424(r, stream_id=1, epoch=1) for r in records])
    timed(
        "rx_ecs_json_us",
        lambda: [orjson.dumps(to_ecs(r, site="s", stream_id=1, epoch=1)) for r in records],
    )
    return out


def syslog(*, rate: int = 20_000, values_hz: int = 10_000, seconds: float = 10.0) -> dict[str, Any]:
    """Values alone, then values with syslog: throughput, latency, and what syslog costs."""
    steps = core()
    base = run(rate=0, values_hz=values_hz, seconds=seconds)
    out: dict[str, Any] = {"core_cpu_per_message": steps, "values_only": base}
    for name, mqtt_syslog in (("with_syslog", True), ("syslog_to_collector_only", False)):
        load = run(rate=rate, values_hz=values_hz, seconds=seconds, mqtt_syslog=mqtt_syslog)
        per = load["sent"] / load["seconds"] if load["sent"] else 0.0
        for side in ("tx", "rx"):
            extra = load[f"{side}_cpu_share"] - base[f"{side}_cpu_share"]
            load[f"{side}_us_per_msg"] = round(extra / per * 1e6, 2) if per else None
        out[name] = load
    return out

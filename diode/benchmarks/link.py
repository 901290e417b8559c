"""``diode bench link``: authenticated goodput over loopback, and pydiode at the same cap.

diode-tx (a synthetic source of string samples, paced at ``rate_mbps``)
sends 1472-byte datagrams to diode-rx on loopback; the receiver publishes
batched payloads to a local mosquitto nobody subscribes to, over loopback TCP
or its Unix socket (``brokers``; the broker's CPU is reported beside the
receiver's: it shares the receiver's core). An nftables rule
on the link's port counts the datagrams that arrive and drops ``loss`` of them
(on the input hook, with loopback's UDP segmentation offload off for the
run, so each datagram is counted and may be dropped alone, as on a 1 GbE NIC).

Goodput is the msgpack bytes of the sample records the receiver delivered
(authenticated, in order) per second of the measurement window, read from
its ``records_delivered`` counter; the wire rate is what nftables counted
arriving from the transmitter (IPv4 + UDP headers included, as the pacer counts).
The target efficiency is ``wire rate x k/n`` of a full block.

pydiode (PyPI) is run in the same invocation on the same loopback with its
``--max-bitrate`` at the same cap: ``bytes`` of random data through
``pydiode send | pydiode receive``, checked byte for byte, timed from the
sender's start to the receiver's end, twice: at its default datagram size
(65 507 bytes; cut into 45 fragments on a real 1500-byte link) and at 1472
bytes (pydiode's own macOS setting, ``pydiode.common.UDP_MAX_BYTES``, set
before it is imported). It is installed on demand into its own virtualenv
(``--pydiode DIR``), never into this one.

As two hosts would be, the sending side runs on one core and the receiving
side (with its broker) on the other, pinned as ``taskset`` does
(``sched_setaffinity``), when the machine has two cores or more. Each run is
repeated ``rounds`` times, the runs alternating (diode at each loss, pydiode
at each size, then again), and the report gives each run and the median.

``sink=True`` measures the transmitter alone: it sends to a process that
only counts datagrams, so what leaves is all the transmitter's core can do.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from diode.benchmarks import harness as h
from diode.config.link import FecSettings, LinkSettings
from diode.loopback import free_port, free_udp_port
from diode.records import Sample, encode_record
from diode.wire import BLOCK_OVERHEAD, symbol_size

PYDIODE_VERSION = "1.0.0"
BrokerWay = Literal["tcp", "unix"]  # how the receiver reaches its broker
DEFAULT_BROKERS: tuple[BrokerWay, ...] = ("tcp",)
DEFAULT_PYDIODE_VENV = Path.home() / ".cache" / "diode-bench" / f"pydiode-{PYDIODE_VERSION}"


def sample_size(string_bytes: int) -> int:
    """Bytes of one synthetic string sample as encoded (tag ids below 128)."""
    return len(encode_record(Sample(tag_id=1, ts_ns=time.time_ns(), value="x" * string_bytes)))


# The sending side's core and the receiving side's, when there are two.
TX_CPU, RX_CPU = 0, 1

# A receiver that only counts datagrams (the transmitter-alone run).
_COUNTER = """
import signal, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
sock.bind(("127.0.0.1", int(sys.argv[1])))
count = 0
def stop(*_):
    print(count, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
buf = bytearray(65536)
while True:
    sock.recv_into(buf)
    count += 1
"""


def _pin(pid: int, cpu: int) -> None:
    """Keep a process (and the threads it starts) on one core, as ``taskset -c`` would."""
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {cpu})


def _records_per_block(string_bytes: int, link: LinkSettings) -> int:
    capacity = link.fec.k * symbol_size(link.datagram_size) - BLOCK_OVERHEAD
    return capacity // sample_size(string_bytes)


def _offered(string_bytes: int, rate_mbps: float, link: LinkSettings) -> float:
    """Records a second: 10 % more than the link carries at full blocks, so the link,
    or the transmitter's CPU, is the limit, never the generator."""
    k = link.fec.k
    n = k + link.fec.repair_for(k)
    blocks_per_s = rate_mbps * 1e6 / 8 / (n * (link.datagram_size + h.WIRE_OVERHEAD))
    return 1.1 * blocks_per_s * _records_per_block(string_bytes, link)


def _transmitter(
    work: Path, *, private: Path, port: int, rate_mbps: float, offered: float, string_bytes: int,
    fec: FecSettings,
) -> h.Daemon:  # fmt: skip
    """diode-tx with one synthetic source at ``offered`` records a second, on its own core."""
    source = {
        "name": "bulk",
        "tags": 100,
        "rate_hz": round(offered),
        "batch_ms": 2.0,
        "string_bytes": string_bytes,
    }
    tx = h.Daemon.tx(
        h.tx_config(
            work,
            private=private,
            port=port,
            rate_mbps=rate_mbps,
            sources=[source],
            link={"fec": fec.model_dump()},
        )
    )
    _pin(tx.proc.pid, TX_CPU)
    return tx


def transmitter_alone_run(
    *, rate_mbps: float, seconds: float, warmup_s: float, string_bytes: int, fec: FecSettings
) -> dict[str, Any]:
    """The transmitter into a process that only counts datagrams: what one core puts out."""
    link = LinkSettings(fec=fec)
    offered = _offered(string_bytes, rate_mbps, link)
    with tempfile.TemporaryDirectory(prefix="diode-bench-link-") as tmp:
        work = Path(tmp)
        private, _ = h.keys(work)
        port = free_udp_port()
        tap = h.LinkTap(port, 0.0, hook="input")
        counter = _Counter(port)
        _pin(counter.proc.pid, RX_CPU)
        with h.software_segmentation(), h.stopping(tap), contextlib.closing(counter):
            tx = _transmitter(
                work, private=private, port=port, rate_mbps=rate_mbps, offered=offered,
                string_bytes=string_bytes, fec=fec,
            )  # fmt: skip
            with h.stopping(tx):
                time.sleep(warmup_s)
                tx.check()
                w0, t0, c0 = tap.counters(), time.monotonic(), tx.cpu_s()
                time.sleep(seconds)
                w1, t1, c1 = tap.counters(), time.monotonic(), tx.cpu_s()
                hwm = tx.hwm_mb()
                tx.check()
    elapsed = t1 - t0
    return {
        "seconds": round(elapsed, 2),
        "wire_mbps": round((w1[1] - w0[1]) * 8 / elapsed / 1e6, 1),
        "datagrams_sent": w1[0] - w0[0],
        "counted_by_receiver_whole_run": counter.received,
        "tx_cpu_s_per_s": round((c1 - c0) / elapsed, 2),
        "tx_rss_peak_mb": round(hwm, 1),
    }


def diode_run(
    *,
    loss: float,
    broker: BrokerWay = "tcp",
    rate_mbps: float,
    seconds: float,
    warmup_s: float,
    string_bytes: int,
    fec: FecSettings,
) -> dict[str, Any]:
    link = LinkSettings(fec=fec)
    k = link.fec.k
    n = k + link.fec.repair_for(k)
    record = sample_size(string_bytes)
    offered = _offered(string_bytes, rate_mbps, link)
    with tempfile.TemporaryDirectory(prefix="diode-bench-link-") as tmp:
        work = Path(tmp)
        private, public = h.keys(work)
        port, metrics = free_udp_port(), free_port()
        # The tap first: without nft it refuses loss, and nothing is left running.
        tap = h.LinkTap(port, loss, hook="input")
        mosquitto = h.Broker(work, unix_socket=broker == "unix")
        _pin(mosquitto.proc.pid, RX_CPU)
        rx = tx = None
        with h.software_segmentation(), h.stopping(tap, mosquitto):
            rx = h.Daemon.rx(
                h.rx_config(
                    work,
                    public=public,
                    port=port,
                    broker_port=mosquitto.port,
                    broker_socket=mosquitto.socket,
                    metrics_port=metrics,
                    output={"payload": "batched", "qos": 0, "retain": False},
                )
            )
            _pin(rx.proc.pid, RX_CPU)
            with h.stopping(rx):
                h.wait_metrics(metrics, rx)
                tx = _transmitter(
                    work, private=private, port=port, rate_mbps=rate_mbps, offered=offered,
                    string_bytes=string_bytes, fec=fec,
                )  # fmt: skip
                with h.stopping(tx):
                    time.sleep(warmup_s)
                    tx.check()
                    rx.check()
                    m0, w0, t0 = h.rx_metrics(metrics), tap.counters(), time.monotonic()
                    c0 = (tx.cpu_s(), rx.cpu_s(), mosquitto.cpu_s())
                    time.sleep(seconds)
                    m1, w1, t1 = h.rx_metrics(metrics), tap.counters(), time.monotonic()
                    c1 = (tx.cpu_s(), rx.cpu_s(), mosquitto.cpu_s())
                    hwm = (tx.hwm_mb(), rx.hwm_mb())
                    tx.check()
                    rx.check()
                    connected = rx.log_events("mqtt connected")
    elapsed = t1 - t0

    def delta(name: str) -> int:
        return int(m1.get(name, 0) - m0.get(name, 0))

    records = delta("records_delivered")
    blocks = records / _records_per_block(string_bytes, link)
    goodput = records * record * 8 / elapsed / 1e6
    sent_packets, sent_bytes = w1[0] - w0[0], w1[1] - w0[1]
    wire = sent_bytes * 8 / elapsed / 1e6 if tap.available else None
    if wire is None:  # no nftables: what arrived is all we know
        wire = delta("datagrams") * (link.datagram_size + h.WIRE_OVERHEAD) * 8 / elapsed / 1e6
    ideal = wire * k / n
    rx_cpu, broker_cpu = c1[1] - c0[1], c1[2] - c0[2]
    return {
        "loss_injected": loss,
        "broker": broker,
        "broker_as_the_receiver_logged_it": connected[-1].get("broker") if connected else None,
        "seconds": round(elapsed, 2),
        "record_bytes": record,
        "records_offered_per_s": round(offered),
        "records_delivered": records,
        "goodput_mbps": round(goodput, 1),
        "wire_mbps": round(wire, 1),
        "efficiency_vs_wire_k_over_n": round(goodput / ideal, 3) if ideal else None,
        "datagrams_sent": sent_packets,
        "datagrams_dropped_injected": w1[2] - w0[2],
        "rx_datagrams": delta("datagrams"),
        "rx_blocks_rebuilt": delta("blocks_rebuilt"),
        "rx_blocks_lost": delta("blocks_lost"),
        "rx_records_lost": delta("records_lost"),
        "rx_kernel_drops": int(m1.get("kernel_drops", 0)),
        "tx_cpu_s_per_s": round((c1[0] - c0[0]) / elapsed, 2),
        "rx_cpu_s_per_s": round(rx_cpu / elapsed, 2),
        # The broker shares the receiver's core: together they must fit on it.
        "broker_cpu_s_per_s": round(broker_cpu / elapsed, 2),
        # The receiver's CPU per full block it delivered: what sets the goodput it can carry
        # on its core (1 000 Mb/s of wire at the default FEC is ~1 400 blocks a second).
        "rx_cpu_us_per_block": round(rx_cpu / blocks * 1e6) if blocks else None,
        "rx_and_broker_cpu_us_per_block": (
            round((rx_cpu + broker_cpu) / blocks * 1e6) if blocks else None
        ),
        "tx_rss_peak_mb": round(hwm[0], 1),
        "rx_rss_peak_mb": round(hwm[1], 1),
    }


class _Counter:
    """A process on the receiving core that counts the datagrams it is sent, nothing else."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [sys.executable, "-c", _COUNTER, str(port)], stdout=subprocess.PIPE, text=True
        )
        self.received: int | None = None
        time.sleep(0.3)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            out, _ = self.proc.communicate(timeout=10)
            self.received = int(out.strip() or 0)


def pydiode_venv(path: Path = DEFAULT_PYDIODE_VENV) -> Path:
    """pydiode's own virtualenv, made with pip on first use."""
    exe = path / "bin" / "pydiode"
    if not exe.exists():
        subprocess.run(["python3", "-m", "venv", str(path)], check=True)  # noqa: S603, S607
        subprocess.run(  # noqa: S603
            [str(path / "bin" / "pip"), "install", "-q", f"pydiode=={PYDIODE_VERSION}"],
            check=True,
        )
    return exe


# pydiode with its datagram size set before its modules copy it (``sys.argv[1]``).
_PYDIODE_SIZED = (
    "import sys, pydiode.common as c; c.UDP_MAX_BYTES = int(sys.argv.pop(1)); "
    "c.MAX_PAYLOAD = c.UDP_MAX_BYTES - c.PACKET_HEADER.size; "
    "from pydiode.pydiode import main; sys.argv[0] = 'pydiode'; main()"
)


def pydiode_run(
    exe: Path, *, nbytes: int, rate_mbps: float, datagram_size: int | None = None
) -> dict[str, Any]:
    """pydiode send | receive on loopback, each on its own core; at its default size if None."""
    port = free_udp_port()
    command = (
        [str(exe)]
        if datagram_size is None
        else [str(exe.parent / "python"), "-c", _PYDIODE_SIZED, str(datagram_size)]
    )
    with tempfile.TemporaryDirectory(prefix="diode-bench-pydiode-") as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        with src.open("wb") as f:
            left = nbytes
            while left:
                chunk = os.urandom(min(left, 1 << 20))
                f.write(chunk)
                left -= len(chunk)
        with dst.open("wb") as out:
            receiver = subprocess.Popen(  # noqa: S603
                [*command, "receive", "127.0.0.1", "--port", str(port)], stdout=out
            )
            _pin(receiver.pid, RX_CPU)
            time.sleep(0.5)
            start = time.monotonic()
            with src.open("rb") as inp:
                sender = subprocess.Popen(  # noqa: S603
                    [
                        *command, "send", "127.0.0.1", "127.0.0.1", "--port", str(port),
                        "--max-bitrate", str(int(rate_mbps * 1e6)),
                    ],
                    stdin=inp,
                )  # fmt: skip
                _pin(sender.pid, TX_CPU)
                if sender.wait() != 0:
                    receiver.kill()
                    receiver.wait()
                    raise RuntimeError(f"pydiode send exited with {sender.returncode}")
            try:
                receiver.wait(timeout=120)
            except subprocess.TimeoutExpired:
                receiver.kill()
                receiver.wait()
            elapsed = time.monotonic() - start
        intact = (
            hashlib.sha256(src.read_bytes()).digest() == hashlib.sha256(dst.read_bytes()).digest()
        )
    return {
        "datagram_size": datagram_size or 65507,
        "bytes": nbytes,
        "seconds": round(elapsed, 2),
        "goodput_mbps": round(nbytes * 8 / elapsed / 1e6, 1),
        "intact": intact,
    }


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric field's median over the rounds (other fields from the first run)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [r[key] for r in runs if r.get(key) is not None]
            out[key] = statistics.median(values) if values else None
    return out


def link(
    *,
    seconds: float = 10.0,
    warmup_s: float = 3.0,
    rate_mbps: float = 1000.0,
    losses: tuple[float, ...] = (0.0, 0.01),
    string_bytes: int = 1000,
    pydiode_bytes: int = 200_000_000,
    pydiode: Path | None = DEFAULT_PYDIODE_VENV,
    fec: FecSettings | None = None,
    rounds: int = 3,
    sink: bool = False,
    brokers: tuple[BrokerWay, ...] = DEFAULT_BROKERS,
) -> dict[str, Any]:
    """diode at each loss rate and pydiode at both sizes, ``rounds`` times alternating; medians.

    ``fec``: the link's FEC (the default profile when None), e.g. a lighter one
    for a link whose loss is measured and low. ``sink``: the transmitter alone
    (into a datagram counter), no receiver and no pydiode. ``brokers``: how the
    receiver reaches mosquitto (loopback TCP, its Unix socket), each in turn per
    round; ``diode`` lists the medians by broker, then by loss.
    """
    fec = fec or FecSettings()
    link_settings = LinkSettings(fec=fec)
    k = link_settings.fec.k
    n = k + link_settings.fec.repair_for(k)
    settings = {
        "rate_mbps": rate_mbps,
        "datagram_size": link_settings.datagram_size,
        "k": k,
        "n_full_block": n,
        "repair_ratio": fec.repair_ratio,
        "repair_burst": fec.repair_burst,
        "string_bytes": string_bytes,
        "rounds": rounds,
        "pinned": f"tx cpu {TX_CPU}, rx and broker cpu {RX_CPU}"
        if (os.cpu_count() or 1) > 1
        else "no (one core)",
        "receiver_output": "batched, QoS 0, local mosquitto over " + " then ".join(brokers),
    }

    def run(broker: BrokerWay, loss: float) -> dict[str, Any]:
        return diode_run(
            loss=loss,
            broker=broker,
            rate_mbps=rate_mbps,
            seconds=seconds,
            warmup_s=warmup_s,
            string_bytes=string_bytes,
            fec=fec,
        )

    if sink:
        runs = [
            transmitter_alone_run(
                rate_mbps=rate_mbps,
                seconds=seconds,
                warmup_s=warmup_s,
                string_bytes=string_bytes,
                fec=fec,
            )
            for _ in range(rounds)
        ]
        return {"settings": settings, "transmitter_alone": _median(runs), "runs": runs}
    exe = pydiode_venv(pydiode) if pydiode is not None else None
    ours: dict[tuple[BrokerWay, float], list[dict[str, Any]]] = {
        (broker, loss): [] for broker in brokers for loss in losses
    }
    theirs: dict[int | None, list[dict[str, Any]]] = {None: [], 1472: []}
    for _ in range(rounds):
        for (broker, loss), got in ours.items():
            got.append(run(broker, loss))
        if exe is not None:
            for size, got in theirs.items():
                # At 1472 bytes pydiode moves a quarter of its default rate: a quarter the bytes.
                nbytes = pydiode_bytes if size is None else pydiode_bytes // 4
                got.append(pydiode_run(exe, nbytes=nbytes, rate_mbps=rate_mbps, datagram_size=size))
    report: dict[str, Any] = {
        "settings": settings,
        "diode": [_median(runs) for runs in ours.values()],
        "diode_runs": [run for runs in ours.values() for run in runs],
    }
    if exe is not None:
        default, small = _median(theirs[None]), _median(theirs[1472])
        report["pydiode"] = default
        report["pydiode_1472"] = small
        report["pydiode_runs"] = [run for runs in theirs.values() for run in runs]
        best = report["diode"][0]["goodput_mbps"]
        report["goodput_ratio_vs_pydiode"] = (
            round(best / default["goodput_mbps"], 2) if default["goodput_mbps"] else None
        )
        report["goodput_ratio_vs_pydiode_1472"] = (
            round(best / small["goodput_mbps"], 2) if small["goodput_mbps"] else None
        )
    return report

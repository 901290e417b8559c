"""``diode bench link``: authenticated goodput over loopback, and pydiode at the same cap.

diode-tx (a synthetic source of string samples, paced at ``rate_mbps``)
sends 1472-byte datagrams to diode-rx on loopback; the receiver publishes
batched payloads to a local mosquitto nobody subscribes to. An nftables rule
on the link's port counts the datagrams sent and drops ``loss`` of them.

Goodput is the msgpack bytes of the sample records the receiver delivered
(authenticated, in order) per second of the measurement window, read from
its ``records_delivered`` counter; the wire rate is what nftables counted
leaving the transmitter (IPv4 + UDP headers included, as the pacer counts).
The target efficiency is ``wire rate x k/n`` of a full block.

pydiode (PyPI) is run in the same invocation on the same loopback with its
``--max-bitrate`` at the same cap: ``bytes`` of random data through
``pydiode send | pydiode receive``, checked byte for byte, timed from the
sender's start to the receiver's end. It is installed on demand into its own
virtualenv (``--pydiode DIR``), never into this one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from diode.benchmarks import harness as h
from diode.config.link import FecSettings, LinkSettings
from diode.records import Sample, encode_record
from diode.wire import BLOCK_OVERHEAD, symbol_size

PYDIODE_VERSION = "1.0.0"
DEFAULT_PYDIODE_VENV = Path.home() / ".cache" / "diode-bench" / f"pydiode-{PYDIODE_VERSION}"


def sample_size(string_bytes: int) -> int:
    """Bytes of one synthetic string sample as encoded (tag ids below 128)."""
    return len(encode_record(Sample(tag_id=1, ts_ns=time.time_ns(), value="x" * string_bytes)))


def _records_per_block(string_bytes: int, link: LinkSettings) -> int:
    capacity = link.fec.k * symbol_size(link.datagram_size) - BLOCK_OVERHEAD
    return capacity // sample_size(string_bytes)


def diode_run(
    *,
    loss: float,
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
    # Offer 10 % more records than the link can carry at full blocks: the link,
    # or the transmitter's CPU, is the limit, never the generator.
    wire_block = n * (link.datagram_size + h.WIRE_OVERHEAD)
    blocks_per_s = rate_mbps * 1e6 / 8 / wire_block
    offered = 1.1 * blocks_per_s * _records_per_block(string_bytes, link)
    with tempfile.TemporaryDirectory(prefix="diode-bench-link-") as tmp:
        work = Path(tmp)
        private, public = h.keys(work)
        port, metrics = h.free_udp_port(), h.free_port()
        broker = h.Broker(work)
        tap = h.LinkTap(port, loss)
        rx = tx = None
        with h.stopping(tap, broker):
            rx = h.Daemon.rx(
                h.rx_config(
                    work,
                    public=public,
                    port=port,
                    broker_port=broker.port,
                    metrics_port=metrics,
                    output={"payload": "batched", "qos": 0, "retain": False},
                )
            )
            with h.stopping(rx):
                h.wait_metrics(metrics, rx)
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
                with h.stopping(tx):
                    time.sleep(warmup_s)
                    tx.check()
                    rx.check()
                    m0, w0, t0 = h.rx_metrics(metrics), tap.counters(), time.monotonic()
                    c0 = (tx.cpu_s(), rx.cpu_s())
                    time.sleep(seconds)
                    m1, w1, t1 = h.rx_metrics(metrics), tap.counters(), time.monotonic()
                    c1 = (tx.cpu_s(), rx.cpu_s())
                    hwm = (tx.hwm_mb(), rx.hwm_mb())
                    tx.check()
                    rx.check()
    elapsed = t1 - t0

    def delta(name: str) -> int:
        return int(m1.get(name, 0) - m0.get(name, 0))

    records = delta("records_delivered")
    goodput = records * record * 8 / elapsed / 1e6
    sent_packets, sent_bytes = w1[0] - w0[0], w1[1] - w0[1]
    wire = sent_bytes * 8 / elapsed / 1e6 if tap.available else None
    if wire is None:  # no nftables: what arrived is all we know
        wire = delta("datagrams") * (link.datagram_size + h.WIRE_OVERHEAD) * 8 / elapsed / 1e6
    ideal = wire * k / n
    return {
        "loss_injected": loss,
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
        "rx_cpu_s_per_s": round((c1[1] - c0[1]) / elapsed, 2),
        "tx_rss_peak_mb": round(hwm[0], 1),
        "rx_rss_peak_mb": round(hwm[1], 1),
    }


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


def pydiode_run(exe: Path, *, nbytes: int, rate_mbps: float) -> dict[str, Any]:
    port = h.free_udp_port()
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
                [str(exe), "receive", "127.0.0.1", "--port", str(port)], stdout=out
            )
            time.sleep(0.5)
            start = time.monotonic()
            with src.open("rb") as inp:
                subprocess.run(  # noqa: S603
                    [
                        str(exe), "send", "127.0.0.1", "127.0.0.1", "--port", str(port),
                        "--max-bitrate", str(int(rate_mbps * 1e6)),
                    ],
                    stdin=inp,
                    check=True,
                )  # fmt: skip
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
        "bytes": nbytes,
        "seconds": round(elapsed, 2),
        "goodput_mbps": round(nbytes * 8 / elapsed / 1e6, 1),
        "intact": intact,
    }


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
) -> dict[str, Any]:
    """diode at each loss rate, then pydiode at the same cap; the ratio of their goodputs.

    ``fec``: the link's FEC (the default profile when None), e.g. a lighter one
    for a link whose loss is measured and low.
    """
    fec = fec or FecSettings()
    link_settings = LinkSettings(fec=fec)
    k = link_settings.fec.k
    n = k + link_settings.fec.repair_for(k)
    runs = [
        diode_run(
            loss=loss,
            rate_mbps=rate_mbps,
            seconds=seconds,
            warmup_s=warmup_s,
            string_bytes=string_bytes,
            fec=fec,
        )
        for loss in losses
    ]
    report: dict[str, Any] = {
        "settings": {
            "rate_mbps": rate_mbps,
            "datagram_size": link_settings.datagram_size,
            "k": k,
            "n_full_block": n,
            "repair_ratio": fec.repair_ratio,
            "repair_burst": fec.repair_burst,
            "string_bytes": string_bytes,
            "receiver_output": "batched, QoS 0, local mosquitto",
        },
        "diode": runs,
    }
    if pydiode is not None:
        theirs = pydiode_run(pydiode_venv(pydiode), nbytes=pydiode_bytes, rate_mbps=rate_mbps)
        report["pydiode"] = theirs
        ours = runs[0]["goodput_mbps"]
        report["goodput_ratio_vs_pydiode"] = (
            round(ours / theirs["goodput_mbps"], 2) if theirs["goodput_mbps"] else None
        )
    return report

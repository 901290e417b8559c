"""``diode bench polling``: how many Modbus devices one transmitter core polls at 1 Hz.

A pymodbus simulator in a child process (``python -m diode.benchmarks.polling
serve PORT UNITS``) serves ``UNITS`` unit ids with 1000 holding registers each.
diode-tx polls ``devices`` of them, one connection each, every second: 100
float32 tags per device at seeded scattered addresses (coalesced by the
planner with its default ``max_gap``). Values stay constant, so the figure is
the cost of polling (requests, decoding, report by exception), not of sending.

Per device count: the transmitter's CPU share over the window, and its poll
counters over the same window (cycles, overruns, timeouts, errors), read from
the transmitter's own authenticated heartbeats on the link port. One core serves ``devices`` when
every cycle ran on time, nothing timed out, and the CPU share is below 1.
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from diode.benchmarks import harness as h
from diode.config.modbus import DEFAULT_MAX_GAP
from diode.loopback import free_port

REGISTERS = 1000
TAGS = 100
SEED = 7
UNITS_PER_SERVER = 200


def tags(unit: int) -> list[dict[str, Any]]:
    """``TAGS`` float32 tags at distinct, scattered, non-overlapping addresses."""
    rng = random.Random(SEED * 1000 + unit)  # reproducible layout, not a secret
    slots = sorted(rng.sample(range(REGISTERS // 2), TAGS))
    return [
        {"name": f"t{i}", "table": "holding_register", "address": 2 * s, "type": "float32"}
        for i, s in enumerate(slots)
    ]


def _serve(ports: list[int], units: int) -> None:
    from pymodbus.server import ModbusTcpServer  # noqa: PLC0415 - only the child needs it
    from pymodbus.simulator import DataType, SimData, SimDevice  # noqa: PLC0415

    def device(unit: int) -> SimDevice:
        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        regs = [SimData(0, count=REGISTERS, values=0x4248, datatype=DataType.REGISTERS)]
        return SimDevice(id=unit, simdata=(bits, bits, regs, regs))

    async def main() -> None:
        servers = []
        for i, port in enumerate(ports):
            count = min(UNITS_PER_SERVER, units - i * UNITS_PER_SERVER)
            server = ModbusTcpServer(
                [device(u) for u in range(1, count + 1)], address=("127.0.0.1", port)
            )
            await server.serve_forever(background=True)
            servers.append(server)
        await asyncio.Event().wait()

    asyncio.run(main())


def _place(device: int) -> tuple[int, int]:
    """(server index, unit id) of device 0, 1, ...: unit ids stop at 254 per server."""
    return divmod(device, UNITS_PER_SERVER)[0], device % UNITS_PER_SERVER + 1


def run(
    devices: int, *, seconds: float = 10.0, warmup_s: float = 4.0, max_gap: int = DEFAULT_MAX_GAP
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="diode-bench-polling-") as tmp:
        work = Path(tmp)
        private, public = h.keys(work)
        listener = h.HeartbeatListener(public)
        ports = [free_port() for _ in range(-(-devices // UNITS_PER_SERVER))]
        server = h.Daemon(
            "modbus-sim",
            [
                sys.executable, "-m", "diode.benchmarks.polling", "serve",
                ",".join(map(str, ports)), str(devices),
            ],
            work / "sim.log",
        )  # fmt: skip
        with h.stopping(server, listener):
            deadline = time.monotonic() + 20
            while True:
                server.check()
                try:
                    for port in ports:
                        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                            pass
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            config = {
                "modbus": {
                    "devices": [
                        {
                            "name": f"plc{d}",
                            "host": "127.0.0.1",
                            "port": ports[_place(d)[0]],
                            "poll_interval_s": 1.0,
                            "read_identity": False,
                            "max_gap": max_gap,
                            "units": [{"id": _place(d)[1], "tags": tags(d)}],
                        }
                        for d in range(devices)
                    ]
                }
            }
            tx = h.polling_tx(work, private=private, port=listener.port, plcs=config)
            with h.stopping(tx):
                time.sleep(warmup_s)
                tx.check()
                t0, c0, s0 = time.monotonic(), tx.cpu_s(), server.cpu_s()
                time.sleep(0.1)
                first = listener.latest[1]
                time.sleep(seconds)
                t1, c1, s1 = time.monotonic(), tx.cpu_s(), server.cpu_s()
                last = listener.latest[1]
                hwm = tx.hwm_mb()
                tx.check()
    share = (c1 - c0) / (t1 - t0)
    result: dict[str, Any] = {
        "devices": devices,
        "tags": devices * TAGS,
        "max_gap": max_gap,
        "seconds": round(t1 - t0, 2),
        "tx_cpu_share": round(share, 3),
        "tx_cpu_ms_per_device_cycle": round(share * 1000 / devices, 3),
        "tx_rss_peak_mb": round(hwm, 1),
        "server_cpu_share": round((s1 - s0) / (t1 - t0), 3),
    }
    # Poll counters of the window, from the transmitter's own heartbeats (1 Hz).
    for name in ("cycles", "overruns", "requests", "timeouts", "errors", "reconnects", "splits"):
        key = f"poll_{name}"
        result[key] = last.get(key, 0) - first.get(key, 0)
    if result["poll_cycles"] and result["poll_requests"]:
        result["requests_per_device_cycle"] = round(
            result["poll_requests"] / result["poll_cycles"], 1
        )
        result["tx_cpu_us_per_request"] = round((c1 - c0) * 1e6 / result["poll_requests"], 1)
    result["ok"] = bool(
        first
        and last
        and share < 1.0
        and not result["poll_overruns"]
        and not result["poll_timeouts"]
        and not result["poll_errors"]
    )
    return result


def polling(
    *,
    device_counts: tuple[int, ...] = (50, 100, 200, 300, 400),
    seconds: float = 10.0,
    max_gap: int = DEFAULT_MAX_GAP,
) -> dict[str, Any]:
    """Raise the device count until a cycle overruns, a request times out or the core is full."""
    best, runs = h.sweep(device_counts, lambda n: run(n, seconds=seconds, max_gap=max_gap))
    return {
        "settings": {
            "registers_per_device": REGISTERS,
            "tags_per_device": TAGS,
            "type": f"float32, scattered, coalesced (max_gap {max_gap})",
            "poll_interval_s": 1.0,
            "values": "constant (polling cost only)",
        },
        "max_devices_ok": best,
        "runs": runs,
    }


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "serve":
        sys.exit("usage: python -m diode.benchmarks.polling serve PORT,PORT... UNITS")
    _serve([int(p) for p in sys.argv[2].split(",")], int(sys.argv[3]))

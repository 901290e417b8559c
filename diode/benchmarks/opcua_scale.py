"""``diode bench opcua``: how many OPC UA monitored items one transmitter core serves at 1 Hz.

An asyncua server in a child process (``python -m diode.benchmarks.opcua_scale
serve PORT ITEMS STATUS``) holds ``ITEMS`` Double variables (``ns=2;i=1`` ...,
a hundred to a folder: asyncua's AddNodes scans the parent's references, so
one flat folder would make building the address space quadratic). diode-tx
subscribes to all of them in one subscription (sampling and publishing
interval 1000 ms; queue size 10, the config's default).

Once the transmitter holds every initial value, the benchmark starts the
server's updater (SIGUSR1): once a second it writes a new value to every
variable through the address space (``aspace.write_attribute_value``, one
shared DataValue per round, yielding to the server's loop every
``WRITE_SLICE`` writes), the cheapest write that still runs asyncua's
data-change machinery, so each monitored item is due one data change per
second (asyncua's per-item deep copy of each written value is switched off:
see :func:`_share_written_values`). After the window it stops the updater (SIGUSR2), lets the last
publish arrive, and compares exactly:

- due: ``ITEMS`` initial values + ``ITEMS`` per round the server wrote (the
  server counts its rounds in the ``STATUS`` JSON file);
- received: the transmitter's ``poll_samples`` heartbeat counter (one per
  data change taken off the subscription; BAD samples would count too, so
  ``poll_monitor_rejected`` must be 0).

Over the window: the transmitter's and the server's CPU share, and the data
changes per second seen in the transmitter's heartbeats (lumpy: the window
holds whole publishes only). One core serves ``ITEMS`` when at least
``SERVED_SHARE`` of the due changes arrived, the session was never rebuilt,
the server kept its 1 Hz (``SERVED_SHARE`` of the rounds due while its updater
ran were written) and the transmitter's CPU share is below 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diode.benchmarks import harness as h
from diode.loopback import free_port

if TYPE_CHECKING:
    from asyncua import ua
    from asyncua.server.server import Server

NAMESPACE = "urn:diode:bench"
NS = 2  # the first namespace registered after the server's own
FOLDER = 100  # variables per folder
WRITE_SLICE = 1000  # writes between yields to the server's event loop
PERIOD_S = 1.0
SERVED_SHARE = 0.98


def node_id(index: int) -> str:
    """The NodeId of variable ``index`` (0-based)."""
    return f"ns={NS};i={index + 1}"


# -- the server (child process) --------------------------------------------------------


def _dump(status: Path, state: dict[str, Any]) -> None:
    tmp = status.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(status)


def _share_written_values() -> None:
    """Let asyncua's server keep a reference to each written DataValue, not a deep copy.

    Its MonitoredItemService deep-copies the value once per monitored item and
    write (against a writer that mutates a DataValue in place): 60 % of this
    server's CPU at 20 000 items, enough to miss 1 Hz. The updater builds a new
    DataValue every round and never mutates one, so a reference is as correct.
    """
    from asyncua.server.monitored_item_service import MonitoredItemValues  # noqa: PLC0415

    def set_current_datavalue(self: MonitoredItemValues, cur_val: ua.DataValue) -> None:
        self.old_dvalue = self.current_dvalue
        self.current_dvalue = cur_val

    MonitoredItemValues.set_current_datavalue = set_current_datavalue  # type: ignore[method-assign]


async def _build(port: int, items: int) -> tuple[Server, list[ua.NodeId]]:
    from asyncua import ua  # noqa: PLC0415 - only the child needs asyncua
    from asyncua.server.server import Server  # noqa: PLC0415

    _share_written_values()
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    server.set_server_name("diode bench server")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace(NAMESPACE)
    if idx != NS:
        raise RuntimeError(f"namespace index {idx}, expected {NS}")
    root = await server.nodes.objects.add_object(ua.NodeId.from_string(f"ns={NS};s=Bench"), "Bench")
    ids: list[ua.NodeId] = []
    for start in range(0, items, FOLDER):
        folder = await root.add_object(
            ua.NodeId.from_string(f"ns={NS};s=Bench.{start // FOLDER}"), "F"
        )
        for i in range(start, min(items, start + FOLDER)):
            node = await folder.add_variable(
                ua.NodeId.from_string(node_id(i)), f"v{i}", ua.Variant(0.0, ua.VariantType.Double)
            )
            ids.append(node.nodeid)
    return server, ids


async def _update(
    server: Server, ids: list[ua.NodeId], running: asyncio.Event, status: Path
) -> None:
    """A new value in every variable once a period while ``running``; rounds in ``status``."""
    from asyncua import ua  # noqa: PLC0415
    from asyncua.ua.attribute_ids import AttributeIds  # noqa: PLC0415

    aspace = server.iserver.aspace
    state: dict[str, Any] = {
        "running": False,
        "rounds": 0,
        "late_rounds": 0,
        "active_s": 0.0,
        "write_s": 0.0,
        "max_round_s": 0.0,
    }
    _dump(status, state)
    next_at = resumed = time.monotonic()
    while True:
        if not running.is_set():
            if state["running"]:  # the time the rounds had, up to the one not written
                state["active_s"] += time.monotonic() - resumed
            state["running"] = False
            _dump(status, state)
            await running.wait()
            state["running"] = True
            next_at = resumed = time.monotonic()
        now = ua.DateTime.now(dt.UTC)
        # One DataValue for the whole round: every variable changes to the same value.
        data = ua.DataValue(
            ua.Variant(float(state["rounds"] + 1), ua.VariantType.Double),
            SourceTimestamp=now,
            ServerTimestamp=now,
        )
        started = time.perf_counter()
        busy = 0.0
        for i, nid in enumerate(ids):
            await aspace.write_attribute_value(nid, AttributeIds.Value, data)
            if i % WRITE_SLICE == WRITE_SLICE - 1:
                busy += time.perf_counter() - started
                await asyncio.sleep(0)
                started = time.perf_counter()
        busy += time.perf_counter() - started
        state["rounds"] += 1
        state["write_s"] += busy
        state["max_round_s"] = max(state["max_round_s"], busy)
        next_at += PERIOD_S
        delay = next_at - time.monotonic()
        if delay < 0:  # this round ended after the next was due: 1 Hz not kept
            state["late_rounds"] += 1
            next_at, delay = time.monotonic(), 0.0
        _dump(status, state)
        await asyncio.sleep(delay)


def _serve(port: int, items: int, status: Path) -> None:
    async def main() -> None:
        server, ids = await _build(port, items)
        # The address space is built once and lives forever: out of the collector's
        # sight, so a full collection does not walk 40 000 nodes' attributes each time.
        gc.freeze()
        running = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, running.set)
        loop.add_signal_handler(signal.SIGUSR2, running.clear)
        await server.start()  # listening from here: the parent waits for the port
        await _update(server, ids, running, status)

    asyncio.run(main())


# -- the benchmark (parent) -----------------------------------------------------------------


def _status(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(path.read_text())
        if isinstance(state, dict):
            return state
    return {}


def _cpu_ticks() -> tuple[int, int]:
    """(busy, all) clock ticks of the whole machine so far, from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _wait_port(server: h.Daemon, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        server.check()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _settled(listener: h.HeartbeatListener, tx: h.Daemon, timeout: float) -> dict[str, int]:
    """The heartbeat counters once ``poll_samples`` stopped moving for two heartbeats."""
    deadline = time.monotonic() + timeout
    seen: tuple[float, int] = (0.0, -1)
    steady = 0
    while time.monotonic() < deadline:
        tx.check()
        at, counters = listener.latest
        if at != seen[0] and counters:
            samples = counters.get("poll_samples", 0)
            steady = steady + 1 if samples == seen[1] and samples > 0 else 0
            seen = (at, samples)
            if steady >= 2:
                return counters
        time.sleep(0.1)
    raise RuntimeError(f"the transmitter's samples did not settle within {timeout:.0f} s")


def _wait_state(path: Path, server: h.Daemon, *, running: bool, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _status(path).get("running") is not running:
        server.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server's updater did not report running={running}")
        time.sleep(0.05)


def run(items: int, *, seconds: float = 10.0, warmup_s: float = 3.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="diode-bench-opcua-") as tmp:
        work = Path(tmp)
        private, public = h.keys(work)
        listener = h.HeartbeatListener(public)
        port = free_port()
        status = work / "server.json"
        server = h.Daemon(
            "opcua-sim",
            [
                sys.executable, "-m", "diode.benchmarks.opcua_scale", "serve",
                str(port), str(items), str(status),
            ],
            work / "sim.log",
        )  # fmt: skip
        with h.stopping(server, listener):
            _wait_port(server, port, 30.0 + items / 1000)
            config = {
                "opcua": {
                    "servers": [
                        {
                            "name": "plc",
                            "endpoint": f"opc.tcp://127.0.0.1:{port}",
                            "sampling_interval_ms": 1000.0,
                            "publishing_interval_ms": PERIOD_S * 1000.0,
                            "nodes": [
                                {"name": f"v{i}", "node_id": node_id(i)} for i in range(items)
                            ],
                        }
                    ]
                }
            }
            tx = h.polling_tx(work, private=private, port=listener.port, plcs=config)
            with h.stopping(tx):
                started = time.monotonic()
                # The initial values (one per item) first: then every change is the updater's.
                initial = _settled(listener, tx, 60.0 + items / 500)
                subscribed_s = time.monotonic() - started
                os.kill(server.proc.pid, signal.SIGUSR1)
                _wait_state(status, server, running=True)
                time.sleep(warmup_s)
                tx.check()
                t0, c0, s0, b0 = time.monotonic(), tx.cpu_s(), server.cpu_s(), time.process_time()
                m0 = _cpu_ticks()
                first = listener.latest
                time.sleep(seconds)
                t1, c1, s1, b1 = time.monotonic(), tx.cpu_s(), server.cpu_s(), time.process_time()
                m1 = _cpu_ticks()
                last = listener.latest
                os.kill(server.proc.pid, signal.SIGUSR2)
                _wait_state(status, server, running=False)
                final = _settled(listener, tx, 30.0 + items / 1000)
                hwm, server_hwm = tx.hwm_mb(), server.hwm_mb()
                state = _status(status)
                tx.check()
    share = (c1 - c0) / (t1 - t0)
    span = last[0] - first[0]
    window = last[1].get("poll_samples", 0) - first[1].get("poll_samples", 0)
    per_s = window / span if span > 0 else 0.0
    rounds = int(state.get("rounds", 0))
    due = items * (1 + rounds)
    received = final.get("poll_samples", 0)
    result: dict[str, Any] = {
        "items": items,
        "seconds": round(t1 - t0, 2),
        "subscribed_s": round(subscribed_s, 1),
        "tx_cpu_share": round(share, 3),
        "tx_cpu_ms_per_1000_changes": round(share * 1e6 / per_s, 2) if per_s else None,
        "tx_rss_peak_mb": round(hwm, 1),
        "due_per_s": items,
        "changes_per_s": round(per_s),
        "initial_values": initial.get("poll_samples", 0),
        "server_rounds": rounds,
        "changes_due": due,
        "changes_received": received,
        "received_share": round(received / due, 4) if due else 0.0,
        "server_cpu_share": round((s1 - s0) / (t1 - t0), 3),
        "server_write_ms_per_round": round(state.get("write_s", 0.0) * 1000 / max(rounds, 1), 1),
        "server_late_rounds": state.get("late_rounds", 0),
        "server_rss_peak_mb": round(server_hwm, 1),
        # This process decodes (and authenticates) the whole link to find the heartbeats:
        # a third CPU consumer on the machine, besides the transmitter and the server.
        "listener_cpu_share": round((b1 - b0) / (t1 - t0), 3),
        # Everything the machine ran in the window, in cores: on a shared box, what
        # else competed with the two processes measured.
        "machine_busy_cores": round((m1[0] - m0[0]) / (m1[1] - m0[1]) * (os.cpu_count() or 1), 2),
    }
    for name in (
        "connects",
        "connect_failures",
        "sessions_lost",
        "watchdog_fired",
        "monitor_rejected",
        "bad_samples",
    ):
        result[f"poll_{name}"] = final.get(f"poll_{name}", 0)
    # 1 Hz kept: the rounds written cover the whole time the updater ran (to the
    # tolerance that also applies to the changes; a single slipped round of a few
    # hundred ms on a busy machine does not fail a run, a server that cannot write
    # its variables in a second does).
    active_s = float(state.get("active_s", 0.0))
    result["server_rounds_per_s"] = round(rounds / active_s, 3) if active_s else 0.0
    result["server_kept_1hz"] = rounds >= SERVED_SHARE * int(active_s / PERIOD_S)
    result["ok"] = bool(
        received >= SERVED_SHARE * due
        and share < 1.0
        and result["server_kept_1hz"]
        and result["poll_connects"] == 1
        and not result["poll_connect_failures"]
        and not result["poll_sessions_lost"]
        and not result["poll_monitor_rejected"]
    )
    return result


def opcua(
    *,
    item_counts: tuple[int, ...] = (1000, 5000, 10_000, 20_000, 40_000, 60_000),
    seconds: float = 10.0,
    warmup_s: float = 3.0,
) -> dict[str, Any]:
    """Raise the item count until a change goes missing, the session breaks or a core is full."""
    best, runs = h.sweep(item_counts, lambda n: run(n, seconds=seconds, warmup_s=warmup_s))
    return {
        "settings": {
            "type": "Double, every variable changes once a second",
            "subscription": "one, publishing interval 1000 ms",
            "sampling_interval_ms": 1000.0,
            "queue_size": "the config default (10)",
            "security": "None",
            "served": f">= {SERVED_SHARE:.0%} of due changes and of 1 Hz rounds, no rebuild, "
            "tx CPU share < 1",
        },
        "max_items_ok": best,
        "runs": runs,
    }


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "serve":
        sys.exit("usage: python -m diode.benchmarks.opcua_scale serve PORT ITEMS STATUS_FILE")
    _serve(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))

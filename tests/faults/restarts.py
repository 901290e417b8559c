"""The restart scenarios (issue 16): a receiver restarted, killed or reloaded loses nothing.

::

    diode-tx --UDP--> Relay --UDP--> [link socket, held by systemd-socket-activate]
                                        |  fd 3, LISTEN_FDS=1
                                        v
                     bash: wait for "go", then exec diode-rx (again and again)

``systemd-socket-activate --datagram`` stands in for systemd: it binds the
link socket and executes a small shell loop that keeps the socket open, as
systemd keeps the socket of ``diode-rx.socket``, and starts diode-rx on it
each time the test says so (``Restart=`` with the test choosing when). While
no receiver runs, the kernel queues what arrives in the socket's buffer.

Each function asserts exact counts and returns a :class:`Result`, the row of
docs/RELIABILITY.md, like the scenarios of tests/faults/scenarios.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diode.benchmarks.harness import to_toml
from diode.loopback import free_port
from receiver.failover import ANNOUNCE_S
from tests.faults.harness import (
    BIN,
    SHUTDOWN_S,
    Child,
    Plant,
    Subscriber,
    _Discard,
    metrics,
    rejected,
    sample_number,
    synthetic_sent,
    wait_until,
)
from tests.faults.scenarios import SEED, Result, _counted_run, _tallied
from tests.support.mosquitto import Mosquitto
from tests.support.relay import Faults, Relay

ACTIVATE = shutil.which("systemd-socket-activate")
# $1: the "go" file, $2: where the receiver's pid goes, the rest: the receiver's argv.
HOLDER = (
    'while :; do while [ ! -e "$1" ]; do sleep 0.02; done; rm -f "$1"; '
    '(export LISTEN_PID=$BASHPID; echo $BASHPID > "$2"; exec "${@:3}"); done'
)
DEAD_S = 2.0


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith(("Z", "X"))
    except (OSError, IndexError):
        return True


class ActivatedRx(Child):
    """diode-rx started on a socket that outlives it; ``pid`` is the current receiver's.

    The holder (systemd-socket-activate, then the shell loop) is the child
    process; the receivers are its children, started by :meth:`start`.
    """

    def __init__(self, name: str, rx_argv: list[str], port: int, tmp: Path) -> None:
        assert ACTIVATE is not None, "systemd-socket-activate is not installed"
        self.go = tmp / "rx.go"
        self.pidfile = tmp / "rx.pid"
        self.port = port
        self._pid = 0
        self._woken = False
        argv = [ACTIVATE, "--datagram", "-l", f"127.0.0.1:{port}", "bash", "-c", HOLDER]
        super().__init__(
            name, [*argv, "holder", str(self.go), str(self.pidfile), *rx_argv], tmp / "rx.log"
        )

    @property
    def pid(self) -> int:
        return self._pid

    async def start(self) -> None:
        """Let the holder start a receiver; returns once its pid is known."""
        await wait_until(
            lambda: "Listening on" in self.log.read_text(errors="replace"), what="socket bound"
        )
        self.go.touch()
        if not self._woken:
            # systemd-socket-activate executes the holder at the first datagram: one
            # datagram that is no frame (the receiver counts it as rejected).
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"wake", ("127.0.0.1", self.port))
            self._woken = True
        old = self._pid
        await wait_until(
            lambda: (
                self.pidfile.exists() and self.pidfile.read_text().strip() not in ("", str(old))
            ),
            what="receiver started by the holder",
        )
        self._pid = int(self.pidfile.read_text())

    def alive(self) -> bool:
        return self._pid != 0 and not _gone(self._pid)

    def _signal(self, sig: int, within: float) -> None:
        self.sample_memory()
        if self.alive():
            os.kill(self._pid, sig)
        deadline = time.monotonic() + within
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def terminate(self) -> int:
        self._signal(signal.SIGTERM, SHUTDOWN_S)
        if self.alive():
            self.kill()
            return -9
        return 0

    def kill(self) -> None:
        self._signal(signal.SIGKILL, 5.0)

    def close(self) -> None:
        """The holder too: the socket closes with it."""
        self.terminate()
        self.proc.terminate()
        self.proc.wait(5)


@dataclass
class ActivatedPlant(Plant):
    """A plant whose receiver runs on a socket held for it (``diode-rx.socket``)."""

    holder: ActivatedRx | None = field(default=None)

    async def start_rx(self) -> Child:
        if self.holder is None:
            argv = [str(BIN / "diode-rx"), "--config", str(self.rx_config())]
            self.holder = ActivatedRx("rx", argv, self.rx_port, self.tmp)
        self.rx = self.holder
        await self.holder.start()
        await wait_until(self._rx_ready, within=20, what="receiver metrics endpoint")
        return self.holder

    async def close(self) -> None:
        await super().close()
        if self.holder is not None:
            await asyncio.to_thread(self.holder.close)


def _quiet_link(rx: dict[str, int]) -> str:
    return (
        f"kernel drops {rx.get('kernel_drops', 0)}, datagrams released uncommitted "
        f"{rx.get('link_released_uncommitted', 0)}"
    )


# --- 13. restarts under socket activation ---------------------------------------------------


def rate_sources(rate: int) -> list[dict[str, Any]]:
    return [{"name": "plc", "tags": 50, "rate_hz": float(rate), "batch_ms": 20.0}]


def rate_output(rate: int) -> dict[str, Any]:
    """Per-tag messages up to 2 000/s; above, one message per device per block, so that the
    subscriber (paho in a Python thread, on this shared machine) is not what limits the run."""
    return {"payload": "batched"} if rate > 2000 else {}


async def socket_activated_restarts(
    tmp: Path, broker: Mosquitto, *, rate: int, seed: int = SEED
) -> Result:
    """On a socket that outlives the receiver: SIGTERM + restart, SIGKILL + restart (each
    2 s dead), and a SIGKILL again in the middle of the catch-up that follows (the new
    receiver reading its 2 s backlog: the moment it holds the most it has read and not
    committed). Every value published, none reported lost, in order."""
    result = Result(
        f"13. socket activation, {rate:,} updates/s: SIGTERM + restart, SIGKILL + restart "
        f"({DEAD_S:.0f} s dead each), SIGKILL during the catch-up",
        seed=seed,
    )
    sources = rate_sources(rate)
    plant = ActivatedPlant(tmp, broker, sources, output=rate_output(rate))
    sub = Subscriber(broker.port)
    fig: dict[str, Any] = {"down": [], "read_at_kill": 0}

    async def restart(how: str) -> None:
        down = time.monotonic()
        if how == "SIGTERM":
            await plant.stop_rx()
        else:
            plant.kill_rx()
        await asyncio.sleep(DEAD_S)
        await plant.start_rx()
        fig["down"].append(time.monotonic() - down)

    async def restarts() -> None:
        await wait_until(lambda: sub.count_good() > 2 * rate, what="values flowing")
        for how in ("SIGTERM", "SIGKILL"):
            before = sub.count_good()
            await restart(how)
            if how == "SIGKILL":
                # The new receiver has begun on its backlog: kill it there.
                await wait_until(
                    lambda: plant.rx_counters().get("datagrams", 0) > 0,
                    step=0.002,
                    what="catch-up begun",
                )
                fig["read_at_kill"] = plant.rx_counters().get("datagrams", 0)
                await restart("SIGKILL")
            await wait_until(
                lambda b=before: sub.count_good() > b + 3 * rate, what=f"values after {how}"
            )
        await asyncio.sleep(1.0)

    try:
        _, rx = await _counted_run(plant, sub, result, 0, during=restarts)
        t = _tallied(result, sub, sources)
        assert plant.rx is not None
        starts = plant.rx.events("receiver starting")
        down = ", ".join(f"{d:.1f}" for d in fig["down"])
        result.note(
            f"receiver down {down} s (SIGTERM, SIGKILL, SIGKILL during the catch-up, killed "
            f"after reading {fig['read_at_kill']} datagrams of its backlog), from the signal to "
            f"the new one serving metrics; {len(starts)} starts, each on the socket passed in; "
            f"gaps reported "
            f"{len(plant.gaps())}; {t.duplicates} values delivered twice (QoS 1: messages "
            f"the killed receiver had sent and the broker had not acknowledged); "
            f"{_quiet_link(rx)}; 1 datagram rejected is the one that woke the socket"
        )
        assert all(s.get("socket") == "passed in" for s in starts), starts
        assert len(starts) == 4
        assert not plant.gaps(), plant.gaps()
        assert result.reported_lost == 0
        assert t.out_of_order == 0, f"{t.out_of_order} values out of order"
        t.assert_none_missing()
        assert rx.get("kernel_drops", 0) == 0
        return result
    finally:
        sub.close()
        await plant.close()


# --- 14. time diversity ---------------------------------------------------------------------

REPEAT_AFTER_S = 5.0
OUTAGE_S = 4.0
DIVERSITY = {"repeat_after_s": REPEAT_AFTER_S}
# A block lost the first time waits for its repeat (docs/CONFIG.md, reorder_timeout_s).
WAIT_FOR_REPEATS = {"reorder_timeout_s": REPEAT_AFTER_S + 1.0}


async def time_diversity(
    tmp: Path, broker: Mosquitto, *, fault: str, rate: int = 1000, seed: int = SEED
) -> Result:
    """``repeat_after_s = 5`` and no socket activation: the receiver SIGKILLed and dead
    4 s (``fault="receiver"``), or the link cut 4 s (``fault="link"``). Every block
    missed the first time is taken from its repeat: 0 lost, in order."""
    what = {
        "receiver": f"receiver SIGKILL, dead {OUTAGE_S:.0f} s",
        "link": f"link cut {OUTAGE_S:.0f} s",
    }[fault]
    result = Result(
        f"14. time diversity (repeat_after_s = {REPEAT_AFTER_S:.0f}), {rate:,} updates/s: {what}",
        seed=seed,
    )
    sources = rate_sources(rate)
    plant = Plant(
        tmp, broker, sources, link=DIVERSITY, receiver=WAIT_FOR_REPEATS, output=rate_output(rate)
    )
    sub = Subscriber(broker.port)
    fig: dict[str, Any] = {}

    async def outage() -> None:
        relay = plant.relay
        assert relay is not None
        await wait_until(lambda: sub.count_good() > 2 * rate, what="values flowing")
        before = sub.count_good()
        cut_from = relay.stats.dropped
        relay.faults.loss = 1.0
        cut = time.monotonic()
        if fault == "receiver":
            # Killed and started again at once; the relay lets nothing through for
            # OUTAGE_S from the kill, so the window in which nothing is received is
            # exactly that, however long this restart takes (about 1-2 s here).
            plant.kill_rx()
            await plant.start_rx()
            fig["restart_s"] = time.monotonic() - cut
        await asyncio.sleep(OUTAGE_S - (time.monotonic() - cut))
        relay.faults.loss = 0.0
        fig["cut_datagrams"] = relay.stats.dropped - cut_from
        await wait_until(
            lambda: sub.count_good() > before + (OUTAGE_S + REPEAT_AFTER_S + 2) * rate,
            within=30,
            what="values after the outage",
        )
        await asyncio.sleep(1.0)

    try:
        counters, rx = await _counted_run(plant, sub, result, 0, during=outage)
        t = _tallied(result, sub, sources)
        repeats = counters.get("repeats_sent", 0)
        sent = counters["datagrams_sent"]
        first = sent - repeats
        outage_note = f"nothing received for {OUTAGE_S:.0f} s ({fig['cut_datagrams']:,} datagrams)"
        if fault == "receiver":
            outage_note += (
                f", the receiver SIGKILLed when it began and serving again "
                f"{fig['restart_s']:.1f} s later (no socket activation: what it had read and "
                "not committed died with it)"
            )
        result.note(
            f"{outage_note}; transmitter sent {first:,} datagrams and {repeats:,} repeats "
            f"({repeats / max(first, 1):.0%}), repeats dropped "
            f"{counters.get('repeats_dropped', 0)}; receiver rejected_late "
            f"{rx.get('rejected_late', 0):,} (the copies it had, and surplus repair symbols); "
            f"gaps reported {len(plant.gaps())}; {t.duplicates} values delivered twice; "
            f"reorder_timeout_s {WAIT_FOR_REPEATS['reorder_timeout_s']:.0f}"
        )
        assert not plant.gaps(), plant.gaps()
        assert result.reported_lost == 0
        assert t.out_of_order == 0, f"{t.out_of_order} values out of order"
        t.assert_none_missing()
        assert counters.get("repeats_dropped", 0) == 0
        assert repeats > 0
        return result
    finally:
        sub.close()
        await plant.close()


async def _pair_finish(plant: Plant, sub: Subscriber) -> dict[str, int]:
    """Stop the transmitter, wait until the subscriber and the active receiver's spool are
    quiet: an active receiver of a pair announces every ANNOUNCE_S, so its published count
    never settles."""
    from tests.faults.harness import settled

    counters = await plant.stop_tx()
    await wait_until(
        settled(lambda: (sub.count_good(), plant.rx_counters().get("mqtt_spool_depth")), 2.0),
        within=60,
        step=0.25,
        what="subscriber quiet",
    )
    return counters


# --- 15. reload (SIGHUP) --------------------------------------------------------------------


async def reload_under_load(tmp: Path, broker: Mosquitto, *, rate: int, seed: int = SEED) -> Result:
    """SIGHUP the receiver (started by hand, no socket unit) under load, with a config
    changed where a reload can change it; then with a broken config. The first re-executes
    the receiver on the same socket, same pid: 0 lost; the second is refused, the receiver
    runs on."""
    result = Result(f"15. receiver reload (SIGHUP) under load, {rate:,} updates/s", seed=seed)
    sources = rate_sources(rate)
    plant = Plant(tmp, broker, sources, output=rate_output(rate))
    sub = Subscriber(broker.port)
    fig: dict[str, Any] = {}

    async def reloads() -> None:
        rx = plant.rx
        assert rx is not None
        await wait_until(lambda: sub.count_good() > 2 * rate, what="values flowing")
        # (a) a good config, changed: another MQTT client id and a longer reorder timeout.
        config = tmp / "rx.toml"
        plant.mqtt["client_id"] = "diode-rx-reloaded"
        plant.receiver["reorder_timeout_s"] = 0.5
        assert plant.rx_config() == config
        fig["sha"] = hashlib.sha256(config.read_bytes()).hexdigest()[:16]
        before = sub.count_good()
        asked = time.monotonic()
        rx.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: len(rx.events("receiver starting")) == 2, what="re-executed")
        # The sockets handed on: the link socket and its quarantines (receiver/steer.py).
        started = rx.events("receiver starting")
        assert [(e["socket"], e["steering"]) for e in started] == [
            ("opened", True),
            ("passed in", True),
        ], started
        await wait_until(plant._rx_ready, what="metrics again")
        fig["reload_s"] = time.monotonic() - asked
        await wait_until(lambda b=before: sub.count_good() > b + 2 * rate, what="values again")
        # (b) a broken one: refused, nothing else happens.
        text = config.read_text()
        config.write_text(text.replace("[mqtt]", "[mqtt]\nno_such_key = 1", 1))
        rx.proc.send_signal(signal.SIGHUP)
        await wait_until(
            lambda: bool(rx.events("config reload refused, the running config is kept")),
            what="refused",
        )
        config.write_text(text)
        before = sub.count_good()
        await wait_until(lambda b=before: sub.count_good() > b + 2 * rate, what="values after")
        await asyncio.sleep(1.0)

    try:
        _, rx = await _counted_run(plant, sub, result, 0, during=reloads)
        assert plant.rx is not None
        t = _tallied(result, sub, sources)
        starts = plant.rx.events("receiver starting")
        (refused,) = plant.rx.events("config reload refused, the running config is kept")
        connected = plant.rx.events("mqtt connected")
        result.note(
            f"reload: the receiver re-executed itself on its socket (pid {plant.rx.pid} "
            f"throughout), serving metrics again {fig['reload_s']:.1f} s after SIGHUP; the new "
            f"config in use (its digest in the new start line); a broken config refused "
            f"({refused['error']}), the running one kept; gaps reported {len(plant.gaps())}; "
            f"{t.duplicates} values delivered twice; {_quiet_link(rx)}"
        )
        assert plant.rx.alive()
        assert [s["socket"] for s in starts] == ["opened", "passed in"]
        # The new process runs the new file (the digest of what it read at its start).
        assert starts[0]["config_sha256"] != starts[1]["config_sha256"] == fig["sha"]
        assert "no_such_key" in refused["error"]
        assert len(connected) == 2
        assert not plant.gaps(), plant.gaps()
        assert result.reported_lost == 0
        assert t.out_of_order == 0, f"{t.out_of_order} values out of order"
        t.assert_none_missing()
        return result
    finally:
        sub.close()
        await plant.close()


# --- 16, 17. a standby receiver -------------------------------------------------------------

TAKEOVER_S = 3.0


class TeeRelay(Relay):
    """The splitter of a real link: every datagram forwarded goes to every receiver."""

    def __init__(self, targets: list[tuple[str, int]], faults: Faults) -> None:
        super().__init__(targets[0], faults)
        self.targets = targets

    def _forward(self, data: bytes) -> None:
        for target in self.targets:
            try:
                self._out.sendto(data, target)
                self.stats.forwarded += 1
            except OSError:
                self.stats.send_errors += 1


@dataclass
class PairPlant(Plant):
    """Two receivers, ``a`` and ``b``, each the other's peer, one relay feeding both."""

    rx_b: Child | None = field(default=None)
    rx_port_b: int = 0
    metrics_port_b: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rx_port_b = free_port(socket.SOCK_DGRAM)
        self.metrics_port_b = free_port()

    def pair_config(self, name: str) -> Path:
        other = "b" if name == "a" else "a"
        port, metrics = (
            (self.rx_port, self.metrics_port)
            if name == "a"
            else (self.rx_port_b, self.metrics_port_b)
        )
        self.receiver = {
            "port": port,
            "metrics_port": metrics,
            "state_dir": str(self.tmp / f"rx-{name}"),
        }
        self.mqtt = {
            "client_id": f"diode-rx-{name}",
            "spool_path": str(self.tmp / f"rx-{name}" / "spool.sqlite"),
            "status_topic": f"diode/$receiver/{name}",
        }
        text = super().rx_config().read_text()
        failover = {
            "failover": {
                "peer_status_topic": f"diode/$receiver/{other}",
                "takeover_after_s": TAKEOVER_S,
            }
        }
        path = self.tmp / f"rx-{name}.toml"
        path.write_text(text + to_toml(failover))
        return path

    async def start_relay(self) -> Relay:
        targets = [("127.0.0.1", self.rx_port), ("127.0.0.1", self.rx_port_b)]
        self.relay = TeeRelay(targets, self.faults)
        if not self.capture:
            self.relay.capture = _Discard()
        await self.relay.start()
        return self.relay

    async def start_one(self, name: str) -> Child:
        argv = [str(BIN / "diode-rx"), "--config", str(self.pair_config(name))]
        child = Child(f"rx-{name}", argv, self.tmp / f"rx-{name}.log")
        port = self.metrics_port if name == "a" else self.metrics_port_b
        if name == "a":
            self.rx = child
        else:
            self.rx_b = child

        def ready() -> bool:
            if not child.alive():
                raise AssertionError(f"{child.name} exited: {child.log.read_text()[-2000:]}")
            try:
                metrics(port)
            except OSError:
                return False
            return True

        await wait_until(ready, within=20, what=f"{child.name} metrics endpoint")
        return child

    async def start_rx(self) -> Child:
        """``a`` first, active once it claimed; then ``b``, which hears it and stays standby."""
        await self.start_one("a")
        await wait_until(lambda: self.counters_of("a").get("failover_active") == 1,
                         within=4 * TAKEOVER_S, what="a active")  # fmt: skip
        await self.start_one("b")
        return await self._rx()

    async def _rx(self) -> Child:
        assert self.rx is not None
        return self.rx

    def counters_of(self, name: str) -> dict[str, int]:
        return metrics(self.metrics_port if name == "a" else self.metrics_port_b)

    def rx_counters(self) -> dict[str, int]:
        """The active receiver's counters (a's while it lives and is active)."""
        if self.rx is not None and self.rx.alive():
            a = self.counters_of("a")
            if a.get("failover_active") == 1:
                return a
        return self.counters_of("b")

    def gaps(self) -> list[dict[str, Any]]:
        return [g for c in (self.rx, self.rx_b) if c is not None for g in c.events("records lost")]

    async def close(self) -> None:
        await super().close()
        if self.rx_b is not None and self.rx_b.alive():
            await asyncio.to_thread(self.rx_b.terminate)


def _took_over(child: Child) -> list[dict[str, Any]]:
    return child.events("failover: taking over")


def _log_s(entry: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


async def standby_takes_over(
    tmp: Path, broker: Mosquitto, *, rate: int = 1000, seed: int = SEED
) -> Result:
    """Two receivers fed the same datagrams; the active one SIGKILLed: the standby takes
    over from the active one's last published position. 0 lost; the repeats and the
    hand-over time are reported; the standby published nothing before."""
    result = Result(f"16. standby receiver, active SIGKILLed, {rate:,} updates/s", seed=seed)
    sources = rate_sources(rate)
    plant = PairPlant(tmp, broker, sources, output=rate_output(rate))
    sub = Subscriber(broker.port)
    fig: dict[str, Any] = {}

    async def kill_active() -> None:
        await wait_until(lambda: sub.count_good() > 3 * rate, what="values flowing")
        fig["b_before"] = plant.counters_of("b")
        before = sub.count_good()
        fig["killed"] = time.time()
        plant.kill_rx()
        fig["top"] = {tag: max(ns, default=0) for tag, ns in sub.good().items()}
        assert plant.rx_b is not None
        b = plant.rx_b
        await wait_until(lambda: bool(_took_over(b)), within=4 * TAKEOVER_S, what="b took over")
        await wait_until(lambda: sub.count_good() > before + 3 * rate, what="values after")
        fig["first_after"] = min(
            (
                s.at_ns
                for tag in sub.good()
                for s in sub.seen(*tag)
                if s.at_ns / 1e9 > fig["killed"]
            ),
            default=0,
        )
        await asyncio.sleep(1.0)

    try:
        await _counted_run(plant, sub, result, 0, during=kill_active, finish=_pair_finish)
        b = plant.counters_of("b")
        result.reported_lost = b.get("records_lost", 0)
        result.rejected = rejected(b)
        t = _tallied(result, sub, sources)
        assert plant.rx_b is not None
        (taking,) = _took_over(plant.rx_b)
        handover_s = _log_s(taking) - fig["killed"]
        # Every tag's first value newer than any it had at the kill, on MQTT.
        first_s = (
            max(
                min(
                    s.at_ns
                    for s in sub.seen(*tag)
                    if s.quality == "good" and (sample_number(s.value) or 0) > top
                )
                for tag, top in fig["top"].items()
            )
            / 1e9
            - fig["killed"]
        )
        result.note(
            f"b, standby, published {fig['b_before'].get('mqtt_published', 0)} messages before "
            f"the kill; it took over {handover_s:.2f} s after the SIGKILL ({taking['reason']}), "
            f"from the positions a last announced {taking['positions']}; every tag had a new "
            f"value on MQTT {first_s:.2f} s after the kill; {t.duplicates} values published "
            f"twice (what a published after its last announcement, every {ANNOUNCE_S} s), "
            f"{t.out_of_order} "
            f"behind a larger one; gaps reported {len(plant.gaps())}"
        )
        assert fig["b_before"].get("mqtt_published", 0) == 0, "the standby published"
        assert fig["b_before"].get("failover_active") == 0
        assert "offline" in taking["reason"], taking
        assert not plant.gaps(), plant.gaps()
        t.assert_none_missing()
        return result
    finally:
        sub.close()
        await plant.close()


async def both_killed(
    tmp: Path, broker: Mosquitto, *, rate: int = 1000, seed: int = SEED
) -> Result:
    """Active and standby SIGKILLed together, dead 2 s, both started again: the one that
    was active resumes (it has the freshest positions and the spool); the loss is reported
    exactly (records and samples, against the decoded capture); nothing published twice
    beyond QoS 1's redelivery of what was in flight."""
    from tests.faults.scenarios import exact_accounting, reference

    result = Result(f"17. standby receiver, both SIGKILLed, {rate:,} updates/s", seed=seed)
    sources = rate_sources(rate)
    plant = PairPlant(tmp, broker, sources, output=rate_output(rate), capture=True)
    sub = Subscriber(broker.port)
    fig: dict[str, Any] = {}

    async def kill_both() -> None:
        await wait_until(lambda: sub.count_good() > 3 * rate, what="values flowing")
        assert plant.rx is not None
        assert plant.rx_b is not None
        before = sub.count_good()
        plant.rx.kill()
        plant.rx_b.kill()
        await asyncio.sleep(DEAD_S)
        restarted = time.time()
        await plant.start_one("a")
        await plant.start_one("b")
        a = plant.rx
        await wait_until(lambda: len(_took_over(a)) == 2, within=4 * TAKEOVER_S, what="a again")
        fig["resumed_s"] = _log_s(_took_over(a)[-1]) - restarted
        await wait_until(lambda: sub.count_good() > before + 3 * rate, what="values after")
        await asyncio.sleep(2 * TAKEOVER_S)  # b had its chance to claim too
        await asyncio.sleep(1.0)

    try:
        counters, _ = await _counted_run(
            plant, sub, result, 0, during=kill_both, finish=_pair_finish
        )
        assert plant.relay is not None
        assert plant.rx_b is not None
        ref = reference(plant, plant.relay.capture)
        sent = synthetic_sent(sources, {"plc": counters["poll_generated"]})
        t, lost_records, lost_samples = exact_accounting(plant, sub, sent, ref)
        a, b = plant.counters_of("a"), plant.counters_of("b")
        result.published, result.lost = t.published - t.duplicates, t.missing
        result.reported_lost = sum(g["records_lost"] for g in plant.gaps())
        result.rejected = rejected(a)
        result.note(
            f"a, active before, resumed {fig['resumed_s']:.1f} s after both were started again; "
            f"b stayed standby (took over {len(_took_over(plant.rx_b))} times, published "
            f"{b.get('mqtt_published', 0)} messages); one gap for the time both were dead: "
            f"{len(plant.gaps())} reported, {lost_records} records, {len(lost_samples)} samples, "
            f"exactly the samples missing on MQTT; {t.duplicates} values published twice, all "
            f"by a: its spool sends again what it had sent before the kill and not yet deleted "
            f"(QoS 1 is at least once across a crash, as in scenario 9), {t.out_of_order} "
            f"behind a larger one"
        )
        assert b.get("mqtt_published", 0) == 0, "the standby published"
        assert b.get("failover_active") == 0
        assert not _took_over(plant.rx_b)
        assert a.get("failover_active") == 1
        assert len(plant.gaps()) == 1, plant.gaps()
        assert result.reported_lost == lost_records > 0
        assert t.out_of_order == 0
        return result
    finally:
        sub.close()
        await plant.close()


FROZEN_S = 6.0


async def active_frozen(
    tmp: Path, broker: Mosquitto, *, rate: int = 1000, seed: int = SEED
) -> Result:
    """The active receiver frozen (SIGSTOP) for 6 s, its broker connection still open (no
    last will): the standby takes over after takeover_after_s of silence; the frozen one,
    resumed (SIGCONT), hears the later claim and steps down. 0 lost; the overlap is
    reported."""
    result = Result(
        f"18. standby receiver, active frozen {FROZEN_S:.0f} s (SIGSTOP) then resumed, "
        f"{rate:,} updates/s",
        seed=seed,
    )
    sources = rate_sources(rate)
    plant = PairPlant(tmp, broker, sources, output=rate_output(rate))
    sub = Subscriber(broker.port)
    fig: dict[str, Any] = {}

    async def freeze() -> None:
        assert plant.rx is not None
        assert plant.rx_b is not None
        a, b = plant.rx, plant.rx_b
        await wait_until(lambda: sub.count_good() > 3 * rate, what="values flowing")
        fig["stopped"] = time.time()
        os.kill(a.pid, signal.SIGSTOP)
        await wait_until(lambda: bool(_took_over(b)), within=4 * TAKEOVER_S, what="b took over")
        await asyncio.sleep(max(FROZEN_S - (time.time() - fig["stopped"]), 0.0))
        os.kill(a.pid, signal.SIGCONT)
        fig["resumed"] = time.time()
        await wait_until(lambda: bool(a.events("failover: stepping down")), what="a stepped down")
        before = sub.count_good()
        await wait_until(lambda: sub.count_good() > before + 3 * rate, what="values after")
        await asyncio.sleep(1.0)

    try:
        await _counted_run(plant, sub, result, 0, during=freeze, finish=_pair_finish)
        assert plant.rx is not None
        assert plant.rx_b is not None
        a, b = plant.counters_of("a"), plant.counters_of("b")
        result.reported_lost = a.get("records_lost", 0) + b.get("records_lost", 0)
        result.rejected = rejected(b)
        t = _tallied(result, sub, sources)
        (taking,) = _took_over(plant.rx_b)
        (down,) = plant.rx.events("failover: stepping down")
        result.note(
            f"b took over {_log_s(taking) - fig['stopped']:.1f} s after a was frozen "
            f"({taking['reason']}); a, resumed, stepped down "
            f"{_log_s(down) - fig['resumed']:.2f} s later ({down['reason']}); "
            f"{t.duplicates} values published twice (what a published after its last "
            f"announcement, published again by b; a published nothing after it resumed), "
            f"{t.out_of_order} arrived behind a larger one; gaps reported {len(plant.gaps())}; "
            f"a's failover_stepdowns {a.get('failover_stepdowns')}, b's failover_active "
            f"{b.get('failover_active')}"
        )
        assert "nothing heard" in taking["reason"], taking
        assert "did not run" in down["reason"], down
        assert a.get("failover_active") == 0
        assert b.get("failover_active") == 1
        assert not plant.gaps(), plant.gaps()
        t.assert_none_missing()
        return result
    finally:
        sub.close()
        await plant.close()

"""SIGHUP re-reads the transmitter's config: a real diode-tx process, a real PLC, real UDP.

Before (issue 14, item 9) SIGHUP simply terminated the daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diode.keys import load_signing_key, write_keypair
from diode.records import Quality, TagInfo
from tests.support.modbus_server import ModbusSimServer
from tests.test_transmitter import Link
from transmitter.app import _cancel

BIN = Path(sys.executable).parent


def tx_toml(keys: Path, state: Path, link_port: int, devices: list[dict[str, Any]]) -> str:
    """A transmitter config in TOML (JSON's strings and numbers are TOML's too)."""
    lines = [
        "[transmitter]",
        "stream_id = 3",
        f'private_key = "{keys / "tx.key"}"',
        f'state_dir = "{state}"',
        "catalogue_period_s = 30.0",  # long: a reload must send the catalogue by itself
        "heartbeat_interval_s = 0.2",
        "[link]",
        'destination = "127.0.0.1"',
        f"port = {link_port}",
        "rate_mbps = 20.0",
        "[log]",
        'format = "json"',
    ]
    for device in devices:
        lines += ["[[modbus.devices]]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in device.items() if k != "tags"]
        lines += ["[[modbus.devices.units]]", "id = 1"]
        for tag in device["tags"]:
            lines += ["[[modbus.devices.units.tags]]"]
            lines += [f"{k} = {json.dumps(v)}" for k, v in tag.items()]
    return "\n".join(lines) + "\n"


def plc(name: str, port: int, *tags: str) -> dict[str, Any]:
    return {
        "name": name,
        "host": "127.0.0.1",
        "port": port,
        "poll_interval_s": 0.05,
        "timeout_s": 0.5,
        "read_identity": False,
        "tags": [
            {"name": t, "table": "holding_register", "address": 10 * i, "type": "uint16"}
            for i, t in enumerate(tags)
        ],
    }


def names(link: Link) -> dict[str, int]:
    return {f"{r.device}/{r.name}": r.tag_id for r in link.records if isinstance(r, TagInfo)}


def has_value(link: Link, name: str, value: int) -> Callable[[], bool]:
    def check() -> bool:
        tag_id = names(link).get(name)
        return tag_id is not None and any(
            s.quality is Quality.GOOD and s.value == value for s in link.samples(tag_id)
        )

    return check


async def test_sighup_applies_new_tags_and_devices_and_keeps_a_bad_config_out(
    tmp_path: Path,
) -> None:
    write_keypair(tmp_path, "tx")
    link = Link(load_signing_key(tmp_path / "tx.key"), 3)
    config = tmp_path / "tx.toml"
    state = tmp_path / "state"
    async with ModbusSimServer(units=[1]) as one, ModbusSimServer(units=[1]) as two:
        one.set_registers(1, "holding_register", 0, [11])
        one.set_registers(1, "holding_register", 10, [12])
        two.set_registers(1, "holding_register", 0, [21])
        config.write_text(tx_toml(tmp_path, state, link.port, [plc("plc1", one.port, "a")]))
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "diode-tx"),
            "--config",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        try:
            await link.wait_for(has_value(link, "plc1/a", 11), within=20)
            requests_before = one.requests()

            # A new tag on plc1 and a whole new device: applied by SIGHUP, no restart.
            config.write_text(
                tx_toml(
                    tmp_path,
                    state,
                    link.port,
                    [plc("plc1", one.port, "a", "b"), plc("plc2", two.port, "c")],
                )
            )
            proc.send_signal(signal.SIGHUP)
            await link.wait_for(has_value(link, "plc1/b", 12), within=10)
            await link.wait_for(has_value(link, "plc2/c", 21), within=10)
            assert proc.returncode is None
            assert one.requests() > requests_before
            ids = names(link)
            assert ids["plc1/a"] != ids["plc1/b"]

            # A config that fails validation: logged, the running one kept.
            config.write_text(
                tx_toml(tmp_path, state, link.port, [plc("plc1", one.port, "a")]).replace(
                    '"uint16"', '"uint17"'
                )
            )
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(1.0)
            assert proc.returncode is None, "a bad config must not stop the transmitter"
            one.set_registers(1, "holding_register", 10, [13])
            two.set_registers(1, "holding_register", 0, [22])
            await link.wait_for(has_value(link, "plc1/b", 13), within=10)
            await link.wait_for(has_value(link, "plc2/c", 22), within=10)

            # Removing a device stops its polling; the unchanged one polls on.
            config.write_text(
                tx_toml(tmp_path, state, link.port, [plc("plc1", one.port, "a", "b")])
            )
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(1.0)
            seen = two.requests()
            await asyncio.sleep(0.5)
            assert two.requests() == seen, "a removed device is no longer polled"
            await link.wait_for(
                lambda: any(
                    s.quality is Quality.BAD and "removed" in s.reason
                    for s in link.samples(names(link)["plc2/c"])
                ),
                within=5,
            )
            one.set_registers(1, "holding_register", 0, [14])
            await link.wait_for(has_value(link, "plc1/a", 14), within=10)
            assert proc.returncode is None
        finally:
            proc.send_signal(signal.SIGTERM)
            _, raw = await asyncio.wait_for(proc.communicate(), 15)
    err = raw.decode()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"].startswith("config reload failed")]
    assert len(failed) == 1
    assert "tx.toml" in failed[0]["error"]
    assert "modbus.devices[0].units[0].tags[0].type" in failed[0]["error"]
    stopped = next(e for e in events if e["event"] == "transmitter stopped")
    assert (stopped["config_reloads"], stopped["config_reload_failures"]) == (2, 1)
    reloaded = [e for e in events if e["event"] == "config reloaded"]
    assert [(e["added"], e["changed"], e["removed"], e["unchanged"]) for e in reloaded] == [
        (["plc2"], ["plc1"], [], 0),
        ([], [], ["plc2"], 1),
    ]
    assert "Traceback" not in err


async def test_a_poller_that_swallows_a_cancellation_cannot_hang_a_reload() -> None:
    """A reload stops a changed source's poller; one that swallowed the cancellation (its
    request ending at that moment) went on polling, and the reload awaited it for good."""
    swallowed = []

    async def poller() -> None:
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)

    task = asyncio.create_task(poller())
    await asyncio.sleep(0.01)
    await asyncio.wait_for(_cancel(task), timeout=10)
    assert swallowed
    assert task.cancelled()

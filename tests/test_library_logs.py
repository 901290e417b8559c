"""The libraries' warnings reach our log: one structlog line each, rate-limited, no traceback.

The daemons used to set asyncua's and pymodbus's loggers to CRITICAL, so a
certificate problem or a protocol error the library noticed was never seen.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from pymodbus.client import AsyncModbusTcpClient

from diode import daemon
from diode.loopback import free_port


@pytest.fixture
def json_log(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """The daemons' logging set up as under systemd (JSON lines); undone afterwards.

    Tests call ``daemon.setup_logging`` themselves: structlog writes to the
    ``sys.stderr`` of that moment, which capsys swaps only once the test runs.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved = structlog.get_config()
    try:
        yield capsys
    finally:
        # structlog would go on writing to this test's captured (then closed) stderr
        structlog.configure(**saved)
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_library_loggers_are_no_longer_silenced(json_log: pytest.CaptureFixture[str]) -> None:
    daemon.setup_logging("info", "json")
    for name in ("asyncua", "asyncua.client.ua_client", "pymodbus.logging", "paho"):
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    assert not logging.getLogger("asyncua").isEnabledFor(logging.INFO)


def test_a_library_warning_becomes_one_json_line(json_log: pytest.CaptureFixture[str]) -> None:
    daemon.setup_logging("info", "json")
    try:
        raise ConnectionResetError("peer went away")
    except ConnectionResetError:
        logging.getLogger("asyncua.client.ua_client").exception("lost %s", "the server")
    (line,) = lines(json_log)
    assert line["event"] == "lost the server"
    assert line["logger"] == "asyncua.client.ua_client"
    assert line["level"] == "error"
    assert line["error"] == "ConnectionResetError('peer went away')"  # no traceback lines


@pytest.fixture
def limited() -> Iterator[tuple[logging.Logger, list[float]]]:
    """A library logger going through a LibraryLogs handler on a clock the test moves."""
    now = [0.0]
    handler = daemon.LibraryLogs(interval_s=10.0, clock=lambda: now[0])
    log = logging.getLogger("pymodbus.test_limit")
    log.addHandler(handler)
    log.propagate = False
    try:
        yield log, now
    finally:
        log.removeHandler(handler)
        log.propagate = True


def test_repeats_are_held_back_and_counted(limited: tuple[logging.Logger, list[float]]) -> None:
    log, now = limited
    with structlog.testing.capture_logs() as events:
        for i in range(50):
            log.warning("retry %d failed", i)
        assert len(events) == 1
        now[0] = 9.9
        log.warning("retry %d failed", 50)
        now[0] = 10.0
        log.warning("retry %d failed", 51)
    assert [e["event"] for e in events] == ["retry 0 failed", "retry 51 failed"]
    assert [e.get("suppressed") for e in events] == [None, 50]


def test_messages_formatted_by_the_library_are_bounded_too(
    limited: tuple[logging.Logger, list[float]],
) -> None:
    log, now = limited
    with structlog.testing.capture_logs() as events:
        for i in range(500):
            log.warning(f"datagram {i} malformed")
        assert len(events) == daemon.LIBRARY_LOG_BUDGET
        now[0] = 10.0
        log.warning("datagram 0 malformed")
    assert len(events) == daemon.LIBRARY_LOG_BUDGET + 1


async def test_pymodbus_connection_failure_reaches_the_log(
    json_log: pytest.CaptureFixture[str],
) -> None:
    daemon.setup_logging("info", "json")
    client = AsyncModbusTcpClient("127.0.0.1", port=free_port(), timeout=0.5, retries=0)
    try:
        assert not await client.connect()
        await asyncio.sleep(0)
    finally:
        client.close()
    found = [line for line in lines(json_log) if str(line.get("logger", "")).startswith("pymodbus")]
    assert found, "pymodbus said nothing, or it was silenced"
    assert all(line["level"] in ("warning", "error") for line in found)

"""What both daemons share around their pipelines: logging, systemd notification, signals.

This module is shell, not core: it touches sockets and signals. The protocol
modules (wire, fec, keys, replay, encoder, decoder) never import it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import structlog

from diode.config import Section, load
from diode.errors import ConfigError, KeyFileError, LinkError, ListenError

C = TypeVar("C", bound=Section)


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    """structlog to stderr: JSON lines under systemd or when asked, readable on a terminal."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # asyncua logs a traceback at every lost connection; our poller reports the loss once.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) something; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)  # a manager that stopped reading must never stall the loop
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            return False
    return True


async def watchdog() -> None:
    """Ping systemd's watchdog at half its interval while the event loop is alive."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0:
        return
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2e6)


def load_config(model: type[C], path: Path) -> C:
    """Load a config or exit with status 2 and one line naming the file and the key."""
    try:
        config = load(model, path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    resolve = getattr(config, "resolve", None)
    return resolve(path) if resolve is not None else config


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run a daemon's main coroutine; SIGTERM and SIGINT set the stop event it watches."""

    async def _outer() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(_outer())
    except (KeyFileError, LinkError, ListenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

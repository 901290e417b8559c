"""What both daemons share around their pipelines: logging, systemd notification, signals.

This module is shell, not core: it touches sockets and signals. The protocol
modules (wire, fec, keys, replay, encoder, decoder) never import it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import structlog

from diode.config import Section, load
from diode.errors import ConfigError, DiodeError, KeyFileError, LinkError, SettingError

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
    # The libraries' own warnings (asyncua, pymodbus, paho, Python's warnings) are
    # not silenced: they become structlog events like ours, one line each, rate-limited.
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, LibraryLogs):
            root.removeHandler(handler)
    root.addHandler(LibraryLogs())
    root.setLevel(logging.WARNING)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET)  # inherit WARNING from the root
    logging.captureWarnings(True)


LIBRARIES = ("asyncua", "pymodbus", "paho", "aiomqtt")
LIBRARY_LOG_INTERVAL_S = 10.0
LIBRARY_LOG_KINDS = 1000  # distinct messages remembered for the rate limit, at most
LIBRARY_LOG_BUDGET = 20  # lines per library per interval, whatever their messages


class LibraryLogs(logging.Handler):
    """Records from the stdlib ``logging`` tree, as structlog events, rate-limited per message.

    asyncua logs a traceback at every lost connection and pymodbus a line at
    every failed retry: each message (by its template, not its arguments) is
    passed on at most once per ``interval_s``, with the count of the ones held
    back since, and an exception becomes its ``repr`` instead of a traceback, so
    the log stays one JSON object per line. Messages formatted before logging
    (each one different) are bounded too: a library gets ``LIBRARY_LOG_BUDGET``
    lines per interval.
    """

    def __init__(
        self,
        interval_s: float = LIBRARY_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(level=logging.WARNING)
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}
        self._spent: dict[str, tuple[float, int]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        kind = (record.name, str(record.msg))
        now = self._clock()
        last = self._last.get(kind)
        library = record.name.split(".")[0]
        started, spent = self._spent.get(library, (now, 0))
        if now - started >= self._interval_s:
            started, spent = now, 0
        if (last is not None and now - last < self._interval_s) or spent >= LIBRARY_LOG_BUDGET:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._spent[library] = (started, spent + 1)
        if len(self._last) >= LIBRARY_LOG_KINDS:
            self._last.clear()
        self._last[kind] = now
        fields: dict[str, object] = {"logger": record.name}
        held = self._held.pop(kind, 0)
        if held:
            fields["suppressed"] = held
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = repr(record.exc_info[1])
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        try:
            structlog.get_logger("diode.library").log(record.levelno, message, **fields)
        except Exception:  # a log line must never take the daemon down
            self.handleError(record)


def freeze_heap() -> None:
    """Take what the daemon built at start (modules, config, clients) out of the cyclic
    garbage collector's sight: its full collections then walk only what came later.

    Without it, at a high rate a full collection walked the whole heap every 2 s or
    so and held the event loop 27-45 ms each time; the transmitter's pacer, whose
    bucket holds 4 ms, lost 2 % of the link's capacity to them (docs/BENCHMARKS.md,
    "Full collections"). With it they take 2-6 ms. Frozen objects are never
    collected by it, and nearly all live as long as the process anyway; one that a
    transmitter reload replaces is freed by reference counting, or kept if it sits
    in a cycle: never more than start-up made, since what a reload makes is not
    frozen.
    """
    gc.collect()
    gc.freeze()


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


def start_failure(exc: BaseException) -> DiodeError | None:
    """The start-up error a user can fix, even from inside a task group's exception group."""
    if isinstance(exc, SettingError | KeyFileError | LinkError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = start_failure(inner)
            if found is not None:
                return found
    return None


def run(main: Callable[[asyncio.Event], Awaitable[None]], config: Path | None = None) -> int:
    """Run a daemon's main coroutine; SIGTERM and SIGINT set the stop event it watches.

    A setting this host cannot honour (a port in use, a missing interface) ends
    the run with one line naming the config file and the key, and status 2.
    """

    async def _outer() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(_outer())
    except (DiodeError, BaseExceptionGroup) as exc:
        failure = start_failure(exc)
        if failure is None:
            raise
        where = f"{config}: " if config is not None and isinstance(failure, SettingError) else ""
        print(f"error: {where}{failure}", file=sys.stderr)
        return 2
    return 0

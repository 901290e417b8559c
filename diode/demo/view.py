"""What the demo shows: the live terminal view, progress lines, the final summary, the log tail.

Everything here renders a :class:`Snapshot`, the figures of one instant,
gathered by the demo from its parts; nothing here touches a socket.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import traceback
from collections import deque
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, TextIO

import structlog
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

LOG_LINES = 6
QUALITY_STYLE = {"good": "green", "uncertain": "yellow", "bad": "red", "stale": "magenta"}
LEVEL_STYLE = {"warning": "yellow", "error": "red", "critical": "bold red"}


@dataclass(frozen=True, slots=True, kw_only=True)
class TagRow:
    """One tag as the subscriber last saw it."""

    topic: str
    value: Any
    quality: str
    age_s: float | None  # since the sample's source timestamp (arrival if it has none)
    messages: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """The demo's figures at one instant."""

    elapsed_s: float
    broker: str
    loss: float
    sent: int  # datagrams the transmitter sent
    relay_received: int
    relay_dropped: int
    datagrams: int  # datagrams the receiver read
    blocks_whole: int
    blocks_rebuilt: int
    records_lost: int
    surplus: int  # repair symbols that arrived after their block was whole
    rejected: dict[str, int]  # reason -> datagrams (surplus not included)
    published: int  # messages the subscriber received on tag topics
    tags: list[TagRow]
    expected_tags: int
    files: dict[str, int] | None = None  # --files: dropped, sent, ok, identical, ...

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def summary(self) -> dict[str, Any]:
        """The final summary, as ``--json`` prints it."""
        return {
            "duration_s": round(self.elapsed_s, 1),
            "broker": self.broker,
            "loss": self.loss,
            "sent": self.sent,
            "published": self.published,
            "lost": self.records_lost,
            "rebuilt": self.blocks_rebuilt,
            "rejected": self.rejected_total,
            "surplus": self.surplus,
            "link": {
                "relay_received": self.relay_received,
                "relay_dropped": self.relay_dropped,
                "datagrams_received": self.datagrams,
                "blocks_whole": self.blocks_whole,
                "blocks_rebuilt": self.blocks_rebuilt,
                "records_lost": self.records_lost,
                "rejected_by_reason": dict(sorted(self.rejected.items())),
            },
            "tags": {
                row.topic: {"value": row.value, "quality": row.quality, "messages": row.messages}
                for row in self.tags
            },
        } | ({"files": dict(self.files)} if self.files is not None else {})


# -- formatting ------------------------------------------------------------------------


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "ON" if value else "off"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def sample_age_s(payload: dict[str, Any], arrived_ago_s: float, now: dt.datetime) -> float:
    """Seconds since the sample's ``ts`` (ISO 8601, UTC), or since it arrived if unparseable."""
    ts = payload.get("ts")
    if isinstance(ts, str):
        try:
            when = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
        except ValueError:
            return arrived_ago_s
        if when.tzinfo is not None:
            return max((now - when).total_seconds(), 0.0)
    return arrived_ago_s


def percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "-"


def progress_line(snap: Snapshot) -> str:
    """One line of figures, for a stdout that is not a terminal."""
    return (
        f"[{snap.elapsed_s:6.1f} s] sent {snap.sent}  "
        f"dropped {snap.relay_dropped} ({percent(snap.relay_dropped, snap.relay_received)})  "
        f"rebuilt {snap.blocks_rebuilt}  lost {snap.records_lost}  "
        f"rejected {snap.rejected_total}  published {snap.published}  "
        f"tags {len(snap.tags)}/{snap.expected_tags}"
        + (
            "  files " + " ".join(f"{k} {v}" for k, v in snap.files.items())
            if snap.files is not None
            else ""
        )
    )


# -- rich renderables ------------------------------------------------------------------


def tag_table(snap: Snapshot) -> Table:
    table = Table(title="Tags on MQTT", expand=True, title_justify="left")
    table.add_column("topic", style="cyan", no_wrap=True)
    table.add_column("value", justify="right")
    table.add_column("age (s)", justify="right")
    table.add_column("quality")
    table.add_column("msgs", justify="right")
    for row in snap.tags:
        age = "-" if row.age_s is None else f"{row.age_s:.1f}"
        quality = Text(row.quality, style=QUALITY_STYLE.get(row.quality, ""))
        table.add_row(row.topic, format_value(row.value), age, quality, str(row.messages))
    missing = snap.expected_tags - len(snap.tags)
    if missing > 0:
        table.add_row(Text(f"({missing} tag(s) not seen yet)", style="dim"), "", "", "", "")
    return table


def link_table(snap: Snapshot) -> Table:
    table = Table(title="One-way link", expand=True, title_justify="left", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("datagrams sent (transmitter)", str(snap.sent))
    table.add_row(
        f"dropped by the relay (loss {snap.loss:.1%})",
        f"{snap.relay_dropped} ({percent(snap.relay_dropped, snap.relay_received)})",
    )
    table.add_row("datagrams received (receiver)", str(snap.datagrams))
    table.add_row("blocks whole", str(snap.blocks_whole))
    table.add_row("blocks rebuilt by FEC", Text(str(snap.blocks_rebuilt), style="green"))
    lost_style = "bold red" if snap.records_lost else "green"
    table.add_row("records lost", Text(str(snap.records_lost), style=lost_style))
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(snap.rejected.items())) or "none"
    table.add_row("repair symbols not needed (block already whole)", str(snap.surplus))
    table.add_row("datagrams rejected", f"{snap.rejected_total} ({rejected})")
    table.add_row("messages published (tags)", str(snap.published))
    return table


def log_panel(lines: deque[tuple[str, str]]) -> Panel:
    rows: list[RenderableType] = [
        Text.assemble((f"{level:<8}", LEVEL_STYLE.get(level, "dim")), line, no_wrap=True)
        for level, line in lines
    ] or [Text("(nothing yet)", style="dim")]
    for row in rows:
        if isinstance(row, Text):
            row.overflow = "ellipsis"  # one line each: the daemons' final counters are long
    return Panel(Group(*rows), title="log", title_align="left")


def render(snap: Snapshot, lines: deque[tuple[str, str]]) -> RenderableType:
    header = Text.assemble(
        ("diode demo", "bold"),
        f"  PLC + OPC UA -> transmitter -> lossy link -> receiver -> MQTT ({snap.broker})",
        f"   {snap.elapsed_s:.0f} s   Ctrl-C stops",
    )
    return Group(header, tag_table(snap), link_table(snap), log_panel(lines))


# -- the log tail ----------------------------------------------------------------------


class LogTail(logging.Handler):
    """The daemons' log events, kept for the view; warnings echoed to stderr without it.

    A structlog processor (the last of the chain) and a stdlib logging handler
    both feed it, so the live view is not torn by lines written under it.
    """

    def __init__(self, *, echo: bool, stream: TextIO | None = None) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: deque[tuple[str, str]] = deque(maxlen=LOG_LINES)
        self.echo = echo
        self.stream = stream or sys.stderr

    def add(self, level: str, text: str, detail: str = "") -> None:
        self.lines.append((level, text))
        if self.echo and level in ("warning", "error", "critical"):
            print(f"{level}: {text}{detail}", file=self.stream)

    def processor(
        self, _logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        level = str(event.pop("level", method))
        event.pop("timestamp", None)
        message = str(event.pop("event", ""))
        detail = str(event.pop("exception", ""))
        fields = " ".join(f"{key}={value}" for key, value in event.items())
        self.add(level, f"{message} {fields}".rstrip(), f"\n{detail}" if detail else "")
        raise structlog.DropEvent

    def emit(self, record: logging.LogRecord) -> None:
        detail = ""
        if record.exc_info and record.exc_info[1] is not None:
            # A stdlib error with a traceback is a bug somewhere: show all of it.
            detail = "\n" + "".join(traceback.format_exception(record.exc_info[1]))
        self.add(record.levelname.lower(), f"{record.name}: {record.getMessage()}", detail)

    def install(self) -> None:
        """Route structlog (the daemons) and stdlib logging (the libraries) here."""
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.format_exc_info,
                self.processor,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            cache_logger_on_first_use=False,
        )
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(self)
        root.setLevel(logging.WARNING)
        # These libraries log a traceback at every dropped connection, which the
        # daemons report once in their own words.
        for name in ("asyncua", "pymodbus", "amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

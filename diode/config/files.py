"""File transfer settings: the transmitter's lane and watched folders, the receiver's target."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from diode.config import Section
from diode.config.link import FecSettings

# What one receiver core drained of a file lane, on the wire, with the lane's own FEC
# (k 128, 8 + 4 repair), both daemons on one 2-core host at a 1000 Mb/s link cap
# (docs/BENCHMARKS.md §7): 500 Mb/s took 0.91 of its core, 1000 overflowed its socket.
# Above it the transmitter warns at start.
RECEIVER_FILE_MBPS = 500.0
# The lane's default ceiling: 0.6 of that core (measured), the rest left for the tag
# values, MQTT and a busy host; files complete at any link cap by default.
FILE_LANE_MBPS = 300.0


class FileLane(Section):
    """``[file_lane]``: the stream files travel on, beside the tag values' stream.

    The lane sends at ``share`` of ``link.rate_mbps``, and never faster than its
    own ``rate_mbps``. The receiver can never ask the transmitter to slow down:
    a lane faster than the receiver host verifies and writes overflows the
    receiver's file socket, every file ends ``incomplete`` and no repetition
    can help, since every round is lost the same way. What a plant needs is
    the file whole, not the link's line rate, so the default ceiling (300 Mb/s)
    is what one receiver core drained here with room to spare (0.6 of it; 500
    Mb/s took 0.91, the 1000 Mb/s link cap overflowed): files complete at any
    link cap as shipped. The transmitter warns at start above 500 Mb/s, and
    the receiver warns when its file socket overflows
    (``diode_rx_file_kernel_drops_total``); raise ``rate_mbps`` only as far as
    ``diode bench files`` shows the receiver host carries.
    """

    stream_id: int = Field(
        ge=0, le=2**32 - 1, description="the file lane's own stream id (not the tag stream's)"
    )
    private_key: Path = Field(
        description="the lane's own Ed25519 key (diode keygen --name files): a key id "
        "names one stream",
        strict=False,
    )
    share: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="share of link.rate_mbps files may use; tag values always go first",
    )
    rate_mbps: float = Field(
        FILE_LANE_MBPS,
        gt=0.0,
        le=100_000.0,
        description="the lane's ceiling on the wire, whatever share x link.rate_mbps allows: "
        "the receiver can never slow the lane down, and a lane faster than the receiver "
        "host drains overflows its socket and loses every file; the default leaves 40 % of "
        "one receiver core free (docs/BENCHMARKS.md §7): raise it only as far as "
        "diode bench files shows your receiver host carries",
    )
    queue_blocks: int = Field(
        4,
        ge=1,
        le=64,
        description="file blocks queued for the pacer at once, behind the tag values",
    )
    fec: FecSettings | None = Field(
        None,
        description="the lane's own FEC (unset: link.fec); larger blocks with less repair "
        "carry more file per datagram, and repeat or carousel_s cover what it cannot; the "
        "receiver's [streams.link] of the lane, if set, must say the same",
    )
    port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="UDP port the lane's datagrams go to (the receiver's file_port), so a "
        "file can only ever fill its own socket there; unset: link.port, beside the tags",
    )

    def wire_mbps(self, link_rate_mbps: float) -> float:
        """The lane's rate on the wire: its share of the link, at most its own ceiling."""
        return min(self.share * link_rate_mbps, self.rate_mbps)


class FilesWatch(Section):
    """``[[files]]``: one OT folder whose finished files go through the diode."""

    directory: Path = Field(description="the folder to watch", strict=False)
    pattern: str = Field("*", min_length=1, description="file name pattern (fnmatch), e.g. *.csv")
    recursive: bool = Field(False, description="also watch sub-folders (names keep the sub-path)")
    complete_when: Literal["unchanged", "renamed"] = Field(
        "unchanged",
        description="unchanged: size and mtime unchanged for unchanged_s; renamed: the writer "
        "renames the finished file into place, so a file is complete when it appears",
    )
    unchanged_s: float = Field(
        5.0, ge=0.0, le=86400.0, description="quiet time that makes a file complete"
    )
    after_send: Literal["keep", "move", "delete"] = Field(
        "keep", description="keep, move to the sent/ sub-folder, or delete once sent"
    )
    repeat: int = Field(
        1, ge=1, le=100, description="times each file is sent (for loss beyond the FEC budget)"
    )
    carousel_s: float = Field(
        0.0,
        ge=0.0,
        le=7 * 86400.0,
        description="send the files of the last carousel_s again and again while no new file "
        "waits (3600: the last hour's files), for losses beyond the FEC budget; 0 = off. "
        "after_send (move, delete) then happens when a file leaves the carousel",
    )
    poll_s: float = Field(
        1.0, gt=0.0, le=3600.0, description="folder scan period when inotify is not available"
    )


class FilesOutput(Section):
    """``[streams.files]``: a file lane's stream writes files here instead of tag values."""

    directory: Path = Field(description="the target folder", strict=False)
    overwrite: bool = Field(False, description="replace an existing file of the same name")
    expire_s: float = Field(
        3600.0, gt=0.0, le=30 * 86400.0, description="an incomplete file is given up after this"
    )
    max_file_mb: float = Field(
        1_000_000.0, gt=0.0, le=1e9, description="larger announced files are refused"
    )

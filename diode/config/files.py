"""File transfer settings: the transmitter's lane and watched folders, the receiver's target."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from diode.config import Section
from diode.config.link import FecSettings


class FileLane(Section):
    """``[file_lane]``: the stream files travel on, beside the tag values' stream."""

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

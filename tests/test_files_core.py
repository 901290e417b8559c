"""The file lane's core: records, names and chunk maps (no I/O, no event loop)."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from diode.errors import FrameError
from diode.files import (
    KIND_FILE_CHUNK,
    KIND_FILE_HOLES,
    KIND_FILE_MANIFEST,
    ChunkMap,
    FileChunk,
    FileHoles,
    FileManifest,
    FileNameError,
    chunk_count,
    sanitise_name,
)
from diode.records import decode_records, encode_records


def _manifest(name: str = "report 1.csv", size: int = 100_000, chunk: int = 45_000) -> FileManifest:
    return FileManifest.of(
        name=name,
        size=size,
        mtime_ns=1_700_000_000_123_456_789,
        sha256=b"\x11" * 32,
        chunk_size=chunk,
    )


def _decode_one(item: list[object]) -> object:
    payload = msgpack.packb(item, use_bin_type=True)
    return decode_records(payload, 1)[0]


def test_manifest_and_chunk_round_trip() -> None:
    manifest = _manifest()
    final = FileManifest(**{**_fields(manifest), "final": True})
    chunk = FileChunk(file_id=manifest.file_id, index=2, data=b"\x00" * 10_000)
    assert decode_records(encode_records([manifest, final, chunk]), 3) == [manifest, final, chunk]
    assert manifest.chunks == 3
    assert [manifest.chunk_length(i) for i in range(3)] == [45_000, 45_000, 10_000]
    holes = FileHoles(file_id=manifest.file_id, first=1, count=2**32)
    assert decode_records(encode_records([holes]), 1) == [holes]


def _fields(m: FileManifest) -> dict[str, object]:
    return {s: getattr(m, s) for s in FileManifest.__slots__}


def test_the_file_id_names_every_field() -> None:
    base = _manifest()
    assert _manifest(name="report 2.csv").file_id != base.file_id
    assert _manifest(size=100_001).file_id != base.file_id
    assert _manifest(chunk=45_001).file_id != base.file_id
    assert _manifest().file_id == base.file_id  # the same file is the same id in every run


def test_a_manifest_whose_id_does_not_match_is_refused() -> None:
    m = _manifest()
    item = [
        KIND_FILE_MANIFEST,
        m.file_id ^ 1,
        m.name,
        m.size,
        m.mtime_ns,
        m.sha256,
        m.chunk_size,
        False,
    ]
    with pytest.raises(FrameError) as exc:
        _decode_one(item)
    assert exc.value.reason == "bad_record"


@pytest.mark.parametrize(
    "change",
    [
        {2: b"name as bytes"},
        {2: ""},
        {2: "x" * 1025},
        {3: -1},
        {3: 2**63},
        {3: True},
        {5: b"\x00" * 31},
        {5: "a" * 32},
        {6: 0},
        {6: 2**20 + 1},
        {7: 1},
        {4: 2**63},
    ],
)
def test_every_manifest_field_is_bounds_checked(change: dict[int, object]) -> None:
    m = _manifest()
    item: list[object] = [
        KIND_FILE_MANIFEST,
        m.file_id,
        m.name,
        m.size,
        m.mtime_ns,
        m.sha256,
        m.chunk_size,
        False,
    ]
    for position, value in change.items():
        item[position] = value
    with pytest.raises(FrameError):
        _decode_one(item)


@pytest.mark.parametrize(
    "item",
    [
        [KIND_FILE_CHUNK, 1, 0, b""],
        [KIND_FILE_CHUNK, 1, 0, "text"],
        [KIND_FILE_CHUNK, 1, -1, b"x"],
        [KIND_FILE_CHUNK, 1, 2**32, b"x"],
        [KIND_FILE_CHUNK, -1, 0, b"x"],
        [KIND_FILE_CHUNK, 1, 0, b"x" * (2**20 + 1)],
        [KIND_FILE_CHUNK, 1, 0],
        [KIND_FILE_CHUNK, 1, 0, b"x", 5],
        [KIND_FILE_HOLES, 1, 0, 0],
        [KIND_FILE_HOLES, 1, -1, 1],
        [KIND_FILE_HOLES, 1, 2**32, 1],
        [KIND_FILE_HOLES, 1, 0, 2**32 + 1],
        [KIND_FILE_HOLES, -1, 0, 1],
        [KIND_FILE_HOLES, 1, 0, True],
        [KIND_FILE_HOLES, 1, 0],
    ],
)
def test_every_chunk_field_is_bounds_checked(item: list[object]) -> None:
    with pytest.raises(FrameError):
        _decode_one(item)


def test_too_many_chunks_for_a_u32_index() -> None:
    size, chunk = 2**33, 1
    sha = hashlib.sha256(b"").digest()
    m = FileManifest.of(name="big", size=size, mtime_ns=0, sha256=sha, chunk_size=chunk)
    with pytest.raises(FrameError):
        decode_records(encode_records([m]), 1)


@given(st.binary(max_size=200))
def test_any_bytes_give_records_or_a_frame_error(data: bytes) -> None:
    # An array header of the right length, the kind, then anything.
    for header in (bytes([0x98, KIND_FILE_MANIFEST]), bytes([0x94, KIND_FILE_CHUNK])):
        try:
            records = decode_records(header + data, 1)
        except FrameError:
            continue
        assert isinstance(records[0], FileManifest | FileChunk)


@pytest.mark.parametrize(
    "name",
    [
        "report.csv",
        "with spaces in it.txt",
        "ünïcødé - 報告 ✓.bin",
        "sub/dir/file.dat",
        "a",
        "CONSOLE.txt",
        "2026-12-06 12.00.00.png",
    ],
)
def test_ordinary_names_pass(name: str) -> None:
    assert str(sanitise_name(name)) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/etc/passwd",
        "../escape",
        "a/../../escape",
        "a/./b",
        "a//b",
        "./a",
        ".bashrc",
        "sub/.ssh/authorized_keys",
        ".diode-part-1234",
        "CON",
        "con.txt",
        "nul",
        "LPT1.log",
        "sub/COM3",
        "aux .txt",
        "bell\x07.txt",
        "new\nline",
        "tab\tname",
        "nul\x00byte",
        "del\x7f",
        "c1\x85",
        "gnp.\u202eexe",
        "back\\slash",
        "C:evil",
        "ends with dot.",
        "ends with space ",
        "x" * 256,
        "/".join(["d"] * 17),
        "a" * 1025,
        "sur\udc80rogate",
    ],
)
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(FileNameError) as exc:
        sanitise_name(name)
    assert exc.value.reason == "bad_name"


def test_chunk_map_counts_and_lists_what_is_missing() -> None:
    chunks = ChunkMap(20)
    for index in [*range(0, 5), *range(8, 15), 19]:
        assert chunks.add(index)
    assert not chunks.add(3)
    assert chunks.have == 13
    assert not chunks.complete
    assert chunks.missing() == [(5, 7), (15, 18)]
    again = ChunkMap(20, chunks.to_bytes())
    assert again.have == 13
    assert again.missing() == chunks.missing()
    for index in [5, 6, 7, 15, 16, 17, 18]:
        again.add(index)
    assert again.complete
    assert again.missing() == []
    assert ChunkMap(0).complete
    assert chunk_count(0, 10) == 0
    assert chunk_count(1, 10) == 1
    assert chunk_count(10, 10) == 1

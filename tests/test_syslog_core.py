"""The syslog core (diode/syslog.py, LogRecord in diode/records.py): no I/O, no clock."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diode.errors import FrameError
from diode.records import LOG_LIMITS, LogFormat, LogRecord, decode_records, encode_record
from diode.syslog import (
    Deframer,
    SourceLimiter,
    TokenBucket,
    event_record,
    octet_counted,
    parse_general,
    parse_sd,
    parse_syslog,
    render_5424,
    rfc3339_us,
    to_ecs,
)

# RFC 5424 section 6.5, examples 1 and 3; RFC 3164 section 5.4, example 1.
EXAMPLE_5424 = (
    b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - "
    b"\xef\xbb\xbf'su root' failed for lonvick on /dev/pts/8"
)
EXAMPLE_5424_SD = (
    b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 "
    b'[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"]'
    b'[examplePriority@32473 class="high"] An application event'
)
EXAMPLE_3164 = b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8"


def test_rfc5424_example() -> None:
    p = parse_syslog(EXAMPLE_5424)
    assert p.format == LogFormat.RFC5424
    assert (p.pri, p.timestamp, p.hostname, p.app_name, p.procid, p.msgid, p.sd) == (
        34,
        "2003-10-11T22:14:15.003Z",
        "mymachine.example.com",
        "su",
        "",
        "ID47",
        "",
    )
    assert p.msg == b"\xef\xbb\xbf'su root' failed for lonvick on /dev/pts/8"


def test_rfc5424_structured_data_kept_and_readable() -> None:
    p = parse_syslog(EXAMPLE_5424_SD)
    assert p.format == LogFormat.RFC5424
    assert p.msg == b"An application event"
    assert parse_sd(p.sd) == {
        "exampleSDID@32473": {"iut": "3", "eventSource": "Application", "eventID": "1011"},
        "examplePriority@32473": {"class": "high"},
    }


def test_rfc3164_example_and_what_logger_sends() -> None:
    p = parse_syslog(EXAMPLE_3164)
    assert (p.format, p.pri, p.timestamp, p.hostname, p.app_name) == (
        LogFormat.RFC3164,
        34,
        "Oct 11 22:14:15",
        "mymachine",
        "su",
    )
    assert p.msg == b"'su root' failed for lonvick on /dev/pts/8"
    p = parse_syslog(b"<13>Dec  6 16:14:34 root[123]: hello world\n")
    assert (p.hostname, p.app_name, p.procid, p.msg) == ("", "root", "123", b"hello world")


@pytest.mark.parametrize(
    "data", [b"no pri at all", b"<999>too high", b"<01>leading zero", b"", b"\xff\xfe<13>"]
)
def test_unparseable_is_kept_raw(data: bytes) -> None:
    p = parse_syslog(data)
    assert p.format == LogFormat.RAW
    assert p.msg == data


def test_broken_5424_falls_back_and_loses_nothing() -> None:
    data = b"<13>1 2003-10-11T22:14:15Z host app - - [unterminated sd"
    p = parse_syslog(data)
    assert p.format == LogFormat.RFC3164
    assert p.msg.endswith(b"[unterminated sd")


def test_overlong_fields_are_cut_to_their_bounds() -> None:
    p = parse_syslog(b"<13>" + b"x" * 100_000)
    assert p.truncated
    assert len(p.msg) == LOG_LIMITS["msg"]
    assert decode_records(encode_record(p.record(seq=0, ts_ns=0, source="h")), 1)


def test_log_record_round_trip_and_one_encoding() -> None:
    record = parse_syslog(EXAMPLE_5424_SD).record(seq=7, ts_ns=123, source="10.0.0.9")
    data = encode_record(record)
    assert decode_records(data, 1) == [record]
    assert encode_record(decode_records(data, 1)[0]) == data


@pytest.mark.parametrize(
    ("index", "bad"),
    [(1, -1), (5, 192), (5, -2), (4, 9), (12, "text, not bin"), (8, "a" * 49), (3, b"bin")],
)
def test_every_field_is_checked_on_decode(index: int, bad: object) -> None:
    record = parse_syslog(EXAMPLE_5424).record(seq=1, ts_ns=1, source="s")
    fields = msgpack.unpackb(encode_record(record), raw=False)
    fields[index] = bad
    with pytest.raises(FrameError) as caught:
        decode_records(msgpack.packb(fields, use_bin_type=True), 1)
    assert caught.value.reason == "bad_record"


def test_a_record_out_of_bounds_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="msgid"):
        LogRecord(seq=0, ts_ns=0, source="", format=LogFormat.RAW, msgid="m" * 33)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_parse_and_encode(data: bytes) -> None:
    record = parse_syslog(data).record(seq=1, ts_ns=2, source="1.2.3.4")
    assert decode_records(encode_record(record), 1) == [record]
    rendered = render_5424(record, stream_id=1, epoch=2)
    assert parse_syslog(rendered).format == LogFormat.RFC5424


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=60).filter(lambda b: b"\n" not in b), max_size=8))
def test_deframer_byte_by_byte_equals_whole(messages: list[bytes]) -> None:
    stream = b"".join(octet_counted(m) for m in messages)
    whole = list(Deframer().feed(stream))
    d = Deframer()
    one_by_one = [m for i in range(len(stream)) for m in d.feed(stream[i : i + 1])]
    assert whole == one_by_one == messages


def test_deframer_newline_framing_and_mixed() -> None:
    d = Deframer()
    assert list(d.feed(b"<13>one\n<13>tw")) == [b"<13>one"]
    assert list(d.feed(b"o\r\n5 three")) == [b"<13>two\r", b"three"]


def test_deframer_refuses_a_count_it_cannot_hold() -> None:
    d = Deframer(max_message=100)
    with pytest.raises(FrameError):
        list(d.feed(b"101 " + b"x" * 101))
    with pytest.raises(FrameError):
        list(Deframer(max_message=100).feed(b"12x4 abc"))


def test_deframer_cuts_an_overlong_line_and_resyncs() -> None:
    d = Deframer(max_message=10)
    out = list(d.feed(b"<" + b"a" * 30)) + list(d.feed(b"bbb\n<13>next\n"))
    assert out == [b"<" + b"a" * 9, b"<13>next"]
    assert d.truncated == 1


def test_token_bucket_uses_only_the_time_given() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=100.0)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.take(100.05)
    assert bucket.take(100.11)
    assert bucket.ready_at() == pytest.approx(100.2, abs=1e-6)


def test_source_limiter_counts_per_source() -> None:
    limiter = SourceLimiter(rate=1, burst=2)
    allowed = [limiter.allow("a", 0.0) for _ in range(5)] + [limiter.allow("b", 0.0)]
    assert allowed == [True, True, False, False, False, True]
    assert limiter.dropped == {"a": 3}


def test_rfc3339() -> None:
    assert rfc3339_us(0) == "1970-01-01T00:00:00.000000Z"
    assert rfc3339_us(951_782_400_123_456_789) == "2000-02-29T00:00:00.123456Z"
    assert rfc3339_us(4_102_444_799_000_000_000) == "2099-12-31T23:59:59.000000Z"


def test_event_record_to_ecs() -> None:
    record = event_record(
        seq=3,
        ts_ns=0,
        source="diode-tx",
        app_name="diode-tx",
        action="device-identity-changed",
        severity=2,
        message="plc1 changed identity",
        params={"device": "plc1", "old": 'a"b]', "new": "c"},
    )
    assert decode_records(encode_record(record), 1) == [record]
    doc = to_ecs(record, site="plant", stream_id=1, epoch=9)
    assert doc["event"]["action"] == "device-identity-changed"
    assert doc["event"]["kind"] == "alert"
    assert doc["log"]["syslog"]["severity"]["name"] == "critical"
    assert doc["labels"] == {"device": "plc1", "old": 'a"b]', "new": "c"}
    line = render_5424(record, stream_id=1, epoch=9)
    assert parse_sd(parse_syslog(line).sd)["diode@32473"]["old"] == 'a"b]'


_TOKEN = st.one_of(
    st.just(b"-"),
    st.binary(min_size=0, max_size=70).map(lambda b: b.replace(b" ", b"")),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=60).map(
        str.encode
    ),
)


@settings(max_examples=400)
@given(
    st.one_of(st.integers(0, 250).map(lambda p: b"%d" % p), st.sampled_from([b"01", b"007", b"x"])),
    st.lists(_TOKEN, min_size=5, max_size=5),
    st.sampled_from([b"-", b'[a@1 x="1"]', b'[a@1 x="\\]"][b y="2"]', b"[broken", b"-x", b""]),
    st.binary(max_size=40),
)
def test_the_one_match_header_parses_as_the_field_by_field_way(
    pri: bytes, fields: list[bytes], sd: bytes, msg: bytes
) -> None:
    """The fast path for RFC 5424 gives what the general parser gives, for any header."""
    data = b"<" + pri + b">1 " + b" ".join(fields) + b" " + sd + (b" " + msg if msg else b"")
    assert parse_syslog(data) == parse_general(data)

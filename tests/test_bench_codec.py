"""``diode bench codec``: the report's shape, and that nothing is lost without loss."""

from __future__ import annotations

import json

from diode.bench import codec, sample_pool
from diode.records import Sample, encode_record


def test_codec_report_is_json_and_delivers_everything_at_zero_loss() -> None:
    report = codec(seconds=0.05, losses=(0.0, 0.3))
    assert json.loads(json.dumps(report)) == report
    assert set(report) == {"settings", "encode", "decode"}
    settings = report["settings"]
    assert isinstance(settings, dict)
    # A full block travels in a group of 4 at n 49 (docs/PROTOCOL.md, section 5).
    assert (settings["datagram_size"], settings["k"], settings["n_full_block"]) == (1472, 32, 49)

    encode = report["encode"]
    assert isinstance(encode, dict)
    assert encode["records"] > 0
    assert encode["datagrams"] >= encode["blocks"] > 0
    for name in ("mb_per_s_cpu", "mb_per_s_wall", "us_per_datagram_cpu", "cpu_s", "wall_s"):
        assert isinstance(encode[name], float)

    decode = report["decode"]
    assert isinstance(decode, list)
    clean, lossy = decode
    assert clean["loss"] == 0.0
    assert clean["datagrams_received"] == clean["datagrams_sent"] == encode["datagrams"]
    assert clean["records_sent"] == clean["records_delivered"] == encode["records"]
    assert (clean["records_missing"], clean["records_reported_lost"], clean["gaps"]) == (0, 0, 0)
    assert clean["blocks_rebuilt"] == clean["blocks_lost"] == 0
    # At 30 % loss whatever is missing is reported, exactly: the bench sends one
    # closing block after the measured ones, so even a lost last block shows.
    assert lossy["datagrams_received"] < lossy["datagrams_sent"]
    assert lossy["records_missing"] == lossy["records_reported_lost"]
    assert lossy["gaps_inexact"] == 0


def test_sample_pool_is_realistic_poller_output() -> None:
    pool = sample_pool(2000)
    sizes = [len(encode_record(r)) for r in pool]
    assert 18 <= sum(sizes) / len(sizes) <= 30
    assert {type(r.value) for r in pool if isinstance(r, Sample)} == {float, int, bool}

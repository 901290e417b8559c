"""``make bench``'s table: medians of the newest repeats, judged against the targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from diode.benchmarks import record


def _tags(p99: float, rx_us: float) -> dict[str, object]:
    run = {"lost": 0, "latency_ms": {"p50": 5.0, "p99": p99}, "rx_us_per_update": rx_us}
    return {"modes": {"per_tag:0": {"runs": [run]}}}


def test_the_table_takes_the_median_of_the_newest_repeats_and_judges_it() -> None:
    (run,) = record.select("tags-10k")
    entries = [
        {"run": "tags-10k", "report": _tags(99.0, 99.0), "load_before": 5.0},  # older: left out
        {"run": "tags-10k", "report": _tags(30.0, 14.0), "load_before": 0.5},
        {"run": "tags-10k", "report": _tags(12.0, 16.0), "load_before": 0.25},
        {"run": "tags-10k", "report": None, "load_before": 0.5},  # a failed repeat
    ]
    rows = {line.split(" | ")[0]: line for line in record.table(entries, [run], 3).splitlines()}
    assert "| 21.0 | 30.0, 12.0, n/a | **no** |" in rows["| T3"]  # p99 < 20
    assert "| 15.0 | 14.0, 16.0, n/a | yes |" in rows["| T5"]  # rx <= 15
    assert "| 0.5/0.25/0.5 |" in rows["| T3"]
    assert "| ? |" in rows["| T4"]  # no tx figure in any repeat: not judged


def test_runs_are_picked_by_group_or_name_and_unknown_ones_refused() -> None:
    assert [r.name for r in record.select("tags")] == ["tags-10k", "tags-50k"]
    assert [r.name for r in record.select("codec,tags-50k")] == ["tags-50k", "codec"]
    assert len(record.select("all")) == len(record.RUNS)
    with pytest.raises(SystemExit):
        record.select("tags,nonsense")


def test_the_table_alone_reads_the_results_of_earlier_sittings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "r.jsonl"
    line = '{"run": "codec", "label": "x", "report": {"encode": {"mb_per_s_cpu": 7.5}}}\n'
    results.write_text(line * 2)
    argv = ["--table", "--runs", "codec", "--results", str(results), "--label", "x"]
    assert record.main(argv) == 0
    out = capsys.readouterr().out
    assert "| C1 | codec | encode MB/s of records (CPU) |  | 7.5 | 7.5, 7.5 |" in out

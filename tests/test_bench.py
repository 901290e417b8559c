"""``diode bench link|tags|cost`` run with small parameters and print JSON of the expected shape.

No timing is asserted: the machine is shared; the figures live in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("mosquitto_sub") is None or shutil.which("mosquitto_pub") is None,
        reason="needs mosquitto clients",
    ),
]


def bench(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from diode.cli import main; sys.exit(main())",
         "bench", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=240,
    ).stdout  # fmt: skip
    report = json.loads(out)
    assert isinstance(report, dict)
    return report


def test_link_without_loss_delivers_and_reports_rates() -> None:
    loss = ["--loss", "0.01"] if os.geteuid() == 0 and shutil.which("nft") else []
    report = bench("link", "--quick", "--no-pydiode", "--rate-mbps", "50", "--loss", "0", *loss)
    assert set(report) >= {"settings", "diode"}
    runs = report["diode"]
    assert isinstance(runs, list)
    for run in runs:
        assert {"goodput_mbps", "wire_mbps", "efficiency_vs_wire_k_over_n"} <= set(run)
        assert run["records_delivered"] > 0
        assert run["rx_records_lost"] == 0


def test_link_alternates_tcp_and_the_unix_socket_and_reports_the_broker_cpu() -> None:
    report = bench(
        "link", "--quick", "--no-pydiode", "--rate-mbps", "50", "--loss", "0",
        "--broker", "tcp", "--broker", "unix",
    )  # fmt: skip
    tcp, unix = report["diode"]
    assert tcp["broker_as_the_receiver_logged_it"].startswith("127.0.0.1:")
    assert unix["broker_as_the_receiver_logged_it"].startswith("unix:/")
    for run in (tcp, unix):
        assert run["records_delivered"] > 0
        assert run["rx_records_lost"] == 0
        assert run["broker_cpu_s_per_s"] >= 0
        assert run["rx_and_broker_cpu_us_per_block"] >= run["rx_cpu_us_per_block"]


def test_tags_one_mode_one_rate() -> None:
    report = bench("tags", "--quick", "--mode", "per_tag:0", "--rate", "2000")
    modes = report["modes"]
    assert isinstance(modes, dict)
    (run,) = modes["per_tag:0"]["runs"]
    assert {"generated", "received", "lost", "latency_ms", "tx_us_per_update"} <= set(run)
    assert set(run["latency_ms"]) == {"p50", "p99", "max"}
    assert run["received"] > 0


def test_cost_reports_cpu_and_memory_per_daemon() -> None:
    report = bench("cost", "--quick", "--rate", "1000")
    (run,) = report["runs"]
    for key in ("tx_us_per_update", "rx_us_per_update", "tx_rss_peak_mb", "rx_rss_peak_mb"):
        assert run[key] > 0


def test_polling_a_few_modbus_devices() -> None:
    report = bench("polling", "--quick")
    (run,) = report["runs"]
    assert run["devices"] == 5
    assert run["poll_cycles"] > 0
    assert {"tx_cpu_share", "tx_cpu_ms_per_device_cycle", "ok"} <= set(run)


def test_opcua_a_few_monitored_items() -> None:
    report = bench("opcua", "--quick")
    (run,) = report["runs"]
    assert run["items"] == 200
    assert run["changes_received"] > 0
    assert run["server_rounds"] > 0
    assert {"tx_cpu_share", "changes_per_s", "due_per_s", "server_cpu_share", "ok"} <= set(run)


def test_link_with_a_lighter_fec_profile() -> None:
    report = bench(
        "link", "--quick", "--no-pydiode", "--rate-mbps", "50", "--loss", "0",
        "--repair-ratio", "0.1", "--repair-burst", "8",
    )  # fmt: skip
    settings = report["settings"]
    assert isinstance(settings, dict)
    # A full block in a group: 32 + ceil(3.2) + group_repair_burst 9 (its own default).
    assert (settings["k"], settings["n_full_block"]) == (32, 45)
    (run,) = report["diode"]
    assert run["rx_records_lost"] == 0
    # Measured against k/n = 32/45: had the transmitter kept the default (32/49 in
    # groups, 31/55 alone), the ratio would fall near 0.92, or 0.75 alone.
    assert run["efficiency_vs_wire_k_over_n"] > 0.8


def test_cost_with_the_receiver_stalled_loses_nothing() -> None:
    report = bench("cost", "--seconds", "4", "--rate", "2000", "--stall", "1")
    (run,) = report["runs"]
    assert run["rx_stalled_s"] == 1.0
    assert run["lost"] == 0
    # Updates made while the receiver was stopped waited for it: the stall happened.
    assert run["latency_ms"]["max"] >= 900


def test_restart_reports_how_long_the_socket_buffer_covers() -> None:
    report = bench("restart", "--quick", "--rate", "10000")
    (run,) = report["runs"]
    assert run["buffer_limit_bytes"] >= 2 * 32 * 1024 * 1024  # ReceiveBuffer=32M, doubled
    assert run["fill_bytes_per_s"] > 0
    # Quick: the buffer does not fill in 2 s; the cover is the limit over the fill rate.
    assert run["first_drop_s"] is None
    assert run["covers_s"] == round(run["buffer_limit_bytes"] / run["fill_bytes_per_s"], 1)


def test_repeat_reports_what_time_diversity_costs() -> None:
    report = bench("repeat", "--quick", "--rate", "2000")
    off, on = report["runs"]
    assert off["repeat_after_s"] == 0.0
    assert off["repeats_sent"] == 0
    assert on["repeat_after_s"] > 0
    assert on["repeats_sent"] > 0
    assert on["repeats_dropped"] == 0
    # Every datagram twice, once the repeats run: about double the datagrams on the wire.
    assert 1.6 < on["datagrams_per_s"] / off["datagrams_per_s"] < 2.4
    assert on["tx_cpu_percent"] > 0
    assert off["tx_cpu_percent"] > 0


def test_drain_reports_the_journal_cost_per_datagram() -> None:
    report = bench("drain", "--quick")
    cost = report["us_per_datagram"]
    assert cost["plain"] > 0
    assert cost["journal"] > cost["plain"]  # a second system call per datagram
    # The receiver's own path and its kernel share are measured (their ratio is a figure
    # for docs/BENCHMARKS.md, not for a test on a shared machine).
    assert cost["feed"] > 0
    assert cost["kernel"] > 0


def test_link_steps_report_each_rebuild_the_crc_and_the_decoder_per_block() -> None:
    steps = bench("link-steps", "--quick")["steps"]
    assert isinstance(steps, dict)
    for missing in range(1, 5):  # fec.FEW = 3 rebuilt here, 4 by pyeclib
        assert steps[f"rebuild_{missing}_missing_us"] > 0
        assert steps[f"pyeclib_decode_{missing}_missing_us"] > 0
    assert steps["crc_zlib_us_per_datagram"] > 0
    assert steps["crc_isal_us_per_datagram"] > 0
    # Measured only once every record came out (link_steps raises otherwise).
    assert steps["decoder_us_per_block_0%_loss"] > 0
    assert steps["decoder_us_per_block_1%_loss"] > 0

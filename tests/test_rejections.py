"""Attacks made visible: rejections by reason and rate in $status, a rate-limited warning."""

from __future__ import annotations

from typing import Any

from diode.config.mqtt import StreamOutput
from receiver.rejections import RejectionMeter
from receiver.router import Router
from tests.test_forgery_effects import Recorder


def test_rates_are_per_second_over_the_window() -> None:
    meter = RejectionMeter(window_s=5.0)
    meter.update({"rejected_bad_tag": 0, "symbols": 7}, 0.0)
    meter.update({"rejected_bad_tag": 1000}, 2.0)
    meter.update({"rejected_bad_tag": 3000, "rejected_late": 40}, 4.0)
    assert meter.totals() == {"bad_tag": 3000, "late": 40}
    assert meter.rates() == {"bad_tag": 750.0, "late": 10.0}
    for t in range(5, 30):
        meter.update({"rejected_bad_tag": 3000, "rejected_late": 40}, float(t))
    assert meter.rates() == {"bad_tag": 0.0, "late": 0.0}, "old bursts leave the window"


def test_the_warning_is_rate_limited_and_ignores_what_a_healthy_link_produces() -> None:
    meter = RejectionMeter(window_s=5.0, warn_every_s=10.0)
    meter.update({"rejected_late": 500, "rejected_duplicate": 3}, 0.0)
    assert meter.warning(0.0) is None, "surplus repair symbols are not an attack"
    meter.update({"rejected_late": 500, "rejected_bad_signature": 9}, 1.0)
    warning = meter.warning(1.0)
    assert warning is not None
    assert warning["rejected"] == {"bad_signature": 9}
    meter.update({"rejected_bad_signature": 90}, 2.0)
    assert meter.warning(2.0) is None, "at most one warning per warn_every_s"
    meter.update({"rejected_bad_signature": 190}, 11.0)
    again = meter.warning(11.0)
    assert again is not None
    assert again["rejected"] == {"bad_signature": 181}, "what is new since the last warning"
    assert meter.warning(30.0) is None, "nothing new"


def test_steered_late_copies_are_quiet_and_steered_replays_warn() -> None:
    """The kernel steers late copies and replays to two quarantines (receiver/steer.py):
    late copies come with every healthy link, quiet at any rate; one replay warns."""
    meter = RejectionMeter(window_s=5.0, warn_every_s=0.0)
    meter.update({"rejected_steered_late": 0, "rejected_steered_replay": 0}, 0.0)
    meter.update({"rejected_steered_late": 700_000, "rejected_steered_replay": 0}, 1.0)
    assert meter.warning(1.0) is None
    meter.update({"rejected_steered_late": 700_100, "rejected_steered_replay": 3}, 2.0)
    warning = meter.warning(2.0)
    assert warning is not None
    assert warning["rejected"] == {"steered_replay": 3}


def test_status_carries_the_rejections() -> None:
    output = Recorder()
    router = Router({7: StreamOutput()}, output)
    meter = RejectionMeter()
    meter.update({"rejected_bad_tag": 0}, 0.0)
    meter.update({"rejected_bad_tag": 50}, 1.0)
    router.rejected = meter.status()
    router.publish_all_status(1.0)
    status: dict[str, Any] = output.status
    assert status["rejected"] == {"total": {"bad_tag": 50}, "per_s": {"bad_tag": 50.0}}

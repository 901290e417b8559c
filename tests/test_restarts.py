"""Restarts and failover that lose nothing (issue 16): tests/faults/restarts.py, end to end.

Each test runs one scenario with real parts (the daemons as child processes,
``systemd-socket-activate`` holding the link socket as systemd would, the
fault relay, mosquitto, a subscriber counting every value); ``make
reliability`` runs the same and writes docs/RELIABILITY.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import restarts
from tests.support.mosquitto import Mosquitto

needs_activate = pytest.mark.skipif(
    restarts.ACTIVATE is None,
    reason="systemd-socket-activate is not installed (apt-get install systemd)",
)


@needs_activate
async def test_restarts_under_socket_activation_lose_nothing_at_1000_per_s(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    await restarts.socket_activated_restarts(tmp_path, mosquitto, rate=1000)


@needs_activate
@pytest.mark.slow
async def test_restarts_under_socket_activation_lose_nothing_at_10000_per_s(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    await restarts.socket_activated_restarts(tmp_path, mosquitto, rate=10_000)


async def test_time_diversity_covers_a_dead_receiver_without_socket_activation(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    await restarts.time_diversity(tmp_path, mosquitto, fault="receiver")


async def test_time_diversity_covers_a_link_cut(tmp_path: Path, mosquitto: Mosquitto) -> None:
    await restarts.time_diversity(tmp_path, mosquitto, fault="link")


async def test_a_reload_under_load_loses_nothing_and_a_broken_config_is_refused(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    await restarts.reload_under_load(tmp_path, mosquitto, rate=10_000)


async def test_a_standby_takes_over_from_a_killed_active_receiver_losing_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    await restarts.standby_takes_over(tmp_path, mosquitto)


async def test_both_receivers_killed_lose_what_was_sent_while_dead_reported_exactly(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    await restarts.both_killed(tmp_path, mosquitto)


async def test_a_frozen_active_receiver_is_replaced_and_steps_down_when_it_resumes(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    await restarts.active_frozen(tmp_path, mosquitto)

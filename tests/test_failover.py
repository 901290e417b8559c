"""The hand-over rule of a pair of receivers (receiver/failover.py), without a broker.

The rule is a pure function of what the watch heard and when; these tests feed
it messages and times. The end-to-end scenarios (a real pair, a broker, a kill)
are tests/test_restarts.py.
"""

from __future__ import annotations

import json

from diode.config import validate
from diode.config.rx import RxConfig
from diode.replay import StreamState
from receiver.failover import (
    Failover,
    announcement_topic,
    claim_topic,
    pack_positions,
    unpack_positions,
)

PEER = "diode/$receiver/b"


def failover(*, was_active: bool = False, takeover_after_s: float = 3.0) -> Failover:
    config = validate(
        RxConfig,
        {
            "receiver": {"listen": "127.0.0.1"},
            "mqtt": {"client_id": "rx-a", "status_topic": "diode/$receiver/a"},
            "streams": [{"id": 7, "public_keys": ["k.pub"]}],
            "failover": {"peer_status_topic": PEER, "takeover_after_s": takeover_after_s},
        },
        "rx.toml",
    )
    return Failover(config.mqtt, config.failover, was_active=was_active)


def announce(f: Failover, *, name: str = "rx-b", since: float = 100.0, now: float,
             retained: bool = False, seq: int = 5) -> None:  # fmt: skip
    positions = pack_positions({7: StreamState(epoch=1, next_seq=seq, next_record=seq * 10)})
    payload = json.dumps({"name": name, "since": since, "positions": positions}).encode()
    f.heard(announcement_topic(PEER), payload, retained=retained, now=now)


def status(f: Failover, *, online: bool, now: float, retained: bool = False) -> None:
    f.heard(PEER, json.dumps({"online": online}).encode(), retained=retained, now=now)


def test_without_the_broker_nothing_is_decided() -> None:
    f = failover()
    assert f.decide(1000.0, active=False, since=0.0) is None
    assert f.decide(1000.0, active=True, since=0.0) is None


def test_a_standby_takes_over_when_the_active_one_goes_silent() -> None:
    f = failover()
    f.connected_at = 0.0
    announce(f, now=1.0)
    assert f.decide(3.9, active=False, since=0.0) is None
    assert f.decide(4.0, active=False, since=0.0) == (
        "take over: nothing heard from the active receiver for 3.0 s"
    )
    assert f.positions() == {7: StreamState(epoch=1, next_seq=5, next_record=50)}


def test_a_standby_takes_over_at_once_when_the_active_ones_will_fires() -> None:
    f = failover()
    f.connected_at = 0.0
    announce(f, now=1.0)
    status(f, online=False, now=1.1)
    assert f.decide(1.1, active=False, since=0.0) == (
        "take over: the active receiver's status is offline"
    )


def test_a_stale_offline_status_or_announcement_from_before_does_not_count() -> None:
    f = failover()
    f.connected_at = 0.0
    status(f, online=False, now=0.1, retained=True)
    announce(f, now=0.1, retained=True)
    # Retained: from before we subscribed. Nobody is known active: the cold-start wait,
    # twice takeover_after_s for a receiver that was the standby.
    assert f.decide(5.9, active=False, since=0.0) is None
    assert f.decide(6.0, active=False, since=0.0) == "take over: nobody active (6.0 s connected)"
    # ... and from the positions the retained announcement gave.
    assert f.positions()[7].next_seq == 5


def test_the_receiver_that_was_active_resumes_first_at_a_cold_start() -> None:
    f = failover(was_active=True)
    f.connected_at = 10.0
    assert f.decide(12.9, active=False, since=0.0) is None
    assert f.decide(13.0, active=False, since=0.0) is not None


def test_two_active_the_most_recent_claim_wins_a_tie_goes_to_the_smaller_name() -> None:
    f = failover()
    f.connected_at = 0.0
    announce(f, name="rx-b", since=200.0, now=1.0)
    assert f.decide(1.0, active=True, since=100.0) == "step down: rx-b claimed later"
    announce(f, name="rx-b", since=50.0, now=1.5)
    assert f.decide(1.5, active=True, since=100.0) is None
    announce(f, name="rx-b", since=100.0, now=2.0)  # "rx-a" < "rx-b": a stays
    assert f.decide(2.0, active=True, since=100.0) is None


def test_claims_keep_a_standby_waiting_while_the_announcements_lag() -> None:
    """The announcements queue behind the active receiver's spool; its claims do not."""
    f = failover()
    f.connected_at = 0.0
    announce(f, now=1.0, seq=5)
    for t in (2.0, 3.0, 4.0, 5.0):
        claim = json.dumps({"name": "rx-b", "since": 100.0}).encode()
        f.heard(claim_topic(PEER), claim, retained=False, now=t)
    assert f.decide(7.9, active=False, since=0.0) is None
    assert f.decide(8.0, active=False, since=0.0) is not None
    # Claims carry no positions: the standby starts from the last announced ones.
    assert f.positions()[7].next_seq == 5


def test_a_receiver_that_stepped_down_waits_before_claiming_again() -> None:
    f = failover()
    f.connected_at = 0.0
    announce(f, now=1.0)
    f.standby_since = 10.0  # stepped down at 10 s, nothing heard since 1 s
    assert f.decide(12.9, active=False, since=0.0) is None
    assert f.decide(13.0, active=False, since=0.0) is not None


def test_malformed_positions_give_none() -> None:
    assert unpack_positions({"7": [1, 2]}) == {}
    assert unpack_positions({"x": [1, 2, 3]}) == {}
    assert unpack_positions({"7": [1, -2, 3]}) == {}
    assert unpack_positions([1]) == {}
    f = failover()
    f.heard(announcement_topic(PEER), b"garbage", retained=False, now=1.0)
    assert f.claim is None


def test_a_receiver_cannot_watch_its_own_status() -> None:
    import pytest

    from diode.errors import ConfigError

    with pytest.raises(ConfigError, match="peer_status_topic"):
        validate(
            RxConfig,
            {
                "receiver": {"listen": "127.0.0.1"},
                "mqtt": {"status_topic": PEER},
                "streams": [{"id": 7, "public_keys": ["k.pub"]}],
                "failover": {"peer_status_topic": PEER},
            },
            "rx.toml",
        )

"""The transmitter's own security events: what it sees of the plant that a SOC must know.

Each event is a log record on the log lane (:meth:`SyslogIn.event`), so it is
numbered, counted and delivered like any syslog message. Sources:

- a device's identity (Modbus FC 43/14, OPC UA BuildInfo) differs from the one
  last seen, kept across restarts in ``state_dir/identities.json``: a swapped
  or reflashed PLC (``device-identity-changed``, critical); the first sighting
  is recorded (``device-identity-recorded``, informational);
- a device that stops answering or comes back (``device-disappeared`` /
  ``device-appeared``), from its tags' quality going to BAD "disconnected" or
  "timeout" and back to GOOD;
- a burst of Modbus exception responses (``modbus-exception-burst``): at least
  ``exception_burst`` in ``EXCEPTION_WINDOW_S``, then quiet until the next window;
- an OPC UA server offering weaker security than when last seen (an endpoint
  with a weaker policy or mode: ``opcua-security-downgrade``, critical); its
  certificate is part of its identity, so a new one is an identity change;
- the daemon starting and stopping (``daemon-start`` / ``daemon-stop``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import structlog

from diode.records import DeviceInfo, Quality, Sample, TagInfo

log = structlog.get_logger("diode.tx.security")

EXCEPTION_WINDOW_S = 10.0
GONE_REASONS = frozenset({"disconnected", "timeout"})

# Severities (RFC 5424): 2 critical, 4 warning, 5 notice, 6 informational.
CRITICAL, WARNING, NOTICE, INFO = 2, 4, 5, 6

Raise = Callable[[str, int, str, dict[str, str]], None]


_MODE_RANK = {"None": 0, "Sign": 1, "SignAndEncrypt": 2}


def weakest(endpoints: str) -> int:
    """The rank of the weakest of ``Policy/Mode`` endpoints (a None policy is 0)."""
    ranks = []
    for endpoint in endpoints.split():
        policy, _, mode = endpoint.partition("/")
        ranks.append(0 if policy == "None" else _MODE_RANK.get(mode, 0))
    return min(ranks, default=0)


def _fingerprint(identity: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(identity.items()))


class SecurityMonitor:
    """Turns what the pollers report into security events; no sockets, clock passed in."""

    def __init__(
        self,
        *,
        state_dir: Path,
        raise_event: Raise,
        catalogue: Callable[[], Iterable[TagInfo]],
        exception_burst: int,
    ) -> None:
        self._path = state_dir / "identities.json"
        self._raise = raise_event
        self._catalogue = catalogue
        self._burst = exception_burst
        self._identities = self._load()
        self._device_of: dict[int, str] = {}
        self._down: set[str] = set()
        self._errors: dict[str, tuple[float, int]] = {}  # device -> (window start, count then)

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self._path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            str(d): {str(k): str(v) for k, v in i.items()}
            for d, i in data.items()
            if isinstance(i, dict)
        }

    def _save(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self._identities, sort_keys=True))
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            tmp.replace(self._path)
        except OSError as exc:
            log.warning("device identities not saved", error=str(exc))

    # -- hooks the outbox calls ------------------------------------------------------------

    def device(self, info: DeviceInfo) -> None:
        identity = {"protocol": info.protocol, "endpoint": info.endpoint, **info.identity}
        known = self._identities.get(info.device)
        if known == identity:
            return
        self._identities[info.device] = identity
        self._save()
        if known is None:
            self._raise(
                "device-identity-recorded",
                INFO,
                f"{info.device}: identity recorded: {_fingerprint(identity)}",
                {"device": info.device, "identity": _fingerprint(identity)},
            )
            return
        self._downgrade(info.device, known, identity)
        changed = sorted(
            k for k in known.keys() | identity.keys() if known.get(k) != identity.get(k)
        )
        self._raise(
            "device-identity-changed",
            CRITICAL,
            f"{info.device}: identity changed since last seen ({', '.join(changed)}): "
            f"was {_fingerprint(known)}; now {_fingerprint(identity)}",
            {
                "device": info.device,
                "protocol": info.protocol,
                "changed": ",".join(changed),
                "old": _fingerprint(known),
                "new": _fingerprint(identity),
            },
        )

    def _downgrade(self, device: str, known: dict[str, str], identity: dict[str, str]) -> None:
        before, now = known.get("endpoints_security"), identity.get("endpoints_security")
        if before is None or now is None:
            return
        if weakest(now) < weakest(before):
            self._raise(
                "opcua-security-downgrade",
                CRITICAL,
                f"{device}: the server now offers weaker security: {now} (was {before})",
                {"device": device, "old": before, "new": now},
            )

    def quality_changed(self, old: Sample | None, new: Sample) -> None:
        """A tag's quality or reason changed (rare: the outbox calls only then)."""
        device = self._device_of.get(new.tag_id)
        if device is None:
            self._device_of = {i.tag_id: i.device for i in self._catalogue()}
            device = self._device_of.get(new.tag_id)
            if device is None:
                return
        if new.quality is Quality.BAD and new.reason in GONE_REASONS:
            if device not in self._down:
                self._down.add(device)
                self._raise(
                    "device-disappeared",
                    WARNING,
                    f"{device}: stopped answering ({new.reason})",
                    {"device": device, "reason": new.reason},
                )
        elif new.quality is Quality.GOOD and device in self._down:
            self._down.discard(device)
            self._raise("device-appeared", NOTICE, f"{device}: answering again", {"device": device})

    # -- periodic ------------------------------------------------------------------------------

    def exceptions(self, device: str, total: int, now: float) -> None:
        """``total`` exception answers so far from ``device``; one event per burst window."""
        start, at_start = self._errors.setdefault(device, (now, total))
        if total - at_start >= self._burst:
            self._raise(
                "modbus-exception-burst",
                WARNING,
                f"{device}: {total - at_start} Modbus exception answers in "
                f"{now - start:.1f} s (threshold {self._burst} in {EXCEPTION_WINDOW_S:.0f} s)",
                {"device": device, "exceptions": str(total - at_start)},
            )
            self._errors[device] = (now, total)
        elif now - start >= EXCEPTION_WINDOW_S:
            self._errors[device] = (now, total)

"""How many blocks outside a stream's window may cost a signature verify, per second.

A block in the window the stream can plausibly be in (its epoch, the next
few thousand sequence numbers) is always verified: the real stream lives
there. Anything else (a new epoch, a far-ahead block, a stream not seen yet)
may be real (a transmitter restart, a receiver that starts late) but is what
a forger without the key sends to make the receiver burn CPU, so its rebuild
and verify draw on a token bucket: ``per_s`` tokens a second, at most one
second's worth saved up. A block refused a token is counted
(``rejected_verify_budget``) and dropped; the real stream re-sends all it
needs (heartbeats, catalogue), so a real epoch change still gets through,
a little later, under any flood.
"""

from __future__ import annotations


class VerifyBudget:
    def __init__(self, per_s: float) -> None:
        self.per_s = per_s
        self._tokens = per_s
        self._at: float | None = None

    def available(self, now: float) -> bool:
        """Is there a token now? (Spends nothing: a datagram of a block that could not
        be verified anyway is dropped before it costs a parse, a CRC or memory.)"""
        if self._at is not None:
            self._tokens = min(self.per_s, self._tokens + (now - self._at) * self.per_s)
        self._at = now
        return self._tokens >= 1.0

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self.available(now):
            self._tokens -= 1.0
            return True
        return False

"""Group signatures already verified: a group's other blocks skip the Ed25519 verify.

In wire generation 3 every block of a group carries the same signature over
the same group message (diode/wire.py), which the receiver rebuilds from the
block's own digest and the manifest. Once one block's rebuilt message
verified, the next block that rebuilds *exactly* that message (its own
digest in its slot: the bytes that were signed, nothing else) with exactly
that signature under that key is as authentic: it costs a SHA-256 of its
signed bytes and a lookup instead of a verify (about 100 us here).

Only messages that verified enter, so nothing a forger sends can add,
replace or evict an entry: it can only miss. Per stream, the newest
``per_stream`` entries are kept and the oldest go first. A group's blocks
complete within one group's datagrams of each other (they are sent
round-robin), so a few entries per stream serve every block a stream has in
flight; a miss costs one verify more, never a block. The memory is trivially
small (about 270 bytes an entry: 16 entries, 4.3 KB a stream) and bounded by
the keyring, so it is not counted in the assembly bound.
"""

from __future__ import annotations

from collections import OrderedDict

PER_STREAM = 16


class VerifiedGroups:
    def __init__(self, per_stream: int = PER_STREAM) -> None:
        self.per_stream = per_stream
        self._streams: dict[int, OrderedDict[bytes, None]] = {}

    def holds(self, stream_id: int, entry: bytes) -> bool:
        """Whether ``entry`` (key id, group message, signature) verified on this stream."""
        entries = self._streams.get(stream_id)
        return entries is not None and entry in entries

    def add(self, stream_id: int, entry: bytes) -> None:
        """Remember an entry whose signature just verified; the oldest goes past the bound."""
        entries = self._streams.setdefault(stream_id, OrderedDict())
        entries[entry] = None
        if len(entries) > self.per_stream:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return sum(map(len, self._streams.values()))

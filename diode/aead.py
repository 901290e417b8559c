"""Optional confidentiality: ChaCha20-Poly1305 with a pre-shared link secret.

For links that cross shared media. The key is derived per (stream, epoch)
with keyed BLAKE2b, and the nonce is the block sequence number, so a nonce is
never reused under one key: epochs only grow (the transmitter persists them)
and sequence numbers only grow within an epoch. The signed block header is the
associated data; the signature covers the ciphertext, so nothing is decrypted
before it is authenticated.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from diode.errors import FrameError


def _cipher(psk: bytes, stream_id: int, epoch: int) -> ChaCha20Poly1305:
    info = stream_id.to_bytes(4, "big") + epoch.to_bytes(8, "big")
    key = hashlib.blake2b(info, key=psk, digest_size=32, person=b"diode-aead-v1").digest()
    return ChaCha20Poly1305(key)


def _nonce(seq: int) -> bytes:
    return seq.to_bytes(8, "big") + b"\0\0\0\0"


def seal(psk: bytes, *, stream_id: int, epoch: int, seq: int, plain: bytes, aad: bytes) -> bytes:
    return _cipher(psk, stream_id, epoch).encrypt(_nonce(seq), plain, aad)


def open_(psk: bytes, *, stream_id: int, epoch: int, seq: int, sealed: bytes, aad: bytes) -> bytes:
    try:
        return _cipher(psk, stream_id, epoch).decrypt(_nonce(seq), sealed, aad)
    except InvalidTag:
        raise FrameError("payload does not decrypt", reason="bad_decrypt") from None

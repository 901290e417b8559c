"""Ed25519 keys, key ids, the receiver's keyring, and the optional link secret.

The transmitter alone holds a private key; the receiver holds public keys
only, so nothing stolen from the IT side can forge OT data. A key id is the
first 8 bytes of SHA-256 of the raw public key: it names the key in every
datagram, lets one receiver serve several transmitters (streams), and lets a
stream rotate keys with an overlap (two keys of one stream in the keyring).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from diode.errors import KeyFileError
from diode.wire import KEY_ID_SIZE

PSK_SIZE = 32


def key_id(public: Ed25519PublicKey) -> bytes:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:KEY_ID_SIZE]


@dataclass(frozen=True, slots=True)
class SigningKey:
    """The transmitter's private key and its id."""

    private: Ed25519PrivateKey
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", key_id(self.private.public_key()))

    def sign(self, data: bytes | memoryview) -> bytes:
        return self.private.sign(bytes(data))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustedKey:
    """A public key the receiver accepts, the stream it speaks for, and that stream's secret."""

    stream_id: int
    public: Ed25519PublicKey
    psk: bytes | None = None

    def verify(self, signature: bytes | memoryview, data: bytes | memoryview) -> bool:
        try:
            self.public.verify(bytes(signature), bytes(data))
        except InvalidSignature:
            return False
        return True


class Keyring:
    """Key id -> trusted key. Several ids may point at one stream (rotation)."""

    def __init__(self, keys: list[TrustedKey] | None = None) -> None:
        self._keys: dict[bytes, TrustedKey] = {}
        for key in keys or []:
            self.add(key)

    def add(self, key: TrustedKey) -> None:
        self._keys[key_id(key.public)] = key

    def get(self, kid: bytes) -> TrustedKey | None:
        return self._keys.get(kid)

    def trusted(self) -> list[TrustedKey]:
        """Every trusted key, in the order added."""
        return list(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)


# -- files -------------------------------------------------------------------


def write_keypair(directory: Path, name: str = "diode") -> tuple[Path, Path, bytes]:
    """Write ``NAME.key`` (PKCS#8 PEM, mode 0600) and ``NAME.pub``; refuse to overwrite."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / f"{name}.key"
    public_path = directory / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create with 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path, key_id(key.public_key())


def write_psk(path: Path) -> None:
    """A fresh 32-byte link secret, hex, mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(os.urandom(PSK_SIZE).hex() + "\n")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc.strerror}") from None


def load_signing_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return SigningKey(key)


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read(path))
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def load_psk(path: Path) -> bytes:
    text = _read(path).decode("ascii", "replace").strip()
    try:
        psk = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{path}: a link secret is {PSK_SIZE} bytes in hex") from None
    if len(psk) != PSK_SIZE:
        raise KeyFileError(f"{path}: a link secret is {PSK_SIZE} bytes in hex, not {len(psk)}")
    return psk

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
import stat
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
        kid = key_id(key.public)
        held = self._keys.get(kid)
        if held is not None and held.stream_id != key.stream_id:
            # A key speaks for one stream: under two, its datagrams would be
            # attributed to whichever stream was listed last.
            raise KeyFileError(
                f"key id {kid.hex()} is listed for streams {held.stream_id} and {key.stream_id}",
                reason="key_shared",
            )
        self._keys[kid] = key

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


def secret_file_problem(path: Path) -> str | None:
    """Why a secret file (private key, link secret, password) is too open, or None.

    As ssh does for private keys: nobody but its owner may read a secret. One
    layout is accepted besides 0600/0400, the one the systemd units use: a file
    owned by root, readable by the service's own group (``root:diode 0640``),
    where root alone decides who is in that group. Nothing may be readable or
    writable by others, ever.
    """
    try:
        info = path.stat()
    except OSError:
        return None  # a missing or unreadable file is reported by whoever reads it
    mode = stat.S_IMODE(info.st_mode)
    fix = f"chmod 600 {path}, or chown root:diode and chmod 640 (docs/OPERATIONS.md)"
    if mode & 0o007:
        return f"{path}: permissions {mode:04o} are too open: others can read it; {fix}"
    if mode & 0o070 and not _service_group_layout(info.st_uid, info.st_gid):
        return (
            f"{path}: permissions {mode:04o} are too open: group {info.st_gid} can read it; {fix}"
        )
    return None


def _service_group_layout(uid: int, gid: int) -> bool:
    """root:GROUP, GROUP not root's, and the daemon is root or in GROUP."""
    if uid != 0 or gid == 0:
        return False
    return os.geteuid() == 0 or gid in {os.getegid(), *os.getgroups()}


def check_secret_file(path: Path) -> None:
    """Refuse a secret file that others (or a foreign group) can read: see secret_file_problem."""
    problem = secret_file_problem(path)
    if problem is not None:
        raise KeyFileError(problem, reason="key_permissions")


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc.strerror}") from None
    if not data.strip():
        raise KeyFileError(f"{path}: the key file is empty")
    return data


def load_signing_key(path: Path) -> SigningKey:
    """The transmitter's private key; refused when others can read it, or when it is not one."""
    data = _read(path)
    if b"PUBLIC KEY-----" in data:
        raise KeyFileError(
            f"{path}: this is a public key (.pub); private_key needs the private half (.key)"
        )
    check_secret_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return SigningKey(key)


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read(path)
    if b"PRIVATE KEY-----" in data:
        # The receiver must never hold the private key: stolen from the IT side,
        # it would forge OT data.
        raise KeyFileError(
            f"{path}: this is a private key; the receiver takes the public key (.pub) only"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def load_psk(path: Path) -> bytes:
    """The link secret; refused when others can read it, or when it is not 32 bytes in hex."""
    check_secret_file(path)
    text = _read(path).decode("ascii", "replace").strip()
    try:
        psk = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{path}: a link secret is {PSK_SIZE} bytes in hex") from None
    if len(psk) != PSK_SIZE:
        raise KeyFileError(f"{path}: a link secret is {PSK_SIZE} bytes in hex, not {len(psk)}")
    return psk

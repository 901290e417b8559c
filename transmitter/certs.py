"""OPC UA certificates: the client's, generated once and then reused; the server's, checked.

The server's certificate is checked against a trust list (or one pinned
certificate) before the session carries a password or a value: see
:func:`why_untrusted`. Without that check, whoever answers at the endpoint's
address would be handed the session and the user's password.

A client certificate regenerated at each start has to be re-trusted on every server
at each start (the friction users of other gateways report). So the pair is
created only when neither file exists, written atomically (key first, 0600),
and never replaced automatically afterwards: if only one half is found, or the
certificate has expired, that is an error for a person to look at, because a
silent replacement would be rejected by every server that trusted the old one.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from diode.errors import KeyFileError

CERT_NAME = "opcua-client.der"
KEY_NAME = "opcua-client.key.pem"
APPLICATION_URI = "urn:diode:transmitter"
VALID_DAYS = 3650  # plants re-trust rarely; a 10-year client certificate is common practice
RSA_BITS = 2048  # Basic256Sha256 requires 2048..4096-bit keys

# Several pollers may share one cert_dir and start together: one generates.
_lock = threading.Lock()


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _generate(cert_path: Path, key_path: Path, application_uri: str, hostname: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"diode transmitter {hostname}"[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "diode"),
        ]
    )
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=VALID_DAYS))
        # OPC UA Part 6 6.2.2: the ApplicationUri in the SAN, with the host name.
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(application_uri), x509.DNSName(hostname)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.DER), 0o644)


def ensure_client_certificate(
    cert_dir: Path,
    *,
    application_uri: str = APPLICATION_URI,
    hostname: str | None = None,
) -> tuple[Path, Path]:
    """``(certificate, private_key)`` in ``cert_dir``, generated only if both are missing.

    Blocking (RSA generation takes a fraction of a second): call it in a thread
    from async code.
    """
    cert_path, key_path = cert_dir / CERT_NAME, cert_dir / KEY_NAME
    with _lock:
        have_cert, have_key = cert_path.exists(), key_path.exists()
        if not have_cert and not have_key:
            cert_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _generate(cert_path, key_path, application_uri, hostname or socket.gethostname())
        elif have_cert != have_key:
            missing = key_path if have_cert else cert_path
            raise KeyFileError(
                f"{missing} is missing but its pair exists; not regenerating, because servers "
                "trust the existing certificate: restore it, or delete both to start over",
                reason="opcua_cert_half",
            )
    return cert_path, key_path


def _load(cert_path: Path) -> x509.Certificate:
    data = cert_path.read_bytes()
    if data.lstrip().startswith(b"-----"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def application_uri_of(cert_path: Path) -> str | None:
    """The ApplicationUri a certificate carries (its SAN URI), which the session must use."""
    try:
        san = _load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def expires_at(cert_path: Path) -> datetime:
    """When the certificate stops being valid."""
    return _load(cert_path).not_valid_after_utc


# -- the server's certificate ------------------------------------------------------

TRUSTED_SUFFIXES = (".der", ".pem", ".crt", ".cer")


def load_trust_list(location: Path) -> list[x509.Certificate]:
    """The certificates of a trust list: a folder of files, or one file (PEM may hold several).

    Blocking: call it in a thread from async code. An unreadable or garbled
    file is an error (a trust list that silently lost an entry refuses a server
    for no visible reason).
    """
    files = (
        sorted(p for p in location.iterdir() if p.suffix.lower() in TRUSTED_SUFFIXES)
        if location.is_dir()
        else [location]
    )
    found: list[x509.Certificate] = []
    for path in files:
        try:
            data = path.read_bytes()
            if data.lstrip().startswith(b"-----"):
                found.extend(x509.load_pem_x509_certificates(data))
            else:
                found.append(x509.load_der_x509_certificate(data))
        except (OSError, ValueError) as exc:
            raise KeyFileError(
                f"{path}: not a certificate for the trust list: {exc}", reason="opcua_trust"
            ) from None
    return found


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as OPC UA tools and browsers show it."""
    return cert.fingerprint(hashes.SHA256()).hex(":")


def why_untrusted(
    cert: x509.Certificate, anchors: list[x509.Certificate], now: datetime
) -> str | None:
    """Why ``cert`` must not be trusted, or None when it may.

    Trusted means: within its validity period, and either one of ``anchors``
    itself (a trusted or pinned server certificate) or signed directly by one
    of them that is a CA. Intermediate CAs are not followed: put the issuing
    CA itself in the trust list.
    """
    if now < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    if now > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    for anchor in anchors:
        if anchor == cert:
            return None
        if anchor.subject != cert.issuer or not _is_ca(anchor):
            continue
        try:
            cert.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return None
    return "neither in the trust list nor signed by a CA in it"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False

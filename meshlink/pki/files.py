"""PEM encoding and the files that hold certificates and keys.

Every write is atomic (a temporary file in the same directory, fsync, rename). Private keys
are created with mode 0600 from the first byte (never chmod-ed after), and a key file that
group or others can read is refused when loaded.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshlink import store
from meshlink.errors import PkiError

T = TypeVar("T")

KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700


def ensure_dir(path: Path, mode: int = DIR_MODE) -> Path:
    """``store.ensure_dir``, its errors PkiError."""
    try:
        return store.ensure_dir(path, mode)
    except store.StoreError as e:
        raise PkiError(str(e)) from None


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """``store.atomic_write`` (atomic, ``mode`` from creation), its errors PkiError."""
    try:
        store.atomic_write(path, data, mode)
    except store.StoreError as e:
        raise PkiError(str(e)) from None


# -- PEM ---------------------------------------------------------------------------------


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_from_pem(data: bytes | str, what: str = "certificate") -> x509.Certificate:
    raw = data.encode() if isinstance(data, str) else data
    try:
        return x509.load_pem_x509_certificate(raw)
    except (ValueError, TypeError):
        raise PkiError(f"{what} is not a PEM certificate") from None


def certs_from_pem(data: bytes | str, what: str = "certificate bundle") -> list[x509.Certificate]:
    raw = data.encode() if isinstance(data, str) else data
    try:
        return x509.load_pem_x509_certificates(raw)
    except (ValueError, TypeError):
        raise PkiError(f"{what} is not a list of PEM certificates") from None


def csr_to_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_from_pem(data: bytes | str) -> x509.CertificateSigningRequest:
    raw = data.encode() if isinstance(data, str) else data
    try:
        return x509.load_pem_x509_csr(raw)
    except (ValueError, TypeError):
        raise PkiError("the CSR is not a PEM certificate signing request") from None


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS8 PEM, unencrypted (the file mode protects it)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# -- files -------------------------------------------------------------------------------


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key as PKCS8 PEM, mode 0600 from creation, atomically."""
    atomic_write(Path(path), key_to_pem(key), KEY_MODE)


def write_cert(path: Path, *certs: x509.Certificate) -> None:
    """Write one certificate (or a chain, leaf first) as PEM, mode 0644, atomically."""
    atomic_write(Path(path), b"".join(cert_to_pem(c) for c in certs), CERT_MODE)


def check_key_file(path: Path) -> None:
    """Refuse a key file that is missing, not a regular file, or open to group/others."""
    path = Path(path)
    st = _read(path, "private key", Path.stat)
    if not stat.S_ISREG(st.st_mode):
        raise PkiError(f"private key {path} is not a regular file")
    if st.st_mode & 0o077:
        raise PkiError(
            f"private key {path} is open to group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): run chmod 600 {path}"
        )


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load an EC P-256 PKCS8/SEC1 PEM key, after checking the file's mode."""
    path = Path(path)
    check_key_file(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PkiError(f"cannot read private key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{path} must hold an EC P-256 key")
    return key


def load_cert(path: Path) -> x509.Certificate:
    path = Path(path)
    return cert_from_pem(_read(path, "certificate", Path.read_bytes), what=str(path))


def _read(path: Path, what: str, op: Callable[[Path], T]) -> T:
    """``op(path)``, its OSError one PkiError line naming ``what`` and the path."""
    try:
        return op(path)
    except FileNotFoundError:
        raise PkiError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise PkiError(f"cannot read {what} {path}: {e.strerror}") from None

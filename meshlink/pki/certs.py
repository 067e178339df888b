"""Certificate profiles: the site CA, gateway and link certificates, CSRs, SPIFFE ids, pins.

Every certificate here is EC P-256 / SHA-256 and is built to verify under OpenSSL's
``VERIFY_X509_STRICT``: CAs have a non-empty subject, critical BasicConstraints and KeyUsage,
SKI and AKI; leaves have an empty subject, so their SAN is critical, and carry an AKI that
matches the CA's SKI. A site's identity is the single URI SAN ``spiffe://meshlink/site/<id>``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlink.errors import PeerNotAuthorized, PkiError
from meshlink.names import is_dns_label

SPIFFE_PREFIX: Final = "spiffe://meshlink/site/"
PIN_PREFIX: Final = "sha256:"
BACKDATE: Final = timedelta(minutes=5)
"""Certificates start this far in the past, so a peer's slightly slow clock accepts them."""
CA_LIFETIME: Final = timedelta(days=3650)
GATEWAY_LIFETIME: Final = timedelta(days=90)
LINK_CERT_LIFETIME: Final = timedelta(hours=24)


@dataclass(frozen=True)
class CertKey:
    """A certificate together with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def is_site_id(site_id: str) -> bool:
    """A site id is one lowercase DNS label (RFC 1123), at most 63 characters."""
    return is_dns_label(site_id)


def check_site_id(site_id: str) -> str:
    if not isinstance(site_id, str) or not is_site_id(site_id):
        raise PkiError(
            f"site id {site_id!r} is not valid: use one lowercase DNS label "
            "(a-z, 0-9, '-', at most 63 characters, no leading or trailing '-')"
        )
    return site_id


def spiffe_id(site_id: str) -> str:
    return SPIFFE_PREFIX + check_site_id(site_id)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _serial() -> int:
    # 159 random bits: positive, at most 20 octets, as RFC 5280 requires.
    return secrets.randbits(159) | 1


def _check_key(key: object, what: str) -> None:
    if not isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)) or not (
        isinstance(key.curve, ec.SECP256R1)
    ):
        raise PkiError(f"{what} must be an EC P-256 key")


def create_ca(site_id: str, *, lifetime: timedelta = CA_LIFETIME) -> CertKey:
    """A new self-signed CA for one site (its id in CN and in a URI SAN)."""
    sid = spiffe_id(site_id)
    key = new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlink"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshlink site {site_id} CA"),
        ]
    )
    now = utcnow()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CertKey(cert=cert, key=key)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs); a leaf signs handshakes (ECDSA)."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _san_entries(
    site_id: str,
    dns_names: Iterable[str],
    ip_addresses: Iterable[str | IPv4Address | IPv6Address],
) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(site_id))]
    for dns in dns_names:
        if not dns or not isinstance(dns, str):
            raise PkiError(f"DNS name {dns!r} for the certificate of {site_id!r} is empty")
        names.append(x509.DNSName(dns))
    for ip in ip_addresses:
        try:
            names.append(x509.IPAddress(ip_address(ip)))
        except ValueError:
            raise PkiError(
                f"{ip!r} is not an IP address (certificate of site {site_id!r})"
            ) from None
    return names


def issue_cert(
    ca: CertKey,
    site_id: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    lifetime: timedelta,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str | IPv4Address | IPv6Address] = (),
    now: datetime | None = None,
) -> x509.Certificate:
    """A leaf (gateway or link client) certificate for ``site_id``, signed by ``ca``.

    Usable both as a TLS server and client certificate. Its end is capped at the CA's.
    """
    _check_key(public_key, "the certificate's public key")
    sans = _san_entries(site_id, dns_names, ip_addresses)
    now = now or utcnow()
    not_after = min(now + lifetime, ca.cert.not_valid_after_utc)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )


def make_csr(site_id: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """A CSR asking for a certificate naming ``site_id``, signed by (and for) ``key``."""
    _check_key(key, "the CSR key")
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(site_id))]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )


def _uris(names: x509.SubjectAlternativeName) -> list[str]:
    return list(names.get_values_for_type(x509.UniformResourceIdentifier))


def sign_csr(
    ca: CertKey,
    csr: x509.CertificateSigningRequest,
    *,
    expected_site_id: str,
    lifetime: timedelta,
    now: datetime | None = None,
) -> x509.Certificate:
    """Sign a peer's CSR after checking its signature and that it names exactly that site.

    Only the site's SPIFFE URI is copied into the certificate; anything else the CSR asks
    for is ignored.
    """
    if not csr.is_signature_valid:
        raise PkiError("the CSR's signature does not verify: make it again from the gateway key")
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError) as e:
        raise PkiError(f"the CSR's public key cannot be read: {e}") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise PkiError("the CSR's key must be EC P-256")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError(
            f"the CSR names no site: it must carry the URI SAN {spiffe_id(expected_site_id)}"
        ) from None
    except ValueError as e:
        raise PkiError(f"the CSR's extensions cannot be parsed: {e}") from None
    uris = _uris(san)
    want = spiffe_id(expected_site_id)
    if uris != [want]:
        raise PkiError(
            f"the CSR names {', '.join(uris) or 'no site'}, expected exactly {want}: "
            "a site may only request a certificate for its own id"
        )
    return issue_cert(ca, expected_site_id, public_key, lifetime=lifetime, now=now)


def site_id_from_uri(uri: str) -> str | None:
    if not uri.startswith(SPIFFE_PREFIX):
        return None
    sid = uri[len(SPIFFE_PREFIX) :]
    return sid if is_site_id(sid) else None


def site_id_of(cert: x509.Certificate) -> str:
    """The site id in a certificate's SPIFFE URI SAN (exactly one is allowed)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("the certificate carries no SAN, so it names no meshlink site") from None
    ids = [s for s in map(site_id_from_uri, _uris(san)) if s is not None]
    if len(ids) != 1:
        raise PkiError(
            f"the certificate must name exactly one site as {SPIFFE_PREFIX}<id>, found {len(ids)}"
        )
    return ids[0]


def peer_site_id(peercert: Mapping[str, Any] | None) -> str:
    """The site id of a TLS peer, from ``ssl_object.getpeercert()`` (its subjectAltName URI).

    Raises PeerNotAuthorized when there is no certificate or it does not name exactly one site.
    """
    if not peercert:
        raise PeerNotAuthorized("the peer presented no certificate")
    sans = peercert.get("subjectAltName") or ()
    ids: list[str] = []
    for entry in sans:
        if isinstance(entry, tuple) and len(entry) == 2 and entry[0] == "URI":
            sid = site_id_from_uri(str(entry[1]))
            if sid is not None:
                ids.append(sid)
            elif str(entry[1]).startswith(SPIFFE_PREFIX):
                raise PeerNotAuthorized(
                    f"the peer's certificate has a malformed site id {entry[1]!r}"
                )
    if len(ids) != 1:
        raise PeerNotAuthorized(
            f"the peer's certificate must name exactly one site as {SPIFFE_PREFIX}<id>, "
            f"found {len(ids)}"
        )
    return ids[0]


def ca_pin(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the DER SubjectPublicKeyInfo: stays the same when a CA is re-signed."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PIN_PREFIX + hashlib.sha256(spki).hexdigest()


def is_pin(text: str) -> bool:
    if not isinstance(text, str) or not text.startswith(PIN_PREFIX):
        return False
    digest = text[len(PIN_PREFIX) :]
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def pins_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def public_keys_equal(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def is_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True if ``ca`` signed ``cert`` (signature and issuer name)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def lifetime_of(cert: x509.Certificate) -> timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def renewal_due(cert: x509.Certificate, now: datetime | None = None) -> bool:
    """True when less than a third of the certificate's lifetime is left (or it has expired)."""
    now = now or utcnow()
    left = cert.not_valid_after_utc - now
    return left < lifetime_of(cert) / 3


def check_valid_now(cert: x509.Certificate, what: str, now: datetime | None = None) -> None:
    now = now or utcnow()
    if now < cert.not_valid_before_utc:
        raise PkiError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z")
    if now > cert.not_valid_after_utc:
        raise PkiError(f"{what} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z")

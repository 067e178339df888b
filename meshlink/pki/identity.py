"""A site's own identity on disk: its CA and its gateway certificate, under ``state_dir/pki``.

Layout (directory 0700, keys 0600, certificates 0644)::

    pki/ca.key  pki/ca.crt                 the site CA (10 years)
    pki/gateway.key  pki/gateway.crt       the gateway leaf, signed by the site CA (90 days)
    pki/gateway-chain.crt                  gateway.crt followed by ca.crt (the grant endpoint
                                           sends the CA so a redeemer can check the pin)

``SiteIdentity.load_or_create`` is idempotent: it creates what is missing and re-issues the
gateway certificate when it is due (less than a third of its life left), names other SANs
than asked for, or no longer matches the CA or the key. A long-running process renews by
calling it again and building new TLS contexts from the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Final

from cryptography import x509

from meshlink.errors import PkiError
from meshlink.pki.certs import (
    CA_LIFETIME,
    GATEWAY_LIFETIME,
    CertKey,
    ca_pin,
    check_site_id,
    create_ca,
    is_issued_by,
    issue_cert,
    new_key,
    public_keys_equal,
    renewal_due,
    site_id_of,
    utcnow,
)
from meshlink.pki.files import (
    cert_to_pem,
    ensure_dir,
    load_cert,
    load_private_key,
    write_cert,
    write_private_key,
)

PKI_DIR: Final = "pki"
_CA_KEY: Final = "ca.key"
_CA_CERT: Final = "ca.crt"
_GATEWAY_KEY: Final = "gateway.key"
_GATEWAY_CERT: Final = "gateway.crt"


def _sans_of(cert: x509.Certificate) -> tuple[frozenset[str], frozenset[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = frozenset(san.get_values_for_type(x509.DNSName))
    ips = frozenset(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return dns, ips


def _wanted_sans(
    gateway_sans: Mapping[str, Sequence[str]] | None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not gateway_sans:
        return (), ()
    unknown = set(gateway_sans) - {"dns", "ip"}
    if unknown:
        raise PkiError(f"gateway_sans: unknown key(s) {sorted(unknown)}; use 'dns' and 'ip'")
    dns = tuple(gateway_sans.get("dns", ()))
    try:
        ips = tuple(str(ip_address(ip)) for ip in gateway_sans.get("ip", ()))
    except ValueError as e:
        raise PkiError(f"gateway_sans.ip: {e}") from None
    return dns, ips


@dataclass(frozen=True)
class SiteIdentity:
    """This site's CA and gateway certificate, loaded from (or created in) ``pki_dir``."""

    site_id: str
    pki_dir: Path
    ca: CertKey
    gateway: CertKey

    @property
    def state_dir(self) -> Path:
        """The state directory this identity lives in (``pki_dir``'s parent)."""
        return self.pki_dir.parent

    @property
    def ca_key_path(self) -> Path:
        return self.pki_dir / _CA_KEY

    @property
    def ca_cert_path(self) -> Path:
        return self.pki_dir / _CA_CERT

    @property
    def gateway_key_path(self) -> Path:
        return self.pki_dir / _GATEWAY_KEY

    @property
    def gateway_cert_path(self) -> Path:
        return self.pki_dir / _GATEWAY_CERT

    @property
    def gateway_chain_path(self) -> Path:
        return self.pki_dir / "gateway-chain.crt"

    @property
    def pin(self) -> str:
        """The pin of this site's CA (``sha256:<hex>``), as carried by link tokens."""
        return ca_pin(self.ca.cert)

    @property
    def ca_pem(self) -> bytes:
        return cert_to_pem(self.ca.cert)

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        site_id: str,
        *,
        gateway_sans: Mapping[str, Sequence[str]] | None = None,
        gateway_lifetime: timedelta = GATEWAY_LIFETIME,
        ca_lifetime: timedelta = CA_LIFETIME,
        now: datetime | None = None,
    ) -> SiteIdentity:
        check_site_id(site_id)
        now = now or utcnow()
        pki_dir = ensure_dir(Path(state_dir) / PKI_DIR)
        ca = _load_or_create_ca(pki_dir, site_id, ca_lifetime, now)
        gateway, changed = _load_or_issue_gateway(
            pki_dir, site_id, ca, _wanted_sans(gateway_sans), gateway_lifetime, now
        )
        ident = cls(site_id=site_id, pki_dir=pki_dir, ca=ca, gateway=gateway)
        if changed or not ident.gateway_chain_path.exists():
            write_cert(ident.gateway_chain_path, gateway.cert, ca.cert)
        return ident


def _load_or_create_ca(pki_dir: Path, site_id: str, lifetime: timedelta, now: datetime) -> CertKey:
    key_path, cert_path = pki_dir / _CA_KEY, pki_dir / _CA_CERT
    if not key_path.exists():
        if cert_path.exists():
            raise PkiError(
                f"{cert_path} exists but its key {key_path} is missing: restore the key, "
                "or remove the pki directory to start a new CA (every link must then be redone)"
            )
        ca = create_ca(site_id, lifetime=lifetime)
        write_private_key(key_path, ca.key)
        write_cert(cert_path, ca.cert)
        return ca
    key = load_private_key(key_path)
    cert = load_cert(cert_path)
    if not public_keys_equal(cert.public_key(), key.public_key()):  # type: ignore[arg-type]
        raise PkiError(f"{cert_path} does not belong to the key {key_path}")
    owner = site_id_of(cert)
    if owner != site_id:
        raise PkiError(
            f"the CA in {pki_dir} was made for site {owner!r}, not {site_id!r}: "
            "use another state directory, or the site id it was made for"
        )
    if now > cert.not_valid_after_utc:
        raise PkiError(
            f"the site CA {cert_path} expired at {cert.not_valid_after_utc:%Y-%m-%d}: "
            "move the pki directory away to create a new CA, then redo every link"
        )
    return CertKey(cert=cert, key=key)


def _load_or_issue_gateway(
    pki_dir: Path,
    site_id: str,
    ca: CertKey,
    sans: tuple[tuple[str, ...], tuple[str, ...]],
    lifetime: timedelta,
    now: datetime,
) -> tuple[CertKey, bool]:
    key_path, cert_path = pki_dir / _GATEWAY_KEY, pki_dir / _GATEWAY_CERT
    if key_path.exists():
        key = load_private_key(key_path)
    else:
        key = new_key()
        write_private_key(key_path, key)
    dns, ips = sans
    if cert_path.exists():
        cert = load_cert(cert_path)
        if (
            is_issued_by(cert, ca.cert)
            and public_keys_equal(cert.public_key(), key.public_key())  # type: ignore[arg-type]
            and site_id_of(cert) == site_id
            and _sans_of(cert) == (frozenset(dns), frozenset(ips))
            and not renewal_due(cert, now)
        ):
            return CertKey(cert=cert, key=key), False
    cert = issue_cert(
        ca, site_id, key.public_key(), lifetime=lifetime, dns_names=dns, ip_addresses=ips, now=now
    )
    write_cert(cert_path, cert)
    return CertKey(cert=cert, key=key), True

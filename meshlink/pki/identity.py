"""A site's own identity: its CA and its gateway certificate, the ``pki`` document of its
state (``meshlink.store``: a directory ``state_dir/pki``, or a Secret).

Files (keys 0600, certificates 0644 in the local copy)::

    ca.key  ca.crt                 the site CA (10 years)
    gateway.key  gateway.crt       the gateway leaf, signed by the site CA (90 days)
    gateway-chain.crt              gateway.crt followed by ca.crt (the grant endpoint sends
                                   the CA so a redeemer can check the pin)

``SiteIdentity.load_or_create`` is idempotent: it creates what is missing and re-issues the
gateway certificate when it is due (less than a third of its life left), names other SANs
than asked for, or no longer matches the CA or the key. A long-running process renews by
calling it again and building new TLS contexts from the result. Every replica of a site
shares one identity: creation and re-issue are optimistic writes of the document, and a
replica that loses the race takes what the winner wrote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

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
from meshlink.pki.files import cert_from_pem, cert_to_pem, check_key_file, key_to_pem
from meshlink.store import StateLike, Store, StoreConflict, StoreError, as_store, local_dir

PKI_DIR: Final = "pki"
_CA_KEY: Final = "ca.key"
_CA_CERT: Final = "ca.crt"
_GATEWAY_KEY: Final = "gateway.key"
_GATEWAY_CERT: Final = "gateway.crt"
_CHAIN: Final = "gateway-chain.crt"


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
    """The local copy of the identity's files (what TLS contexts load)."""
    ca: CertKey
    gateway: CertKey
    store: Store | None = None
    """Where the site's state lives (its records too); None: ``state_dir``'s files."""

    @property
    def state_dir(self) -> Path:
        """The state directory this identity lives in (``pki_dir``'s parent)."""
        return self.pki_dir.parent

    @property
    def state(self) -> Store:
        """The store of the site's records (tokens, peers, links)."""
        return self.store if self.store is not None else as_store(self.state_dir)

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
        return self.pki_dir / _CHAIN

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
        state: StateLike,
        site_id: str,
        *,
        gateway_sans: Mapping[str, Sequence[str]] | None = None,
        gateway_lifetime: timedelta = GATEWAY_LIFETIME,
        ca_lifetime: timedelta = CA_LIFETIME,
        now: datetime | None = None,
    ) -> SiteIdentity:
        check_site_id(site_id)
        now = now or utcnow()
        store = as_store(state)
        sans = _wanted_sans(gateway_sans)
        for _ in range(8):
            try:
                doc = store.read(PKI_DIR, fresh=True)
            except StoreError as e:
                raise PkiError(str(e)) from None
            pki_dir = local_dir(store, PKI_DIR)
            files = dict(doc.files)
            ca = _load_or_create_ca(files, pki_dir, site_id, ca_lifetime, now)
            gateway = _load_or_issue_gateway(
                files, pki_dir, site_id, ca, sans, gateway_lifetime, now
            )
            chain = cert_to_pem(gateway.cert) + cert_to_pem(ca.cert)
            if files.get(_CHAIN) != chain:
                files[_CHAIN] = chain
            if files != doc.files:
                try:
                    store.write(PKI_DIR, files, doc)
                except StoreConflict:
                    continue  # another replica wrote it first: take what it wrote
                except StoreError as e:
                    raise PkiError(str(e)) from None
            for name in (_CA_KEY, _GATEWAY_KEY):
                check_key_file(pki_dir / name)
            return cls(site_id=site_id, pki_dir=pki_dir, ca=ca, gateway=gateway, store=store)
        raise PkiError(f"{store.describe()}: the site identity kept changing while it was loaded")


def _key(files: dict[str, bytes], name: str, where: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(files[name], password=None)
    except (ValueError, TypeError):
        raise PkiError(f"{where / name} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{where / name} must hold an EC P-256 key")
    return key


def _load_or_create_ca(
    files: dict[str, bytes], pki_dir: Path, site_id: str, lifetime: timedelta, now: datetime
) -> CertKey:
    key_path, cert_path = pki_dir / _CA_KEY, pki_dir / _CA_CERT
    if _CA_KEY not in files:
        if _CA_CERT in files:
            raise PkiError(
                f"{cert_path} exists but its key {key_path} is missing: restore the key, "
                "or remove the pki directory to start a new CA (every link must then be redone)"
            )
        ca = create_ca(site_id, lifetime=lifetime)
        files[_CA_KEY] = key_to_pem(ca.key)
        files[_CA_CERT] = cert_to_pem(ca.cert)
        return ca
    key = _key(files, _CA_KEY, pki_dir)
    if _CA_CERT not in files:
        raise PkiError(f"certificate {cert_path} does not exist")
    cert = cert_from_pem(files[_CA_CERT], what=str(cert_path))
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
    files: dict[str, bytes],
    pki_dir: Path,
    site_id: str,
    ca: CertKey,
    sans: tuple[tuple[str, ...], tuple[str, ...]],
    lifetime: timedelta,
    now: datetime,
) -> CertKey:
    if _GATEWAY_KEY in files:
        key = _key(files, _GATEWAY_KEY, pki_dir)
    else:
        key = new_key()
        files[_GATEWAY_KEY] = key_to_pem(key)
    dns, ips = sans
    if _GATEWAY_CERT in files:
        cert = cert_from_pem(files[_GATEWAY_CERT], what=str(pki_dir / _GATEWAY_CERT))
        if (
            is_issued_by(cert, ca.cert)
            and public_keys_equal(cert.public_key(), key.public_key())  # type: ignore[arg-type]
            and site_id_of(cert) == site_id
            and _sans_of(cert) == (frozenset(dns), frozenset(ips))
            and not renewal_due(cert, now)
        ):
            return CertKey(cert=cert, key=key)
    cert = issue_cert(
        ca, site_id, key.public_key(), lifetime=lifetime, dns_names=dns, ip_addresses=ips, now=now
    )
    files[_GATEWAY_CERT] = cert_to_pem(cert)
    return CertKey(cert=cert, key=key)

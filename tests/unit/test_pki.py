"""PKI: certificate profiles, CSR signing, pins, key files, SiteIdentity, TLS contexts.

TLS checks here run real OpenSSL handshakes over in-memory BIO pairs (no sockets).
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshlink import pki
from meshlink.errors import PeerNotAuthorized, PkiError
from meshlink.pki.tls import PinnedSSLObject


def handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, max_rounds: int = 20
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A real TLS handshake between two contexts over memory BIOs; raises what either raises."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(max_rounds):
        if not c_done:
            try:
                client.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            try:
                server.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if c_done and s_done:
            # TLS 1.3: the server learns of a bad client certificate only here, and the
            # client only at its first read; exchange one byte each way to settle it.
            client.write(b"c")
            s_in.write(c_out.read())
            assert server.read(1) == b"c"
            server.write(b"s")
            c_in.write(s_out.read())
            assert client.read(1) == b"s"
            return client, server
    raise AssertionError("handshake did not finish")


@pytest.fixture(scope="module")
def ca_a() -> pki.CertKey:
    return pki.create_ca("site-a")


@pytest.fixture(scope="module")
def ca_b() -> pki.CertKey:
    return pki.create_ca("site-b")


def test_ca_profile(ca_a: pki.CertKey) -> None:
    cert = ca_a.cert
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.subject == cert.issuer
    assert len(cert.subject) > 0
    assert isinstance(ca_a.key.curve, ec.SECP256R1)
    assert pki.site_id_of(cert) == "site-a"
    # back-dated about five minutes, ten years ahead
    assert timedelta(minutes=4) < pki.utcnow() - cert.not_valid_before_utc < timedelta(minutes=6)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > timedelta(days=3649)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_leaf_profile(ca_a: pki.CertKey) -> None:
    key = pki.new_key()
    cert = pki.issue_cert(
        ca_a,
        "site-a",
        key.public_key(),
        lifetime=timedelta(days=1),
        dns_names=["gw.example"],
        ip_addresses=["127.0.0.1", "::1"],
    )
    assert len(cert.subject) == 0
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://meshlink/site/site-a"
    ]
    assert san.value.get_values_for_type(x509.DNSName) == ["gw.example"]
    assert [str(i) for i in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not bc.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert not ku.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca_a.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert pki.is_issued_by(cert, ca_a.cert)
    assert pki.site_id_of(cert) == "site-a"
    # cryptography's own RFC 5280 verifier accepts it as a client and as a server
    store = Store([ca_a.cert])
    PolicyBuilder().store(store).build_client_verifier().verify(cert, [])
    PolicyBuilder().store(store).build_server_verifier(x509.DNSName("gw.example")).verify(cert, [])


def test_leaf_lifetime_capped_at_ca() -> None:
    ca = pki.create_ca("short", lifetime=timedelta(days=2))
    cert = pki.issue_cert(ca, "short", pki.new_key().public_key(), lifetime=timedelta(days=90))
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_leaf_from_other_ca_does_not_verify(ca_a: pki.CertKey, ca_b: pki.CertKey) -> None:
    cert = pki.issue_cert(ca_b, "site-b", pki.new_key().public_key(), lifetime=timedelta(hours=1))
    assert not pki.is_issued_by(cert, ca_a.cert)
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ca_a.cert])).build_client_verifier().verify(cert, [])


@pytest.mark.parametrize("bad", ["", "A", "-a", "a-", "a.b", "a_b", "x" * 64, "é"])
def test_bad_site_ids_refused(ca_a: pki.CertKey, bad: str) -> None:
    with pytest.raises(PkiError, match="not valid"):
        pki.issue_cert(ca_a, bad, pki.new_key().public_key(), lifetime=timedelta(hours=1))
    with pytest.raises(PkiError, match="not valid"):
        pki.create_ca(bad)


def test_csr_signing(ca_a: pki.CertKey) -> None:
    key = pki.new_key()
    csr = pki.make_csr("site-b", key)
    cert = pki.sign_csr(ca_a, csr, expected_site_id="site-b", lifetime=timedelta(hours=24))
    assert pki.site_id_of(cert) == "site-b"
    assert pki.public_keys_equal(cert.public_key(), key.public_key())  # type: ignore[arg-type]
    assert pki.is_issued_by(cert, ca_a.cert)
    life = cert.not_valid_after_utc - pki.utcnow()
    assert timedelta(hours=23) < life <= timedelta(hours=24)
    # PEM round trip
    csr2 = pki.csr_from_pem(pki.csr_to_pem(csr))
    assert csr2 == csr


def test_csr_for_wrong_site_refused(ca_a: pki.CertKey) -> None:
    csr = pki.make_csr("site-c", pki.new_key())
    with pytest.raises(PkiError, match=r"names spiffe://meshlink/site/site-c.*expected exactly"):
        pki.sign_csr(ca_a, csr, expected_site_id="site-b", lifetime=timedelta(hours=1))


def test_csr_with_extra_uri_or_none_refused(ca_a: pki.CertKey) -> None:
    key = pki.new_key()
    two = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("spiffe://meshlink/site/site-b"),
                    x509.UniformResourceIdentifier("spiffe://meshlink/site/site-a"),
                ]
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(PkiError, match="expected exactly"):
        pki.sign_csr(ca_a, two, expected_site_id="site-b", lifetime=timedelta(hours=1))
    bare = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(PkiError, match="names no site"):
        pki.sign_csr(ca_a, bare, expected_site_id="site-b", lifetime=timedelta(hours=1))


def test_csr_wrong_curve_refused(ca_a: pki.CertKey) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://meshlink/site/site-b")]
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(PkiError, match="P-256"):
        pki.sign_csr(ca_a, csr, expected_site_id="site-b", lifetime=timedelta(hours=1))


def test_csr_bad_signature_refused(ca_a: pki.CertKey) -> None:
    pem = pki.csr_to_pem(pki.make_csr("site-b", pki.new_key()))
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x55  # inside the signature
    csr = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(PkiError, match="signature"):
        pki.sign_csr(ca_a, csr, expected_site_id="site-b", lifetime=timedelta(hours=1))


def test_csr_garbage_pem_refused() -> None:
    with pytest.raises(PkiError, match="not a PEM certificate signing request"):
        pki.csr_from_pem(
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        )


def test_ca_pin(ca_a: pki.CertKey, ca_b: pki.CertKey) -> None:
    pin = pki.ca_pin(ca_a.cert)
    assert pki.is_pin(pin)
    assert pin.startswith("sha256:")
    assert len(pin) == 7 + 64
    assert pin != pki.ca_pin(ca_b.cert)
    # the pin is of the key, so a CA re-signed with the same key keeps it
    resigned = pki.issue_cert(ca_a, "site-a", ca_a.key.public_key(), lifetime=timedelta(days=1))
    assert pki.ca_pin(resigned) == pin
    assert not pki.is_pin("sha256:XYZ")
    assert not pki.is_pin("md5:" + "0" * 64)


def test_peer_site_id() -> None:
    ok = {"subjectAltName": (("URI", "spiffe://meshlink/site/site-b"), ("DNS", "x"))}
    assert pki.peer_site_id(ok) == "site-b"
    with pytest.raises(PeerNotAuthorized, match="no certificate"):
        pki.peer_site_id({})
    with pytest.raises(PeerNotAuthorized, match="no certificate"):
        pki.peer_site_id(None)
    with pytest.raises(PeerNotAuthorized, match="found 0"):
        pki.peer_site_id({"subjectAltName": (("DNS", "x"),)})
    with pytest.raises(PeerNotAuthorized, match="malformed"):
        pki.peer_site_id({"subjectAltName": (("URI", "spiffe://meshlink/site/Bad_Id"),)})
    with pytest.raises(PeerNotAuthorized, match="found 2"):
        pki.peer_site_id(
            {
                "subjectAltName": (
                    ("URI", "spiffe://meshlink/site/a"),
                    ("URI", "spiffe://meshlink/site/b"),
                )
            }
        )


def test_renewal_due(ca_a: pki.CertKey) -> None:
    cert = pki.issue_cert(ca_a, "site-a", pki.new_key().public_key(), lifetime=timedelta(days=30))
    start = cert.not_valid_before_utc
    life = cert.not_valid_after_utc - start
    assert not pki.renewal_due(cert, start + life / 2)
    assert pki.renewal_due(cert, start + life * 0.7)
    assert pki.renewal_due(cert, cert.not_valid_after_utc + timedelta(seconds=1))


# -- key files ------------------------------------------------------------------------------


def test_private_key_file_mode_and_roundtrip(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask the file is 0600 from creation
    try:
        key = pki.new_key()
        path = tmp_path / "k.key"
        pki.write_private_key(path, key)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    loaded = pki.load_private_key(path)
    assert loaded.private_numbers() == key.private_numbers()
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]  # no temporary file left


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_readable_key_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.key"
    pki.write_private_key(path, pki.new_key())
    path.chmod(mode)
    with pytest.raises(PkiError, match=f"chmod 600 {path}"):
        pki.load_private_key(path)


def test_key_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="does not exist"):
        pki.load_private_key(tmp_path / "missing.key")
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    with pytest.raises(PkiError, match="not an unencrypted PEM private key"):
        pki.load_private_key(junk)


# -- SiteIdentity -----------------------------------------------------------------------


def test_identity_created_and_reloaded(tmp_path: Path) -> None:
    ident = pki.SiteIdentity.load_or_create(
        tmp_path, "site-a", gateway_sans={"dns": ["gw.a"], "ip": ["127.0.0.1"]}
    )
    for p in (ident.ca_key_path, ident.gateway_key_path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(ident.pki_dir.stat().st_mode) == 0o700
    assert ident.ca_cert_path.exists()
    assert ident.gateway_cert_path.exists()
    assert pki.is_issued_by(ident.gateway.cert, ident.ca.cert)
    assert pki.site_id_of(ident.gateway.cert) == "site-a"
    life = ident.gateway.cert.not_valid_after_utc - ident.gateway.cert.not_valid_before_utc
    assert timedelta(days=89) < life < timedelta(days=91)
    chain = pki.certs_from_pem(ident.gateway_chain_path.read_bytes())
    assert chain == [ident.gateway.cert, ident.ca.cert]
    again = pki.SiteIdentity.load_or_create(
        tmp_path, "site-a", gateway_sans={"dns": ["gw.a"], "ip": ["127.0.0.1"]}
    )
    assert again.ca.cert == ident.ca.cert
    assert again.gateway.cert == ident.gateway.cert
    assert again.pin == ident.pin == pki.ca_pin(ident.ca.cert)
    # other SANs asked for: re-issued, same key
    other = pki.SiteIdentity.load_or_create(tmp_path, "site-a")
    assert other.gateway.cert != ident.gateway.cert
    assert other.gateway.key.private_numbers() == ident.gateway.key.private_numbers()


def test_identity_renews_gateway_when_due(tmp_path: Path) -> None:
    ident = pki.SiteIdentity.load_or_create(tmp_path, "site-a")
    later = ident.gateway.cert.not_valid_before_utc + timedelta(days=61)
    renewed = pki.SiteIdentity.load_or_create(tmp_path, "site-a", now=later)
    assert renewed.gateway.cert.serial_number != ident.gateway.cert.serial_number
    assert renewed.gateway.cert.not_valid_after_utc > ident.gateway.cert.not_valid_after_utc
    assert pki.load_cert(renewed.gateway_cert_path) == renewed.gateway.cert
    assert pki.certs_from_pem(renewed.gateway_chain_path.read_bytes())[0] == renewed.gateway.cert


def test_identity_other_site_refused(tmp_path: Path) -> None:
    pki.SiteIdentity.load_or_create(tmp_path, "site-a")
    with pytest.raises(PkiError, match="made for site 'site-a', not 'site-b'"):
        pki.SiteIdentity.load_or_create(tmp_path, "site-b")


def test_identity_world_readable_key_refused(tmp_path: Path) -> None:
    ident = pki.SiteIdentity.load_or_create(tmp_path, "site-a")
    ident.ca_key_path.chmod(0o644)
    with pytest.raises(PkiError, match="chmod 600"):
        pki.SiteIdentity.load_or_create(tmp_path, "site-a")


def test_identity_missing_ca_key_refused(tmp_path: Path) -> None:
    ident = pki.SiteIdentity.load_or_create(tmp_path, "site-a")
    ident.ca_key_path.unlink()
    with pytest.raises(PkiError, match=r"key .* is missing"):
        pki.SiteIdentity.load_or_create(tmp_path, "site-a")


# -- TLS contexts over memory BIOs ---------------------------------------------------------


@pytest.fixture
def two_sites(tmp_path: Path) -> tuple[pki.SiteIdentity, pki.SiteIdentity, Path]:
    """Site a issues a link client certificate to site b (as a redemption would)."""
    a = pki.SiteIdentity.load_or_create(tmp_path / "a", "site-a")
    b = pki.SiteIdentity.load_or_create(tmp_path / "b", "site-b")
    cert = pki.sign_csr(
        a.ca,
        pki.make_csr("site-b", b.gateway.key),
        expected_site_id="site-b",
        lifetime=timedelta(hours=24),
    )
    link_cert = tmp_path / "b-link.crt"
    pki.write_cert(link_cert, cert)
    return a, b, link_cert


def test_mtls_handshake_strict(two_sites: tuple[pki.SiteIdentity, pki.SiteIdentity, Path]) -> None:
    a, b, link_cert = two_sites
    server = pki.server_context(a.gateway_cert_path, a.gateway_key_path, [a.ca_pem])
    client = pki.client_context(link_cert, b.gateway_key_path, a.ca_pem)
    for ctx in (server, client):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
    c, s = handshake(client, server)
    assert c.version() == s.version() == "TLSv1.3"
    assert pki.authorize_peer(s, "site-b") == "site-b"
    assert pki.authorize_peer(c, "site-a") == "site-a"
    with pytest.raises(PeerNotAuthorized, match="for site 'site-b', expected 'site-c'"):
        pki.authorize_peer(s, "site-c")


def test_mtls_client_cert_from_other_ca_refused(
    two_sites: tuple[pki.SiteIdentity, pki.SiteIdentity, Path],
) -> None:
    a, b, _ = two_sites
    server = pki.server_context(a.gateway_cert_path, a.gateway_key_path, [a.ca_pem])
    # b presents its own gateway certificate (signed by b's CA, which a does not trust)
    client = pki.client_context(b.gateway_cert_path, b.gateway_key_path, a.ca_pem)
    with pytest.raises(ssl.SSLError, match="certificate"):
        handshake(client, server)


def test_mtls_server_from_unexpected_ca_refused(
    two_sites: tuple[pki.SiteIdentity, pki.SiteIdentity, Path],
) -> None:
    a, b, link_cert = two_sites
    server = pki.server_context(b.gateway_cert_path, b.gateway_key_path, [a.ca_pem])
    client = pki.client_context(link_cert, b.gateway_key_path, a.ca_pem)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(client, server)


def test_pinned_context_accepts_matching_pin(
    two_sites: tuple[pki.SiteIdentity, pki.SiteIdentity, Path],
) -> None:
    a, _, _ = two_sites
    server = pki.grant_server_context(a.gateway_chain_path, a.gateway_key_path)
    client = pki.pinned_client_context(a.pin)
    c, _s = handshake(client, server)
    assert isinstance(c, PinnedSSLObject)
    assert c.pinned_ca == a.ca.cert


def test_pinned_context_refuses_other_pin(
    two_sites: tuple[pki.SiteIdentity, pki.SiteIdentity, Path],
) -> None:
    a, b, _ = two_sites
    server = pki.grant_server_context(a.gateway_chain_path, a.gateway_key_path)
    client = pki.pinned_client_context(b.pin)
    with pytest.raises(pki.CaPinMismatch, match=f"CA pin is {a.pin}, the token expects {b.pin}"):
        handshake(client, server)


def test_pinned_context_refuses_leaf_not_signed_by_pinned_ca(
    tmp_path: Path, two_sites: tuple[pki.SiteIdentity, pki.SiteIdentity, Path]
) -> None:
    a, b, _ = two_sites
    # a chain that shows a's CA but a leaf (and key) of b's: a stolen CA certificate is no use
    chain = tmp_path / "forged-chain.crt"
    pki.write_cert(chain, b.gateway.cert, a.ca.cert)
    server = pki.grant_server_context(chain, b.gateway_key_path)
    with pytest.raises(pki.CaPinMismatch, match="not signed by that CA"):
        handshake(pki.pinned_client_context(a.pin), server)


def test_pinned_context_refuses_chain_without_ca(
    two_sites: tuple[pki.SiteIdentity, pki.SiteIdentity, Path],
) -> None:
    a, _, _ = two_sites
    server = pki.grant_server_context(a.gateway_cert_path, a.gateway_key_path)
    with pytest.raises(pki.CaPinMismatch, match="absent"):
        handshake(pki.pinned_client_context(a.pin), server)


def test_pinned_context_bad_pin_text() -> None:
    with pytest.raises(PkiError, match="not a CA pin"):
        pki.pinned_client_context("sha256:abc")


def test_context_refuses_readable_key(
    two_sites: tuple[pki.SiteIdentity, pki.SiteIdentity, Path],
) -> None:
    a, _, _ = two_sites
    a.gateway_key_path.chmod(0o644)
    with pytest.raises(PkiError, match="chmod 600"):
        pki.server_context(a.gateway_cert_path, a.gateway_key_path, [a.ca_pem])


def resigned(ca: pki.CertKey, *, days_from: int, days_to: int) -> x509.Certificate:
    """A copy of ``ca``'s certificate (same key, name and extensions, so the same pin and
    the same leaves verify under it), self-signed again with another validity."""
    now = pki.utcnow()
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=days_from))
        .not_valid_after(now + timedelta(days=days_to))
    )
    for ext in ca.cert.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    return builder.sign(ca.key, hashes.SHA256())


@pytest.fixture
def resigned_ca(tmp_path: Path) -> tuple[pki.SiteIdentity, x509.Certificate, x509.Certificate]:
    """A site, an expired copy of its CA certificate and a valid re-signed one (same key)."""
    a = pki.SiteIdentity.load_or_create(tmp_path / "a", "site-a")
    expired = resigned(a.ca, days_from=-400, days_to=-30)
    fresh = resigned(a.ca, days_from=-1, days_to=3650)
    assert pki.ca_pin(expired) == pki.ca_pin(fresh) == a.pin
    return a, expired, fresh


def _der(*certs: x509.Certificate) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


@pytest.mark.parametrize("expired_first", [True, False])
def test_pinned_chain_tries_every_ca_with_the_pin(
    resigned_ca: tuple[pki.SiteIdentity, x509.Certificate, x509.Certificate],
    expired_first: bool,
) -> None:
    a, expired, fresh = resigned_ca
    cas = (expired, fresh) if expired_first else (fresh, expired)
    assert pki.verify_pinned_chain(_der(a.gateway.cert, *cas), a.pin) == fresh


@pytest.mark.parametrize("expired_first", [True, False])
def test_pinned_handshake_with_expired_and_resigned_ca(
    tmp_path: Path,
    resigned_ca: tuple[pki.SiteIdentity, x509.Certificate, x509.Certificate],
    expired_first: bool,
) -> None:
    a, expired, fresh = resigned_ca
    chain = tmp_path / "chain.crt"
    pki.write_cert(
        chain, a.gateway.cert, *((expired, fresh) if expired_first else (fresh, expired))
    )
    server = pki.grant_server_context(chain, a.gateway_key_path)
    c, _s = handshake(pki.pinned_client_context(a.pin), server)
    assert isinstance(c, PinnedSSLObject)
    assert c.pinned_ca == fresh


def test_pinned_chain_only_expired_ca_says_expired(
    tmp_path: Path,
    resigned_ca: tuple[pki.SiteIdentity, x509.Certificate, x509.Certificate],
) -> None:
    a, expired, _ = resigned_ca
    chain = tmp_path / "chain.crt"
    pki.write_cert(chain, a.gateway.cert, expired)
    server = pki.grant_server_context(chain, a.gateway_key_path)
    with pytest.raises(
        pki.CaPinMismatch,
        match=(
            r"^the grant endpoint's CA matches the token's pin but that CA certificate "
            rf"expired at {expired.not_valid_after_utc:%Y-%m-%d %H:%M}Z$"
        ),
    ):
        handshake(pki.pinned_client_context(a.pin), server)


@pytest.mark.parametrize("expired_first", [True, False])
def test_pinned_chain_refusal_names_the_furthest_check(
    resigned_ca: tuple[pki.SiteIdentity, x509.Certificate, x509.Certificate],
    expired_first: bool,
) -> None:
    """Two candidates with the pin, both unusable: one did not sign the leaf (another
    subject name), the other signed it but expired; the refusal names the expiry."""
    a, expired, _ = resigned_ca
    other_name = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "not it")]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "not it")]))
        .public_key(a.ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(pki.utcnow() - timedelta(days=1))
        .not_valid_after(pki.utcnow() + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(a.ca.key, hashes.SHA256())
    )
    cas = (expired, other_name) if expired_first else (other_name, expired)
    with pytest.raises(pki.CaPinMismatch) as err:
        pki.verify_pinned_chain(_der(a.gateway.cert, *cas), a.pin)
    assert str(err.value) == (
        "the grant endpoint's CA matches the token's pin but that CA certificate expired at "
        f"{expired.not_valid_after_utc:%Y-%m-%d %H:%M}Z "
        "(2 certificates have that pin, none is usable)"
    )
    assert err.value.seen == (a.pin, a.pin)


def test_pinned_chain_not_a_ca_and_expired_leaf(
    ca_a: pki.CertKey,
) -> None:
    """Each remaining check has its own words: a pinned certificate that is no CA, and a leaf
    out of its validity under a good CA."""
    leaf_key = pki.new_key()
    old_leaf = pki.issue_cert(
        ca_a,
        "site-a",
        leaf_key.public_key(),
        lifetime=timedelta(days=1),
        now=pki.utcnow() - timedelta(days=3),
    )
    with pytest.raises(pki.CaPinMismatch, match="but the endpoint's certificate expired at"):
        pki.verify_pinned_chain(_der(old_leaf, ca_a.cert), pki.ca_pin(ca_a.cert))
    # the leaf itself repeated as "CA": its pin is the leaf key's, and it is no CA
    with pytest.raises(pki.CaPinMismatch, match=r"with that pin is not a CA certificate$"):
        pki.verify_pinned_chain(_der(old_leaf, old_leaf), pki.ca_pin(old_leaf))


def test_reloading_context_rebuilds_only_when_files_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = pki.SiteIdentity.load_or_create(tmp_path / "a", "site-a")
    builds: list[int] = []

    def build() -> ssl.SSLContext:
        builds.append(1)
        return pki.grant_server_context(a.gateway_chain_path, a.gateway_key_path)

    tls = pki.ReloadingServerContext(build, [a.gateway_chain_path, a.gateway_key_path])

    def served() -> x509.Certificate:
        c, _ = handshake(pki.pinned_client_context(a.pin), tls.context)
        der = c.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    assert served() == served() == a.gateway.cert
    assert (len(builds), tls.rebuilds) == (1, 0)

    # a missing file: the last good context serves on, one error line for any number of tries
    caplog.set_level(logging.ERROR, logger="meshlink.pki.tls")
    moved = a.gateway_chain_path.rename(tmp_path / "chain.bak")
    assert served() == served() == a.gateway.cert
    assert len(caplog.records) == 1
    assert "cannot read a certificate file" in caplog.records[0].getMessage()
    moved.rename(a.gateway_chain_path)

    renewed = pki.SiteIdentity.load_or_create(
        a.state_dir, "site-a", gateway_sans={"ip": ["127.0.0.1"]}
    )
    assert served() == served() == renewed.gateway.cert
    assert (len(builds), tls.rebuilds) == (2, 1)

"""Link tokens: encoding, every malformed form, the issuer's store and the grant decision
(expiry, uses, secret, clashes, CSR) without a network."""

from __future__ import annotations

import base64
import json
import stat
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlink import links, pki
from meshlink.errors import PkiError, TokenError, TokenMalformed
from meshlink.links.issuer import GrantRefused
from meshlink.links.records import secret_hash
from meshlink.links.tokens import TOKEN_PREFIX, b64url_encode


def sample() -> links.Token:
    return links.Token(
        id="0123456789abcdef",
        secret=b64url_encode(b"s" * 32),
        grant="127.0.0.1:7444",
        pin="sha256:" + "ab" * 32,
        site="site-a",
        exp=2_000_000_000,
    )


def raw_token(body: object) -> str:
    data = json.dumps(body).encode()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def good_body() -> dict[str, object]:
    t = sample()
    return {
        "v": 1,
        "id": t.id,
        "secret": t.secret,
        "grant": t.grant,
        "pin": t.pin,
        "site": t.site,
        "exp": t.exp,
    }


def test_roundtrip() -> None:
    t = sample()
    text = links.encode_token(t)
    assert text.startswith("meshlink-token-v1.")
    assert links.decode_token(text) == t
    assert links.decode_token(f"  {text}\n") == t
    assert links.decode_token(raw_token(good_body())) == t


def test_ipv6_grant_roundtrip() -> None:
    t = replace(sample(), grant="[::1]:7444")
    assert links.decode_token(links.encode_token(t)).grant_hostport == ("::1", 7444)


def test_repr_hides_secret() -> None:
    t = sample()
    assert t.secret not in repr(t)
    assert t.secret not in str(t)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "it is empty"),
        ("   \n", "it is empty"),
        ("hello", "does not start with 'meshlink-token-v1.'"),
        ("meshlink-token-v2.abcd", "version v2 is not supported"),
        (TOKEN_PREFIX + "abc def", "contains whitespace"),
        (TOKEN_PREFIX + "!!!!", "not base64url"),
        (TOKEN_PREFIX + "a", "not base64url"),
        (TOKEN_PREFIX + b64url_encode(b"\xff\xfe"), "not JSON"),
        (TOKEN_PREFIX + b64url_encode(b"{not json"), "not JSON"),
        (TOKEN_PREFIX + b64url_encode(b"[1,2]"), "not a JSON object"),
        (TOKEN_PREFIX + "A" * 5000, "more than any token"),
    ],
)
def test_malformed_text(text: str, message: str) -> None:
    with pytest.raises(TokenMalformed, match=message) as e:
        links.decode_token(text)
    assert str(e.value).startswith("malformed token: ")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "body version 2 is not supported"),
        ({"v": "1"}, "'v' must be an integer"),
        ({"v": True}, "'v' must be an integer"),
        ({"id": None}, "'id' must be a str"),
        ({"id": "XYZ"}, "16 lowercase hex"),
        ({"id": "../../etc/passw"}, "16 lowercase hex"),
        ({"secret": "c2hvcnQ"}, "has 40 bits, at least 128"),
        ({"secret": "a+b/"}, "secret is not base64url"),
        ({"grant": "nohost"}, "grant address"),
        ({"grant": "h:0"}, "grant address"),
        ({"grant": "h:70000"}, "grant address"),
        ({"grant": "::1:80"}, "write an IPv6 address as"),
        ({"grant": "[h]:80"}, "only IPv6 addresses go in brackets"),
        ({"grant": "a b:80"}, "grant address"),
        ({"pin": "sha1:00"}, "CA pin must be"),
        ({"pin": "sha256:" + "AB" * 32}, "CA pin must be"),
        ({"site": "Site_A"}, "not a DNS label"),
        ({"exp": 1.5}, "'exp' must be an integer"),
        ({"exp": 0}, "positive unix time"),
    ],
)
def test_malformed_fields(change: dict[str, object], message: str) -> None:
    body = good_body() | change
    with pytest.raises(TokenMalformed, match=message):
        links.decode_token(raw_token(body))


@pytest.mark.parametrize("missing", ["v", "id", "secret", "grant", "pin", "site", "exp"])
def test_missing_field(missing: str) -> None:
    body = good_body()
    del body[missing]
    with pytest.raises(TokenMalformed, match=f"the field '{missing}' is missing"):
        links.decode_token(raw_token(body))


def test_truncated_token_is_malformed() -> None:
    text = links.encode_token(sample())
    for cut in (len(text) - 1, len(text) - 7, len(TOKEN_PREFIX) + 10):
        with pytest.raises(TokenMalformed):
            links.decode_token(text[:cut])


# -- issuer store and grant decision ----------------------------------------------------


@pytest.fixture
def issuer(tmp_path: Path) -> pki.SiteIdentity:
    return pki.SiteIdentity.load_or_create(tmp_path / "a", "site-a")


def request_for(
    ident: pki.SiteIdentity, token: links.Token, *, site: str | None = None
) -> dict[str, str]:
    site = site or ident.site_id
    return {
        "token_id": token.id,
        "secret": token.secret,
        "site": site,
        "ca_pem": ident.ca_pem.decode(),
        "csr_pem": pki.csr_to_pem(pki.make_csr(site, ident.gateway.key)).decode(),
    }


def site(tmp_path: Path, name: str) -> pki.SiteIdentity:
    return pki.SiteIdentity.load_or_create(tmp_path / name, name)


def test_create_token_stores_only_hash(issuer: pki.SiteIdentity) -> None:
    text = links.create_token(issuer, "127.0.0.1:7444", expiry=timedelta(minutes=5), uses=2)
    tok = links.decode_token(text)
    assert tok.site == "site-a"
    assert tok.pin == issuer.pin
    assert len(base64.urlsafe_b64decode(tok.secret + "==")) >= 16
    assert abs(tok.exp - (time.time() + 300)) < 5
    path = issuer.state_dir / "tokens" / f"{tok.id}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_text()
    assert tok.secret not in content
    rec = links.TOKENS.load(issuer.state_dir, tok.id)
    assert rec is not None
    assert rec.secret_sha256 == secret_hash(tok.secret)
    assert (rec.uses, rec.uses_left, rec.expires) == (2, 2, tok.exp)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"expiry": timedelta(0)}, "between 1 second and 30 days"),
        ({"expiry": timedelta(days=31)}, "between 1 second and 30 days"),
        ({"uses": 0}, "between 1 and 1000"),
        ({"uses": 5000}, "between 1 and 1000"),
    ],
)
def test_create_token_bad_args(
    issuer: pki.SiteIdentity, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(TokenError, match=message):
        links.create_token(issuer, "127.0.0.1:7444", **kwargs)  # type: ignore[arg-type]


def test_create_token_bad_grant_address(issuer: pki.SiteIdentity) -> None:
    with pytest.raises(TokenError, match="grant address"):
        links.create_token(issuer, "localhost")


def decide(issuer: pki.SiteIdentity, body: object, now: float | None = None) -> dict[str, object]:
    return links.decide_redeem(
        issuer, issuer.state_dir, body, endpoints=["127.0.0.1:7443"], now=now
    )


def test_decide_success_and_uses(issuer: pki.SiteIdentity, tmp_path: Path) -> None:
    tok = links.decode_token(links.create_token(issuer, "127.0.0.1:7444", uses=2))
    b, c, d = site(tmp_path, "site-b"), site(tmp_path, "site-c"), site(tmp_path, "site-d")
    answer = decide(issuer, request_for(b, tok))
    assert answer["site"] == "site-a"
    assert answer["endpoints"] == ["127.0.0.1:7443"]
    cert = pki.cert_from_pem(str(answer["cert_pem"]))
    assert pki.site_id_of(cert) == "site-b"
    assert pki.is_issued_by(cert, issuer.ca.cert)
    assert links.is_peer_allowed(issuer.state_dir, "site-b")
    decide(issuer, request_for(c, tok))
    with pytest.raises(GrantRefused, match="already used \\(2 use\\(s\\) allowed\\)") as e:
        decide(issuer, request_for(d, tok))
    assert (e.value.code, e.value.status) == ("token_used_up", 403)
    assert not links.is_peer_allowed(issuer.state_dir, "site-d")


def test_decide_expired(issuer: pki.SiteIdentity, tmp_path: Path) -> None:
    tok = links.decode_token(links.create_token(issuer, "127.0.0.1:7444"))
    with pytest.raises(GrantRefused, match="expired at") as e:
        decide(issuer, request_for(site(tmp_path, "site-b"), tok), now=tok.exp + 1)
    assert (e.value.code, e.value.status) == ("token_expired", 410)


def test_decide_unknown_and_wrong_secret_look_the_same(
    issuer: pki.SiteIdentity, tmp_path: Path
) -> None:
    tok = links.decode_token(links.create_token(issuer, "127.0.0.1:7444"))
    b = site(tmp_path, "site-b")
    with pytest.raises(GrantRefused) as unknown:
        decide(issuer, request_for(b, replace(tok, id="f" * 16)))
    with pytest.raises(GrantRefused) as wrong:
        decide(issuer, request_for(b, replace(tok, secret=b64url_encode(b"x" * 32))))
    # even for an expired token, a wrong secret says "unknown", not "expired"
    with pytest.raises(GrantRefused) as wrong_late:
        decide(
            issuer, request_for(b, replace(tok, secret=b64url_encode(b"x" * 32))), now=tok.exp + 9
        )
    assert unknown.value.code == wrong.value.code == wrong_late.value.code == "unknown_token"
    assert str(unknown.value) == str(wrong.value) == str(wrong_late.value)
    assert tok.secret not in str(wrong.value)
    rec = links.TOKENS.load(issuer.state_dir, tok.id)
    assert rec is not None
    assert rec.uses_left == 1  # refusals consume nothing


def test_decide_site_clash(issuer: pki.SiteIdentity, tmp_path: Path) -> None:
    tok = links.decode_token(links.create_token(issuer, "127.0.0.1:7444", uses=3))
    with pytest.raises(GrantRefused, match="issuer's own site id") as e:
        decide(issuer, request_for(site(tmp_path, "site-a2"), tok, site="site-a"))
    assert e.value.code == "site_id_clash"
    decide(issuer, request_for(site(tmp_path, "site-b"), tok))
    other_b = pki.SiteIdentity.load_or_create(tmp_path / "other-b", "site-b")
    with pytest.raises(GrantRefused, match="already linked") as e:
        decide(issuer, request_for(other_b, tok))
    assert (e.value.code, e.value.status) == ("site_id_clash", 409)


def with_gateway(ident: pki.SiteIdentity, body: dict[str, str]) -> dict[str, str]:
    """What a redeemer of this version sends: its gateway certificate too."""
    return {**body, "gateway_pem": pki.cert_to_pem(ident.gateway.cert).decode()}


def test_the_same_site_may_link_again_and_nobody_else(
    issuer: pki.SiteIdentity, tmp_path: Path
) -> None:
    """After an unlink the issuer could not hear of, the same site (the CA pinned for it,
    and its gateway key, proved) redeems a fresh token; another site with the same id, or
    the same CA without the proof, or someone holding b's public certificates but not its
    key, is still a clash."""
    tok = links.decode_token(links.create_token(issuer, "127.0.0.1:7444", uses=5))
    b = site(tmp_path, "site-b")
    decide(issuer, with_gateway(b, request_for(b, tok)))
    first = links.PEERS.load(issuer.state_dir, "site-b")
    assert first is not None
    answer = decide(issuer, with_gateway(b, request_for(b, tok)), now=time.time() + 1)
    cert = pki.cert_from_pem(str(answer["cert_pem"]))
    assert pki.public_keys_equal(cert.public_key(), b.gateway.key.public_key())  # type: ignore[arg-type]
    again = links.PEERS.load(issuer.state_dir, "site-b")
    assert again is not None
    assert again.linked_at > first.linked_at
    other_b = pki.SiteIdentity.load_or_create(tmp_path / "other-b", "site-b")
    with pytest.raises(GrantRefused, match="another CA is already linked") as e:
        decide(issuer, with_gateway(other_b, request_for(other_b, tok)))
    assert e.value.code == "site_id_clash"
    with pytest.raises(GrantRefused, match="sends its gateway certificate"):
        decide(issuer, request_for(b, tok))
    # b's CA and gateway certificate are public; a CSR for another key proves nothing.
    thief = with_gateway(b, request_for(other_b, tok))
    thief["ca_pem"] = b.ca_pem.decode()
    with pytest.raises(GrantRefused, match="CSR is for another key") as e:
        decide(issuer, thief)
    assert e.value.code == "bad_csr"
    rec = links.TOKENS.load(issuer.state_dir, tok.id)
    assert rec is not None
    assert rec.uses_left == 3


def reauth_body(ident: pki.SiteIdentity, csr_key: pki.SiteIdentity | None = None) -> dict[str, str]:
    return {
        "site": ident.site_id,
        "gateway_pem": pki.cert_to_pem(ident.gateway.cert).decode(),
        "csr_pem": pki.csr_to_pem(
            pki.make_csr(ident.site_id, (csr_key or ident).gateway.key)
        ).decode(),
    }


def test_reauth_needs_a_current_peer_proving_its_identity(
    issuer: pki.SiteIdentity, tmp_path: Path
) -> None:
    tok = links.decode_token(links.create_token(issuer, "127.0.0.1:7444"))
    b = site(tmp_path, "site-b")
    decide(issuer, request_for(b, tok))
    answer = links.decide_reauth(issuer, issuer.state_dir, reauth_body(b))
    cert = pki.cert_from_pem(str(answer["cert_pem"]))
    assert answer["site"] == "site-a"
    assert pki.site_id_of(cert) == "site-b"
    assert pki.is_issued_by(cert, issuer.ca.cert)
    peer = links.PEERS.load(issuer.state_dir, "site-b")
    assert peer is not None
    assert peer.cert_not_after == cert.not_valid_after_utc.timestamp()
    # Another site calling itself b: its gateway certificate is not from b's pinned CA.
    other_b = pki.SiteIdentity.load_or_create(tmp_path / "other-b", "site-b")
    with pytest.raises(GrantRefused, match="not signed by the CA site site-b linked with"):
        links.decide_reauth(issuer, issuer.state_dir, reauth_body(other_b))
    # b's gateway certificate with a CSR for another key.
    with pytest.raises(GrantRefused, match="CSR is for another key"):
        links.decide_reauth(issuer, issuer.state_dir, reauth_body(b, csr_key=other_b))
    with pytest.raises(GrantRefused, match="lacks the text field 'gateway_pem'"):
        links.decide_reauth(issuer, issuer.state_dir, {"site": "site-b", "csr_pem": "x"})
    # A revoked peer is refused, and told that only a new token helps.
    links.revoke_peer(issuer.state_dir, "site-b")
    with pytest.raises(GrantRefused, match="ask site-a for a new token") as e:
        links.decide_reauth(issuer, issuer.state_dir, reauth_body(b))
    assert (e.value.code, e.value.status) == ("not_a_peer", 401)


def test_decide_bad_csr_consumes_nothing(issuer: pki.SiteIdentity, tmp_path: Path) -> None:
    tok = links.decode_token(links.create_token(issuer, "127.0.0.1:7444"))
    b = site(tmp_path, "site-b")
    body = request_for(b, tok)
    body["csr_pem"] = pki.csr_to_pem(pki.make_csr("site-c", b.gateway.key)).decode()
    with pytest.raises(GrantRefused, match="a site may only request") as e:
        decide(issuer, body)
    assert (e.value.code, e.value.status) == ("bad_csr", 422)
    body = request_for(b, tok) | {"csr_pem": "junk"}
    with pytest.raises(GrantRefused, match="not a PEM certificate signing request"):
        decide(issuer, body)
    body = request_for(b, tok) | {"ca_pem": issuer.ca_pem.decode()}  # a CA not of site-b
    with pytest.raises(GrantRefused, match="not a meshlink CA for site 'site-b'"):
        decide(issuer, body)
    rec = links.TOKENS.load(issuer.state_dir, tok.id)
    assert rec is not None
    assert rec.uses_left == 1
    decide(issuer, request_for(b, tok))  # still redeemable


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "must be a JSON object"),
        ({}, "lacks the text field 'token_id'"),
        ({"token_id": "x", "secret": "y", "site": "b", "ca_pem": "c"}, "'csr_pem'"),
        (
            {"token_id": "x", "secret": "y", "site": "B!", "ca_pem": "c", "csr_pem": "d"},
            "not a DNS label",
        ),
    ],
)
def test_decide_malformed(issuer: pki.SiteIdentity, body: object, message: str) -> None:
    with pytest.raises(GrantRefused, match=message) as e:
        decide(issuer, body)
    assert (e.value.code, e.value.status) == ("malformed_request", 400)


def test_refusal_codes_distinct() -> None:
    codes = list(links.REFUSALS)
    statuses = [r.status for r in links.REFUSALS.values()]
    assert len(set(codes)) == len(codes)
    assert len(set(statuses)) == len(statuses)


def test_prune_and_revoke_tokens(issuer: pki.SiteIdentity) -> None:
    old = links.decode_token(links.create_token(issuer, "h:1", now=time.time() - 3 * 86400))
    new = links.decode_token(links.create_token(issuer, "h:1"))  # creating prunes the old one
    ids = [t.id for t in links.TOKENS.list(issuer.state_dir)]
    assert ids == [new.id]
    assert old.id not in ids
    links.revoke_token(issuer.state_dir, new.id)
    assert links.TOKENS.list(issuer.state_dir) == []
    with pytest.raises(links.RecordNotFound, match="no token"):
        links.revoke_token(issuer.state_dir, new.id)


def test_sign_renewal_only_for_allowed_peer(issuer: pki.SiteIdentity, tmp_path: Path) -> None:
    tok = links.decode_token(links.create_token(issuer, "127.0.0.1:7444"))
    b = site(tmp_path, "site-b")
    decide(issuer, request_for(b, tok))
    pem = links.sign_renewal(issuer, issuer.state_dir, "site-b", links.renewal_csr(b))
    cert = pki.cert_from_pem(pem)
    assert pki.site_id_of(cert) == "site-b"
    assert pki.is_issued_by(cert, issuer.ca.cert)
    with pytest.raises(PkiError, match="only request a certificate for its own id"):
        links.sign_renewal(issuer, issuer.state_dir, "site-b", links.renewal_csr(issuer))
    links.revoke_peer(issuer.state_dir, "site-b")
    assert not links.is_peer_allowed(issuer.state_dir, "site-b")
    with pytest.raises(PkiError, match="not a peer"):
        links.sign_renewal(issuer, issuer.state_dir, "site-b", links.renewal_csr(b))
    with pytest.raises(links.RecordNotFound, match="no peer 'site-b'"):
        links.revoke_peer(issuer.state_dir, "site-b")


def test_is_peer_allowed_rejects_odd_names(issuer: pki.SiteIdentity) -> None:
    assert not links.is_peer_allowed(issuer.state_dir, "../pki/ca")
    assert not links.is_peer_allowed(issuer.state_dir, "")
    assert not links.is_peer_allowed(issuer.state_dir, "site-z")


# -- fuzzing: decoding never fails with anything but TokenMalformed ---------------------


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_any_text(text: str) -> None:
    message = ""
    try:
        links.decode_token(text)
    except TokenMalformed as e:
        message = str(e)
    assert "\n" not in message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_body(body: bytes) -> None:
    message = ""
    try:
        links.decode_token(TOKEN_PREFIX + b64url_encode(body))
    except TokenMalformed as e:
        message = str(e)
    assert "\n" not in message


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(list(good_body())),
        st.none()
        | st.integers()
        | st.text(max_size=40)
        | st.booleans()
        | st.lists(st.integers(), max_size=2),
    )
)
def test_fuzz_field_values(change: dict[str, object]) -> None:
    try:
        tok = links.decode_token(raw_token(good_body() | change))
    except TokenMalformed:
        return
    assert links.decode_token(links.encode_token(tok)) == tok

"""Link tokens: the text a site hands out so another site can link to it (pure, no I/O).

Format: ``meshlink-token-v1.`` followed by the unpadded base64url of a JSON object::

    {"v": 1, "id": "<16 hex>", "secret": "<base64url, >= 128 bits>",
     "grant": "host:port", "pin": "sha256:<64 hex>", "site": "<issuer site id>",
     "exp": <unix seconds>}

Whoever holds the token can link once (or ``uses`` times) until ``exp``: treat it as a
password. Decoding refuses anything else with one line saying what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final

from meshlink.errors import TokenMalformed
from meshlink.names import split_hostport
from meshlink.pki import is_pin, is_site_id

TOKEN_PREFIX: Final = "meshlink-token-v1."  # noqa: S105 (a format prefix, not a secret)
TOKEN_VERSION: Final = 1
SECRET_BYTES: Final = 32
MIN_SECRET_BYTES: Final = 16  # 128 bits
MAX_TOKEN_CHARS: Final = 4096
_ID_RE: Final = re.compile(r"[0-9a-f]{16}")
_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url; raises ValueError on anything else."""
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_token_id() -> str:
    return secrets.token_hex(8)


def new_secret() -> str:
    return b64url_encode(secrets.token_bytes(SECRET_BYTES))


def is_token_id(text: object) -> bool:
    return isinstance(text, str) and _ID_RE.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    secret: str
    grant: str
    """Where the issuer's grant endpoint listens, ``host:port``."""
    pin: str
    """The issuer CA's pin, ``sha256:<hex>``."""
    site: str
    """The issuer's site id."""
    exp: int
    """Expiry, unix seconds."""

    def __repr__(self) -> str:  # never show the secret
        return f"Token(id={self.id!r}, site={self.site!r}, grant={self.grant!r}, exp={self.exp})"

    @property
    def grant_hostport(self) -> tuple[str, int]:
        return split_hostport(self.grant, strict=True)


def encode_token(token: Token) -> str:
    body = {
        "v": TOKEN_VERSION,
        "id": token.id,
        "secret": token.secret,
        "grant": token.grant,
        "pin": token.pin,
        "site": token.site,
        "exp": token.exp,
    }
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    text = TOKEN_PREFIX + b64url_encode(raw)
    decode_token(text)  # what we hand out must be what we accept
    return text


def _bad(msg: str) -> TokenMalformed:
    return TokenMalformed(f"malformed token: {msg}")


def _field(body: dict[str, Any], name: str, kind: type) -> Any:
    if name not in body:
        raise _bad(f"the field {name!r} is missing")
    value = body[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _bad(f"the field {name!r} must be an integer")
    if not isinstance(value, kind):
        raise _bad(f"the field {name!r} must be a {kind.__name__}")
    return value


def decode_token(text: str) -> Token:
    """Parse a token; surrounding whitespace is ignored. Raises TokenMalformed."""
    if not isinstance(text, str):
        raise _bad("expected text")
    text = text.strip()
    if not text:
        raise _bad("it is empty")
    if len(text) > MAX_TOKEN_CHARS:
        raise _bad(f"it is {len(text)} characters long, more than any token ({MAX_TOKEN_CHARS})")
    if not text.startswith(TOKEN_PREFIX):
        m = re.match(r"meshlink-token-v(\d+)\.", text)
        if m:
            raise _bad(
                f"version v{m.group(1)} is not supported by this meshlink (it reads v1): "
                "upgrade meshlink or ask for a v1 token"
            )
        raise _bad(f"it does not start with {TOKEN_PREFIX!r}; pass the token exactly as printed")
    payload = text[len(TOKEN_PREFIX) :]
    if any(c.isspace() for c in payload):
        raise _bad("it contains whitespace; it was probably wrapped when copied, join the lines")
    try:
        raw = b64url_decode(payload)
    except (ValueError, binascii.Error):
        raise _bad("its body is not base64url; was it cut or changed when copied?") from None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _bad("its body is not JSON; was it cut or changed when copied?") from None
    if not isinstance(body, dict):
        raise _bad("its body is not a JSON object")
    v = _field(body, "v", int)
    if v != TOKEN_VERSION:
        raise _bad(f"body version {v} is not supported (this meshlink reads {TOKEN_VERSION})")
    tid = _field(body, "id", str)
    if not is_token_id(tid):
        raise _bad("the token id must be 16 lowercase hex digits")
    secret = _field(body, "secret", str)
    try:
        secret_bytes = b64url_decode(secret)
    except (ValueError, binascii.Error):
        raise _bad("the secret is not base64url") from None
    if len(secret_bytes) < MIN_SECRET_BYTES:
        raise _bad(f"the secret has {len(secret_bytes) * 8} bits, at least 128 are required")
    grant = _field(body, "grant", str)
    try:
        split_hostport(grant, strict=True)
    except ValueError as e:
        raise _bad(f"the grant address: {e}") from None
    pin = _field(body, "pin", str)
    if not is_pin(pin):
        raise _bad("the CA pin must be sha256:<64 lowercase hex digits>")
    site = _field(body, "site", str)
    if not is_site_id(site):
        raise _bad(f"the issuer site id {site!r} is not a DNS label")
    exp = _field(body, "exp", int)
    if exp <= 0:
        raise _bad("the expiry must be a positive unix time")
    return Token(id=tid, secret=secret, grant=grant, pin=pin, site=site, exp=exp)

"""The error hierarchy: every error a user can see derives from MeshlinkError.

A MeshlinkError's message is the one line a user reads: what is wrong and what to do.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import enum


class MeshlinkError(Exception):
    """Root of every expected, user-facing error."""


class ConfigError(MeshlinkError):
    """A configuration file or flag is wrong; the message names the offending key."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        where = ""
        if source:
            where += f"{source}: "
        if key:
            where += f"{key}: "
        super().__init__(f"{where}{message}")
        self.key = key
        self.source = source


class PkiError(MeshlinkError):
    """Certificates or keys are missing, unreadable or invalid."""


class TokenError(MeshlinkError):
    """A link token could not be created, parsed or redeemed."""


class TokenMalformed(TokenError):
    """The token text is not a meshlink token."""


class TokenExpired(TokenError):
    """The token's expiry has passed."""


class TokenUsedUp(TokenError):
    """The token has no uses left."""


class TokenUnknown(TokenError):
    """The issuer has no record of this token (never issued, revoked, or wrong secret)."""


class TokenPinMismatch(TokenError):
    """The grant endpoint's CA does not match the pin carried by the token."""


class SiteIdClash(TokenError):
    """The redeeming site's id is already linked, or equals the issuer's."""


class GrantUnreachable(TokenError):
    """The grant endpoint could not be reached at the address in the token."""


class LinkRevoked(TokenError):
    """The issuer no longer has this site as a peer (revoked, or unlinked): only a new
    token links the two sites again."""


class PeerNotAuthorized(MeshlinkError):
    """A peer's certificate identity is not one we have a link record for."""


class ErrorCode(enum.IntEnum):
    """Wire error codes carried by RST / GOAWAY frames and ProtocolError."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 4
    FRAME_SIZE_ERROR = 5
    REFUSED_STREAM = 6
    CANCEL = 7
    CONNECT_ERROR = 8
    NO_ROUTE = 9
    UNSUPPORTED_VERSION = 10
    NOT_AUTHORIZED = 11


class ProtocolError(MeshlinkError):
    """Base for wire protocol errors; carries a wire error code."""

    code: ErrorCode = ErrorCode.PROTOCOL_ERROR

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class LocalProtocolError(ProtocolError):
    """We misused the protocol API (a bug on our side)."""

    code = ErrorCode.INTERNAL_ERROR


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class CatalogError(MeshlinkError):
    """A catalog record or message from a peer is invalid; the message says which field."""


class KubeError(MeshlinkError):
    """The Kubernetes API refused or could not be reached."""

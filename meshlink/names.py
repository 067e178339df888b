"""Names and addresses every layer checks the same way: DNS labels (site ids, namespaces,
service, port and host names), instance ids, service protocols, ``host:port`` text and
address families.

The one place each rule is written; callers turn a refusal into their own error type
(ConfigError naming a key, CatalogError for a peer's record, ...).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final, TypeGuard

_DNS_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
"""Used with fullmatch: `$` would also match before a trailing newline."""
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9.-]{1,253}")

_INSTANCE_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,253}")
MAX_REPLICAS: Final = 1024
"""The most instances one site may announce (``proto`` HELLO)."""

PROTOCOLS: Final = frozenset({"TCP", "UDP", "SCTP"})
"""The protocols of a Kubernetes service port."""


def is_dns_label(value: object) -> TypeGuard[str]:
    """One lowercase RFC 1123 label: a-z, 0-9 and '-', at most 63, no '-' at either end.
    Site ids, namespaces, service, port and host names all obey it."""
    return isinstance(value, str) and _DNS_LABEL.fullmatch(value) is not None


def is_instance_id(value: object) -> TypeGuard[str]:
    """An instance id (a pod name, a host name, a random id): 1 to 253 of a-z, A-Z, 0-9,
    '.', '_' and '-', as the tunnel's HELLO carries it; "" is "not named"."""
    return isinstance(value, str) and _INSTANCE_ID.fullmatch(value) is not None


def is_ascii_number(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def split_hostport(text: str, *, strict: bool = False) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into (host, port, brackets removed); ValueError if it
    is not one. ``strict`` (text a peer handed us, as in a token) also wants a port from 1,
    an IPv6 address in brackets and nothing else in them, and a plain host name."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not is_ascii_number(port) or int(port) > 65535:
        raise ValueError(f"{text!r} is not host:port")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if strict:
        if int(port) == 0 or len(port) > 5:
            raise ValueError(f"{text!r} is not host:port")
        if bracketed and ":" not in host:
            raise ValueError(f"{text!r}: only IPv6 addresses go in brackets")
        if not bracketed and ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address as [addr]:port")
        if not host or (":" not in host and not _HOSTNAME.fullmatch(host)):
            raise ValueError(f"{text!r} has no valid host")
    return host, int(port)


def address_family(address: str) -> str:
    """``IPv4`` or ``IPv6`` (Kubernetes' names); ValueError if it is no IP address."""
    return "IPv6" if ipaddress.ip_address(address).version == 6 else "IPv4"

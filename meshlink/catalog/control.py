"""The site-to-site control channel's messages and their codec (sans-IO).

Every control frame of a link (``proto`` CONTROL) carries one JSON object, the message,
whose ``"t"`` names its type:

- ``{"t": "update", "add": [entry...], "del": [key...]}``: catalog replication (the entry
  and key formats are ``catalog.sync``'s); either list may be absent when empty.
- ``{"t": "renew", "csr": PEM}``: the redeemer of a link asks its issuer to sign a new link
  client certificate for the same key.
- ``{"t": "renewed", "cert": PEM}``: the issuer's answer.
- ``{"t": "unlink"}``: the sender has deleted its side of the link between the two sites
  (``meshlink link delete`` on the redeemer, ``meshlink peer revoke`` on the issuer) and is
  about to close it. The receiver forgets the sender (its peer record, or its link record)
  and drops what it learned through the link at once: an unlink is not an outage, so no
  grace period applies. A site can only unlink itself: the link authenticates the sender.

``encode`` is the one place a message becomes bytes, and the one place it is split: an
update whose encoding exceeds ``CONTROL_LIMIT`` is cut into several updates by size, every
one but the last marked ``"more": true``, so the receiver applies them together (a
snapshot is never seen in part: the grace period relies on it). ``decode`` is the one place bytes
become a message; it raises ``CatalogError`` for anything that is not one. The entries of
an update stay raw here: the catalog checks each and refuses one without dropping the rest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Final

from meshlink.errors import CatalogError

log = logging.getLogger(__name__)

CONTROL_LIMIT: Final = 512 * 1024
"""Messages above this are split: half the tunnel's largest control frame (1 MiB,
``proto.MAX_CONTROL``). A record at its limits (1,000 endpoints) is about 80 KiB."""
MAX_PEM: Final = 16384
"""A CSR or certificate of a renewal longer than this is refused."""

WireKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class Update:
    """Catalog entries to add or replace, and keys to withdraw, from one peer."""

    add: tuple[Any, ...] = ()
    """Entries as on the wire (``{"path": [...], "rec": {...}}`` or ``"site"``); checked
    one by one by the catalog."""
    delete: tuple[WireKey, ...] = ()
    """``(origin, namespace, name)`` keys; namespace and name are empty for a site."""
    more: bool = False
    """A fragment of a larger update: more fragments follow (``encode`` splits)."""


@dataclass(frozen=True, slots=True)
class RenewRequest:
    csr: str
    """PEM of a certificate signing request for the redeemer's gateway key."""


@dataclass(frozen=True, slots=True)
class RenewAnswer:
    cert: str
    """PEM of the renewed link client certificate."""


@dataclass(frozen=True, slots=True)
class Unlink:
    """The sender deleted its side of the link (see the module docstring)."""


ControlMessage = Update | RenewRequest | RenewAnswer | Unlink


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _update_json(add: list[Any] | tuple[Any, ...], delete: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"t": "update"}
    if add:
        out["add"] = list(add)
    if delete:
        out["del"] = delete
    return out


def encode(message: ControlMessage, limit: int = CONTROL_LIMIT) -> list[bytes]:
    """The frames that carry ``message``, each at most ``limit`` bytes (an update may
    become several; an empty update none). An entry too large on its own (which the
    record limits make impossible in practice) is dropped with one log line rather than
    sent to be refused by the peer."""
    if isinstance(message, RenewRequest):
        return [_dumps({"t": "renew", "csr": message.csr})]
    if isinstance(message, RenewAnswer):
        return [_dumps({"t": "renewed", "cert": message.cert})]
    if isinstance(message, Unlink):
        return [_dumps({"t": "unlink"})]
    dels = [list(k) for k in message.delete]
    if not message.add and not dels:
        return []
    whole = _dumps(_update_json(message.add, dels))
    if len(whole) <= limit:
        return [whole]
    # Too large: pack the encoded items greedily into updates that fit.
    overhead = len(_dumps(_update_json([0], [0]))) - 2 + len(',"more":true')
    parts: list[bytes] = []
    adds: list[bytes] = []
    keys: list[bytes] = []
    size = overhead

    def flush() -> None:
        nonlocal size
        if adds or keys:
            body = [b'{"t":"update","more":true']
            if adds:
                body.append(b',"add":[' + b",".join(adds) + b"]")
            if keys:
                body.append(b',"del":[' + b",".join(keys) + b"]")
            parts.append(b"".join(body) + b"}")
        adds.clear()
        keys.clear()
        size = overhead

    for into, items in ((adds, message.add), (keys, dels)):
        for item in items:
            raw = json.dumps(item, separators=(",", ":")).encode()
            if len(raw) + overhead > limit:
                log.error("catalog entry of %d bytes exceeds %d: not sent", len(raw), limit)
                continue
            if size + len(raw) + 1 > limit:
                flush()
            into.append(raw)
            size += len(raw) + 1
    flush()
    if parts:  # the last fragment: the update is complete
        parts[-1] = parts[-1].replace(b'"more":true,', b"", 1)
    return parts


def decode(payload: bytes) -> ControlMessage:
    """The message in one control frame; CatalogError if it is not a valid one."""
    try:
        msg = json.loads(payload)
    except ValueError as e:  # UnicodeDecodeError is a ValueError too
        raise CatalogError(f"control message is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise CatalogError("control message is not a JSON object")
    kind = msg.get("t")
    if kind == "update":
        adds, dels = msg.get("add", []), msg.get("del", [])
        if not isinstance(adds, list) or not isinstance(dels, list):
            raise CatalogError("update add/del must be lists")
        # A malformed key withdraws nothing (as an unknown one): it is skipped.
        keys = tuple(
            (k[0], k[1], k[2])
            for k in dels
            if isinstance(k, list) and len(k) == 3 and all(isinstance(x, str) for x in k)
        )
        return Update(tuple(adds), keys, msg.get("more") is True)
    if kind == "renew":
        csr = msg.get("csr")
        if not isinstance(csr, str) or len(csr) > MAX_PEM:
            raise CatalogError("renew without a CSR")
        return RenewRequest(csr)
    if kind == "renewed":
        cert = msg.get("cert")
        if not isinstance(cert, str) or len(cert) > MAX_PEM:
            raise CatalogError("renewed without a certificate")
        return RenewAnswer(cert)
    if kind == "unlink":
        return Unlink()
    raise CatalogError(f"unknown control message type {kind!r}")

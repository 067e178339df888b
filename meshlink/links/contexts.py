"""TLS contexts for the gateway, built from this site's identity and its link records.

Who trusts what: an issuer signs the client certificate of every site that redeems one of its
tokens, so its listener trusts only its own CA for clients and then authorizes the peer's
site id against its peer records (``is_peer_allowed``). A redeemer dials with the client
certificate of the link and trusts only the peer's CA recorded in the link.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from meshlink.links.records import LinkRecord, link_cert_path
from meshlink.pki import ReloadingServerContext, SiteIdentity, client_context, server_context


def gateway_server_context(identity: SiteIdentity) -> ssl.SSLContext:
    """The link listener's context: our gateway certificate, clients signed by our CA."""
    return server_context(identity.gateway_cert_path, identity.gateway_key_path, [identity.ca_pem])


def reloading_gateway_context(current: Callable[[], SiteIdentity]) -> ReloadingServerContext:
    """The link listener's context, following the identity's files (the hourly reload may
    re-issue the gateway certificate): rebuilt only when they change, as the grant
    endpoint's is. Peers present client certificates our CA signed at redemption: it
    trusts only that CA."""
    ident = current()
    return ReloadingServerContext(
        lambda: gateway_server_context(current()),
        [ident.gateway_cert_path, ident.gateway_key_path, ident.ca_cert_path],
    )


def link_client_context(identity: SiteIdentity, link: LinkRecord) -> ssl.SSLContext:
    """The dialer's context for one link: its client certificate, the peer's CA only."""
    return client_context(
        link_cert_path(identity.state, link.name),
        identity.gateway_key_path,
        link.peer_ca_pem.encode("ascii"),
    )

"""Links between sites: link tokens, the grant endpoint, link and peer records on disk.

Modules: ``tokens`` (token text, pure), ``records`` (files under the state directory),
``issuer`` (token creation, the grant and re-authentication decisions, no network),
``grant`` (the HTTPS grant endpoint), ``redeem`` (the redeeming client, and
re-authentication), ``renewal`` (link certificate renewal pieces), ``certcheck`` (the
certificate checks: a link certificate a peer signed, a peer's proof of its identity),
``contexts`` (gateway TLS contexts from records), ``commands`` (CLI text).
"""

from meshlink.links.commands import (
    cmd_link_create,
    cmd_link_delete,
    cmd_link_list,
    cmd_peer_list,
    cmd_peer_revoke,
    cmd_token_create,
    cmd_token_list,
    cmd_token_revoke,
    read_token_arg,
)
from meshlink.links.contexts import (
    gateway_server_context,
    link_client_context,
    reloading_gateway_context,
)
from meshlink.links.grant import (
    REAUTH_PATH,
    REDEEM_PATH,
    GrantServer,
    RunningGrant,
    start_grant_server,
    start_site_grant,
)
from meshlink.links.issuer import (
    REFUSALS,
    GrantRefused,
    create_token,
    decide_reauth,
    decide_redeem,
    sign_renewal,
)
from meshlink.links.records import (
    LINKS,
    PEERS,
    TOKENS,
    LinkRecord,
    PeerRecord,
    RecordNotFound,
    RecordStore,
    TokenRecord,
    delete_link,
    find_link_to,
    forget_site,
    is_peer_allowed,
    link_cert,
    link_cert_path,
    revoke_peer,
    revoke_token,
)
from meshlink.links.redeem import reauthenticate, redeem
from meshlink.links.renewal import (
    Renewals,
    link_renewal_due,
    renewal_csr,
    renewal_due,
    store_renewed_cert,
)
from meshlink.links.tokens import TOKEN_PREFIX, Token, decode_token, encode_token

__all__ = [
    "LINKS",
    "PEERS",
    "REAUTH_PATH",
    "REDEEM_PATH",
    "REFUSALS",
    "TOKENS",
    "TOKEN_PREFIX",
    "GrantRefused",
    "GrantServer",
    "LinkRecord",
    "PeerRecord",
    "RecordNotFound",
    "RecordStore",
    "Renewals",
    "RunningGrant",
    "Token",
    "TokenRecord",
    "cmd_link_create",
    "cmd_link_delete",
    "cmd_link_list",
    "cmd_peer_list",
    "cmd_peer_revoke",
    "cmd_token_create",
    "cmd_token_list",
    "cmd_token_revoke",
    "create_token",
    "decide_reauth",
    "decide_redeem",
    "decode_token",
    "delete_link",
    "encode_token",
    "find_link_to",
    "forget_site",
    "gateway_server_context",
    "is_peer_allowed",
    "link_cert",
    "link_cert_path",
    "link_client_context",
    "link_renewal_due",
    "read_token_arg",
    "reauthenticate",
    "redeem",
    "reloading_gateway_context",
    "renewal_csr",
    "renewal_due",
    "revoke_peer",
    "revoke_token",
    "sign_renewal",
    "start_grant_server",
    "start_site_grant",
    "store_renewed_cert",
]

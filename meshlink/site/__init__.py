"""The parts of a running site, each an object with its own state; ``meshlink.runtime``
builds them and runs them as named tasks.

Modules: ``control`` (the control channel: link events, control messages, renewal, the
catalog feed), ``router`` (where a flow goes), ``imports`` (the import plane: listeners and
DNS from the platform's import views), ``linkset`` (the link records on disk), ``identity``
(the site's keys and certificates, reloaded), ``linkcerts`` (the link certificates: expiry,
re-authentication while a link is down), ``metrics`` (Prometheus), ``memory`` (the catalog
kept across restarts), ``reload`` (SIGHUP), ``platforms`` (the platform a config asks for).
"""

from meshlink.site.control import ControlChannel
from meshlink.site.identity import CurrentIdentity
from meshlink.site.imports import ImportPlane
from meshlink.site.linkcerts import LinkCerts, LinkCertState
from meshlink.site.linkset import LinkSet, peer_authorizer
from meshlink.site.memory import CatalogMemory
from meshlink.site.metrics import Metrics
from meshlink.site.platforms import make_platform
from meshlink.site.router import Router

__all__ = [
    "CatalogMemory",
    "ControlChannel",
    "CurrentIdentity",
    "ImportPlane",
    "LinkCertState",
    "LinkCerts",
    "LinkSet",
    "Metrics",
    "Router",
    "make_platform",
    "peer_authorizer",
]

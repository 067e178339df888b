"""The gateway's public vocabulary: dial specs, routes, the handler protocol, link status,
and the flow errors `open_flow` raises."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from meshlink.errors import ErrorCode, MeshlinkError
from meshlink.proto import FlowTarget


@dataclass(frozen=True)
class DialSpec:
    """A link this site dials: to `peer_site`, trying `endpoints` ("host:port") in order."""

    name: str
    peer_site: str
    endpoints: tuple[str, ...]
    ssl_context: Callable[[], ssl.SSLContext]
    """Builds the client context for this peer (called per attempt: rotation-friendly)."""


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """The target is served here: connect to host:port."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class PeerRoute:
    """Forward the flow over the link to `peer_site` (the target itself or a next hop)."""

    peer_site: str


@dataclass(frozen=True, slots=True)
class NoRoute:
    reason: str


Route = LocalRoute | PeerRoute | NoRoute


class GatewayHandler(Protocol):
    """What the gateway tells the rest of the daemon about its links (the site's control
    channel implements it)."""

    def link_up(self, peer_site: str) -> None:
        """The first instance of ``peer_site`` is linked (before its ``instance_up``)."""

    def link_down(self, peer_site: str, reason: str) -> None:
        """The last instance of ``peer_site`` went (after its ``instance_down``)."""

    def instance_up(self, peer_site: str, instance: str) -> None:
        """A link with the instance ``instance`` of ``peer_site`` is up."""

    def instance_down(self, peer_site: str, instance: str, reason: str) -> None:
        """The link with that instance is gone."""

    def control_received(self, peer_site: str, instance: str, payload: bytes) -> None:
        """A control message over the link with that instance."""


RouteFn = Callable[[FlowTarget], Route]
"""Where a flow for a target goes (the site's router): asked per flow, so it must be cheap."""


@dataclass(frozen=True, slots=True)
class LinkStatus:
    peer_site: str
    direction: str
    """"dial" or "accept"."""
    state: str
    """"up", "connecting", "backoff" (dialers waiting to retry), "standby" (a dialer
    idle because the peer's own dials are the preferred links) or "linked" (a dialer
    holding links with every instance the peer announces)."""
    rtt_ms: float | None
    """Last heartbeat round trip."""
    rtt_ewma_ms: float | None
    since: float
    """Wall-clock time (epoch seconds) of the last state change."""
    bytes_in: int
    bytes_out: int
    flows_open: int
    last_error: str | None
    endpoint: str | None = None
    dial_name: str | None = None
    peer_instance: str = ""
    """The instance of the peer site at the other end ("" for a dialer's row, or a peer
    that names no instance)."""
    peer_replicas: int = 1
    """How many instances the peer site runs, as that instance announced."""
    refused: bool = False
    """The peer refused this site as not authorized (GOAWAY NOT_AUTHORIZED): the link was
    revoked or deleted there, and only a new token links the two again."""


class FlowError(MeshlinkError):
    """A flow could not be opened or was aborted; `code` is the wire reason."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.CONNECT_ERROR):
        super().__init__(message)
        self.code = code


class NoRouteError(FlowError):
    """No path to the target's site (or the target is not exported there)."""

    def __init__(self, message: str):
        super().__init__(message, ErrorCode.NO_ROUTE)


class FlowRefused(FlowError):
    """The far gateway (or its service) refused the flow."""


def describe_code(code: ErrorCode) -> str:
    """A human reason for a stream reset code."""
    return {
        ErrorCode.NO_ROUTE: "no route to the service there",
        ErrorCode.CONNECT_ERROR: "the service's endpoint refused or did not answer",
        ErrorCode.REFUSED_STREAM: "the gateway is at its flow limit or shutting down",
        ErrorCode.CANCEL: "the flow was cancelled",
        ErrorCode.NOT_AUTHORIZED: "not authorized",
    }.get(code, code.name)

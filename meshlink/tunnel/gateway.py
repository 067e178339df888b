"""The gateway: accepts and dials TLS 1.3 mTLS links, keeps one live link per peer site
instance, heartbeats them, and forwards flows (to a local endpoint, or relayed to another
peer).

Flows are multiplexed streams over one long-lived TLS connection per peer (the decision and
its measurements are in the package docstring, `meshlink.tunnel`).

Lifecycle of a link: TCP accept -> TLS handshake (the listener switches each handshake to
the current server context in the SNI callback, so rotated certificates and newly
trusted CAs apply to new links) -> the peer's site id from its certificate
(`pki.authorize_peer`) -> `authorize(site)` (else HELLO + GOAWAY NOT_AUTHORIZED, one log
line) -> HELLO exchange (each side names its instance and how many its site runs) ->
`handler.link_up` (the site's first instance) and `handler.instance_up`. A dialer checks
that the server's certificate names the site it meant to reach. A link silent for
`dead_after` heartbeat intervals is aborted (this catches a peer behind an iptables DROP).

Several instances per site (active/active; the registry is ``LinkTable``): a dialer keeps
dialing until it holds links with as many distinct instances as the peer announces. Behind
a Kubernetes Service each dial lands on a random replica; one that lands on an instance
already linked is closed at its HELLO (the existing link is untouched) and retried after a
short jittered delay (``LANDED_DELAY``), ``LANDED_RETRIES`` times, then with the backoff.
Endpoints are tried first that did not lead to a linked instance last time (local mode
lists one endpoint per replica). Failed dials use full-jitter exponential backoff (0.1 s
doubling to 5 s). Two links with one (site, instance) pair: if both sides dialled, the one
dialled by the lexicographically smaller site id is kept; if one side dialled both, the
existing one is kept (both ends agree on that) unless it has been silent for two heartbeat
intervals, or the peer names no instance (then the newer: the old is likely dead).

A gateway made with ``open_links=False`` binds its listener but neither accepts (dials get
"connection refused") nor dials until ``open()``: the site calls it once it knows its own
exports (its platform published them), because a link carries new flows at once and a
process that cannot route them yet would fail them. The listener must not wait for more
than that (readiness, or the peers' snapshots): in Kubernetes the gateway Service publishes
not-ready pods, so sites restarted all at once can link without waiting for each other.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

from meshlink.config import listen_error
from meshlink.errors import ErrorCode, LocalProtocolError, MeshlinkError, PeerNotAuthorized
from meshlink.names import split_hostport
from meshlink.pki import AlertingSSLObject, authorize_peer
from meshlink.proto import DEFAULT_MAX_STREAMS, MAX_HOPS, FlowTarget
from meshlink.tunnel.link import STREAM_WINDOW, Link, StreamEnd
from meshlink.tunnel.linktable import LinkTable
from meshlink.tunnel.ratelimit import TokenBucket
from meshlink.tunnel.splice import End, Flow, TcpEnd, join
from meshlink.tunnel.types import (
    DialSpec,
    FlowError,
    FlowRefused,
    GatewayHandler,
    LinkStatus,
    LocalRoute,
    NoRoute,
    NoRouteError,
    PeerRoute,
    RouteFn,
)

log = logging.getLogger(__name__)

BACKOFF_BASE: Final = 0.1
BACKOFF_CAP: Final = 5.0
LANDED_DELAY: Final = (0.05, 0.25)
"""Seconds (uniform) before dialing again after a dial met an instance already linked."""
LANDED_RETRIES: Final = 8
"""Such quick retries in a row, before the backoff applies (a peer may run fewer replicas
than it announced, for a while: a rolling update, a pod being replaced)."""
NEW_FLOWS_PER_SECOND: Final = 2000.0
"""Default rate of new flows a peer may open over one link (the burst is one second's
worth); the excess is refused with RST(REFUSED_STREAM)."""


class _Outcome(enum.Enum):
    UP = "up"
    LANDED = "landed on an instance already linked"
    FAILED = "failed"


class _Dialer:
    def __init__(self, spec: DialSpec) -> None:
        self.spec = spec
        self.task: asyncio.Task[None] | None = None
        self.state = "connecting"
        self.since = time.time()
        self.last_error: str | None = None
        self.links: set[Link] = set()  # the open links this dialer made
        self.last_link: Link | None = None  # the last one that came up
        self.endpoint: str | None = None
        self.landed: dict[str, str] = {}  # endpoint -> the instance it led to last
        self.refused = False  # the last attempt ended in the peer's NOT_AUTHORIZED

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.since = time.time()


class _AcceptSSLObject(AlertingSSLObject):
    """Server-side TLS object that logs why a handshake was refused (asyncio and uvloop
    only log that at debug level): one line per refused peer, which gets the alert."""

    def refused(self, error: ssl.SSLError) -> None:
        log.warning("refused a link: TLS handshake failed: %s", _error_reason(error))


class Gateway:
    """The tunnel data plane of one site (see the module docstring).

    Over 300 lines because accepting, dialing, the one-live-link-per-peer registry and
    flow routing share that registry and the link lifecycle; the dialers (``_Dialer``,
    ``set_dials``, ``_dial_loop``) are the first part to move out when it grows again.
    """

    def __init__(
        self,
        site_id: str,
        *,
        listen: tuple[str, int] | None,
        server_context: Callable[[], ssl.SSLContext] | None,
        authorize: Callable[[str], bool],
        handler: GatewayHandler,
        route: RouteFn,
        heartbeat_interval: float = 1.0,
        dead_after: int = 3,
        handshake_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        stream_window: int = STREAM_WINDOW,
        max_streams: int = DEFAULT_MAX_STREAMS,
        new_flows_per_second: float = NEW_FLOWS_PER_SECOND,
        instance: str = "",
        replicas: int = 1,
        open_links: bool = True,
    ) -> None:
        if listen is not None and server_context is None:
            raise ValueError("a gateway that listens needs a server_context")
        self.site_id = site_id
        self._listen = listen
        self._server_context = server_context
        self._authorize = authorize
        self.handler = handler
        self.route = route
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.stream_window = stream_window
        """Flow-control credit per stream: buffering is bounded by flows x this."""
        self.max_streams = max_streams
        """Streams a peer may have open at once over one link (announced in our HELLO)."""
        self.new_flows_per_second = new_flows_per_second
        self.instance = instance
        """This process's instance id, announced in every HELLO."""
        self.replicas = replicas
        """How many instances this site runs, announced in every HELLO."""
        self._open_budget: dict[Link, TokenBucket] = {}  # per link: new flows it may open
        self._links = LinkTable(fresh_within=2 * heartbeat_interval)
        self._all: set[Link] = set()  # every attached link (live or not yet ready)
        self._dialers: dict[str, _Dialer] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._started = asyncio.Event()
        self._open = asyncio.Event()
        if open_links:
            self._open.set()
        self._start_error: BaseException | None = None
        self._running = False
        self.bound_address: tuple[str, int] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def started(self) -> None:
        """Wait until the listener is bound (raises what stopped it from binding)."""
        await self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def open(self) -> None:
        """Accept and dial links from now on (see the module docstring)."""
        self._open.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def run(self) -> None:
        """Serve until cancelled: listener, dialers, heartbeats. Clean shutdown on cancel."""
        loop = asyncio.get_running_loop()
        try:
            if self._listen is not None:
                try:
                    self._server = await loop.create_server(
                        self._new_accepted_link,
                        self._listen[0],
                        self._listen[1],
                        ssl=self._listener_context(),
                        ssl_handshake_timeout=self.handshake_timeout,
                        reuse_address=True,
                        start_serving=False,  # see open()
                    )
                except OSError as e:
                    err = listen_error("gateway.listen", *self._listen, e)
                    self._start_error = err
                    raise err from None
                except MeshlinkError as e:  # e.g. the certificate files cannot be loaded
                    self._start_error = e
                    raise
                sockname = self._server.sockets[0].getsockname()
                self.bound_address = (sockname[0], sockname[1])
                log.info("gateway listening for links on %s:%d", *self.bound_address)
            self._started.set()
            await self._open.wait()
            if self._server is not None:
                await self._server.start_serving()
            self._running = True
            for dialer in self._dialers.values():
                self._start_dialer(dialer)
            await self._heartbeats()
        finally:
            self._started.set()
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._running = False
        if self._server is not None:
            self._server.close()
        for link in list(self._all):
            link.close("gateway shutting down")
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for d in self._dialers.values():
            d.task = None
            d.links.clear()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"gateway-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("gateway task %s failed: %r", task.get_name(), exc, exc_info=exc)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            limit = self.heartbeat_interval * self.dead_after
            for link in list(self._all):
                link.heartbeat(limit)

    # ------------------------------------------------------------------ accepting
    def _listener_context(self) -> ssl.SSLContext:
        """The listener's context. Each handshake switches to the context
        ``server_context()`` gives then (in the SNI callback, which OpenSSL runs for every
        ClientHello), so rotated certificates and newly trusted CAs apply to new links
        without a restart (a site passes ``pki.ReloadingServerContext.refresh``, which
        rebuilds only when the certificate files change)."""
        assert self._server_context is not None
        base = self._server_context()
        base.sni_callback = self._pick_context
        base.sslobject_class = _AcceptSSLObject
        return base

    def _pick_context(
        self, obj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext
    ) -> int | None:
        assert self._server_context is not None
        try:
            obj.context = self._server_context()
        except (MeshlinkError, OSError, ssl.SSLError, ValueError) as e:
            log.error("cannot build the link server TLS context: %s", e)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None

    def _new_accepted_link(self) -> Link:
        return Link(
            self,
            direction="accept",
            stream_window=self.stream_window,
            max_streams=self.max_streams,
            instance=self.instance,
            replicas=self.replicas,
        )

    def link_accepted(self, link: Link, transport: asyncio.Transport) -> None:
        """A TLS handshake completed on the listener: check the peer, start or refuse."""
        peername = transport.get_extra_info("peername")
        where = f"{peername[0]}:{peername[1]}" if peername else "?"
        link.endpoint = where
        if not self._running:
            transport.abort()
            return
        try:
            site = authorize_peer(transport.get_extra_info("ssl_object"))
        except PeerNotAuthorized as e:
            log.warning("refused link from %s: %s", where, e)
            link.refuse(transport, ErrorCode.NOT_AUTHORIZED, str(e))
            return
        if not self._authorize(site):
            log.warning("refused link from %s: site %s is not authorized here", where, site)
            link.refuse(
                transport, ErrorCode.NOT_AUTHORIZED, f"site {site} is not linked to {self.site_id}"
            )
            return
        self._all.add(link)
        link.attach(transport, site)

    # ------------------------------------------------------------------ dialing
    def set_dials(self, specs: Sequence[DialSpec]) -> None:
        """Reconcile the links this site dials: start new dialers, stop removed ones."""
        wanted = {s.name: s for s in specs}
        for name in [n for n in self._dialers if n not in wanted]:
            d = self._dialers.pop(name)
            if d.task is not None:
                d.task.cancel()
            for link in list(d.links):
                link.close("link deleted")
            log.info("stopped dialing %s (%s)", d.spec.peer_site, name)
        for name, spec in wanted.items():
            old = self._dialers.get(name)
            if old is not None and (old.spec.peer_site, old.spec.endpoints) == (
                spec.peer_site,
                spec.endpoints,
            ):
                old.spec = spec  # new context factory: used from the next attempt
                continue
            if old is not None:
                if old.task is not None:
                    old.task.cancel()
                for link in list(old.links):
                    link.close("link re-configured")
            d = _Dialer(spec)
            self._dialers[name] = d
            if self._running:
                self._start_dialer(d)

    def _start_dialer(self, d: _Dialer) -> None:
        if d.task is None or d.task.done():
            d.task = self._spawn(self._dial_loop(d), f"dial-{d.spec.name}")

    async def _dial_loop(self, d: _Dialer) -> None:
        attempt = 0  # failed dials in a row: the backoff grows
        landed = 0  # dials in a row that met an instance already linked
        last_up: Link | None = None  # the last link this loop brought up
        while True:
            peer = d.spec.peer_site
            changed = self._links.changed(peer)
            live = self._links.live(peer)
            if len(live) >= self._links.wanted(peer):
                d.set_state("linked")
                landed = 0
                await changed.wait()
                continue
            if not self._we_win(peer) and any(lk.direction == "accept" for lk in live):
                # the peer's own dials are the preferred links: its instances reach ours
                d.set_state("standby")
                await changed.wait()
                continue
            if last_up is not None:
                if last_up.goaway_code is not ErrorCode.NOT_AUTHORIZED:
                    attempt = 0  # it was up: start the backoff afresh (not after a refusal)
                if last_up.closed:  # dialing again because it went: not in a tight loop
                    d.set_state("backoff")
                    await asyncio.sleep(random.uniform(0, self.backoff_base))  # noqa: S311
                last_up = None
                continue
            d.set_state("connecting")
            outcome = await self._dial_once(d)
            if outcome is _Outcome.UP:
                landed = 0
                last_up = d.last_link
                continue  # more instances to reach? (checked at the top)
            if outcome is _Outcome.LANDED and landed < LANDED_RETRIES:
                landed += 1
                delay = random.uniform(*LANDED_DELAY)  # noqa: S311 - jitter
            else:
                cap = min(self.backoff_cap, self.backoff_base * 2**attempt)
                delay = random.uniform(0, cap)  # noqa: S311 - jitter, not cryptography
                attempt += 1
            d.set_state("backoff")
            await asyncio.sleep(delay)

    def _we_win(self, peer: str) -> bool:
        """Duplicate links: keep the one dialled by the lexicographically smaller site id."""
        return self.site_id < peer

    def _endpoint_order(self, d: _Dialer) -> list[str]:
        """The endpoints to try, those that led to an instance not linked now first."""
        peer = d.spec.peer_site

        def linked(endpoint: str) -> bool:
            instance = d.landed.get(endpoint)
            return instance is not None and self._links.get(peer, instance) is not None

        return sorted(d.spec.endpoints, key=linked)

    async def _dial_once(self, d: _Dialer) -> _Outcome:
        """Try each endpoint in turn until a link comes up (see ``_Outcome``)."""
        loop = asyncio.get_running_loop()
        spec = d.spec
        errors = []
        landed = False
        for endpoint in self._endpoint_order(d):
            try:
                host, port = split_hostport(endpoint)
                ctx = spec.ssl_context()
            except (ValueError, MeshlinkError, OSError, ssl.SSLError) as e:
                errors.append(f"{endpoint}: {e}")
                continue
            link = Link(
                self,
                direction="dial",
                endpoint=endpoint,
                dial_name=spec.name,
                stream_window=self.stream_window,
                max_streams=self.max_streams,
                instance=self.instance,
                replicas=self.replicas,
            )
            try:
                async with asyncio.timeout(self.connect_timeout + self.handshake_timeout):
                    transport, _ = await loop.create_connection(
                        lambda link=link: link,  # type: ignore[misc]
                        host,
                        port,
                        ssl=ctx,
                        ssl_handshake_timeout=self.handshake_timeout,
                    )
            except (OSError, ssl.SSLError, TimeoutError) as e:
                errors.append(f"{endpoint}: {_error_reason(e)}")
                continue
            try:
                site = authorize_peer(transport.get_extra_info("ssl_object"), spec.peer_site)
            except PeerNotAuthorized as e:
                errors.append(f"{endpoint}: {e}")
                transport.abort()
                continue
            d.links.add(link)
            self._all.add(link)
            link.attach(transport, site)
            # Not awaited directly: cancelling this dialer must not cancel the link's futures.
            await asyncio.wait(
                (link.up, link.done),
                timeout=self.handshake_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not link.closed and not link.ready:
                link.close("no HELLO from the peer", send_goaway=False, abort=True)
            if link.ready:
                d.landed[endpoint] = link.peer_instance
            if not link.closed:
                d.endpoint = endpoint
                d.refused = False
                d.last_error = None
                d.last_link = link
                return _Outcome.UP
            d.refused = link.goaway_code is ErrorCode.NOT_AUTHORIZED
            if link.duplicate:
                landed = True
                continue
            reason = link.close_reason
            if isinstance(link.lost_error, ssl.SSLError):  # TLS 1.3: its alert after our Finished
                reason = f"the peer refused the link: {_error_reason(link.lost_error)}"
            elif reason == "peer closed":
                reason = (
                    "the peer closed the connection before the protocol started "
                    "(it refused our certificate, or it is not a meshlink gateway)"
                )
            errors.append(f"{endpoint}: {reason}")
        if landed and not errors:
            log.debug("dial of %s met only instances already linked", spec.peer_site)
            return _Outcome.LANDED
        msg = "; ".join(errors) or "no endpoints"
        if msg != d.last_error:
            log.warning("cannot link to %s: %s", spec.peer_site, msg)
        d.last_error = msg
        return _Outcome.LANDED if landed else _Outcome.FAILED

    # ------------------------------------------------------------------ LinkOwner
    def link_ready(self, link: Link) -> None:
        peer, instance = link.peer_site, link.peer_instance
        assert peer is not None
        existing = self._links.get(peer, instance)
        if existing is not None and not existing.closed:
            keep = self._prefer(existing, link)
            drop = link if keep is existing else existing
            # Keeping the existing link is routine (a peer dialling through a Service until
            # it reaches every instance lands here many times a second while one is away):
            # DEBUG at both ends. Replacing one is worth a line.
            log.log(
                logging.DEBUG if keep is existing else logging.INFO,
                "duplicate link with %s%s: keeping the %s link, closing the %s one",
                peer,
                _named(instance),
                "existing" if keep is existing else "new",
                "new" if keep is existing else "existing",
            )
            drop.duplicate = True
            if keep is existing:
                drop.close("duplicate link")
                return
            self._links.remove(drop)
            drop.close("duplicate link")  # link_closed: not the registered link, no callback
            self._notify(self.handler.instance_down, peer, instance, "replaced by a duplicate link")
        first = not self._links.links(peer)
        self._links.add(link)
        log.info(
            "link up: %s%s (%s %s)",
            peer,
            _named(instance),
            "dialled" if link.direction == "dial" else "accepted",
            link.endpoint,
        )
        if first:
            self._notify(self.handler.link_up, peer)
        self._notify(self.handler.instance_up, peer, instance)

    def _prefer(self, a: Link, b: Link) -> Link:
        """Of two links with one (site, instance) pair, the one to keep (``a`` is the one
        registered): both ends of the two links must choose the same."""

        def dialer(link: Link) -> str:
            return self.site_id if link.direction == "dial" else (link.peer_site or "")

        da, db = dialer(a), dialer(b)
        if da != db:
            return a if da < db else b
        if not b.peer_instance:
            return b  # a peer naming no instance dialled again: the old link is likely dead
        silent = time.monotonic() - a.last_rx
        return b if silent > 2 * self.heartbeat_interval else a

    def link_closed(self, link: Link, reason: str) -> None:
        self._all.discard(link)
        self._open_budget.pop(link, None)
        for d in self._dialers.values():
            if link in d.links:
                d.links.discard(link)
                if link.ready and link.goaway_code is ErrorCode.NOT_AUTHORIZED:
                    d.refused = True
                    d.last_error = f"{link.endpoint}: {reason}"
        peer = link.peer_site
        if peer is not None and self._links.remove(link):
            log.info("link down: %s%s: %s", peer, _named(link.peer_instance), reason)
            self._notify(self.handler.instance_down, peer, link.peer_instance, reason)
            if not self._links.links(peer):
                self._notify(self.handler.link_down, peer, reason)

    def _notify(self, event: Callable[..., None], peer: str, *args: str) -> None:
        """Tell the handler; a handler's bug is logged, never the link's end."""
        try:
            event(peer, *args)
        except Exception:
            log.exception("%s handler failed for %s", event.__name__, peer)

    def control(self, link: Link, payload: bytes) -> None:
        peer = link.peer_site
        if peer is None or self._links.get(peer, link.peer_instance) is not link:
            return
        try:
            self.handler.control_received(peer, link.peer_instance, payload)
        except Exception:
            log.exception("control message handler failed for %s", peer)

    def stream_opened(self, link: Link, stream: StreamEnd, target: FlowTarget, hops: int) -> None:
        if not self._may_open(link):
            log.debug("flow from %s to %s refused: over its new-flow rate", link.peer_site, target)
            stream.feed_abort(
                ErrorCode.REFUSED_STREAM,
                f"{self.site_id}: more than {self.new_flows_per_second:g} new flows a second",
            )
            return
        try:
            route = self.route(target)
        except Exception:
            log.exception("route lookup failed for %s", target)
            stream.feed_abort(ErrorCode.INTERNAL_ERROR, f"route lookup failed at {self.site_id}")
            return
        if isinstance(route, LocalRoute):
            self._spawn(self._connect_local(link, stream, route), "flow")
        elif isinstance(route, PeerRoute):
            self._relay(link, stream, target, hops, route.peer_site)
        else:
            log.debug("flow from %s to %s: no route: %s", link.peer_site, target, route.reason)
            stream.feed_abort(ErrorCode.NO_ROUTE, f"{self.site_id}: {route.reason}")

    def _may_open(self, link: Link) -> bool:
        """Whether the peer on ``link`` is within its rate of new flows."""
        now = time.monotonic()
        budget = self._open_budget.get(link)
        if budget is None:
            rate = self.new_flows_per_second
            budget = self._open_budget[link] = TokenBucket(rate, max(rate, 1.0), now)
        return budget.take(now)

    async def _connect_local(self, link: Link, stream: StreamEnd, route: LocalRoute) -> None:
        try:
            # reads from the service go straight into the stream
            tcp = await _dial(route, self.connect_timeout, peer=stream)
        except (OSError, TimeoutError) as e:
            why = f"{self.site_id} cannot connect to {route.host}:{route.port}: {_error_reason(e)}"
            log.info("flow from %s refused: %s", link.peer_site, why)
            stream.feed_abort(ErrorCode.CONNECT_ERROR, why)
            return
        if stream.closed and stream.peer is None:
            tcp.feed_abort(ErrorCode.CANCEL)
            stream.start()
            return
        join(stream, tcp)
        link.accept(stream)
        stream.start()

    def _relay(
        self, link: Link, stream: StreamEnd, target: FlowTarget, hops: int, peer: str
    ) -> None:
        out = self._live_link(peer)
        if out is None or out is link:
            why = "the route leads back where it came from" if out is link else "no live link"
            log.debug("relay %s via %s refused: %s", target, peer, why)
            stream.feed_abort(ErrorCode.NO_ROUTE, f"{self.site_id}: {why} to {peer}")
            return
        if hops + 1 > MAX_HOPS:
            log.info("relay of %s refused: more than %d hops (a routing loop?)", target, MAX_HOPS)
            stream.feed_abort(ErrorCode.NO_ROUTE, f"more than {MAX_HOPS} hops (a routing loop?)")
            return
        try:
            onward = _open_stream(out, target, hops + 1)
        except FlowError as e:
            stream.feed_abort(e.code, f"{self.site_id}: link to {peer}: {e}")
            return
        join(stream, onward)
        onward.on_accepted = lambda: link.accept(stream)
        stream.start()
        onward.start()

    # ------------------------------------------------------------------ API
    def send_control(self, peer_site: str, payload: bytes, instance: str | None = None) -> bool:
        """Send a control message to the instance ``instance`` of a peer site, or (None) to
        one of its instances; False if there is no live link to it."""
        if instance is None:
            link = self._live_link(peer_site)
        else:
            link = self._links.get(peer_site, instance)
            link = None if link is None or link.closed or not link.ready else link
        if link is None:
            return False
        link.send_control(payload)
        return True

    def broadcast_control(self, peer_site: str, payload: bytes) -> bool:
        """Send a control message to every linked instance of a peer site; False if none."""
        links = self._links.live(peer_site)
        for link in links:
            link.send_control(payload)
        return bool(links)

    def instances(self, peer_site: str) -> list[str]:
        """The instances of ``peer_site`` this gateway has live links with."""
        return [lk.peer_instance for lk in self._links.live(peer_site)]

    def _live_link(self, peer_site: str) -> Link | None:
        """A link to ``peer_site`` that is up (not closing, HELLO exchanged), for a flow."""
        return self._links.pick(peer_site)

    def drop_peer(self, peer_site: str, reason: str) -> int:
        """Close every link `peer_site` dialled to us (e.g. it was revoked); returns how
        many. The links this site dials go with their dial (``set_dials``)."""
        dropped = [
            lk
            for lk in self._all
            if lk.peer_site == peer_site and lk.direction == "accept" and not lk.closed
        ]
        for link in dropped:
            log.info("dropping link with %s: %s", peer_site, reason)
            link.close(reason, code=ErrorCode.NOT_AUTHORIZED)
        return len(dropped)

    def live_peers(self) -> list[str]:
        return self._links.sites()

    async def connect_end(
        self,
        target: FlowTarget,
        *,
        timeout: float,  # noqa: ASYNC109
        wait_accept: bool = True,
    ) -> End:
        """An End connected to `target` (a local socket or an accepted stream), not yet
        started: join it with yours, then call its start(). Raises FlowError.

        With wait_accept=False a stream is returned at once (its `accepted` future tells
        the outcome): data flows optimistically, saving a link round trip per flow; a
        refusal then arrives as a reset of the joined end."""
        try:
            route = self.route(target)
        except MeshlinkError as e:
            raise NoRouteError(f"no route to {target}: {e}") from None
        if isinstance(route, NoRoute):
            raise NoRouteError(f"no route to {target}: {route.reason}")
        if isinstance(route, LocalRoute):
            try:
                return await _dial(route, timeout)
            except (OSError, TimeoutError) as e:
                raise FlowRefused(
                    f"cannot connect to {target} at {route.host}:{route.port}: {_error_reason(e)}"
                ) from None
        link = self._live_link(route.peer_site)
        if link is None:
            raise NoRouteError(f"no route to {target}: no live link to {route.peer_site}")
        try:
            stream = _open_stream(link, target, 0)
        except FlowError as e:  # the link is closing under us, or at its limit
            if e.code is ErrorCode.REFUSED_STREAM:
                raise FlowRefused(
                    f"flow to {target} via {route.peer_site} refused: {e}", e.code
                ) from None
            raise NoRouteError(f"no route to {target}: link to {route.peer_site}: {e}") from None
        stream.accepted = asyncio.get_running_loop().create_future()
        if not wait_accept:
            return stream
        try:
            async with asyncio.timeout(timeout):
                await stream.accepted
        except TimeoutError:
            stream.feed_abort(ErrorCode.CANCEL)
            raise FlowError(
                f"flow to {target} via {route.peer_site}: no answer within {timeout:g} s",
                ErrorCode.CANCEL,
            ) from None
        except FlowError as e:
            raise type(e)(f"flow to {target} via {route.peer_site} refused: {e}") from None
        except asyncio.CancelledError:
            stream.feed_abort(ErrorCode.CANCEL)
            raise
        return stream

    async def open_flow(self, target: FlowTarget, *, timeout: float = 5.0) -> Flow:  # noqa: ASYNC109
        """Open a flow to `target` and return it (read/write/drain/write_eof/abort)."""
        end = await self.connect_end(target, timeout=timeout)
        flow = Flow()
        join(flow, end)
        end.start()
        return flow

    def rtt_ms(self, peer: str) -> float | None:
        """The last heartbeat RTT of the link to ``peer`` (None: no link, or not measured)."""
        rtts = [lk.rtt_ms for lk in self._links.live(peer) if lk.rtt_ms is not None]
        return min(rtts, default=None)

    def status(self) -> list[LinkStatus]:
        out = []
        seen: set[str] = set()
        for peer, instance, link in self._links.items():
            seen.add(peer)
            out.append(
                LinkStatus(
                    peer_site=peer,
                    peer_instance=instance,
                    peer_replicas=link.peer_replicas,
                    direction=link.direction,
                    state="up",
                    rtt_ms=link.rtt_ms,
                    rtt_ewma_ms=link.rtt_ewma_ms,
                    since=link.since,
                    bytes_in=link.bytes_in,
                    bytes_out=link.bytes_out,
                    flows_open=len(link.streams),
                    last_error=None,
                    endpoint=link.endpoint,
                    dial_name=link.dial_name,
                )
            )
        for d in self._dialers.values():
            if d.spec.peer_site in seen:
                continue
            seen.add(d.spec.peer_site)
            out.append(
                LinkStatus(
                    peer_site=d.spec.peer_site,
                    direction="dial",
                    state=d.state,
                    rtt_ms=None,
                    rtt_ewma_ms=None,
                    since=d.since,
                    bytes_in=0,
                    bytes_out=0,
                    flows_open=0,
                    last_error=d.last_error,
                    endpoint=d.endpoint,
                    dial_name=d.spec.name,
                    refused=d.refused,
                )
            )
        return out


def _named(instance: str) -> str:
    """`` instance X`` for log lines (nothing for a peer that names no instance)."""
    return f" instance {instance}" if instance else ""


async def _dial(route: LocalRoute, timeout: float, *, peer: End | None = None) -> TcpEnd:  # noqa: ASYNC109
    """A TCP connection to a local route (OSError or TimeoutError when it cannot be made).
    With ``peer`` the connection's reads go to it from the first byte."""
    tcp = TcpEnd()
    tcp.peer = peer
    async with asyncio.timeout(timeout):
        await asyncio.get_running_loop().create_connection(lambda: tcp, route.host, route.port)
    return tcp


def _open_stream(link: Link, target: FlowTarget, hops: int) -> StreamEnd:
    """A new stream on a live link; FlowError when the link refuses: REFUSED_STREAM at the
    peer's stream limit, else NO_ROUTE (the link is closing under us)."""
    try:
        return link.open_stream(target, hops)
    except LocalProtocolError as e:
        code = e.code if e.code is ErrorCode.REFUSED_STREAM else ErrorCode.NO_ROUTE
        raise FlowError(str(e), code) from None


def _error_reason(e: BaseException) -> str:
    """One short phrase for a TLS, timeout or socket error (TimeoutError is an OSError:
    it is checked first)."""
    if isinstance(e, ssl.SSLError):
        reason = getattr(e, "reason", None) or str(e)
        if "UNSUPPORTED_PROTOCOL" in str(reason) or "VERSION" in str(reason).upper():
            return f"{reason} (TLS 1.3 is required)"
        if "CERTIFICATE" in str(reason).upper() or "UNKNOWN_CA" in str(reason).upper():
            return f"{reason} (certificate not trusted or missing)"
        return str(reason)
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    return str(e)

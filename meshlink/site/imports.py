"""The import plane: what the platform's import view becomes on this host, namely the
import listeners and the clusterset DNS server's snapshot.

``apply(view)`` only keeps the newest view and wakes one task (``run``), which opens and
closes listeners first and then swaps in a DNS snapshot built from the view, so a name never
resolves before its traffic has a listener. That task is the one owner of the listener set:
a listener that cannot bind is logged once, shown by the status (``errors``), and retried
by ``retry`` (a periodic job) in the same task, so a retry always works from the newest
view and can never bring back a set a newer view replaced. Bursts coalesce: after a run
the task waits as long as the run took (at most 1 s), so at thousands of imports the DNS
rebuilds cost at most half a core.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from meshlink.catalog.view import ImportedService, ImportView, ListenerSpec
from meshlink.dns import run as dns_run
from meshlink.dns.server import DnsServer
from meshlink.dns.snapshot import SnapshotBuilder
from meshlink.proto import FlowTarget
from meshlink.site.metrics import Metrics
from meshlink.tasks import Coalescer, pace
from meshlink.tunnel import Gateway, ImportListener

log = logging.getLogger(__name__)

Addr = tuple[str, int]


class ImportPlane:
    """See the module docstring."""

    def __init__(
        self,
        gateway: Gateway,
        candidates: Callable[[ListenerSpec], list[FlowTarget]],
        *,
        zone: str,
        ttl: int,
        import_range: str,
        metrics: Metrics,
    ) -> None:
        self._gateway = gateway
        self._candidates = candidates
        self._import_range = import_range
        self._metrics = metrics
        self._builder = SnapshotBuilder(zone=zone, ttl=ttl)
        self.dns: DnsServer | None = None
        self._view = ImportView()
        self._dns_view: ImportView | None = None
        self._listeners: dict[Addr, ImportListener] = {}
        self._specs: dict[Addr, ListenerSpec] = {}
        self._errors: dict[Addr, str] = {}
        self._sync = Coalescer(self._apply, pause=pace)

    # -- inputs --------------------------------------------------------------------------

    def apply(self, view: ImportView) -> None:
        """The platform's newest view (``catalog.view.OnView``): applied by ``run``."""
        self._view = view
        self._sync.wake()

    def retry(self) -> None:
        """Try the listeners that could not bind again (a periodic job)."""
        if self._errors:
            self._sync.wake()

    # -- state ---------------------------------------------------------------------------

    @property
    def imports(self) -> tuple[ImportedService, ...]:
        """The imports DNS serves now."""
        return self._dns_view.imports if self._dns_view is not None else ()

    def listeners(self) -> list[ListenerSpec]:
        """The listeners open now."""
        return [self._specs[a] for a in self._listeners]

    def errors(self) -> list[tuple[ListenerSpec, str]]:
        """The listeners that cannot bind, and why (retried)."""
        return [(self._specs[a], why) for a, why in self._errors.items()]

    # -- lifecycle -----------------------------------------------------------------------

    async def start_dns(self, host: str, port: int) -> None:
        """Serve DNS on ``host:port``: until the first view, a zone that answers SERVFAIL
        for the names it does not know (the site is starting), never NXDOMAIN."""
        self.dns = await dns_run.start_server(self._builder.build((), complete=False), host, port)

    async def run(self) -> None:
        await self._sync.run()

    async def close(self) -> None:
        """Close every listener and the DNS server."""
        for listener in self._listeners.values():
            await listener.close()
        self._listeners.clear()
        if self.dns is not None:
            await self.dns.close()

    # -- the one task --------------------------------------------------------------------

    async def _apply(self) -> None:
        view = self._view
        await self._apply_listeners(view.listeners)
        if view is not self._dns_view:
            self._dns_view = view
            self._metrics.services.set(len(view.imports))
            if self.dns is not None:
                self.dns.update(self._builder.build(view.imports))

    async def _apply_listeners(self, specs: Sequence[ListenerSpec]) -> None:
        """Close the listeners no longer wanted, open the missing ones."""
        wanted = {(s.address, s.port): s for s in specs}
        for addr in [a for a in self._listeners if a not in wanted]:
            listener = self._listeners.pop(addr)
            await listener.close()
            log.info("import listener closed: %s:%d", *addr)
        self._specs = wanted
        self._errors = {a: e for a, e in self._errors.items() if a in wanted}
        for addr, spec in wanted.items():
            if addr in self._listeners:
                continue
            listener = ImportListener(self._gateway, addr, self._chooser(addr))
            try:
                await listener.start()
            except OSError as e:
                # asyncio rewords bind errors ("error while attempting to bind ..."):
                # the errno's own text is the one line that says it.
                why = os.strerror(e.errno) if e.errno else str(e)
                if self._errors.get(addr) != why:
                    log.error(
                        "cannot listen on %s:%d for %s: %s (check %s; retrying)",
                        addr[0],
                        addr[1],
                        spec.key,
                        why,
                        self._import_range,
                    )
                self._errors[addr] = why
                continue
            self._errors.pop(addr, None)
            self._listeners[addr] = listener
            log.info(
                "import listener: %s:%d -> %s port %d",
                addr[0],
                addr[1],
                spec.key,
                spec.service_port,
            )

    def _chooser(self, addr: Addr) -> Callable[[], list[FlowTarget]]:
        # Per flow: the spec of the address now (a changed spec needs no new listener).
        def choose() -> list[FlowTarget]:
            spec = self._specs.get(addr)
            return [] if spec is None else self._candidates(spec)

        return choose

"""Local mode: exports declared in YAML, imports as local addresses and listeners.

Owns three things for a site without Kubernetes:
- turning the config's exports into ExportRecords (creation times persisted in the state
  directory, so "oldest export wins" survives restarts);
- choosing the local endpoint for a flow that arrives for one of our exports;
- the import table: one stable address per imported service from the configured pool
  (persisted), the union of its ports, and the ``ImportedService`` view DNS serves.

It is the local-mode ``Platform``: listeners themselves are opened by the runtime's import
plane (they need the gateway); this module only says which (address, port) should exist
and which sites each may send flows to.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from meshlink.catalog.merge import MergedService, merge
from meshlink.catalog.records import (
    Endpoint,
    ExportRecord,
    Port,
    ServiceKey,
    ServiceType,
)
from meshlink.catalog.view import (
    ClusterEndpoints,
    Conflict,
    ExportTarget,
    ImportedService,
    ImportView,
    ListenerSpec,
    OnView,
    PlatformStatus,
    Publish,
)
from meshlink.config import ExportConfig, SiteConfig
from meshlink.errors import ConfigError
from meshlink.names import address_family
from meshlink.pki.files import atomic_write, ensure_dir

log = logging.getLogger(__name__)


def _write_json(path: Path, data: object) -> None:
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode(), 0o644)


class LocalSite:
    """The local-mode platform adapter of one site."""

    mode = "local"
    import_range = "imports.pool"

    def __init__(self, config: SiteConfig):
        self.config = config
        self.site = config.site
        self._exports: dict[ServiceKey, ExportConfig] = {
            ServiceKey(e.namespace, e.name): e for e in config.exports
        }
        self._rr = itertools.count()
        self._state = config.state_dir / "local"
        ensure_dir(self._state)
        self._created = self._load_created()
        self._alloc_path = self._state / "imports.json"
        self._alloc: dict[str, str] = self._load_alloc()
        self.imports: tuple[ImportedService, ...] = ()
        self.listeners: tuple[ListenerSpec, ...] = ()
        self.merged: dict[ServiceKey, MergedService] = {}
        self._on_view: OnView | None = None
        self._publish: Publish | None = None
        self._services: Mapping[ServiceKey, Sequence[ExportRecord]] = {}
        self._published = False

    # -- Platform ------------------------------------------------------------------------

    async def run(self, publish: Publish, on_view: OnView) -> None:
        """Publish the configured exports once; views follow ``catalog_changed``."""
        self._on_view = on_view
        self._publish = publish
        publish(self.export_records())
        self._published = True
        if self.imports or self.listeners:
            on_view(self.view())

    def catalog_changed(self, services: Mapping[ServiceKey, Sequence[ExportRecord]]) -> None:
        self._services = services
        if self.update(services) and self._on_view is not None:
            self._on_view(self.view())

    def reload(self, config: SiteConfig) -> None:
        """New exports and namespaces (SIGHUP): published at once (a changed export gets
        a new version, a removed one is withdrawn, a new one created now), and the
        imports recomputed. Links and flows are untouched."""
        self.config = config
        self._exports = {ServiceKey(e.namespace, e.name): e for e in config.exports}
        self._created = self._load_created()
        if self._publish is not None:
            self._publish(self.export_records())
        self.catalog_changed(self._services)

    def view(self) -> ImportView:
        return ImportView(self.imports, self.listeners)

    def not_ready(self) -> str | None:
        return None if self._published else "the exports are not published yet"

    def status(self) -> PlatformStatus | None:
        return None

    def conflicts(self) -> list[Conflict]:
        return [
            Conflict(k, tuple(m.conflicts), m.winner.origin)
            for k, m in sorted(self.merged.items())
            if m.conflicts
        ]

    # -- exports ---------------------------------------------------------------------

    def _load_created(self) -> dict[str, float]:
        path = self._state / "exports.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError):
            log.warning("%s is unreadable; export creation times start afresh", path)
            data = {}
        now = time.time()
        created = {
            str(k): float(data[str(k)]) if isinstance(data.get(str(k)), (int, float)) else now
            for k in self._exports
        }
        _write_json(path, created)
        return created

    def export_records(self) -> list[ExportRecord]:
        """This site's exports as catalog records (versions are stamped by the catalog)."""
        out = []
        for key, e in self._exports.items():
            ready = tuple(ep for ep in e.endpoints if ep.ready)
            headless = e.headless
            out.append(
                ExportRecord(
                    origin=self.site,
                    namespace=e.namespace,
                    name=e.name,
                    type=ServiceType.HEADLESS if headless else ServiceType.CLUSTERSET_IP,
                    ports=tuple(Port(p.port, p.protocol, p.name, p.app_protocol) for p in e.ports),
                    created=self._created[str(key)],
                    version=0,
                    ready_endpoints=len(ready),
                    endpoints=tuple(
                        Endpoint((ep.address,), ep.hostname, ep.ready) for ep in e.endpoints
                    )
                    if headless
                    else (),
                    labels=e.labels,
                    annotations=e.annotations,
                    ip_families=_families(ep.address for ep in e.endpoints),
                )
            )
        return out

    def local_endpoint(self, namespace: str, name: str, port: int) -> tuple[str, int] | None:
        """Where a flow for our export ``namespace/name:port`` goes (round robin over ready
        endpoints); None if we do not export it or nothing is ready."""
        e = self._exports.get(ServiceKey(namespace, name))
        if e is None:
            return None
        target = next((p.target_port for p in e.ports if p.port == port), None)
        ready = [ep for ep in e.endpoints if ep.ready]
        if target is None or not ready:
            return None
        ep = ready[next(self._rr) % len(ready)]
        return (ep.address, target)

    def export_targets(self) -> list[ExportTarget]:
        out = []
        for key, e in self._exports.items():
            ready = [ep for ep in e.endpoints if ep.ready]
            for p in e.ports:
                if p.protocol != "TCP":
                    continue
                out += [ExportTarget(key, p.port, (ep.address, p.target_port)) for ep in ready]
                if not ready:
                    out.append(ExportTarget(key, p.port, None, "no ready endpoint is configured"))
        return out

    # -- imports ---------------------------------------------------------------------

    def _load_alloc(self) -> dict[str, str]:
        try:
            data = json.loads(self._alloc_path.read_text())
        except (OSError, ValueError):
            return {}
        pool = self.config.import_pool
        return {str(k): str(v) for k, v in data.items() if isinstance(v, str) and _in_pool(v, pool)}

    def _address_for(self, key: ServiceKey) -> str:
        name = str(key)
        addr = self._alloc.get(name)
        if addr is not None:
            return addr
        used = set(self._alloc.values())
        pool = self.config.import_pool
        # Skip the network address and, on loopback pools, .1 which the host often uses.
        for host in itertools.islice(pool.hosts(), 1, None):
            if str(host) not in used:
                self._alloc[name] = str(host)
                _write_json(self._alloc_path, self._alloc)
                return str(host)
        raise ConfigError(f"import pool {pool} is exhausted", key="imports.pool")

    def namespace_exists(self, namespace: str) -> bool:
        ns = self.config.namespaces
        return ns is None or namespace in ns

    def update(self, services: Mapping[ServiceKey, Sequence[ExportRecord]]) -> bool:
        """Recompute the import view from the catalog; True if anything changed."""
        merged = {
            key: merge(records)
            for key, records in services.items()
            if records and self.namespace_exists(key.namespace)
        }
        imports: list[ImportedService] = []
        listeners: list[ListenerSpec] = []
        for key in sorted(merged):
            m = merged[key]
            if m.type is ServiceType.HEADLESS:
                clusters = tuple(ClusterEndpoints(r.origin, r.endpoints) for r in m.serving)
                imports.append(
                    ImportedService(key.namespace, key.name, m.type, (), m.ports, clusters)
                )
                continue
            addr = self._address_for(key)
            clusters = tuple(ClusterEndpoints(o) for o in m.clusters)
            imports.append(
                ImportedService(key.namespace, key.name, m.type, (addr,), m.ports, clusters)
            )
            listeners.extend(
                ListenerSpec(key, addr, p.port, p.port, origins)
                for p, origins in m.port_origins
                if p.protocol == "TCP"
            )
        new_imports, new_listeners = tuple(imports), tuple(listeners)
        changed = new_imports != self.imports or new_listeners != self.listeners
        self.imports, self.listeners, self.merged = new_imports, new_listeners, merged
        return changed


def _families(addresses: Iterable[str]) -> tuple[str, ...]:
    fams: list[str] = []
    for a in addresses:
        fam = address_family(a)
        if fam not in fams:
            fams.append(fam)
    return tuple(fams) or ("IPv4",)


def _in_pool(addr: str, pool: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(addr) in pool
    except ValueError:
        return False

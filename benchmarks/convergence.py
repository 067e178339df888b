"""Export-to-import convergence of the Kubernetes controller on real kube-apiservers.

    python benchmarks/convergence.py [--quick] [--json PATH]

Starts three real control planes (tests/kube.py: etcd + kube-apiserver built from the
official Go modules) and one meshlink controller *process* per cluster (this script in
``--controller`` mode: a real ``Controller`` with its own ApiClient). Export records travel
between the controller processes through a small Unix-socket hub in this process, as
deltas, the way catalog sync carries them over gateway links in a deployment (the links
themselves are not part of this measurement).

Measured:
- latency: one ServiceExport created in cluster c1 at a time, time until the ServiceImport
  exists in cluster c2 (seen by a watch), p50/p99/max over 200 exports (30 with --quick),
  the first one created once the API server no longer delays creates of the new CRDs'
  objects (tests.kube.CRD_CREATE_DELAY: a 2 s sleep in the API server, not meshlink's);
- scale: N Services spread over the three clusters (2,000; 300 with --quick), all exported
  at once; time until every cluster has every ServiceImport (with its clusterset IP) and
  every imported EndpointSlice;
- export -> DNS: in the same loop, a real DNS client (dnspython, UDP) asks c2's clusterset
  DNS server for ``<svc>.bench.svc.clusterset.local`` A every ~2 ms until it answers with the
  ServiceImport's IP; p50/p99/max of the time from creating the export to that answer;
- the peak RSS (VmHWM) of each controller process, next to its RSS once synced and idle.

``--restart`` (issue 10, item 7) measures instead what a restart of a controller holding
every import costs: the same N services exported at once (2,000; 300 with --quick), then
the importing controller of c2 killed (SIGKILL) and started again. Measured: the time from
its restart until it is consistent (synced, every import materialised, nothing queued),
the requests it made (writes by verb and kind, and reads), and the ServiceImports,
derived Services and EndpointSlices of c2 it recreated (another UID) or rewrote (another
resourceVersion); the goal for both is 0. The restarted controller gets the catalog as a
restarted site's does: only once its peers' records are in (the hub replays its log,
then says so), never an empty first view.

Each controller process also runs meshlink's DNS server the way ``meshlink run`` does in
Kubernetes mode (``site.ImportPlane``: ``apply`` and its one task): ``on_view``
wakes a task that rebuilds through a ``SnapshotBuilder`` (unchanged services' records
reused) and calls ``DnsServer.update``, then waits as long as that took; the server is started
with ``dns.run.start_server`` and the heap settled once. So the scale phase pays for the
snapshot rebuilds as a site does; their count and CPU time per controller are reported
(``dns_snapshot_builds``, ``dns_snapshot_build_s``).
``--no-dns`` runs the controllers alone (export -> DNS is then not measured).

There is no published figure from another MCS implementation to compare with, so the
reference columns are the issue's targets (p99 < 1 s, 2,000 services < 30 s, < 300 MB).
Not measured here: the catalog sync over gateway links (the hub stands in for it), so
export -> DNS is the controller's and the DNS server's share of the path, not the links'.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from _common import cpu_s, load_line, percentile, print_table, write_json  # noqa: E402

# Python put this directory first on the path; its dns.py (the DNS benchmark) would shadow
# dnspython's package ``dns``, the DNS client used below. _common is imported already.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

NS = "bench"
LINE_LIMIT = 64 << 20
"""The hub's lines: a restarted controller publishes all its exports in one."""


# --------------------------------------------------------------------------- controller process


async def controller_main(site: str, kubeconfig: str, hub: str, workers: int, *, dns: bool) -> None:
    from kubernetes_asyncio import config as kconfig

    from meshlink.catalog.records import ExportRecord, ServiceKey, record_from_wire, record_to_wire
    from meshlink.catalog.view import ImportedService, ImportView
    from meshlink.config import DnsConfig, HostPort, KubernetesConfig, SiteConfig
    from meshlink.dns import run as dns_run
    from meshlink.dns.server import DnsServer
    from meshlink.dns.snapshot import SnapshotBuilder, build_snapshot
    from meshlink.k8s import Controller

    reader, writer = await asyncio.open_unix_connection(hub, limit=LINE_LIMIT)
    sent: dict[ServiceKey, int] = {}
    by_origin: dict[str, dict[tuple[str, str], ExportRecord]] = {}

    def send(msg: dict[str, Any]) -> None:
        writer.write(json.dumps(msg).encode() + b"\n")

    def publish(records: Any) -> None:
        nonlocal sent
        cur = {r.key: r for r in records}
        upd = [record_to_wire(r) for k, r in cur.items() if sent.get(k) != r.version]
        rm = [[k.namespace, k.name] for k in sent if k not in cur]
        sent = {k: r.version for k, r in cur.items()}
        send({"origin": site, "upd": upd, "rm": rm})

    api = await kconfig.new_client_from_config(kubeconfig)
    cfg = SiteConfig(
        site=site,
        state_dir=Path(tempfile.gettempdir()),
        kubernetes=KubernetesConfig(kubeconfig=Path(kubeconfig)),
        dns=DnsConfig(listen=HostPort("127.0.0.1", 0), enabled=dns),
    )

    # The DNS server as the runtime runs it in Kubernetes mode (site.ImportPlane: apply and
    # its one task): started with an empty snapshot, the heap settled once; the callback
    # keeps the latest import view and wakes a task that rebuilds the snapshot and swaps it
    # in. (The plane first opens the import listeners in that task; this benchmark has no
    # gateway, so there are none.)
    server: DnsServer | None = None
    if cfg.dns.enabled:
        server = await dns_run.start_server(
            build_snapshot((), zone=cfg.dns.zone, ttl=cfg.dns.ttl),
            cfg.dns.listen.host,
            cfg.dns.listen.port,
        )
        dns_run.settle_heap()
    builds = 0
    build_s = 0.0
    view: tuple[ImportedService, ...] = ()
    dirty = asyncio.Event()

    def on_view(new: ImportView) -> None:
        nonlocal view
        view = new.imports
        dirty.set()

    builder = SnapshotBuilder(zone=cfg.dns.zone, ttl=cfg.dns.ttl)

    async def dns_feed(dns_server: DnsServer) -> None:
        nonlocal builds, build_s
        while True:
            await dirty.wait()
            dirty.clear()
            t, t0 = time.process_time(), time.monotonic()
            dns_server.update(builder.build(view))
            build_s += time.process_time() - t
            builds += 1
            await asyncio.sleep(min(time.monotonic() - t0, 1.0))  # as the runtime paces it

    ctl = Controller(api, cfg, publish=publish, on_view=on_view, workers=workers)

    def grouped() -> dict[ServiceKey, list[ExportRecord]]:
        out: dict[ServiceKey, list[ExportRecord]] = {}
        for recs in by_origin.values():
            for r in recs.values():
                out.setdefault(r.key, []).append(r)
        return out

    async def receive() -> None:
        # As a site's control channel does: the controller gets the catalog only once the
        # peers' records are in (the hub's replay of its log, then "replayed").
        replayed = False
        while line := await reader.readline():
            msg = json.loads(line)
            if msg.get("replayed"):
                replayed = True
                ctl.update_catalog(grouped())
                continue
            if "origin" not in msg:
                continue
            recs = by_origin.setdefault(msg["origin"], {})
            for d in msg["upd"]:
                r = record_from_wire(d, validate_addresses=False)
                recs[(r.namespace, r.name)] = r
            for ns, name in msg["rm"]:
                recs.pop((ns, name), None)
            if replayed:
                ctl.update_catalog(grouped())

    async def report() -> None:
        await ctl.wait_synced()
        dns_port = server.bound_port if server is not None else None
        send({"synced": site, "pid": os.getpid(), "dns_port": dns_port})
        while True:
            await asyncio.sleep(0.2)
            send(
                {
                    "status": site,
                    "idle": ctl.idle(),
                    "imports": len(ctl.imports),
                    "requests": dict(ctl.kube.requests),
                    "dns_builds": builds,
                    "dns_build_s": round(build_s, 3),
                }
            )

    try:
        async with api, asyncio.TaskGroup() as tg:
            tg.create_task(ctl.run())
            tg.create_task(receive())
            tg.create_task(report())
            if server is not None:
                tg.create_task(dns_feed(server))
    finally:
        if server is not None:
            await server.close()


# --------------------------------------------------------------------------- hub


class Hub:
    """Relays every controller's record deltas to every controller (replaying the log to
    late joiners), and collects their status lines."""

    def __init__(self) -> None:
        self.log: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.synced: dict[str, int] = {}
        self.dns_ports: dict[str, int | None] = {}
        self.status: dict[str, dict[str, Any]] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for line in self.log:
            writer.write(line)
        writer.write(b'{"replayed": true}\n')
        self.writers.append(writer)
        try:
            while line := await reader.readline():
                msg = json.loads(line)
                if "synced" in msg:
                    self.synced[msg["synced"]] = msg["pid"]
                    self.dns_ports[msg["synced"]] = msg.get("dns_port")
                elif "status" in msg:
                    self.status[msg["status"]] = msg
                else:
                    self.log.append(line)
                    for w in self.writers:
                        w.write(line)
        finally:
            self.writers.remove(writer)


# --------------------------------------------------------------------------- measuring side


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import dns.asyncbackend
    import dns.asyncquery
    import dns.exception
    import dns.message
    import dns.query
    import dns.rdatatype
    from kubernetes_asyncio import config as kconfig

    from meshlink.k8s.api import (
        ENDPOINT_SLICE,
        NAMESPACE,
        SERVICE,
        SERVICE_EXPORT,
        SERVICE_IMPORT,
        Kube,
    )
    from meshlink.k8s.watch import ApiHealth, Watcher
    from tests.kube import KubeControlPlane, install_crds, wait_crd_create_delay

    n_latency = 30 if args.quick else 200
    n_scale = 300 if args.quick else 2000
    work = Path(tempfile.mkdtemp(prefix="meshlink-convergence-"))
    result: dict[str, Any] = {}
    cp = KubeControlPlane(3, work / "kube")
    procs: list[subprocess.Popen[bytes]] = []
    t_start = time.monotonic()
    cp.start()
    try:
        for c in cp.clusters:
            install_crds(c)
        # The API server sleeps 2 s in any create of a custom resource while its CRD is
        # under 2 s old (CRD_CREATE_DELAY): the first export would measure that sleep.
        for c in cp.clusters:
            wait_crd_create_delay(c)
        print(
            f"3 control planes up in {time.monotonic() - t_start:.1f} s; {load_line()}",
            file=sys.stderr,
        )
        hub = Hub()
        sock = str(work / "hub.sock")
        server = await asyncio.start_unix_server(hub.handle, sock, limit=LINE_LIMIT)
        apis = [await kconfig.new_client_from_config(str(c.kubeconfig)) for c in cp.clusters]
        kubes = [Kube(a, 30.0) for a in apis]
        try:
            for k in kubes:
                await k.apply(
                    NAMESPACE,
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
                    manager="bench",
                )

            def spawn(c: Any) -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--controller",
                        c.name,
                        "--kubeconfig",
                        str(c.kubeconfig),
                        "--hub",
                        sock,
                        "--workers",
                        str(args.workers),
                    ]
                    + (["--no-dns"] if args.no_dns else [])
                    + (["--profile", args.profile] if args.profile and c.name == "c2" else []),
                    stderr=open(work / f"controller-{c.name}.log", "ab"),
                )

            for c in cp.clusters:
                procs.append(spawn(c))
            deadline = time.monotonic() + 60
            while len(hub.synced) < 3:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"controllers did not sync; see {work}/controller-*.log")
                await asyncio.sleep(0.05)
            pids = [hub.synced[c.name] for c in cp.clusters]
            base_rss = [rss_mb(p)[0] for p in pids]

            # Watches on the importing side, as a user's client would see the objects.
            seen_si: list[dict[str, float]] = [{} for _ in kubes]
            si_ips: list[dict[str, list[str]]] = [{} for _ in kubes]  # those with an IP
            slices: list[set[str]] = [set() for _ in kubes]

            def on_si(i: int) -> Any:
                def h(key: Any, old: Any, new: Any) -> None:
                    if new is None:
                        seen_si[i].pop(key[1], None)
                        si_ips[i].pop(key[1], None)
                        return
                    seen_si[i].setdefault(key[1], time.monotonic())
                    if ips := (new.get("spec") or {}).get("ips"):
                        si_ips[i][key[1]] = list(ips)

                return h

            def on_slice(i: int) -> Any:
                def h(key: Any, old: Any, new: Any) -> None:
                    (slices[i].discard if new is None else slices[i].add)(key[1])

                return h

            watchers = []
            for i, k in enumerate(kubes):
                watchers.append(
                    Watcher(k, SERVICE_IMPORT, on_si(i), ApiHealth(f"c{i + 1}"), namespace=NS)
                )
                watchers.append(
                    Watcher(
                        k,
                        ENDPOINT_SLICE,
                        on_slice(i),
                        ApiHealth(f"c{i + 1}"),
                        namespace=NS,
                        label_selector="endpointslice.kubernetes.io/managed-by=meshlink.io",
                    )
                )
            wtasks = [asyncio.create_task(w.run()) for w in watchers]
            for w in watchers:
                await w.synced.wait()

            def svc_body(name: str) -> dict[str, Any]:
                return {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": name, "namespace": NS},
                    "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": name}},
                }

            def svcex_body(name: str) -> dict[str, Any]:
                return {
                    "apiVersion": "multicluster.x-k8s.io/v1beta1",
                    "kind": "ServiceExport",
                    "metadata": {"name": name, "namespace": NS},
                }

            async def bounded(coros: list[Any], limit: int = 16) -> None:
                sem = asyncio.Semaphore(limit)

                async def one(c: Any) -> None:
                    async with sem:
                        await c

                await asyncio.gather(*(one(c) for c in coros))

            dns_port = hub.dns_ports.get("c2")

            # One UDP socket for every query (a new socket per query doubles the round trip).
            dns_sock = None
            if dns_port is not None:
                backend = dns.asyncbackend.get_backend("asyncio")
                dns_sock = await backend.make_socket(  # type: ignore[no-untyped-call]
                    socket.AF_INET, socket.SOCK_DGRAM, 0, ("127.0.0.1", 0)
                )

            async def dns_a(name: str) -> list[str] | None:
                """c2's A answer for the service (None: no address yet, or no reply)."""
                assert dns_port is not None
                q = dns.message.make_query(f"{name}.{NS}.svc.clusterset.local", "A")
                try:
                    r = await dns.asyncquery.udp(
                        q, "127.0.0.1", port=dns_port, timeout=0.5, sock=dns_sock
                    )
                except (dns.exception.Timeout, dns.query.BadResponse):
                    # BadResponse: a late reply to a query that had timed out (one socket).
                    return None
                ips = [
                    rr.address for rrset in r.answer for rr in rrset if rr.rdtype == dns.rdatatype.A
                ]
                return ips or None

            # ---- latency: one export at a time, c1 -> c2. The import is timestamped by the
            # watch's callback; the DNS answer by the poll in the same loop (one UDP query,
            # then a 2 ms sleep, until it answers), so neither wait delays the other's stamp.
            # The DNS stamp is the answer's arrival: late by at most the gap since the last
            # reply without the address (reported as the poll gap, the stamp's resolution).
            names = [] if args.restart else [f"lat-{j}" for j in range(n_latency)]
            await bounded([kubes[0].create(SERVICE, svc_body(n)) for n in names])
            lat_ms: list[float] = []
            dns_ms: list[float] = []
            gap_ms: list[float] = []
            polls = 0
            for name in names:
                t0 = time.monotonic()
                await kubes[0].create(SERVICE_EXPORT, svcex_body(name))
                answer: list[str] | None = None if dns_port is not None else []
                t_dns = t_miss = t0
                while answer is None or name not in si_ips[1]:
                    if time.monotonic() - t0 > 30:
                        raise RuntimeError(
                            f"{name}: no ServiceImport with an IP in c2, or no DNS answer there, "
                            f"after 30 s (import seen: {name in seen_si[1]}, DNS: {answer})"
                        )
                    if answer is None:
                        t_miss = t_dns
                        answer = await dns_a(name)
                        polls += 1
                        t_dns = time.monotonic()
                    await asyncio.sleep(0.002)
                lat_ms.append((seen_si[1][name] - t0) * 1000)
                if dns_port is not None:
                    if sorted(answer) != sorted(si_ips[1][name]):
                        raise RuntimeError(
                            f"{name}: c2's DNS answers {answer}, its ServiceImport has "
                            f"{si_ips[1][name]}"
                        )
                    dns_ms.append((t_dns - t0) * 1000)
                    gap_ms.append((t_dns - t_miss) * 1000)
            if dns_sock is not None:
                await dns_sock.close()
            if args.restart:
                lat_ms = dns_ms = gap_ms = [0.0]  # not measured in this mode
            result["export_to_import_p50_ms"] = round(percentile(lat_ms, 50), 1)
            result["export_to_import_p99_ms"] = round(percentile(lat_ms, 99), 1)
            result["export_to_import_max_ms"] = round(max(lat_ms), 1)
            result["export_to_dns_p50_ms"] = round(percentile(dns_ms, 50), 1) if dns_ms else None
            result["export_to_dns_p99_ms"] = round(percentile(dns_ms, 99), 1) if dns_ms else None
            result["export_to_dns_max_ms"] = round(max(dns_ms), 1) if dns_ms else None
            result["dns_polls_per_export"] = (
                round(polls / len(names), 1) if names and dns_ms else None
            )
            result["export_to_dns_poll_gap_p50_ms"] = (
                round(percentile(gap_ms, 50), 1) if gap_ms else None
            )
            print(
                "latency: not measured (--restart)"
                if args.restart
                else f"latency: export -> import p50 {result['export_to_import_p50_ms']} ms, "
                f"p99 {result['export_to_import_p99_ms']} ms, "
                f"max {result['export_to_import_max_ms']} ms; export -> DNS "
                f"p50 {result['export_to_dns_p50_ms']} ms, "
                f"p99 {result['export_to_dns_p99_ms']} ms, max {result['export_to_dns_max_ms']} ms",
                file=sys.stderr,
            )

            # ---- scale: n_scale services over three clusters, exported at once
            scale = [(j % 3, f"svc-{j}") for j in range(n_scale)]
            await bounded([kubes[i].create(SERVICE, svc_body(n)) for i, n in scale], 32)
            total = len(names) + n_scale
            groups = {
                "controllers": pids,
                "apiservers": [c._procs.apiserver.pid for c in cp.clusters if c._procs.apiserver],
                "etcds": [c._procs.etcd.pid for c in cp.clusters if c._procs.etcd],
                "benchmark": [os.getpid()],
            }
            cpu0 = {g: sum(cpu_s(p) for p in ps) for g, ps in groups.items()}
            cpu0_ctl = [cpu_s(p) for p in pids]
            t0 = time.monotonic()
            await bounded([kubes[i].create(SERVICE_EXPORT, svcex_body(n)) for i, n in scale], 32)
            created_s = time.monotonic() - t0
            peak = [0.0, 0.0, 0.0]
            while True:
                done = all(len(si_ips[i]) >= total and len(slices[i]) >= total for i in range(3))
                for j, p in enumerate(pids):
                    peak[j] = max(peak[j], rss_mb(p)[0])
                if done:
                    break
                if time.monotonic() - t0 > args.scale_timeout:
                    counts = [(len(si_ips[i]), len(slices[i])) for i in range(3)]
                    raise RuntimeError(
                        f"scale did not converge in {args.scale_timeout} s: {counts}"
                    )
                await asyncio.sleep(0.05)
            converge_s = time.monotonic() - t0
            result["scale_cpu_s"] = {
                g: round(sum(cpu_s(p) for p in ps) - cpu0[g], 1) for g, ps in groups.items()
            }
            print(
                f"scale: {converge_s:.1f} s, CPU seconds used: {result['scale_cpu_s']}",
                file=sys.stderr,
            )
            await asyncio.sleep(0.5)
            result["controller_requests"] = {
                s: hub.status[s].get("requests") for s in sorted(hub.status)
            }
            result["scale_cpu_s_per_controller"] = {
                c.name: round(cpu_s(p) - cpu0_ctl[j], 1)
                for j, (c, p) in enumerate(zip(cp.clusters, pids, strict=True))
            }
            result["dns_snapshot_builds"] = {
                s: hub.status[s].get("dns_builds") for s in sorted(hub.status)
            }
            result["dns_snapshot_build_s"] = {
                s: hub.status[s].get("dns_build_s") for s in sorted(hub.status)
            }
            print(json.dumps(result["controller_requests"]), file=sys.stderr)
            result["scale_services"] = n_scale
            result["scale_imports_per_cluster"] = total
            result["scale_export_create_s"] = round(created_s, 2)
            result["scale_converge_s"] = round(converge_s, 2)
            hwm = [rss_mb(p)[1] for p in pids]
            result["controller_rss_mb"] = round(max(hwm), 1)
            result["controller_rss_idle_mb"] = round(max(base_rss), 1)
            if args.restart:
                result |= await restart_phase(
                    hub, procs, spawn, cp.clusters[1], kubes[1], total, pids[1]
                )
            result["load"] = load_line()
            for task in wtasks:
                task.cancel()
            await asyncio.gather(*wtasks, return_exceptions=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            server.close()
            for a in apis:
                await a.close()
    finally:
        cp.close()
    return result


async def restart_phase(
    hub: Hub,
    procs: list[subprocess.Popen[bytes]],
    spawn: Any,
    cluster: Any,
    kube: Any,
    total: int,
    pid: int,
) -> dict[str, Any]:
    """Kill c2's controller (SIGKILL) once it is idle, start it again, and measure (see the
    module docstring)."""
    from meshlink.k8s.api import ENDPOINT_SLICE, SERVICE, SERVICE_IMPORT

    async def objects() -> dict[tuple[str, str], tuple[str, str]]:
        out = {}
        for res, sel in (
            (SERVICE_IMPORT, None),
            (SERVICE, "app.kubernetes.io/managed-by=meshlink"),
            (ENDPOINT_SLICE, "endpointslice.kubernetes.io/managed-by=meshlink.io"),
        ):
            items, _ = await kube.list(res, NS, sel)
            for o in items:
                m = o["metadata"]
                out[(res.plural, m["name"])] = (m["uid"], m["resourceVersion"])
        return out

    def consistent() -> bool:
        st = hub.status.get(cluster.name) or {}
        return bool(st.get("idle")) and st.get("imports") == total

    deadline = time.monotonic() + 120
    while not consistent():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{cluster.name} never idle before the restart")
        await asyncio.sleep(0.1)
    before = await objects()
    index = next(i for i, p in enumerate(procs) if p.pid == pid)
    procs[index].kill()
    procs[index].wait(10)
    hub.synced.pop(cluster.name, None)
    hub.status.pop(cluster.name, None)
    print(
        f"restart: {cluster.name}'s controller killed holding {len(before)} objects; {load_line()}",
        file=sys.stderr,
    )
    t0 = time.monotonic()
    procs[index] = spawn(cluster)
    deadline = t0 + 300
    while not (cluster.name in hub.synced and consistent()):
        if time.monotonic() > deadline or procs[index].poll() is not None:
            raise RuntimeError(f"{cluster.name}'s restarted controller did not converge")
        await asyncio.sleep(0.05)
    took = time.monotonic() - t0
    await asyncio.sleep(1.0)  # late writes, if any, show in the requests and objects
    after = await objects()
    requests = dict((hub.status.get(cluster.name) or {}).get("requests") or {})
    writes = {k: v for k, v in requests.items() if not k.startswith(("get ", "list ", "watch "))}
    recreated = sum(1 for k, (uid, _) in before.items() if after.get(k, ("", ""))[0] != uid)
    rewritten = sum(
        1
        for k, (uid, rv) in before.items()
        if after.get(k, ("", ""))[0] == uid and after[k][1] != rv
    )
    print(
        f"restart: consistent {took:.1f} s after the restart; writes {writes or 0}; "
        f"recreated {recreated}, rewritten {rewritten} of {len(before)} objects",
        file=sys.stderr,
    )
    return {
        "restart_objects": len(before),
        "restart_consistent_s": round(took, 2),
        "restart_writes": sum(writes.values()),
        "restart_writes_by_kind": writes,
        "restart_requests": requests,
        "restart_recreated": recreated,
        "restart_rewritten": rewritten,
        "restart_rss_mb": round(rss_mb(procs[index].pid)[1], 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="30 latency samples, 300 services")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--workers", type=int, default=24, help="reconcile workers per controller")
    ap.add_argument("--scale-timeout", type=float, default=300.0)
    ap.add_argument("--no-dns", action="store_true", help="controllers without their DNS servers")
    ap.add_argument(
        "--restart",
        action="store_true",
        help="restart convergence: kill -9 and restart c2's controller holding every import",
    )
    ap.add_argument("--controller", help=argparse.SUPPRESS)
    ap.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    ap.add_argument("--hub", help=argparse.SUPPRESS)
    ap.add_argument("--profile", help="write cProfile stats of controller c2 to this path")
    args = ap.parse_args()
    if args.controller:
        import logging

        import uvloop

        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        import signal

        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        prof = None
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(
                controller_main(
                    args.controller, args.kubeconfig, args.hub, args.workers, dns=not args.no_dns
                )
            )
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.profile)
        return 0
    r = asyncio.run(bench(args))
    if args.restart:
        print_table(
            ["metric", "meshlink", "target"],
            [
                [
                    f"imports held by c2 ({r['restart_objects']} objects)",
                    r["scale_imports_per_cluster"],
                    "-",
                ],
                ["restart -> consistent (s)", r["restart_consistent_s"], 30.0],
                ["writes by the restarted controller", r["restart_writes"], 0],
                ["objects recreated (new UID)", r["restart_recreated"], 0],
                ["objects rewritten (new resourceVersion)", r["restart_rewritten"], 0],
                ["restarted controller peak RSS (MB)", r["restart_rss_mb"], 300.0],
            ],
        )
        print(f"requests of the restarted controller: {r['restart_requests']}; {r['load']}")
        write_json(args.json, r)
        return 0

    def dns_cell(v: float | None) -> object:
        return "n/a (--no-dns)" if v is None else v

    print_table(
        ["metric", "meshlink", "target", "ratio to target"],
        [
            ["export -> import p50 (ms)", r["export_to_import_p50_ms"], "-", "-"],
            [
                "export -> import p99 (ms)",
                r["export_to_import_p99_ms"],
                1000.0,
                f"{r['export_to_import_p99_ms'] / 1000:.2f}",
            ],
            ["export -> import max (ms)", r["export_to_import_max_ms"], "-", "-"],
            ["export -> DNS answer in c2 p50 (ms)", dns_cell(r["export_to_dns_p50_ms"]), "-", "-"],
            [
                "export -> DNS answer in c2 p99 (ms)",
                dns_cell(r["export_to_dns_p99_ms"]),
                1000.0,
                "-"
                if r["export_to_dns_p99_ms"] is None
                else f"{r['export_to_dns_p99_ms'] / 1000:.2f}",
            ],
            ["export -> DNS answer in c2 max (ms)", dns_cell(r["export_to_dns_max_ms"]), "-", "-"],
            [
                "  DNS poll gap p50 (the DNS stamp's resolution, ms)",
                dns_cell(r["export_to_dns_poll_gap_p50_ms"]),
                "-",
                "-",
            ],
            [
                f"{r['scale_services']} services converged (s)",
                r["scale_converge_s"],
                30.0,
                f"{r['scale_converge_s'] / 30:.2f}",
            ],
            ["  of which creating the exports (s)", r["scale_export_create_s"], "-", "-"],
            [
                "controller peak RSS (MB)",
                r["controller_rss_mb"],
                300.0,
                f"{r['controller_rss_mb'] / 300:.2f}",
            ],
            ["controller RSS synced, idle (MB)", r["controller_rss_idle_mb"], "-", "-"],
            [
                "c2 DNS snapshot rebuilds, CPU s (whole run)",
                f"{r['dns_snapshot_builds'].get('c2')}, {r['dns_snapshot_build_s'].get('c2')}",
                "-",
                "-",
            ],
        ],
    )
    print(
        "controllers "
        + ("without DNS (--no-dns)" if args.no_dns else "each with its DNS server (as a site)")
        + f"; {r['load']}"
    )
    write_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())

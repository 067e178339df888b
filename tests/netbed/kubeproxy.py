"""A kube-proxy stand-in for the testbed: Service ClusterIPs -> EndpointSlice endpoints.

    python -m tests.netbed.kubeproxy --kubeconfig K --state-file F [--chain-prefix P]

Run inside a cluster's network namespace (`Testbed.start_kubeproxy`). It lists and watches
Services and EndpointSlices of every namespace (its own list/watch on aiohttp: relist on
410 Gone or any error, bookmarks on) and programs the namespace's iptables the way
kube-proxy's iptables mode does, with `iptables-restore --noflush` of its own chains only:

- nat `<P>-SERVICES` (jumped to from OUTPUT, since processes in the namespace are the
  pods, and from PREROUTING): for each TCP port of each Service with a ClusterIP, jump to
  a per-port chain that DNATs to one ready endpoint, chosen with `-m statistic --mode
  random --probability 1/(n-k)` as kube-proxy does. Service ports match slice ports by
  NAME; the slice's port number is the endpoint's (target) port.
- filter `<P>-SERVICES` (from OUTPUT and FORWARD): a Service port without a ready
  endpoint REJECTs with tcp-reset.

After each successful restore it writes the state file (atomically): {"generation": N,
"rules": {"CLUSTERIP:PORT": ["EP:PORT", ...] (sorted; [] = REJECT)}}, which is how a test
knows the rules are in place (`KubeProxy.wait_rules`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

log = logging.getLogger("kubeproxy")

Obj = dict[str, Any]
Key = tuple[str, str]
DEFAULT_PREFIX = "MLKP"
_RESTORE_TIMEOUT = 10.0
_RETRY_DELAY = 0.1
_MAX_RETRY_DELAY = 1.0
_WATCH_SECONDS = 240


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Program:
    """What `render` computes: iptables-restore input and the state it establishes."""

    text: str
    chains: frozenset[str]
    """Per-port nat chains in use (to delete once they are no longer rendered)."""
    rules: dict[str, list[str]]


def _chain(prefix: str, ns: str, name: str, port_name: str) -> str:
    digest = hashlib.sha256(f"{ns}/{name}/{port_name}/tcp".encode()).hexdigest()[:12]
    return f"{prefix}-SVC-{digest.upper()}"


def _ready(ep: Mapping[str, Any]) -> bool:
    # The API: an absent `ready` condition means "unknown", to be read as ready.
    return (ep.get("conditions") or {}).get("ready") is not False


def _endpoints(slices: Iterable[Mapping[str, Any]], port_name: str) -> list[str]:
    """The ready endpoints of one port. An address:port listed by several slices with
    different readiness is not ready: real kube-proxy keeps whichever copy it meets first
    (Go map order, so either one), and tests must see the worst case."""
    ready: dict[str, bool] = {}
    for s in slices:
        if s.get("addressType") != "IPv4":
            continue
        port = next(
            (
                p.get("port")
                for p in s.get("ports") or []
                if (p.get("name") or "") == port_name and (p.get("protocol") or "TCP") == "TCP"
            ),
            None,
        )
        if not isinstance(port, int):
            continue
        for ep in s.get("endpoints") or []:
            addrs = ep.get("addresses") or []
            if addrs:
                key = f"{addrs[0]}:{port}"
                ready[key] = ready.get(key, True) and _ready(ep)
    return sorted(k for k, ok in ready.items() if ok)


def render(
    services: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    *,
    prefix: str = DEFAULT_PREFIX,
    stale: Iterable[str] = (),
) -> Program:
    """The iptables-restore text (nat + filter) for these Services and EndpointSlices.

    `stale`: chains of the previous program; those not rendered again are deleted."""
    by_service: dict[Key, list[Mapping[str, Any]]] = {}
    for s in slices:
        m = s.get("metadata") or {}
        svc = (m.get("labels") or {}).get("kubernetes.io/service-name")
        if svc:
            by_service.setdefault((m.get("namespace", ""), svc), []).append(s)
    top = f"{prefix}-SERVICES"
    nat_rules: list[str] = []
    filter_rules: list[str] = []
    chains: dict[str, list[str]] = {}
    state: dict[str, list[str]] = {}
    for svc in sorted(services, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"])):
        meta, spec = svc["metadata"], svc.get("spec") or {}
        ip = spec.get("clusterIP")
        if not ip or ip == "None" or ":" in ip or spec.get("type") == "ExternalName":
            continue
        for p in spec.get("ports") or []:
            if (p.get("protocol") or "TCP") != "TCP":
                continue
            port_name = p.get("name") or ""
            eps = _endpoints(by_service.get((meta["namespace"], meta["name"]), []), port_name)
            match = f"-d {ip}/32 -p tcp -m tcp --dport {p['port']}"
            state[f"{ip}:{p['port']}"] = eps
            if not eps:
                filter_rules.append(f"-A {top} {match} -j REJECT --reject-with tcp-reset")
                continue
            chain = _chain(prefix, meta["namespace"], meta["name"], port_name)
            nat_rules.append(f"-A {top} {match} -j {chain}")
            body = []
            for k, ep in enumerate(eps):
                left = len(eps) - k
                stat = (
                    f"-m statistic --mode random --probability {1 / left:.10f} " if left > 1 else ""
                )
                body.append(f"-A {chain} -p tcp {stat}-j DNAT --to-destination {ep}")
            chains[chain] = body
    gone = sorted(set(stale) - set(chains))
    lines = ["*nat", f":{top} - [0:0]"]
    lines += [f":{c} - [0:0]" for c in sorted(chains)]
    lines += [f":{c} - [0:0]" for c in gone]  # declaring flushes them, so -X can delete
    lines += nat_rules
    for c in sorted(chains):
        lines += chains[c]
    lines += [f"-X {c}" for c in gone]
    lines += ["COMMIT", "*filter", f":{top} - [0:0]", *filter_rules, "COMMIT", ""]
    return Program(text="\n".join(lines), chains=frozenset(chains), rules=state)


# ----------------------------------------------------------------------------- iptables


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["iptables", "-w", "5", *args],
        capture_output=True,
        text=True,
        timeout=_RESTORE_TIMEOUT,
        check=False,
    )


def install_hooks(prefix: str) -> None:
    """Create the top chains (empty) and jump to them from the built-in chains, once."""
    top = f"{prefix}-SERVICES"
    restore(f"*nat\n:{top} - [0:0]\nCOMMIT\n*filter\n:{top} - [0:0]\nCOMMIT\n")
    hooks = (("nat", "OUTPUT"), ("nat", "PREROUTING"), ("filter", "OUTPUT"), ("filter", "FORWARD"))
    for table, hook in hooks:
        if _iptables("-t", table, "-C", hook, "-j", top).returncode != 0:
            done = _iptables("-t", table, "-I", hook, "-j", top)
            if done.returncode != 0:
                raise RuntimeError(f"iptables -t {table} -I {hook}: {done.stderr.strip()}")


def restore(text: str) -> None:
    proc = subprocess.run(
        ["iptables-restore", "-w", "5", "--noflush"],
        input=text,
        capture_output=True,
        text=True,
        timeout=_RESTORE_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"iptables-restore failed: {proc.stderr.strip()}")


# ----------------------------------------------------------------------------- API access


@dataclass
class Api:
    server: str
    ssl: ssl.SSLContext
    headers: dict[str, str] = field(default_factory=dict)


def _data_or_file(entry: Mapping[str, Any], key: str) -> bytes | None:
    if entry.get(f"{key}-data"):
        return base64.b64decode(entry[f"{key}-data"])
    if entry.get(key):
        return Path(entry[key]).read_bytes()
    return None


def load_kubeconfig(path: Path) -> Api:
    """Server, TLS context and auth header of the kubeconfig's current context (client
    certificate or bearer token)."""
    cfg = yaml.safe_load(path.read_text())
    ctx_name = cfg["current-context"]
    ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    user: dict[str, Any] = next(
        (u["user"] for u in cfg.get("users") or [] if u["name"] == ctx.get("user")), {}
    )
    ca = _data_or_file(cluster, "certificate-authority")
    tls = ssl.create_default_context(cadata=ca.decode() if ca else None)
    cert, key = _data_or_file(user, "client-certificate"), _data_or_file(user, "client-key")
    if cert and key:
        with tempfile.TemporaryDirectory(prefix="kubeproxy") as d:
            cp, kp = Path(d) / "c.pem", Path(d) / "k.pem"
            for p, data in ((cp, cert), (kp, key)):
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            tls.load_cert_chain(cp, kp)
    headers = {"Authorization": f"Bearer {user['token']}"} if user.get("token") else {}
    return Api(server=cluster["server"].rstrip("/"), ssl=tls, headers=headers)


class _Relist(Exception):
    """The watch's resourceVersion is gone (410): list again."""


async def informer(
    session: aiohttp.ClientSession,
    api: Api,
    path: str,
    store: dict[Key, Obj],
    changed: asyncio.Event,
    synced: asyncio.Event,
) -> None:
    """Keep `store` equal to the collection at `path`: list, then watch from the list's
    resourceVersion; relist on 410 or any error. Sets `changed` on every change."""
    url = api.server + path
    delay = _RETRY_DELAY
    while True:
        try:
            async with session.get(url, headers=api.headers, ssl=api.ssl) as r:
                if r.status != 200:
                    raise RuntimeError(f"list {path}: HTTP {r.status}")
                body = await r.json()
            rv = body["metadata"]["resourceVersion"]
            store.clear()
            for o in body.get("items") or []:
                store[(o["metadata"].get("namespace", ""), o["metadata"]["name"])] = o
            synced.set()
            changed.set()
            delay = _RETRY_DELAY
            while True:
                rv = await _watch(session, api, url, rv, store, changed)
        except _Relist:
            log.info("watch %s: resourceVersion gone, relisting", path)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("watch %s: %s; relisting in %.1f s", path, e or type(e).__name__, delay)
            await asyncio.sleep(delay)  # a retry backoff, not a wait for a condition
            delay = min(delay * 2, _MAX_RETRY_DELAY)


async def _watch(
    session: aiohttp.ClientSession,
    api: Api,
    url: str,
    rv: str,
    store: dict[Key, Obj],
    changed: asyncio.Event,
) -> str:
    params = {
        "watch": "1",
        "resourceVersion": rv,
        "allowWatchBookmarks": "true",
        "timeoutSeconds": str(_WATCH_SECONDS),
    }
    timeout = aiohttp.ClientTimeout(total=None, sock_read=_WATCH_SECONDS + 30)
    async with session.get(
        url, params=params, headers=api.headers, ssl=api.ssl, timeout=timeout
    ) as r:
        if r.status == 410:
            raise _Relist
        if r.status != 200:
            raise RuntimeError(f"watch: HTTP {r.status}")
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                ev = json.loads(line)
                kind, obj = ev["type"], ev["object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Relist
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                rv = obj["metadata"]["resourceVersion"]
                if kind == "BOOKMARK":
                    continue
                key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
                if kind == "DELETED":
                    store.pop(key, None)
                else:
                    store[key] = obj
                changed.set()
    return rv


# ----------------------------------------------------------------------------- daemon


def _write_state(path: Path, generation: int, rules: Mapping[str, list[str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"generation": generation, "rules": rules}, sort_keys=True))
    tmp.replace(path)


async def run(kubeconfig: Path, state_file: Path, prefix: str) -> None:
    api = load_kubeconfig(kubeconfig)
    install_hooks(prefix)
    services: dict[Key, Obj] = {}
    slices: dict[Key, Obj] = {}
    changed = asyncio.Event()
    synced = (asyncio.Event(), asyncio.Event())
    applied: Program | None = None
    generation = 0
    async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tg:
        tg.create_task(informer(session, api, "/api/v1/services", services, changed, synced[0]))
        tg.create_task(
            informer(
                session,
                api,
                "/apis/discovery.k8s.io/v1/endpointslices",
                slices,
                changed,
                synced[1],
            )
        )
        backoff = _RETRY_DELAY
        while True:
            await changed.wait()
            changed.clear()
            if not all(e.is_set() for e in synced):
                continue
            prog = render(
                services.values(),
                slices.values(),
                prefix=prefix,
                stale=applied.chains if applied else (),
            )
            if applied is not None and prog.text == applied.text:
                continue
            t0 = time.monotonic()
            try:
                await asyncio.to_thread(restore, prog.text)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log.warning("%s; retrying in %.1f s", e, backoff)
                await asyncio.sleep(backoff)  # retry backoff, doubling up to 2 s
                backoff = min(backoff * 2, 2.0)
                changed.set()
                continue
            backoff = _RETRY_DELAY
            applied = prog
            generation += 1
            _write_state(state_file, generation, prog.rules)
            log.info(
                "generation %d: %d service ports programmed in %.1f ms",
                generation,
                len(prog.rules),
                (time.monotonic() - t0) * 1000,
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kubeproxy", description=__doc__)
    p.add_argument("--kubeconfig", type=Path, required=True)
    p.add_argument("--state-file", type=Path, required=True)
    p.add_argument("--chain-prefix", default=DEFAULT_PREFIX)
    args = p.parse_args(argv)
    if not args.chain_prefix.isalnum() or len(args.chain_prefix) > 10:
        p.error("--chain-prefix: 1 to 10 letters or digits")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kubeproxy %(message)s")

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.kubeconfig, args.state_file, args.chain_prefix))
    return 0


# ----------------------------------------------------------------------------- test side


@dataclass(frozen=True)
class KubeProxy:
    """A running stand-in (see `Testbed.start_kubeproxy`) and how to wait on its rules."""

    cluster: int
    state_file: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def state(self) -> dict[str, Any]:
        """The last state written ({} before the first sync)."""
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        return data

    def wait_rules(
        self,
        cluster_ip: str,
        port: int,
        endpoints: Iterable[str] | None,
        *,
        timeout: float = 10.0,
    ) -> None:
        """Wait until ClusterIP:port is programmed to exactly `endpoints` ("IP:PORT"
        strings; empty = REJECT), or, for None, until it has no rule at all."""
        from tests.kube import wait_until

        want = None if endpoints is None else sorted(endpoints)
        key = f"{cluster_ip}:{port}"

        def done() -> bool:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"kubeproxy exited with {self.proc.returncode}:\n{tail}")
            state = self.state()
            return bool(state) and state.get("rules", {}).get(key) == want

        wait_until(done, timeout, f"kubeproxy rules {key} -> {want}")


if __name__ == "__main__":
    sys.exit(main())

"""`meshlink demo`: three local sites on loopback, linked by real tokens, a service 2 hops away.

A exports an HTTP echo service; B redeems a token from A; C redeems a token from B. C has
no link to A, yet reaches A's service by its clusterset name through B. Every site is a
separate `meshlink run` process started through the CLI, and every link is made with
`meshlink token create` / `meshlink link create`, exactly as a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from dnslib import QTYPE

from meshlink import status
from meshlink.errors import MeshlinkError

STEP_TIMEOUT = 20.0


class DemoFailed(MeshlinkError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class DemoSite:
    name: str
    dir: Path
    ports: dict[str, int]
    pool: str
    proc: asyncio.subprocess.Process | None = None

    @property
    def config_path(self) -> Path:
        return self.dir / "site.yaml"

    @property
    def ops(self) -> str:
        return f"http://127.0.0.1:{self.ports['ops']}"


def _say(msg: str) -> None:
    print(msg, flush=True)


async def _cli(*args: str, capture: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshlink",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), STEP_TIMEOUT)
    if proc.returncode != 0:
        raise DemoFailed(f"`meshlink {' '.join(args)}` failed: {err.decode().strip()}")
    return (out.decode() + err.decode()).strip() if capture else ""


async def _wait(what: str, check: Callable[[], Any], limit: float = STEP_TIMEOUT) -> Any:
    deadline = time.monotonic() + limit
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = await asyncio.to_thread(check)
            if result:
                return result
        except (OSError, ValueError, KeyError, status.StatusUnavailable) as e:
            last = e
        await asyncio.sleep(0.1)
    raise DemoFailed(
        f"timed out after {limit:.0f} s waiting for {what}" + (f" ({last})" if last else "")
    )


async def _link(*, issuer: DemoSite, redeemer: DemoSite) -> str:
    """`meshlink token create` on the issuer, `meshlink link create` on the redeemer."""
    token = issuer.dir / f"token-for-{redeemer.name}"
    await _cli("token", "create", "--config", str(issuer.config_path), "-o", str(token))
    return await _cli("link", "create", str(token), "--config", str(redeemer.config_path))


def _status(site: DemoSite) -> status.SiteStatus:
    return status.fetch(site.ops, timeout=2)


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            body = f"hello from site a: you asked for {line}\n".encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _http_get(host: str, port: int, path: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    elapsed = time.perf_counter() - t0
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise DemoFailed(f"unexpected reply from {host}:{port}: {head[:60]!r}")
    return body.decode().strip(), elapsed


async def _dns_query(port: int, name: str) -> list[str]:
    reply = await asyncio.to_thread(status.dns_query, "127.0.0.1", port, name, "A", timeout=3)
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


@contextlib.asynccontextmanager
async def _sites(root: Path, verbose: bool) -> AsyncIterator[list[DemoSite]]:
    sites = []
    for i, name in enumerate(("a", "b", "c")):
        d = root / name
        d.mkdir(mode=0o700)
        ports = {k: _free_port() for k in ("gateway", "grant", "dns", "ops")}
        sites.append(DemoSite(name, d, ports, f"127.{80 + i}.0.0/24"))
    try:
        yield sites
    finally:
        for s in sites:
            if s.proc is not None and s.proc.returncode is None:
                s.proc.terminate()
        for s in sites:
            if s.proc is not None:
                try:
                    await asyncio.wait_for(s.proc.wait(), 5)
                except TimeoutError:
                    s.proc.kill()
                    await s.proc.wait()


def _write_config(site: DemoSite, echo_port: int | None) -> None:
    cfg: dict[str, Any] = {
        "site": site.name,
        "stateDir": str(site.dir / "state"),
        "gateway": {"listen": f"127.0.0.1:{site.ports['gateway']}"},
        "grant": {"listen": f"127.0.0.1:{site.ports['grant']}"},
        "dns": {"listen": f"127.0.0.1:{site.ports['dns']}"},
        "ops": {"listen": f"127.0.0.1:{site.ports['ops']}"},
        "imports": {"pool": site.pool},
        "heartbeatInterval": 0.5,
    }
    if echo_port is not None:
        cfg["exports"] = [
            {
                "name": "echo",
                "namespace": "demo",
                "ports": [{"name": "http", "port": 80, "targetPort": echo_port}],
                "endpoints": ["127.0.0.1"],
            }
        ]
    site.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


async def run(*, keep: bool = False, verbose: bool = False) -> int:
    root = Path(tempfile.mkdtemp(prefix="meshlink-demo-"))
    os.chmod(root, 0o700)
    echo, echo_port = await _echo_server()
    t_start = time.perf_counter()
    try:
        async with _sites(root, verbose) as (a, b, c):
            _say(f"meshlink demo: three sites on loopback, state in {root}")
            _say(f"[1/7] site a exports demo/echo (HTTP echo on 127.0.0.1:{echo_port}, port 80)")
            for s in (a, b, c):
                _write_config(s, echo_port if s is a else None)
            _say("[2/7] starting sites a, b, c (`meshlink run --config site.yaml`)")
            for s in (a, b, c):
                log = None if verbose else (s.dir / "meshlink.log").open("wb")
                s.proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "meshlink",
                    "run",
                    "--config",
                    str(s.config_path),
                    stdout=log,
                    stderr=log,
                )
                if log is not None:
                    log.close()
            for s in (a, b, c):
                await _wait(f"site {s.name} to be ready", functools.partial(_ready, s))
            _say("[3/7] linking b -> a: `meshlink token create` on a, `meshlink link create` on b")
            _say("      " + await _link(issuer=a, redeemer=b))
            _say("[4/7] linking c -> b (c has no link to a)")
            _say("      " + await _link(issuer=b, redeemer=c))
            t_link = time.perf_counter()
            status_c = await _wait(
                "demo/echo to be imported at c",
                lambda: _import_ready(c, "demo/echo"),
            )
            imp = next(i for i in status_c["imports"] if i["service"] == "demo/echo")
            _say(
                f"      c imports demo/echo from {', '.join(imp['clusters'])} "
                f"{(time.perf_counter() - t_link) * 1000:.0f} ms after the link"
            )
            name = "echo.demo.svc.clusterset.local"
            _say(f"[5/7] DNS at c (127.0.0.1:{c.ports['dns']}): {name}")
            addrs = await _dns_query(c.ports["dns"], name)
            if not addrs:
                raise DemoFailed(f"c's DNS server has no A record for {name}")
            _say(f"      {name}. A {addrs[0]}")
            _say(f"[6/7] HTTP GET http://{name}/ from c -> b -> a")
            body, first = await _http_get(addrs[0], 80, "/hello")
            times = [first]
            for _ in range(4):
                times.append((await _http_get(addrs[0], 80, "/again"))[1])
            _say(f"      reply: {body}")
            _say(
                f"      round trip: first {first * 1000:.2f} ms, "
                f"median of 5 {sorted(times)[2] * 1000:.2f} ms (new connection each)"
            )
            _say("[7/7] summary")
            await _wait(
                "every link to measure its RTT",
                lambda: all(
                    x.get("rtt_ms") is not None for s in (a, b, c) for x in _status(s)["links"]
                ),
                limit=5,
            )
            for s in (a, b, c):
                st = _status(s)
                links = (
                    ", ".join(
                        f"{x['peer']} ({x['direction']}, {x['state']}, RTT "
                        + (f"{x['rtt_ms']:.2f} ms" if x.get("rtt_ms") is not None else "-")
                        + ")"
                        for x in st["links"]
                    )
                    or "none"
                )
                sites_ = ", ".join(f"{x['site']}:{x['hops']}" for x in st["sites"])
                imports = ", ".join(f"{i['service']}@{','.join(i['ips'])}" for i in st["imports"])
                _say(
                    f"      site {s.name}: links [{links}]  sites(hops) [{sites_}]  "
                    f"imports [{imports}]"
                )
            _say(f"demo OK in {time.perf_counter() - t_start:.1f} s")
            return 0
    except DemoFailed as e:
        print(f"demo FAILED: {e}", file=sys.stderr)
        for site_name in ("a", "b", "c"):
            logf = root / site_name / "meshlink.log"
            if logf.exists():
                tail = logf.read_text(errors="replace").strip().splitlines()[-5:]
                print(f"--- last lines of site {site_name}'s log ({logf}):", file=sys.stderr)
                print("\n".join(tail), file=sys.stderr)
        keep = True
        return 1
    finally:
        echo.close()
        await echo.wait_closed()
        if keep:
            print(f"state kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _ready(site: DemoSite) -> bool:
    if site.proc is not None and site.proc.returncode is not None:
        raise DemoFailed(f"site {site.name} exited with {site.proc.returncode}")
    with urllib.request.urlopen(f"{site.ops}/readyz", timeout=1) as resp:  # noqa: S310
        return bool(resp.status == 200)


def _import_ready(site: DemoSite, service: str) -> status.SiteStatus | None:
    st = _status(site)
    for i in st["imports"]:
        if i["service"] == service and i["reachable"] and i["ips"]:
            return st
    return None

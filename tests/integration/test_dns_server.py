"""The real DNS server on a loopback port, asked by real clients: dig, kdig and dnspython,
over UDP and TCP."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import dns.asyncbackend
import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from meshlink.catalog.records import Endpoint, Port
from meshlink.catalog.view import ImportedService
from meshlink.dns.run import serve_file, start_server
from meshlink.dns.server import DnsServer
from meshlink.dns.snapshot import (
    NEGATIVE_CACHE_BYTES,
    NEGATIVE_CACHE_ENTRIES,
    POSITIVE_CACHE_ENTRIES,
    build_snapshot,
)
from meshlink.errors import ConfigError
from tests.dnsview import clusterset_ip, headless

pytestmark = pytest.mark.timeout(60)

Z = "clusterset.local"
HOST = "127.0.0.1"


def services(web_ip: str = "10.0.0.1") -> list[ImportedService]:
    many = tuple(Endpoint((f"10.3.0.{i}", f"fd00:3::{i:x}"), f"pod-{i}") for i in range(1, 121))
    return [
        clusterset_ip(
            "web",
            (web_ip, "fd00::1"),
            (Port(80, "TCP", "http"), Port(42, "TCP", "x"), Port(42, "UDP", "y")),
        ),
        headless(
            "db",
            (Port(5432, "TCP", "pg"),),
            {
                "east": (Endpoint(("10.1.2.3",)), Endpoint(("10.1.2.4",), "db-1")),
                "west": (Endpoint(("fd00::7",)),),
            },
        ),
        headless("many", (Port(80, "TCP", "http"),), {"c1": many}, namespace="big"),
    ]


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    srv = DnsServer(build_snapshot(services()), host=HOST, port=0)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


async def run(*argv: str, timeout: float = 15) -> str:
    exe = shutil.which(argv[0])
    if exe is None:
        pytest.fail(f"{argv[0]} is not installed (Debian: dnsutils / knot-dnsutils)")
    proc = await asyncio.create_subprocess_exec(
        exe, *argv[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return out.decode()


async def dig(port: int, *args: str) -> str:
    return await run("dig", f"@{HOST}", "-p", str(port), "+time=2", "+tries=1", *args)


async def kdig(port: int, *args: str) -> str:
    return await run("kdig", f"@{HOST}", "-p", str(port), "+time=2", "+retry=0", *args)


def answers(out: str, rtype: str) -> list[str]:
    """The rdata of answer-section lines of `rtype` in dig/kdig output."""
    found = []
    section = ""
    for line in out.splitlines():
        if line.startswith(";;"):
            section = line
            continue
        parts = line.split()
        if "ANSWER" in section and len(parts) >= 5 and rtype in parts[2:4]:
            found.append(" ".join(parts[parts.index(rtype) + 1 :]))
    return sorted(found)


def status(out: str) -> str:
    m = re.search(r"status: (\w+)", out)
    assert m, out
    return m.group(1)


# --- dig ----------------------------------------------------------------------------------


async def test_dig_udp_every_record_form(server: DnsServer) -> None:
    p = server.bound_port
    out = await dig(p, f"web.default.svc.{Z}", "A")
    assert status(out) == "NOERROR"
    assert answers(out, "A") == ["10.0.0.1"]
    assert re.search(r"flags: qr aa rd;", out)
    assert re.search(rf"web\.default\.svc\.{Z}\.\s+5\s+IN\s+A", out)  # TTL 5
    assert answers(await dig(p, f"web.default.svc.{Z}", "AAAA"), "AAAA") == ["fd00::1"]
    srv = answers(await dig(p, f"_http._tcp.web.default.svc.{Z}", "SRV"), "SRV")
    assert srv == [f"0 100 80 web.default.svc.{Z}."]
    bare = answers(await dig(p, f"web.default.svc.{Z}", "SRV"), "SRV")
    assert bare == [f"0 100 42 web.default.svc.{Z}.", f"0 100 80 web.default.svc.{Z}."]
    assert answers(await dig(p, f"dns-version.{Z}", "TXT"), "TXT") == ['"1.0.0"']
    hl = await dig(p, f"db.default.svc.{Z}", "A")
    assert answers(hl, "A") == ["10.1.2.3", "10.1.2.4"]
    assert answers(await dig(p, f"db.default.svc.{Z}", "AAAA"), "AAAA") == ["fd00::7"]
    assert answers(await dig(p, f"10-1-2-3.east.db.default.svc.{Z}", "A"), "A") == ["10.1.2.3"]
    assert answers(await dig(p, f"fd00--7.west.db.default.svc.{Z}", "AAAA"), "AAAA") == ["fd00::7"]
    hsrv = answers(await dig(p, f"_pg._tcp.db.default.svc.{Z}", "SRV"), "SRV")
    assert hsrv == [
        f"0 100 5432 10-1-2-3.east.db.default.svc.{Z}.",
        f"0 100 5432 db-1.east.db.default.svc.{Z}.",
        f"0 100 5432 fd00--7.west.db.default.svc.{Z}.",
    ]


async def test_dig_negative_answers(server: DnsServer) -> None:
    p = server.bound_port
    nodata = await dig(p, f"web.default.svc.{Z}", "TXT")
    assert status(nodata) == "NOERROR"
    assert "ANSWER: 0" in nodata
    assert re.search(rf"^{Z}\.\s+5\s+IN\s+SOA\s", nodata, re.MULTILINE)
    nx = await dig(p, f"east.web.default.svc.{Z}", "A")  # the forbidden <clusterid>.<svc>
    assert status(nx) == "NXDOMAIN"
    assert re.search(rf"^{Z}\.\s+5\s+IN\s+SOA\s", nx, re.MULTILINE)
    assert status(await dig(p, f"web.nowhere.svc.{Z}", "A")) == "NXDOMAIN"
    refused = await dig(p, "kubernetes.default.svc.cluster.local", "A")
    assert status(refused) == "REFUSED"


async def test_dig_norec_and_tcp(server: DnsServer) -> None:
    p = server.bound_port
    out = await dig(p, "+norec", f"web.default.svc.{Z}", "A")
    assert re.search(r"flags: qr aa;", out)  # RD not set, so not echoed
    out = await dig(p, "+tcp", f"web.default.svc.{Z}", "AAAA")
    assert answers(out, "AAAA") == ["fd00::1"]
    assert "(TCP)" in out


async def test_dig_truncation_then_tcp_retry_gets_everything(server: DnsServer) -> None:
    p = server.bound_port
    name = f"many.big.svc.{Z}"
    # +ignore: show the truncated UDP reply as is: TC set, question kept, no answers.
    tc = await dig(p, "+ignore", "+bufsize=1232", name, "A")
    assert re.search(r"flags: qr aa tc rd;", tc)
    assert "QUERY: 1, ANSWER: 0" in tc
    assert re.search(rf"^;{re.escape(name)}\.\s+IN\s+A", tc, re.MULTILINE)
    # Default dig retries over TCP on TC and gets all 120 records.
    full = await dig(p, "+bufsize=1232", name, "A")
    assert "Truncated, retrying in TCP mode" in full
    assert len(answers(full, "A")) == 120
    assert len(answers(await dig(p, "+bufsize=512", name, "AAAA"), "AAAA")) == 120


async def test_dig_bufsize_is_honoured(server: DnsServer) -> None:
    srv = DnsServer(build_snapshot(services()), host=HOST, port=0, max_udp=4096)
    await srv.start()
    try:
        p = srv.bound_port
        name = f"many.big.svc.{Z}"
        small = await dig(p, "+ignore", "+bufsize=1232", name, "A")
        assert " tc " in small.split("flags:")[1].split(";")[0] + " "
        big = await dig(p, "+ignore", "+bufsize=4096", name, "A")
        assert "Truncated" not in big
        assert re.search(r"flags: qr aa rd;", big)
        assert len(answers(big, "A")) == 120
        assert "udp: 4096" in big  # our OPT advertises our limit
        noedns = await dig(p, "+ignore", "+noedns", f"db.default.svc.{Z}", "A")
        assert "OPT PSEUDOSECTION" not in noedns
        assert len(answers(noedns, "A")) == 2
    finally:
        await srv.close()


# --- kdig ---------------------------------------------------------------------------------


async def test_kdig_udp_tcp_and_bufsize(server: DnsServer) -> None:
    p = server.bound_port
    out = await kdig(p, f"web.default.svc.{Z}", "A")
    assert status(out) == "NOERROR"
    assert answers(out, "A") == ["10.0.0.1"]
    out = await kdig(p, "+tcp", f"db.default.svc.{Z}", "A")
    assert "TCP" in out
    assert answers(out, "A") == ["10.1.2.3", "10.1.2.4"]
    out = await kdig(p, "+norec", f"db-1.east.db.default.svc.{Z}", "A")
    assert answers(out, "A") == ["10.1.2.4"]
    assert re.search(r"Flags: qr aa;", out)
    out = await kdig(p, "+bufsize=1232", "+ignore", f"many.big.svc.{Z}", "A")
    assert re.search(r"Flags: qr aa tc rd;", out)
    out = await kdig(p, "+tcp", f"many.big.svc.{Z}", "A")
    assert len(answers(out, "A")) == 120
    out = await kdig(p, f"many.big.svc.{Z}", "AAAA")  # kdig retries over TCP on TC
    assert len(answers(out, "AAAA")) == 120
    assert status(await kdig(p, f"east.db.default.svc.{Z}", "A")) == "NOERROR"
    assert status(await kdig(p, "example.com", "A")) == "REFUSED"


# --- dnspython ----------------------------------------------------------------------------


async def test_dnspython_udp_and_tcp(server: DnsServer) -> None:
    p = server.bound_port
    q = dns.message.make_query(f"web.default.svc.{Z}", "A")
    r = await dns.asyncquery.udp(q, HOST, port=p, timeout=2)
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA
    assert [rd.address for rd in r.answer[0]] == ["10.0.0.1"]
    assert r.answer[0].ttl == 5
    q = dns.message.make_query(f"many.big.svc.{Z}", "AAAA", use_edns=0, payload=1232)
    r = await dns.asyncquery.udp(q, HOST, port=p, timeout=2, ignore_trailing=True)
    assert r.flags & dns.flags.TC
    assert r.question[0].name == q.question[0].name
    r = await dns.asyncquery.tcp(q, HOST, port=p, timeout=2)
    assert not r.flags & dns.flags.TC
    assert len(r.answer[0]) == 120
    r, used_tcp = await dns.asyncquery.udp_with_fallback(q, HOST, port=p, timeout=2)
    assert used_tcp
    assert len(r.answer[0]) == 120
    q = dns.message.make_query(f"nope.default.svc.{Z}", "A")
    r = await dns.asyncquery.udp(q, HOST, port=p, timeout=2)
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.authority[0].rdtype == dns.rdatatype.SOA


async def test_several_queries_on_one_tcp_connection(server: DnsServer) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.bound_port)
    try:
        names = [f"web.default.svc.{Z}", f"db.default.svc.{Z}", f"many.big.svc.{Z}", "x.org"]
        queries = [dns.message.make_query(n, "A") for n in names]
        # Pipelined: all queries written before any reply is read.
        writer.write(
            b"".join(len(w).to_bytes(2, "big") + w for w in (q.to_wire() for q in queries))
        )
        await writer.drain()
        for q, n in zip(queries, names, strict=True):
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 5), "big")
            r = dns.message.from_wire(await reader.readexactly(size))
            assert r.id == q.id
            assert str(r.question[0].name) == n.rstrip(".") + "."
        assert len(server.connections) == 1
    finally:
        writer.close()
        await writer.wait_closed()


async def test_kdig_keepopen_several_queries_on_one_tcp_connection(server: DnsServer) -> None:
    before = server.tcp_accepted
    out = await kdig(
        server.bound_port,
        "+tcp",
        "+keepopen",
        f"web.default.svc.{Z}",
        "A",
        f"web.default.svc.{Z}",
        "AAAA",
        f"dns-version.{Z}",
        "TXT",
    )
    assert answers(out, "A") == ["10.0.0.1"]
    assert answers(out, "AAAA") == ["fd00::1"]
    assert answers(out, "TXT") == ['"1.0.0"']
    assert server.tcp_accepted - before == 1


async def test_dnspython_reuses_one_tcp_connection(server: DnsServer) -> None:
    backend = dns.asyncbackend.get_default_backend()
    sock = await backend.make_socket(
        socket.AF_INET, socket.SOCK_STREAM, 0, None, (HOST, server.bound_port), timeout=2
    )
    async with sock:
        for name, qtype, want in (
            (f"web.default.svc.{Z}", "A", "10.0.0.1"),
            (f"web.default.svc.{Z}", "AAAA", "fd00::1"),
            (f"db-1.east.db.default.svc.{Z}", "A", "10.1.2.4"),
        ):
            q = dns.message.make_query(name, qtype)
            r = await dns.asyncquery.tcp(q, HOST, port=server.bound_port, sock=sock, timeout=2)
            assert r.answer[0][0].address == want
            assert len(server.connections) == 1


async def test_tcp_idle_timeout_and_connection_cap() -> None:
    srv = DnsServer(
        build_snapshot(services()), host=HOST, port=0, idle_timeout=0.3, max_connections=2
    )
    await srv.start()
    try:
        conns = [await asyncio.open_connection(HOST, srv.bound_port) for _ in range(2)]
        t0 = time.monotonic()
        # Over the cap: the new connection stays, the quietest (the first) is closed for it.
        conns.append(await asyncio.open_connection(HOST, srv.bound_port))
        assert await asyncio.wait_for(conns[0][0].read(), 5) == b""
        conns[0][1].close()
        for reader, writer in conns[1:]:
            assert await asyncio.wait_for(reader.read(), 5) == b""  # idle: closed
            writer.close()
        assert time.monotonic() - t0 < 5
        assert not srv.connections
    finally:
        await srv.close()


async def test_tcp_frames_split_across_writes(server: DnsServer) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.bound_port)
    try:
        wire = dns.message.make_query(f"web.default.svc.{Z}", "AAAA").to_wire()
        framed = len(wire).to_bytes(2, "big") + wire
        for i in range(len(framed)):  # one byte per segment
            writer.write(framed[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 5), "big")
        r = dns.message.from_wire(await reader.readexactly(size))
        assert r.answer[0][0].address == "fd00::1"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_tcp_unreadable_header_closes_the_connection(server: DnsServer) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.bound_port)
    writer.write(b"\x00\x05hello")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


# --- snapshots, floods, lifecycle -----------------------------------------------------------


async def test_snapshot_update_is_visible_within_100ms(server: DnsServer) -> None:
    q = dns.message.make_query(f"web.default.svc.{Z}", "A")
    r = await dns.asyncquery.udp(q, HOST, port=server.bound_port, timeout=2)
    assert r.answer[0][0].address == "10.0.0.1"
    new = build_snapshot(services(web_ip="10.0.0.42"))
    t0 = time.monotonic()
    server.update(new)
    while True:
        r = await dns.asyncquery.udp(q, HOST, port=server.bound_port, timeout=2)
        if r.answer[0][0].address == "10.0.0.42":
            break
        assert time.monotonic() - t0 < 0.1, "update not visible within 100 ms"
    assert time.monotonic() - t0 < 0.1
    # TCP sees it too, and a service removed from the view stops resolving.
    server.update(build_snapshot([s for s in services() if s.name != "web"]))
    r = await dns.asyncquery.tcp(q, HOST, port=server.bound_port, timeout=2)
    assert r.rcode() == dns.rcode.NXDOMAIN


async def test_garbage_flood_does_not_kill_the_server(server: DnsServer) -> None:
    rnd = random.Random(1)
    good = dns.message.make_query(f"web.default.svc.{Z}", "A").to_wire()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        for i in range(30_000):
            kind = i % 3
            if kind == 0:
                pkt = rnd.randbytes(rnd.randrange(0, 300))
            elif kind == 1:
                pkt = bytearray(good)
                for _ in range(3):
                    pkt[rnd.randrange(len(pkt))] = rnd.randrange(256)
                pkt = bytes(pkt)
            else:  # random names in the zone: each a new negative cache entry
                pkt = dns.message.make_query(f"r{i}.{rnd.random()}.svc.{Z}", "A").to_wire()
            try:
                sock.sendto(pkt, (HOST, server.bound_port))
            except BlockingIOError:
                await asyncio.sleep(0)
            if i % 200 == 0:
                await asyncio.sleep(0)  # let the server (same loop) drain its socket
    finally:
        sock.close()
    await asyncio.sleep(0.2)
    out = await dig(server.bound_port, f"web.default.svc.{Z}", "A")
    assert answers(out, "A") == ["10.0.0.1"]
    cache = server.snapshot.cache(server.max_udp, False)
    assert cache.neg  # the flood did reach the server
    assert len(cache.neg) <= NEGATIVE_CACHE_ENTRIES
    assert cache.neg_bytes <= NEGATIVE_CACHE_BYTES
    assert len(cache.pos) <= POSITIVE_CACHE_ENTRIES


async def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    srv = DnsServer(build_snapshot(services()), host="::1", port=0)
    try:
        await srv.start()
    except OSError:
        pytest.skip("::1 is not configured here")
    try:
        out = await run("dig", "@::1", "-p", str(srv.bound_port), "+time=2", "+tries=1",
                        f"web.default.svc.{Z}", "AAAA")  # fmt: skip
        assert answers(out, "AAAA") == ["fd00::1"]
    finally:
        await srv.close()


async def test_busy_port_is_one_clear_error(server: DnsServer) -> None:
    busy = r"dns\.listen: cannot listen on 127\.0\.0\.1:\d+: the address is in use"
    with pytest.raises(ConfigError, match=busy):
        await start_server(build_snapshot([]), HOST, server.bound_port)


async def test_serve_file_reloads_on_change(tmp_path: Path) -> None:
    path = tmp_path / "records.yaml"
    doc = "services:\n  - {name: web, namespace: default, ips: [%s]}\n"
    path.write_text(doc % "10.0.0.1")
    started: asyncio.Future[DnsServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_file(path, HOST, 0, reload_interval=0.05, on_started=started.set_result)
    )
    try:
        srv = await asyncio.wait_for(started, 5)
        q = dns.message.make_query(f"web.default.svc.{Z}", "A")

        async def current() -> str:
            r = await dns.asyncquery.udp(q, HOST, port=srv.bound_port, timeout=2)
            return str(r.answer[0][0].address) if r.answer else dns.rcode.to_text(r.rcode())

        assert await current() == "10.0.0.1"
        path.write_text(doc % "10.0.0.2")
        os.utime(path, (time.time() + 5, time.time() + 5))
        deadline = time.monotonic() + 5
        while await current() != "10.0.0.2":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        path.write_text("services: [{name: Bad}]\n")  # a bad edit keeps the last good records
        os.utime(path, (time.time() + 10, time.time() + 10))
        await asyncio.sleep(0.3)
        assert await current() == "10.0.0.2"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

"""DNS benchmark: dnsperf against meshlink's DNS server and against unbound, same records.

    python benchmarks/dns.py [--quick] [--json PATH] [--services N] [--rounds N]

Both servers hold the same ~1,000 services (ClusterSetIP dual-stack with named ports, and
Headless with endpoints in two clusters): meshlink from a records file, unbound as
``local-zone: "clusterset.local." static`` with ``local-data`` generated from the very same
snapshot. dnsperf sends the same query mix (ClusterSetIP A, AAAA, SRV, headless A, NXDOMAIN
names) with the same settings to each, alternating, in rounds:

- throughput: ``-c 10 -q 100 -l D`` (as fast as it answers): QPS, lost queries, latency;
- latency at a fixed rate: ``-Q 1000``, per-query latencies from ``-v``: p50/p99.

meshlink runs in its own process under uvloop (``--serve`` below). Both servers are
single-threaded (unbound ``num-threads: 1``). Prints a table and the ratio; ``--json``
writes ``meshlink_qps``, ``unbound_qps``, ``meshlink_lost_pct``, ``unbound_lost_pct``,
``meshlink_p99_ms_at_1k``, ``unbound_p99_ms_at_1k`` and more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ensure_tools,
    free_port,
    load_line,
    median,
    percentile,
    print_table,
    ratio,
    write_json,
)

ZONE = "clusterset.local"


def make_records(n: int, seed: int = 7) -> dict[str, object]:
    """n services: 4 of 5 ClusterSetIP (dual-stack, 2 named ports), 1 of 5 Headless (4
    ready endpoints over two clusters, half with hostnames)."""
    rnd = random.Random(seed)
    services = []
    for i in range(n):
        ns = f"ns{i % 20}"
        if i % 5:
            v4 = ipaddress.IPv4Address(0x0A600000 + i)
            v6 = ipaddress.IPv6Address((0xFD00 << 112) + 0x6000 + i)
            services.append(
                {
                    "name": f"svc{i}",
                    "namespace": ns,
                    "type": "ClusterSetIP",
                    "ips": [str(v4), str(v6)],
                    "ports": [
                        {"port": 80, "protocol": "TCP", "name": "http"},
                        {"port": 443, "protocol": "TCP", "name": "https"},
                    ],
                    "clusters": [{"cluster": "east"}, {"cluster": "west"}],
                }
            )
        else:
            clusters = []
            for c, cluster in enumerate(("east", "west")):
                eps = []
                for k in range(2):
                    addr = ipaddress.IPv4Address(0x0A800000 + (i << 4) + (c << 2) + k)
                    ep: dict[str, object] = {"addresses": [str(addr)], "ready": True}
                    if rnd.random() < 0.5:
                        ep["hostname"] = f"pod-{k}"
                    eps.append(ep)
                clusters.append({"cluster": cluster, "endpoints": eps})
            services.append(
                {
                    "name": f"hl{i}",
                    "namespace": ns,
                    "type": "Headless",
                    "ports": [{"port": 5432, "protocol": "TCP", "name": "pg"}],
                    "clusters": clusters,
                }
            )
    return {"services": services}


def make_queries(records: dict[str, object], count: int, seed: int = 11) -> list[str]:
    """The query mix, in dnsperf's ``name TYPE`` format."""
    rnd = random.Random(seed)
    services = records["services"]
    assert isinstance(services, list)
    cip = [s for s in services if s["type"] == "ClusterSetIP"]
    hl = [s for s in services if s["type"] == "Headless"]
    out = []
    for _ in range(count):
        r = rnd.random()
        if r < 0.35:
            s = rnd.choice(cip)
            out.append(f"{s['name']}.{s['namespace']}.svc.{ZONE} A")
        elif r < 0.55:
            s = rnd.choice(cip)
            out.append(f"{s['name']}.{s['namespace']}.svc.{ZONE} AAAA")
        elif r < 0.70:
            s = rnd.choice(cip)
            out.append(f"_http._tcp.{s['name']}.{s['namespace']}.svc.{ZONE} SRV")
        elif r < 0.90:
            s = rnd.choice(hl)
            out.append(f"{s['name']}.{s['namespace']}.svc.{ZONE} A")
        else:
            out.append(f"missing{rnd.randrange(200)}.ns{rnd.randrange(20)}.svc.{ZONE} A")
    return out


def unbound_conf(records_path: Path, port: int, workdir: Path) -> str:
    """An unbound.conf serving exactly the records meshlink serves (from the same snapshot)."""
    from meshlink.dns import build_snapshot, load_services

    snap = build_snapshot(load_services(records_path), zone=ZONE, ttl=5)
    lines = [
        "server:",
        "    interface: 127.0.0.1",
        f"    port: {port}",
        "    do-daemonize: no",
        '    chroot: ""',
        '    username: ""',
        f'    directory: "{workdir}"',
        '    pidfile: ""',
        "    use-syslog: no",
        "    verbosity: 0",
        "    num-threads: 1",
        "    do-ip6: no",
        "    access-control: 127.0.0.0/8 allow",
        "    so-rcvbuf: 4m",
        "    so-sndbuf: 4m",
        f'    local-zone: "{ZONE}." static',
    ]
    for name, by_type in snap.records.items():
        owner = name.decode() + "."
        for qtype, rdatas in by_type.items():
            tname = {1: "A", 28: "AAAA", 33: "SRV", 16: "TXT", 6: "SOA", 2: "NS"}[qtype]
            for value in rdatas:
                text = str(snap.rdata(qtype, value)).replace('"', '\\"')
                lines.append(f'    local-data: "{owner} 5 IN {tname} {text}"')
    lines += ["remote-control:", "    control-enable: no", ""]
    return "\n".join(lines)


def snapshot_build_ms(records_path: Path) -> float:
    """How long a catalog change takes to become a snapshot (part of the 100 ms budget)."""
    from meshlink.dns import build_snapshot, load_services

    services = load_services(records_path)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        build_snapshot(services, zone=ZONE, ttl=5)
        times.append((time.perf_counter() - t) * 1000)
    return median(times)


# --- meshlink's server in its own process ------------------------------------------------


def serve_main(records: str, port: int) -> None:
    """What ``meshlink dns --records FILE`` runs, under uvloop; prints the bound port."""
    import uvloop

    from meshlink.dns.run import serve_file

    def started(server: object) -> None:
        print(f"PORT {getattr(server, 'bound_port', 0)}", flush=True)

    async def main() -> None:
        task = asyncio.create_task(serve_file(records, "127.0.0.1", port, on_started=started))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    uvloop.run(main())


@contextlib.contextmanager
def meshlink_server(records: Path, profile: Path | None) -> Iterator[int]:
    argv = [sys.executable]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    argv += [__file__, "--serve", str(records)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.match(r"PORT (\d+)", line)
        if not m:
            raise RuntimeError(f"meshlink dns server did not start: {line!r}")
        yield int(m.group(1))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def unbound_server(records: Path, workdir: Path) -> Iterator[int]:
    port = free_port("127.0.0.1", kind=2)  # SOCK_DGRAM
    conf = workdir / "unbound.conf"
    conf.write_text(unbound_conf(records, port, workdir))
    subprocess.run(["unbound-checkconf", str(conf)], check=True, capture_output=True)
    proc = subprocess.Popen(["unbound", "-d", "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        _wait_dns(port, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_dns(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"unbound exited: {err[-500:]}")
        r = subprocess.run(
            ["dig", "+short", "+tries=1", "+time=1", "-p", str(port), "@127.0.0.1",
             f"dns-version.{ZONE}", "TXT"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if "1.0.0" in r.stdout:
            return
        time.sleep(0.1)
    raise TimeoutError("unbound did not answer")


# --- dnsperf -----------------------------------------------------------------------------


class Run:
    """A dnsperf process writing to a temporary file: two runs at once must not block on
    a full stdout pipe (with -v a 64 KiB pipe fills after ~1,150 answers)."""

    def __init__(self, argv: list[str], seconds: float) -> None:
        self.out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in result()
        self.seconds = seconds
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT, text=True)


def dnsperf_start(port: int, queries: Path, seconds: float, rate: int | None) -> Run:
    argv = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries),
            "-c", "10", "-q", "100", "-l", str(seconds), "-t", "2"]  # fmt: skip
    if rate is not None:
        argv += ["-Q", str(rate), "-v"]
    return Run(argv, seconds)


def dnsperf_result(run: Run) -> dict[str, float]:
    try:
        run.proc.wait(timeout=run.seconds + 30)
        run.out.seek(0)
        out = run.out.read()
    finally:
        run.out.close()
    if run.proc.returncode != 0 and "Queries sent" not in out:
        raise RuntimeError(f"dnsperf failed: {out[-500:]}")

    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else float("nan")

    sent = num(r"Queries sent:\s+(\d+)")
    lost = num(r"Queries lost:\s+(\d+)")
    res = {
        "qps": num(r"Queries per second:\s+([\d.]+)"),
        "sent": sent,
        "lost": lost,
        "lost_pct": 100.0 * lost / sent if sent else float("nan"),
        "avg_ms": 1000 * num(r"Average Latency \(s\):\s+([\d.]+)"),
        "nxdomain_pct": num(r"NXDOMAIN \d+ \(([\d.]+)%\)"),
        "response_bytes": num(r"Average packet size:\s+request \d+, response (\d+)"),
    }
    # -v: one line per answered query, latency (seconds) in the last column.
    lat = [
        float(m.group(1)) * 1000
        for m in re.finditer(r"^> \S+ .* ([\d.]+)$", out, flags=re.MULTILINE)
    ]
    res["p50_ms"] = percentile(lat, 50)
    res["p99_ms"] = percentile(lat, 99)
    res["samples"] = float(len(lat))
    return res


def dnsperf(port: int, queries: Path, seconds: float, rate: int | None = None) -> dict[str, float]:
    return dnsperf_result(dnsperf_start(port, queries, seconds, rate))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round (< 1 minute)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="per throughput run")
    ap.add_argument("--profile", help="cProfile the meshlink server into this file")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_main(args.serve, args.port)
        return 0

    ensure_tools({"dnsperf": "dnsperf", "unbound": "unbound", "dig": "bind9-dnsutils"})
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (8.0 if args.quick else 15.0)
    lat_seconds = 5.0 if args.quick else 10.0
    results: dict[str, dict[str, list[float]]] = {"meshlink": {}, "unbound": {}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshlink-dnsbench-") as tmp:
        work = Path(tmp)
        records = make_records(args.services)
        rec_path = work / "records.json"
        rec_path.write_text(json.dumps(records))
        build_ms = snapshot_build_ms(rec_path)
        print(f"# build_snapshot of {args.services} services: {build_ms:.1f} ms (median of 5)")
        qfile = work / "queries.txt"
        qfile.write_text("\n".join(make_queries(records, 20_000)) + "\n")
        profile = Path(args.profile) if args.profile else None
        with meshlink_server(rec_path, profile) as mport, unbound_server(rec_path, work) as uport:
            # Warm both (meshlink fills its reply cache; unbound has nothing to warm).
            for name, port in (("meshlink", mport), ("unbound", uport)):
                w = dnsperf(port, qfile, 1.0)
                print(
                    f"# warm-up {name}: NXDOMAIN {w['nxdomain_pct']:.2f}%, "
                    f"average response {w['response_bytes']:.0f} bytes",
                    flush=True,
                )
            print(
                f"# {load_line()}; {args.services} services; {rounds} round(s), "
                f"{seconds:g}s throughput + {lat_seconds:g}s at 1k QPS each",
                flush=True,
            )
            for rnd in range(rounds):
                # Throughput: one server at a time, alternating which goes first.
                order = [("meshlink", mport), ("unbound", uport)]
                if rnd % 2:
                    order.reverse()
                for name, port in order:
                    t = dnsperf(port, qfile, seconds)
                    r = results[name]
                    for k in ("qps", "lost_pct", "avg_ms"):
                        r.setdefault(k, []).append(t[k])
                    print(
                        f"  round {rnd + 1} {name:8s} {t['qps']:9.0f} qps  lost "
                        f"{t['lost_pct']:.2f}%  avg {t['avg_ms']:.3f} ms",
                        flush=True,
                    )
                # Latency at 1k QPS: both at once, so both see the same noise from the
                # (shared) machine; 2k queries/s in all is a light load.
                procs = {n: dnsperf_start(p, qfile, lat_seconds, 1000) for n, p in order}
                for name, run in procs.items():
                    lat = dnsperf_result(run)
                    r = results[name]
                    for k in ("p50_ms", "p99_ms", "lost_pct"):
                        r.setdefault(f"{k}_at_1k", []).append(lat[k])
                    print(
                        f"  round {rnd + 1} {name:8s} at 1k QPS: p50 {lat['p50_ms']:.3f} ms "
                        f"p99 {lat['p99_ms']:.3f} ms lost {lat['lost_pct']:.2f}% "
                        f"({lat['samples']:.0f} answers)",
                        flush=True,
                    )
    m = {k: median(v) for k, v in results["meshlink"].items()}
    u = {k: median(v) for k, v in results["unbound"].items()}
    rows = [
        ["QPS (-c 10 -q 100)", m["qps"], u["qps"], ratio(m["qps"], u["qps"])],
        ["lost % at max rate", m["lost_pct"], u["lost_pct"], "-"],
        ["avg latency ms at max rate", m["avg_ms"], u["avg_ms"], ratio(m["avg_ms"], u["avg_ms"])],
        ["p50 ms at 1k QPS", m["p50_ms_at_1k"], u["p50_ms_at_1k"],
         ratio(m["p50_ms_at_1k"], u["p50_ms_at_1k"])],
        ["p99 ms at 1k QPS", m["p99_ms_at_1k"], u["p99_ms_at_1k"],
         ratio(m["p99_ms_at_1k"], u["p99_ms_at_1k"])],
        ["lost % at 1k QPS", m["lost_pct_at_1k"], u["lost_pct_at_1k"], "-"],
    ]  # fmt: skip
    print()
    print_table(["dnsperf, median of rounds", "meshlink", "unbound", "meshlink/unbound"], rows)
    print(f"# {load_line()}; took {time.monotonic() - started:.0f}s")
    write_json(
        args.json,
        {
            "meshlink_qps": m["qps"],
            "unbound_qps": u["qps"],
            "qps_ratio": m["qps"] / u["qps"] if u["qps"] else float("nan"),
            "meshlink_lost_pct": m["lost_pct"],
            "unbound_lost_pct": u["lost_pct"],
            "meshlink_avg_ms": m["avg_ms"],
            "unbound_avg_ms": u["avg_ms"],
            "meshlink_p50_ms_at_1k": m["p50_ms_at_1k"],
            "unbound_p50_ms_at_1k": u["p50_ms_at_1k"],
            "meshlink_p99_ms_at_1k": m["p99_ms_at_1k"],
            "unbound_p99_ms_at_1k": u["p99_ms_at_1k"],
            "snapshot_build_ms": build_ms,
            "services": args.services,
            "rounds": rounds,
            "seconds": seconds,
            "load": os.getloadavg()[0],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

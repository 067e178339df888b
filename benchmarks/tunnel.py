"""Tunnel data-plane benchmark: direct loopback TCP vs meshlink vs stunnel4, side by side.

    python benchmarks/tunnel.py [--quick] [--json PATH] [--runs N] [--profile DIR]

Interleaved runs of each mode for:
- bulk throughput, 1 flow and 8 flows (iperf3, -P 8);
- request rate and latency (wrk -t2 -c50 against nginx serving a small file);
- per-flow setup: connect, one small HTTP request/response, close (2,000 times);
- the same (1,000 times) while a bulk iperf3 flow runs through the same tunnel
  (head-of-line blocking: for meshlink both share one TLS link).

meshlink: two gateways in separate processes (benchmarks/tunnel_gw.py, uvloop) linked by
one TLS 1.3 mTLS link; an import listener on one, a local route to the server on the other.
stunnel4: a client and a server stunnel, TLS 1.3, client certificates, certs from
meshlink.pki. Everything binds 127.0.0.1. Prints a table with ratios to direct and to
stunnel, writes JSON (medians of the runs). --quick keeps the whole run under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common as C

from meshlink import pki

HERE = Path(__file__).resolve().parent
MODES = ("direct", "meshlink", "stunnel")
TOOLS = {"stunnel4": "stunnel4", "iperf3": "iperf3", "wrk": "wrk", "nginx": "nginx-light"}


class Proc:
    """A child process we started; stopped by its pid only."""

    def __init__(self, argv: list[str], name: str, **kw: object) -> None:
        self.name = name
        self.p = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Bench:
    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        self.tmp = tmp
        self.args = args
        self.procs: list[Proc] = []
        self.port_iperf = C.free_port()
        self.port_http = C.free_port()
        # entry ports per mode: (iperf, http)
        self.ports: dict[str, tuple[int, int]] = {"direct": (self.port_iperf, self.port_http)}
        self.cpu_per_gb: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ setup
    def start_backends(self) -> None:
        conf = C.nginx_config(self.tmp, f"127.0.0.1:{self.port_http}")
        self.procs.append(
            Proc(
                ["nginx", "-c", str(conf), "-p", str(self.tmp)],
                "nginx",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self.procs.append(
            Proc(
                ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.port_iperf)],
                "iperf3",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        C.wait_port("127.0.0.1", self.port_http)
        C.wait_port("127.0.0.1", self.port_iperf)

    def make_pki(self) -> None:
        self.a = pki.SiteIdentity.load_or_create(self.tmp / "site-a", "bench-a")
        self.b = pki.SiteIdentity.load_or_create(self.tmp / "site-b", "bench-b")
        (self.tmp / "a-ca.pem").write_bytes(self.a.ca_pem)
        (self.tmp / "b-ca.pem").write_bytes(self.b.ca_pem)

    def start_meshlink(self) -> None:
        gw_port = C.free_port()
        imp_iperf, imp_http = C.free_port(), C.free_port()
        self.ports["meshlink"] = (imp_iperf, imp_http)
        py = sys.executable
        script = str(HERE / "tunnel_gw.py")
        prof = self.args.profile
        common = {"stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL, "text": True}
        b_argv = [
            py,
            script,
            "--site",
            "bench-b",
            "--state",
            str(self.tmp / "site-b"),
            "--peer-ca",
            str(self.tmp / "a-ca.pem"),
            "--listen",
            f"127.0.0.1:{gw_port}",
            "--export",
            f"bench/iperf/5201=127.0.0.1:{self.port_iperf}",
            "--export",
            f"bench/http/80=127.0.0.1:{self.port_http}",
        ]
        a_argv = [
            py,
            script,
            "--site",
            "bench-a",
            "--state",
            str(self.tmp / "site-a"),
            "--peer-ca",
            str(self.tmp / "b-ca.pem"),
            "--dial",
            f"bench-b@127.0.0.1:{gw_port}",
            "--import",
            f"{imp_iperf}=bench-b/bench/iperf/5201",
            "--import",
            f"{imp_http}=bench-b/bench/http/80",
        ]
        if prof:
            b_argv += ["--profile", str(Path(prof) / "gw-exporter.prof")]
            a_argv += ["--profile", str(Path(prof) / "gw-importer.prof")]
        gb = Proc(b_argv, "gw-b", **common)
        self.procs.append(gb)
        self._expect(gb, "READY")
        ga = Proc(a_argv, "gw-a", **common)
        self.procs.append(ga)
        self._expect(ga, "READY")
        self._expect(ga, "LINK UP bench-b")

    def _expect(self, proc: Proc, word: str, timeout: float = 30) -> None:
        assert proc.p.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.p.stdout.readline()
            if not line:
                raise RuntimeError(f"{proc.name} exited before printing {word}")
            if line.startswith(word):
                return
        raise RuntimeError(f"{proc.name} did not print {word} within {timeout}s")

    def start_stunnel(self) -> None:
        s_iperf, s_http = C.free_port(), C.free_port()
        c_iperf, c_http = C.free_port(), C.free_port()
        self.ports["stunnel"] = (c_iperf, c_http)
        server = _stunnel_conf(
            {"iperf": (s_iperf, self.port_iperf), "http": (s_http, self.port_http)},
            self.b,
            self.tmp / "a-ca.pem",
            client=False,
        )
        client = _stunnel_conf(
            {"iperf": (c_iperf, s_iperf), "http": (c_http, s_http)},
            self.a,
            self.tmp / "b-ca.pem",
            client=True,
        )
        (self.tmp / "stunnel-server.conf").write_text(server)
        (self.tmp / "stunnel-client.conf").write_text(client)
        binary = "stunnel4" if shutil.which("stunnel4") else "stunnel"
        for name in ("server", "client"):
            self.procs.append(
                Proc(
                    [binary, str(self.tmp / f"stunnel-{name}.conf")],
                    f"stunnel-{name}",
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in (s_iperf, s_http, c_iperf, c_http):
            C.wait_port("127.0.0.1", port)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    # ------------------------------------------------------------------ measurements
    def cpu_seconds(self, mode: str) -> float:
        """CPU time (user + system, all threads) used so far by the mode's tunnel processes."""
        names = {"meshlink": ("gw-a", "gw-b"), "stunnel": ("stunnel-server", "stunnel-client")}
        total = 0.0
        for p in self.procs:
            if p.name in names.get(mode, ()):
                total += C.cpu_s(p.p.pid)
        return total

    def iperf(self, mode: str, flows: int, seconds: float) -> float:
        """Gbit/s; also records the tunnel's CPU seconds per GB moved (load-independent)."""
        cpu0 = self.cpu_seconds(mode)
        gbps = self._iperf(mode, flows, seconds)
        if mode != "direct" and gbps == gbps:
            cpu = self.cpu_seconds(mode) - cpu0
            gbytes = gbps / 8 * (seconds + (0.5 if seconds >= 3 else 0))
            self.cpu_per_gb.setdefault(f"{mode}_cpu_s_per_gb_{flows}", []).append(cpu / gbytes)
        return gbps

    def _iperf(self, mode: str, flows: int, seconds: float) -> float:
        port = self.ports[mode][0]
        argv = [
            "iperf3",
            "-c",
            "127.0.0.1",
            "-p",
            str(port),
            "-t",
            str(seconds),
            "-J",
            "-O",
            "0.5" if seconds >= 3 else "0",
        ]
        if flows > 1:
            argv += ["-P", str(flows)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        try:
            data = json.loads(out.stdout)
            return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
        except (ValueError, KeyError):
            print(f"iperf3 {mode} failed: {out.stdout[-300:]} {out.stderr[-300:]}", file=sys.stderr)
            return float("nan")

    def wrk(self, mode: str, seconds: float) -> tuple[float, float, float]:
        port = self.ports[mode][1]
        out = subprocess.run(
            ["wrk", "-t2", "-c50", f"-d{seconds:g}s", "--latency", f"http://127.0.0.1:{port}/"],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        return C.wrk_result(out.stdout, mode)

    def setup_under_bulk(self, mode: str, count: int) -> tuple[float, float]:
        """Per-flow setup while one bulk iperf3 flow runs through the same tunnel: for
        meshlink both share one TLS link, so this shows any head-of-line blocking."""
        port = self.ports[mode][0]
        bulk = subprocess.Popen(
            ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "60"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # let the bulk flow ramp up
            return self.setup(mode, count)
        finally:
            bulk.terminate()
            bulk.wait(10)
            time.sleep(0.5)  # iperf3's server serves one test at a time

    def setup(self, mode: str, count: int) -> tuple[float, float]:
        port = self.ports[mode][1]
        times, failures = C.http_setup_times("127.0.0.1", port, count)
        if failures:
            print(f"setup {mode}: {failures} failed connections", file=sys.stderr)
        if not times:
            return float("nan"), float("nan")
        return sum(times) / len(times), C.percentile(times, 99)


def _stunnel_conf(
    routes: dict[str, tuple[int, int]], ident: pki.SiteIdentity, ca: Path, *, client: bool
) -> str:
    """An stunnel config: one TLS 1.3, mutually authenticated service per route
    (name: (accept port, connect port)), all on 127.0.0.1."""
    conf = "foreground = yes\npid =\ndebug = 3\n"
    for name, (accept, connect) in routes.items():
        conf += f"[{name}]\n" + ("client = yes\n" if client else "")
        conf += f"""accept = 127.0.0.1:{accept}
connect = 127.0.0.1:{connect}
cert = {ident.gateway_chain_path}
key = {ident.gateway_key_path}
CAfile = {ca}
sslVersionMin = TLSv1.3
verifyChain = yes

"""
    return conf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs: the whole thing < 1 min")
    ap.add_argument("--json", help="write the results (medians) to this file")
    ap.add_argument("--runs", type=int, help="interleaved runs per mode (default 3, quick 1)")
    ap.add_argument("--profile", help="directory for cProfile stats of the two gateways")
    ap.add_argument("--only", help="comma-separated subset: gbps1,gbps8,wrk,setup,hol")
    args = ap.parse_args()
    C.ensure_tools(TOOLS)
    runs = args.runs or (1 if args.quick else 3)
    secs = 3.0 if args.quick else 10.0
    wrk_secs = 3.0 if args.quick else 10.0
    setup_n = 300 if args.quick else 2000
    hol_n = 200 if args.quick else 1000
    only = set((args.only or "gbps1,gbps8,wrk,setup,hol").split(","))
    print(f"# {C.load_line()} (before)", file=sys.stderr)
    results: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory(prefix="meshlink-bench-") as tmpdir:
        bench = Bench(Path(tmpdir), args)
        try:
            bench.make_pki()
            bench.start_backends()
            bench.start_meshlink()
            bench.start_stunnel()
            steps: list[tuple[str, Callable[[str], None]]] = []
            if "gbps1" in only:
                steps.append(("gbps1", lambda m: add(f"{m}_gbps_1", bench.iperf(m, 1, secs))))
            if "gbps8" in only:
                steps.append(("gbps8", lambda m: add(f"{m}_gbps_8", bench.iperf(m, 8, secs))))
            if "wrk" in only:

                def do_wrk(m: str) -> None:
                    rps, p50, p99 = bench.wrk(m, wrk_secs)
                    add(f"{m}_rps", rps)
                    add(f"{m}_p50_ms", p50)
                    add(f"{m}_p99_ms", p99)

                steps.append(("wrk", do_wrk))
            if "setup" in only:

                def do_setup(m: str) -> None:
                    mean, p99 = bench.setup(m, setup_n)
                    add(f"setup_ms_{m}", mean)
                    add(f"setup_p99_ms_{m}", p99)

                steps.append(("setup", do_setup))
            if "hol" in only:

                def do_hol(m: str) -> None:
                    mean, p99 = bench.setup_under_bulk(m, hol_n)
                    add(f"hol_setup_ms_{m}", mean)
                    add(f"hol_setup_p99_ms_{m}", p99)

                steps.append(("hol", do_hol))
            for r in range(runs):
                for name, step in steps:
                    order = MODES if r % 2 == 0 else tuple(reversed(MODES))
                    for mode in order:
                        print(f"run {r + 1}/{runs}: {name} {mode} ...", file=sys.stderr)
                        step(mode)
        finally:
            bench.stop()

    results.update(bench.cpu_per_gb)
    med = {k: C.median(v) for k, v in results.items()}
    print(f"# {C.load_line()} (after); medians of {runs} interleaved run(s)")
    rows = []

    def row(label: str, key: str, unit: str, better: str) -> None:
        d, m, s = (med.get(key.format(mode=x), float("nan")) for x in MODES)
        rows.append([f"{label} ({unit}, {better})", d, m, s, C.ratio(m, d), C.ratio(m, s)])

    row("throughput 1 flow", "{mode}_gbps_1", "Gbit/s", "higher")
    row("throughput 8 flows", "{mode}_gbps_8", "Gbit/s", "higher")
    row("wrk requests", "{mode}_rps", "req/s", "higher")
    row("wrk p50", "{mode}_p50_ms", "ms", "lower")
    row("wrk p99", "{mode}_p99_ms", "ms", "lower")
    row("tunnel CPU per GB, 1 flow", "{mode}_cpu_s_per_gb_1", "s", "lower")
    row("tunnel CPU per GB, 8 flows", "{mode}_cpu_s_per_gb_8", "s", "lower")
    row("setup mean", "setup_ms_{mode}", "ms", "lower")
    row("setup p99", "setup_p99_ms_{mode}", "ms", "lower")
    row("setup mean, bulk flow running", "hol_setup_ms_{mode}", "ms", "lower")
    row("setup p99, bulk flow running", "hol_setup_p99_ms_{mode}", "ms", "lower")
    C.print_table(
        ["metric", "direct", "meshlink", "stunnel", "meshlink/direct", "meshlink/stunnel"], rows
    )
    keys = [
        "direct_gbps_1",
        "meshlink_gbps_1",
        "stunnel_gbps_1",
        "direct_gbps_8",
        "meshlink_gbps_8",
        "stunnel_gbps_8",
        "direct_rps",
        "meshlink_rps",
        "stunnel_rps",
        "meshlink_p99_ms",
        "stunnel_p99_ms",
        "setup_ms_direct",
        "setup_ms_meshlink",
        "setup_ms_stunnel",
    ]
    out: dict[str, object] = {k: med.get(k, float("nan")) for k in keys}
    out.update({k: v for k, v in med.items() if k not in out})
    out["runs"] = runs
    out["quick"] = bool(args.quick)
    out["load"] = C.load_line()
    C.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

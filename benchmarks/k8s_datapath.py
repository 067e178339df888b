"""Kubernetes data path: a client pod in cluster B -> clusterset IP -> meshlink -> a pod in A.

    python benchmarks/k8s_datapath.py [--quick] [--json PATH] [--runs N] [--profile DIR]

Needs root (network namespaces, iptables). Two real kube-apiservers (tests/kube.py) and the
network-namespace testbed (tests/netbed: a WAN namespace and one namespace per cluster, the
kube-proxy stand-in programming ClusterIP DNAT from Services and EndpointSlices). meshlink
runs as the gateway pod of each cluster exactly as in tests/e2e/test_datapath_k8s.py (whose
Cluster class is reused), c2 linked to c1 with a real token. c1's pod serves nginx (a
612-byte page) and iperf3 on one pod address; Services `web` (80 -> 8080) and `bulk`
(5201 -> 5201) are exported from c1 and imported in c2.

Three paths to the same pod, measured with the same clients (tools of benchmarks/tunnel.py):
- meshlink: client in c2 -> clusterset IP (c2 kube-proxy -> gateway target port) -> TLS 1.3
  tunnel over the WAN -> c1 gateway -> c1 Service ClusterIP (c1 kube-proxy) -> pod;
- incluster (reference): client in c1 -> c1 Service ClusterIP (kube-proxy) -> pod, the
  cluster's own path without meshlink;
- wan (reference): client in c2 -> c1's node address, plain iptables DNAT there to the pod
  (no TLS, no proxy process): what crossing the WAN namespace alone costs.

Metrics: iperf3 1 and 8 flows (Gbit/s), wrk -t2 -c50 (req/s, p50, p99), flow setup
(connect, one HTTP request and response, close; p50 and p99) and the CPU seconds both
gateways spend per GB moved. Runs are interleaved (the mode order flips every round); the
table shows medians with the ratios meshlink/incluster and meshlink/wan. --quick: one round
of 3 s runs (about 45 s in all, control planes included); default: three rounds of 8 s runs
(about 4 min). --profile DIR samples both gateways with py-spy during the first round's
meshlink runs and prints each one's top functions (self time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import _common as C  # noqa: E402

if TYPE_CHECKING:
    from tests.e2e.test_datapath_k8s import Cluster
    from tests.netbed.netns import Testbed

MODES = ("meshlink", "incluster", "wan")
TOOLS = {
    "iperf3": "iperf3",
    "wrk": "wrk",
    "nginx": "nginx-light",
    "socat": "socat",
    "curl": "curl",
    "ss": "iproute2",
}
HTTP_PORT, IPERF_PORT = 8080, 5201
WAN_HTTP_PORT, WAN_IPERF_PORT = 18080, 15201


# --------------------------------------------------------------------------- setup loop


def setup_loop(host: str, port: int, count: int) -> int:
    """Hidden mode, run inside a cluster namespace: `count` times connect, send one GET,
    read the response, close. Prints the times (ms) of the successful ones as JSON."""
    times, failures = C.http_setup_times(host, port, count)
    print(json.dumps({"times": times, "failures": failures}))
    return 0


# --------------------------------------------------------------------------- the bench


class Bench:
    """The two clusters, the server pod, and one client per mode."""

    def __init__(self, tb: Testbed, c1: Cluster, c2: Cluster, work: Path) -> None:
        self.tb, self.c1, self.c2, self.work = tb, c1, c2, work
        self.pod_ip = ""
        # mode -> (client cluster index, HTTP host:port, iperf3 host:port)
        self.targets: dict[str, tuple[int, tuple[str, int], tuple[str, int]]] = {}
        self.pids: dict[int, int] = {}
        self.cpu: dict[str, list[float]] = {}

    def start_servers(self) -> None:
        """nginx and iperf3 on one pod address of c1."""
        self.pod_ip = self.tb.add_pod_ip(1)
        conf = C.nginx_config(self.work, f"{self.pod_ip}:{HTTP_PORT}")
        self.tb.popen(1, ["nginx", "-c", str(conf), "-p", str(self.work)], log="nginx-c1")
        argv = ["iperf3", "-s", "-B", self.pod_ip, "-p", str(IPERF_PORT)]
        self.tb.popen(1, argv, log="iperf3-c1")
        for port in (HTTP_PORT, IPERF_PORT):
            self._wait_listen(1, self.pod_ip, port)

    def _wait_listen(self, i: int, ip: str, port: int) -> None:
        from tests.kube import wait_until

        def up() -> bool:
            out = self.tb.run(i, ["ss", "-Htln", "src", f"{ip}:{port}"], check=False)
            return bool(out.stdout.strip())

        wait_until(up, 15, f"a listener on {ip}:{port} in cluster {i}")

    def export(self) -> tuple[str, str]:
        """Services web and bulk exported from c1 (`Cluster.export`); their ClusterIPs."""
        web = self.c1.export("web", self.pod_ip, 80, HTTP_PORT, "http")
        bulk = self.c1.export("bulk", self.pod_ip, IPERF_PORT, IPERF_PORT, "iperf")
        return web, bulk

    def wan_forward(self) -> None:
        """The no-meshlink cross-cluster path: c1's node address forwards two ports to the
        pod with plain DNAT (the WAN namespace routes node to node)."""
        node = self.tb.cluster(1).node_ip
        for outer, inner in ((WAN_HTTP_PORT, HTTP_PORT), (WAN_IPERF_PORT, IPERF_PORT)):
            rule = ["-t", "nat", "-A", "PREROUTING", "-d", node, "-p", "tcp"]
            rule += ["--dport", str(outer), "-j", "DNAT"]
            rule += ["--to-destination", f"{self.pod_ip}:{inner}"]
            self.tb.run(1, ["iptables", "-w", "5", *rule], timeout=15)

    def plan(self, web_ip: str, bulk_ip: str, ms_web: str, ms_bulk: str) -> None:
        node = self.tb.cluster(1).node_ip
        self.targets = {
            "meshlink": (2, (ms_web, 80), (ms_bulk, IPERF_PORT)),
            "incluster": (1, (web_ip, 80), (bulk_ip, IPERF_PORT)),
            "wan": (2, (node, WAN_HTTP_PORT), (node, WAN_IPERF_PORT)),
        }

    def check_paths(self) -> None:
        """Each mode's HTTP path answers the page before anything is measured."""
        from tests.kube import wait_until

        for mode, (i, (host, port), _) in self.targets.items():

            def ok(i: int = i, host: str = host, port: int = port) -> bool:
                out = self.tb.curl(i, f"http://{host}:{port}/", timeout=3)
                return out.returncode == 0 and out.stdout.strip() == "x" * C.NGINX_PAGE

            wait_until(ok, 30, f"the page through the {mode} path")

    # ------------------------------------------------------------------ measurements

    def gateway_pids(self) -> dict[int, int]:
        """{cluster index: pid} of the meshlink processes."""
        pids = {c.i: c.proc.pid for c in (self.c1, self.c2) if c.proc is not None}
        if sorted(pids) != [1, 2]:
            raise RuntimeError(f"meshlink processes not found in both clusters: {pids}")
        return pids

    def gateway_cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by the exporting (c1) and importing (c2) gateway."""
        return C.cpu_s(self.pids[1]), C.cpu_s(self.pids[2])

    def add_cpu(self, key: str, cpu0: tuple[float, float], per: float) -> None:
        """Record each gateway's CPU since `cpu0`, divided by `per` (GB or flows)."""
        if per > 0:
            for side, before, now in zip(
                ("exporter", "importer"), cpu0, self.gateway_cpu(), strict=True
            ):
                self.cpu.setdefault(f"{key}_{side}", []).append((now - before) / per)

    def iperf(self, mode: str, flows: int, seconds: int) -> float:
        """Gbit/s received; for meshlink also the gateways' CPU seconds per GB."""
        i, _, (host, port) = self.targets[mode]
        argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"]
        argv += ["-O", "1" if seconds >= 4 else "0"]
        if flows > 1:
            argv += ["-P", str(flows)]
        for _attempt in range(5):  # the server runs one test at a time: wait out the last
            cpu0 = self.gateway_cpu()
            out = self.tb.run(i, argv, check=False, timeout=seconds + 60)
            try:
                data = json.loads(out.stdout)
            except ValueError:
                data = {}
            if "busy" in str(data.get("error", "")):
                time.sleep(0.5)  # a retry backoff, bounded by the loop
                continue
            try:
                gbps = float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
            except (KeyError, TypeError, ValueError):
                tail = (out.stdout[-300:] + out.stderr[-300:]).replace("\n", " ")
                print(f"iperf3 {mode} failed: {tail}", file=sys.stderr)
                return float("nan")
            if mode == "meshlink":
                moved = float(data["end"]["sum_received"]["bytes"]) / 1e9
                self.add_cpu("gateway_cpu_s_per_gb", cpu0, moved)
            return gbps
        print(f"iperf3 {mode}: the server stayed busy", file=sys.stderr)
        return float("nan")

    def wrk(self, mode: str, seconds: int) -> tuple[float, float, float]:
        i, (host, port), _ = self.targets[mode]
        argv = ["wrk", "-t2", "-c50", f"-d{seconds}s", "--latency", f"http://{host}:{port}/"]
        out = self.tb.run(i, argv, check=False, timeout=seconds + 60).stdout
        return C.wrk_result(out, mode)

    def profiled(self, step: Callable[[str], None], mode: str, out: Path | None, name: str) -> None:
        """Run `step(mode)`; with `out`, sample both gateways with py-spy meanwhile (collapsed
        stacks to out/<name>-c<i>.txt) and print each one's top leaf functions."""
        if out is None:
            step(mode)
            return
        spy = Path(sys.executable).parent / "py-spy"
        spies = {}
        for i, pid in self.pids.items():
            argv = [
                str(spy) if spy.exists() else "py-spy",
                "record",
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "250",
            ]
            argv += ["--pid", str(pid), "--output", str(out / f"{name}-c{i}.txt")]
            spies[i] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)  # py-spy attaches
            step(mode)
        finally:
            for p in spies.values():
                p.send_signal(signal.SIGINT)
            for p in spies.values():
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for i in spies:
            print(f"profile {name} c{i}: {top_leaves(out / f'{name}-c{i}.txt')}", file=sys.stderr)

    def log_problems(self) -> list[str]:
        """WARNING and ERROR lines the two meshlink processes logged (shown, counted)."""
        lines = []
        for c in (self.c1, self.c2):
            for line in self.tb.log_path(c.log).read_text(errors="replace").splitlines():
                if re.search(r" (WARNING|WARN|ERROR|CRITICAL) ", line):
                    lines.append(f"{c.kube.name}: {line}")
        return lines

    def setup(self, mode: str, count: int) -> tuple[float, float]:
        i, (host, port), _ = self.targets[mode]
        argv = [sys.executable, str(Path(__file__).resolve()), "--setup-loop"]
        argv += [f"{host}:{port}", "--count", str(count)]
        cpu0 = self.gateway_cpu()
        out = self.tb.run(i, argv, check=False, timeout=count * 0.5 + 30)
        try:
            data = json.loads(out.stdout)
        except ValueError:
            print(f"setup {mode} failed: {out.stderr[-300:]}", file=sys.stderr)
            return float("nan"), float("nan")
        if data["failures"]:
            print(f"setup {mode}: {data['failures']} failed connections", file=sys.stderr)
        times: list[float] = data["times"]
        if mode == "meshlink":
            self.add_cpu("gateway_cpu_ms_per_flow", cpu0, len(times) / 1000)
        return C.percentile(times, 50), C.percentile(times, 99)


def top_leaves(path: Path, n: int = 6) -> str:
    """The `n` functions with the most samples at the top of the stack (self time), in
    percent, from py-spy's collapsed-stack output."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no profile)"
    leaves: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        leaves[leaf] = leaves.get(leaf, 0) + int(count)
        total += int(count)
    top = sorted(leaves.items(), key=lambda kv: -kv[1])[:n]
    return "; ".join(f"{k} {100 * v / total:.0f}%" for k, v in top) if total else "(empty)"


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, object]:
    from tests.e2e.test_datapath_k8s import Cluster
    from tests.kube import KubeControlPlane, wait_until
    from tests.netbed.netns import Testbed

    runs = args.runs or (1 if args.quick else 3)
    profile = Path(args.profile).resolve() if args.profile else None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    secs = 3 if args.quick else 8
    setup_n = 300 if args.quick else 1000
    results: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    t_start = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="meshlink-k8sdp-") as tmp,
        tempfile.TemporaryDirectory(prefix="meshlink-k8sdp-www-") as srv,
    ):
        work = Path(tmp)
        cp = KubeControlPlane(2, work / "kube")
        clusters: list[Cluster] = []
        try:
            kubes = cp.start()
            with Testbed(2, work / "netbed") as tb:
                c1, c2 = (Cluster(tb, i + 1, k, work / "sites") for i, k in enumerate(kubes))
                clusters = [c1, c2]
                try:
                    for c in clusters:
                        c.prepare()
                        c.start_site()
                    c2.link_to(c1)
                    bench = Bench(tb, c1, c2, Path(srv))
                    bench.start_servers()
                    web_ip, bulk_ip = bench.export()
                    ms_web = wait_until(lambda: c2.imported("web", 80), 30, "web in c2")[0]
                    ms_bulk = wait_until(lambda: c2.imported("bulk", IPERF_PORT), 30, "bulk in c2")[
                        0
                    ]
                    bench.wan_forward()
                    bench.plan(web_ip, bulk_ip, ms_web, ms_bulk)
                    bench.check_paths()
                    bench.pids = bench.gateway_pids()
                    startup_s = time.monotonic() - t_start
                    print(f"ready after {startup_s:.1f} s; {C.load_line()}", file=sys.stderr)

                    def do_wrk(m: str) -> None:
                        rps, p50, p99 = bench.wrk(m, secs)
                        add(f"rps_{m}", rps)
                        add(f"p50_ms_{m}", p50)
                        add(f"p99_ms_{m}", p99)

                    def do_setup(m: str) -> None:
                        p50, p99 = bench.setup(m, setup_n)
                        add(f"setup_ms_p50_{m}", p50)
                        add(f"setup_ms_p99_{m}", p99)

                    steps: list[tuple[str, Callable[[str], None]]] = [
                        ("gbps1", lambda m: add(f"gbps_{m}", bench.iperf(m, 1, secs))),
                        ("gbps8", lambda m: add(f"gbps8_{m}", bench.iperf(m, 8, secs))),
                        ("wrk", do_wrk),
                        ("setup", do_setup),
                    ]
                    for r in range(runs):
                        order = MODES if r % 2 == 0 else tuple(reversed(MODES))
                        for name, step in steps:
                            for mode in order:
                                print(f"run {r + 1}/{runs}: {name} {mode} ...", file=sys.stderr)
                                prof = profile if r == 0 and mode == "meshlink" else None
                                bench.profiled(step, mode, prof, name)
                    problems = bench.log_problems()
                    for line in problems[:20]:
                        print(f"meshlink log: {line}", file=sys.stderr)
                except BaseException:
                    for c in clusters:
                        print(
                            f"--- meshlink log of {c.kube.name}:\n{c.log_tail()}", file=sys.stderr
                        )
                    raise
        finally:
            cp.close()
    med: dict[str, object] = {k: C.median(v) for k, v in sorted(results.items())}
    med.update({k: C.median(v) for k, v in sorted(bench.cpu.items())})
    med["meshlink_log_warnings"] = len(problems)
    med["startup_s"] = round(startup_s, 1)
    med["total_s"] = round(time.monotonic() - t_start, 1)
    med["runs"] = runs
    med["quick"] = bool(args.quick)
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of short runs (< 2 min)")
    ap.add_argument("--json", help="write the results (medians) to this file")
    ap.add_argument("--runs", type=int, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--profile", help="directory for py-spy samples of both gateways (first round)")
    ap.add_argument("--setup-loop", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=300, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.setup_loop:
        host, port = args.setup_loop.rsplit(":", 1)
        return setup_loop(host, int(port), args.count)
    if os.geteuid() != 0:
        print("k8s_datapath.py needs root (ip netns, iptables): run it as root", file=sys.stderr)
        return 2
    C.ensure_tools(TOOLS)
    print(f"# {C.load_line()} (before)", file=sys.stderr)
    try:
        med = run(args)
    except (RuntimeError, AssertionError) as e:  # KubeError, NetbedError, wait_until
        print(f"k8s_datapath.py: the testbed failed: {e}", file=sys.stderr)
        return 1
    load = C.load_line()
    print(f"# {load} (after); medians of {med['runs']} interleaved round(s)")

    def get(key: str) -> float:
        v = med.get(key, float("nan"))
        return v if isinstance(v, float) else float("nan")

    rows: list[list[object]] = []
    ratios: dict[str, object] = {}
    metrics = (
        ("iperf3 1 flow", "gbps", "Gbit/s", "higher"),
        ("iperf3 8 flows", "gbps8", "Gbit/s", "higher"),
        ("wrk -t2 -c50 requests", "rps", "req/s", "higher"),
        ("wrk p50", "p50_ms", "ms", "lower"),
        ("wrk p99", "p99_ms", "ms", "lower"),
        ("flow setup p50", "setup_ms_p50", "ms", "lower"),
        ("flow setup p99", "setup_ms_p99", "ms", "lower"),
    )
    for label, key, unit, better in metrics:
        m, inc, wan = (get(f"{key}_{x}") for x in MODES)
        rows.append([f"{label} ({unit}, {better})", m, inc, wan, C.ratio(m, inc), C.ratio(m, wan)])
        for ref, v in (("incluster", inc), ("wan", wan)):
            ratios[f"ratio_{key}_meshlink_{ref}"] = (
                round(m / v, 3) if v == v and m == m and v else float("nan")
            )
    C.print_table(
        ["metric", "meshlink", "incluster", "wan", "meshlink/incluster", "meshlink/wan"], rows
    )
    print(
        "meshlink gateway CPU, exporter (c1) / importer (c2): "
        f"{get('gateway_cpu_s_per_gb_exporter'):.2f} / {get('gateway_cpu_s_per_gb_importer'):.2f}"
        " s per GB (iperf3); "
        f"{get('gateway_cpu_ms_per_flow_exporter'):.3f} / "
        f"{get('gateway_cpu_ms_per_flow_importer'):.3f} ms per flow (setup loop)"
    )
    print(
        f"control planes + testbed + sites ready in {med['startup_s']} s, whole run "
        f"{med['total_s']} s; meshlink logged {med['meshlink_log_warnings']} warnings/errors"
    )
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in {**med, **ratios}.items()}
    out["load"] = load
    print(json.dumps({k: (None if v != v else v) for k, v in out.items()}, sort_keys=True))
    C.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

"""Kubernetes data path on kind: a pod in c2 -> meshlink -> a pod in c1, on real clusters.

    python benchmarks/kind_datapath.py [--quick] [--json PATH] [--keep]

Needs root and what hack/kind.sh needs (it installs Docker if missing). Brings up two kind
clusters with meshlink deployed from manifests/ and linked (tests/kindbed.py, the e2e
tests' harness; prefix mlbench), then serves nginx (a 612-byte page) and iperf3 from one
pod in c1 (the testbed tools image) behind Services `web` (80 -> 8080) and `bulk` (5201),
both exported, and measures three paths to that pod with the same clients:
- meshlink: a pod in c2 -> web.bench.svc.clusterset.local (CoreDNS -> meshlink's DNS), the
  clusterset IP -> kube-proxy -> c2's meshlink pod -> TLS 1.3 tunnel across the Docker
  network -> c1's NodePort -> c1's meshlink pod -> the Service -> the pod;
- incluster (reference): a pod in c1 -> web.bench.svc.cluster.local, the cluster's own path;
- nodeport (reference): a pod in c2 -> c1's node address and a NodePort of the same pod,
  plain kube-proxy DNAT across the Docker network (no TLS, no proxy process).
Metrics: iperf3 with 1 and 8 flows (Gbit/s), wrk -t2 -c50 (req/s and p99), flow setup
(connect, one GET of the page, close: p50 and p99). Also: building meshlink's image, the
clusters' bring-up (hack/kind.sh up 2: created, meshlink Ready, linked), and meshlink's pod
start-to-Ready (its pod deleted; the time until the replacement is Ready, and from its
container's start to Ready). Runs are interleaved, the mode order flipping every round;
the table shows medians. --quick: one round of 3 s runs; default: three rounds of 8 s.
--keep leaves the clusters up (and reuses them next time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import _common as C  # noqa: E402

from tests.kindbed import KindCluster, KindTestbed, wait_pod_ready, wait_rollout  # noqa: E402
from tests.kube import wait_until  # noqa: E402

PREFIX = "mlbench"
NS = "bench"
MODES = ("meshlink", "incluster", "nodeport")
HTTP_PORT, IPERF_PORT = 8080, 5201
NODE_HTTP, NODE_IPERF = 31080, 31201


def _server(image: str) -> str:
    conf = C.nginx_conf_text("/work", f"0.0.0.0:{HTTP_PORT}")
    page = f"head -c {C.NGINX_PAGE} /dev/zero | tr '\\0' x > /work/www/index.html"
    nginx = f"mkdir -p /work/www && {page} && cat > /work/nginx.conf <<'EOF'\n{conf}\nEOF\n"
    nginx += "exec nginx -c /work/nginx.conf -p /work"
    labels = {"app": "bench"}
    objs: list[dict[str, object]] = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "server", "namespace": NS},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {
                                "name": "nginx",
                                "image": image,
                                "command": ["sh", "-c", nginx],
                                "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                                "readinessProbe": {"tcpSocket": {"port": HTTP_PORT}},
                            },
                            {
                                "name": "iperf3",
                                "image": image,
                                "command": ["iperf3", "-s", "-p", str(IPERF_PORT)],
                                "readinessProbe": {"tcpSocket": {"port": IPERF_PORT}},
                            },
                        ],
                        "volumes": [{"name": "work", "emptyDir": {}}],
                    },
                },
            },
        }
    ]
    for name, port, target, node_port in (
        ("web", 80, HTTP_PORT, NODE_HTTP),
        ("bulk", IPERF_PORT, IPERF_PORT, NODE_IPERF),
    ):
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    "selector": labels,
                    "ports": [{"name": "p", "port": port, "targetPort": target}],
                },
            }
        )
        objs.append(
            {
                "apiVersion": "multicluster.x-k8s.io/v1alpha1",
                "kind": "ServiceExport",
                "metadata": {"name": name, "namespace": NS},
            }
        )
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"{name}-nodeport", "namespace": NS},
                "spec": {
                    "type": "NodePort",
                    "selector": labels,
                    "ports": [
                        {"name": "p", "port": port, "targetPort": target, "nodePort": node_port}
                    ],
                },
            }
        )
    return "\n---\n".join(json.dumps(o) for o in objs)


class Bench:
    def __init__(self, bed: KindTestbed, quick: bool) -> None:
        self.bed = bed
        self.c1, self.c2 = bed.clusters
        self.seconds = 3 if quick else 8
        self.rounds = 1 if quick else 3
        self.results: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
        node = self.c1.node_ip()
        # mode -> (client cluster, HTTP host, HTTP port, iperf3 host, iperf3 port)
        self.targets: dict[str, tuple[KindCluster, str, int, str, int]] = {
            "meshlink": (
                self.c2,
                f"web.{NS}.svc.clusterset.local",
                80,
                f"bulk.{NS}.svc.clusterset.local",
                IPERF_PORT,
            ),
            "incluster": (
                self.c1,
                f"web.{NS}.svc.cluster.local",
                80,
                f"bulk.{NS}.svc.cluster.local",
                IPERF_PORT,
            ),
            "nodeport": (self.c2, node, NODE_HTTP, node, NODE_IPERF),
        }

    def setup(self) -> None:
        for c in (self.c1, self.c2):
            c.kubectl("create", "namespace", NS, check=False)
            c.kubectl(
                "-n",
                NS,
                "run",
                "client",
                f"--image={self.bed.tools_image}",
                "--restart=Never",
                "--command",
                "--",
                "sleep",
                "infinity",
                check=False,
            )
        self.c1.apply(_server(self.bed.tools_image))
        wait_rollout(self.c1, NS, "deploy/server")
        for c in (self.c1, self.c2):
            wait_pod_ready(c, NS, "client")
            c.kubectl("cp", str(HERE / "_common.py"), f"{NS}/client:/tmp/_common.py")
        for name in ("web", "bulk"):
            self.c2.wait_for(
                lambda name=name: self.c2.exists("serviceimport", name, "-n", NS),
                120,
                f"{name} imported",
            )
        for mode, (c, host, port, _, _) in self.targets.items():
            wait_until(
                lambda c=c, host=host, port=port: self._http_ok(c, host, port),
                120,
                f"the {mode} path answering",
                ignore=(Exception,),
            )

    def _exec(self, c: KindCluster, *cmd: str, timeout: float = 120) -> str:
        return c.exec(NS, "client", *cmd, timeout=timeout)

    def _http_ok(self, c: KindCluster, host: str, port: int) -> bool:
        return (
            len(self._exec(c, "curl", "-sS", "--fail", "-m", "3", f"http://{host}:{port}/"))
            == C.NGINX_PAGE
        )

    def iperf(self, mode: str, flows: int) -> float:
        c, _, _, host, port = self.targets[mode]
        out = self._exec(
            c,
            "iperf3",
            "-c",
            host,
            "-p",
            str(port),
            "-t",
            str(self.seconds),
            "-P",
            str(flows),
            "-J",
            timeout=self.seconds + 60,
        )
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9

    def wrk(self, mode: str) -> tuple[float, float, float]:
        c, host, port, _, _ = self.targets[mode]
        out = self._exec(
            c,
            "wrk",
            "-t2",
            "-c50",
            f"-d{self.seconds}s",
            "--latency",
            f"http://{host}:{port}/",
            timeout=self.seconds + 60,
        )
        return C.wrk_result(out, mode)

    def setup_times(self, mode: str, count: int) -> tuple[float, float, int]:
        c, host, port, _, _ = self.targets[mode]
        code = (
            "import json, socket, sys; sys.path.insert(0, '/tmp'); import _common as C; "
            f"host = socket.gethostbyname({host!r}); "
            f"t, f = C.http_setup_times(host, {port}, {count}); "
            "print(json.dumps({'times': t, 'failures': f}))"
        )
        got = json.loads(self._exec(c, "python3", "-c", code, timeout=300))
        times = got["times"]
        return C.percentile(times, 50), C.percentile(times, 99), int(got["failures"])

    def run(self) -> None:
        setups = 200 if self.seconds < 5 else 1000
        for r in range(self.rounds):
            order = MODES if r % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                res = self.results[mode]
                res.setdefault("iperf_1", []).append(self.iperf(mode, 1))
                res.setdefault("iperf_8", []).append(self.iperf(mode, 8))
                rps, _p50, p99 = self.wrk(mode)
                res.setdefault("wrk_rps", []).append(rps)
                res.setdefault("wrk_p99_ms", []).append(p99)
                s50, s99, failures = self.setup_times(mode, setups)
                res.setdefault("setup_p50_ms", []).append(s50)
                res.setdefault("setup_p99_ms", []).append(s99)
                res.setdefault("setup_failures", []).append(float(failures))
                print(f"round {r + 1} {mode}: done ({C.load_line()})", file=sys.stderr)


def meshlink_restart(c: KindCluster) -> dict[str, float]:
    """Delete one of c's meshlink pods; the seconds until its replacement is Ready, and from
    the replacement's container start to its Ready condition (API timestamps, 1 s
    resolution)."""
    before = {p["metadata"]["name"] for p in c.meshlink_pods()}
    old = min(before)
    t0 = time.monotonic()
    c.kubectl("-n", "meshlink-system", "delete", "pod", old, "--wait=false")

    def ready_pod() -> dict[str, object] | None:
        pods = c.get_json("pods", "-n", "meshlink-system", "-l", "app.kubernetes.io/name=meshlink")
        for p in pods["items"]:
            conds = {x["type"]: x for x in p["status"].get("conditions", [])}
            ready = conds.get("Ready", {}).get("status") == "True"
            if p["metadata"]["name"] not in before and ready:
                return p
        return None

    pod = wait_until(ready_pod, 300, "a new Ready meshlink pod", interval=0.2)
    total = time.monotonic() - t0

    def ts(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    status = pod["status"]
    assert isinstance(status, dict)
    started = ts(status["containerStatuses"][0]["state"]["running"]["startedAt"])
    ready = ts(next(x for x in status["conditions"] if x["type"] == "Ready")["lastTransitionTime"])
    return {"delete_to_ready_s": round(total, 2), "container_start_to_ready_s": ready - started}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--keep", action="store_true", help="leave the clusters up (and reuse them)")
    args = ap.parse_args()
    state = KindTestbed.kept_state(PREFIX)
    t0 = time.monotonic()
    try:
        bed = KindTestbed.up(2, state, prefix=PREFIX)
    except BaseException:
        if not args.keep:
            KindTestbed.teardown(state, PREFIX)
        raise
    try:
        bringup = {
            "image_build_s": round(bed.image_seconds, 1),
            "kind_up_2_clusters_s": round(bed.up_seconds, 1),
        }
        bench = Bench(bed, args.quick)
        bench.setup()
        bench.run()
        restart = meshlink_restart(bench.c1)
    finally:
        if not args.keep:
            KindTestbed.teardown(state, PREFIX)
    med = {m: {k: C.median(v) for k, v in bench.results[m].items()} for m in MODES}
    rows = []
    for key, label in (
        ("iperf_1", "iperf3 1 flow (Gbit/s)"),
        ("iperf_8", "iperf3 8 flows (Gbit/s)"),
        ("wrk_rps", "wrk -t2 -c50 (req/s)"),
        ("wrk_p99_ms", "wrk p99 (ms)"),
        ("setup_p50_ms", "flow setup p50 (ms)"),
        ("setup_p99_ms", "flow setup p99 (ms)"),
    ):
        m, i, n = (med[x][key] for x in MODES)
        rows.append((label, m, i, n, C.ratio(m, i), C.ratio(m, n)))
    print(C.load_line())
    C.print_table(
        ("metric", "meshlink", "incluster", "nodeport", "vs incluster", "vs nodeport"), rows
    )
    print(
        f"bring-up: image {bringup['image_build_s']} s, `hack/kind.sh up 2` "
        f"{bringup['kind_up_2_clusters_s']} s; meshlink pod deleted -> replacement Ready "
        f"{restart['delete_to_ready_s']} s (container start -> Ready "
        f"{restart['container_start_to_ready_s']:.0f} s)"
    )
    C.write_json(
        args.json,
        {
            "modes": med,
            "bringup": bringup,
            "meshlink_restart": restart,
            "quick": args.quick,
            "load": C.load_line(),
            "total_s": round(time.monotonic() - t0, 1),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

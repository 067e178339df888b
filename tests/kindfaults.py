"""Gateway faults on kind and what new flows see through them (issue 12): the HA tests
(tests/e2e/test_kind_ha.py) and the failover benchmark (benchmarks/failover.py) share this.

The setting: an exporting cluster (c1, two worker nodes, meshlink's replicas one on each)
serves `hweb` from one pod pinned to its control-plane node (so that no fault of a worker
takes the service itself away); an importing cluster (c2) runs a client pod that opens a
new connection to hweb's clusterset IP every 50 ms (`Probe`), each a GET /who with a 1 s
deadline, and reports when each started and whether it succeeded. `Gap.of` turns that into
the longest time with no successful connection after the fault, and the failed share.

The faults (`FAULTS`): kill -9 of a meshlink container (containerd's task, from its node);
delete of a pod; its node cut off the Docker network; SIGSTOP of the leader for 10 s; and
`kubectl rollout restart` of meshlink in c1 (exporter) and in c2 (importer).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.kindbed import Follow, KindCluster, docker, wait_pod_ready, wait_rollout
from tests.kube import KubeError, wait_until

NS = "hashop"
SERVICE = "hweb"
NAME = f"{SERVICE}.{NS}.svc.clusterset.local"
CLIENT = "client"
MESHLINK_NS = "meshlink-system"
SELECTOR = "app.kubernetes.io/name=meshlink"

PROBE_INTERVAL = 0.05
"""A new connection every 50 ms (the issue's figure)."""
PROBE_TIMEOUT = 1.0
"""Each connection's deadline: connect, request and the whole answer."""

# hweb: /who answers the cluster's name; /stream?id=&bytes=&rate= sends `bytes` bytes of a
# sequence every side derives alike (so a checksum proves the body crossed intact), paced
# at `rate` bytes/s, and prints the peer's address when it starts (`PEER id address`): the
# meshlink pod of c1 that carries the flow.
SERVER = r"""
import hashlib, http.server, os, time, urllib.parse
WHO = os.environ["CLUSTER"].encode() + b"\n"
def blocks():
    chunk = b"meshlink"
    while True:
        chunk = hashlib.sha256(chunk).digest()
        yield chunk * 32
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def log_message(self, *args):
        pass
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/who":
            self.send_response(200)
            self.send_header("Content-Length", str(len(WHO)))
            self.end_headers()
            self.wfile.write(WHO)
        elif url.path == "/stream":
            n, rate = int(q["bytes"]), float(q["rate"])
            print("PEER", q.get("id", "-"), self.client_address[0], flush=True)
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            gen, sent, t0 = blocks(), 0, time.monotonic()
            while sent < n:
                piece = b"".join(next(gen) for _ in range(64))[: n - sent]
                self.wfile.write(piece)
                sent += len(piece)
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        else:
            self.send_error(404)
http.server.ThreadingHTTPServer(("", 8080), Handler).serve_forever()
"""

# The client loop: a new connection every INTERVAL s until its stdin closes, each printed
# when it ends as `START OK MS ERROR` (START: time.time() when it began; the pods share
# the machine's clock with the test).
PROBE = r"""
import asyncio, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
interval, timeout = float(sys.argv[3]), float(sys.argv[4])
request = b"GET /who HTTP/1.0\r\nHost: probe\r\n\r\n"
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
async def exchange():
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        return await reader.read()
    finally:
        writer.close()
async def attempt():
    t0 = time.time()
    try:
        data = await asyncio.wait_for(exchange(), timeout)
        head, _, body = data.partition(b"\r\n\r\n")
        ok = head.split(b" ", 2)[1:2] == [b"200"] and body.strip() != b""
        err = "-" if ok else "bad-answer"
    except Exception as e:
        ok, err = False, type(e).__name__
    print(f"{t0:.4f} {int(ok)} {(time.time() - t0) * 1000:.0f} {err}", flush=True)
async def main():
    tasks = set()
    due = time.monotonic()
    while not stop.is_set():
        task = asyncio.ensure_future(attempt())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        due += interval
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    if tasks:
        await asyncio.wait(tasks)
asyncio.run(main())
"""

# One long download through the tunnel: its byte count and SHA-256, as JSON.
BULK = r"""
import hashlib, json, socket, sys
host, port, ident, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[5]
n = int(sys.argv[4])
out = {"bytes": 0, "sha256": None, "error": None}
digest = hashlib.sha256()
try:
    s = socket.create_connection((host, port), timeout=10)
    s.settimeout(30)
    s.sendall(f"GET /stream?id={ident}&bytes={n}&rate={rate} HTTP/1.0\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise EOFError("closed before the headers")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    out["status"] = head.split(b" ", 2)[1].decode()
    digest.update(body)
    out["bytes"] = len(body)
    while True:
        data = s.recv(65536)
        if not data:
            break
        digest.update(data)
        out["bytes"] += len(data)
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
out["sha256"] = digest.hexdigest()
print(json.dumps(out), flush=True)
"""


def stream_sha256(n: int) -> str:
    """The SHA-256 of the first `n` bytes /stream sends."""
    digest, chunk, left = hashlib.sha256(), b"meshlink", n
    while left > 0:
        chunk = hashlib.sha256(chunk).digest()
        block = (chunk * 32)[:left]
        digest.update(block)
        left -= len(block)
    return digest.hexdigest()


def objects(cluster: str, image: str) -> str:
    """hweb in c1: one pod on the control-plane node, its Service, its ServiceExport."""
    labels = {"app": SERVICE}
    objs: list[dict[str, Any]] = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": SERVICE, "namespace": NS},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
                        "tolerations": [
                            {
                                "key": "node-role.kubernetes.io/control-plane",
                                "operator": "Exists",
                                "effect": "NoSchedule",
                            }
                        ],
                        "containers": [
                            {
                                "name": "web",
                                "image": image,
                                "command": ["python3", "-u", "-c", SERVER],
                                "env": [{"name": "CLUSTER", "value": cluster}],
                                "ports": [{"containerPort": 8080}],
                                "readinessProbe": {
                                    "httpGet": {"path": "/who", "port": 8080},
                                    "periodSeconds": 2,
                                },
                            }
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": NS},
            "spec": {
                "selector": labels,
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            },
        },
        {
            "apiVersion": "multicluster.x-k8s.io/v1beta1",
            "kind": "ServiceExport",
            "metadata": {"name": SERVICE, "namespace": NS},
        },
    ]
    return "\n---\n".join(json.dumps(o) for o in objs)


def client_pod(c: KindCluster, image: str) -> None:
    c.kubectl(
        "-n", NS, "run", CLIENT, f"--image={image}", "--restart=Never", "--command", "--",
        "sleep", "infinity",
    )  # fmt: skip


# -- new flows through a fault --------------------------------------------------------------


Row = tuple[float, bool, float, str]
"""(start, succeeded, milliseconds, error) of one probe connection."""


class Probe:
    """The client loop in c2's client pod, read as it prints."""

    def __init__(self, c2: KindCluster, ip: str, port: int = 80) -> None:
        argv = [
            str(c2.kubectl_bin), "--kubeconfig", str(c2.kubeconfig), "-n", NS, "exec", "-i",
            CLIENT, "--", "python3", "-c", PROBE, ip, str(port), str(PROBE_INTERVAL),
            str(PROBE_TIMEOUT),
        ]  # fmt: skip
        self.follow = Follow(argv, _probe_row, stdin=True)
        self.rows = self.follow.rows

    def ok_since(self, t: float) -> int:
        return sum(1 for start, ok, _, _ in list(self.rows) if ok and start >= t)

    def calm(self, since: float, until: float) -> bool:
        """Only successes among the connections started in [since, until], and some. Look
        at least PROBE_TIMEOUT back: a connection that times out is printed only then."""
        rows = [r for r in list(self.rows) if since <= r[0] <= until]
        return len(rows) >= 10 and all(ok for _, ok, _, _ in rows)

    def wait_ok(self, count: int = 20, timeout: float = 60) -> None:
        since = time.time()
        wait_until(
            lambda: self.ok_since(since) >= count,
            timeout,
            f"{count} successful connections before the fault",
            interval=0.1,
        )

    def stop(self) -> list[Row]:
        """End the loop (its stdin closes) and return every row, by start time."""
        assert self.follow.proc.stdin is not None
        self.follow.proc.stdin.close()
        rows = self.follow.finish(PROBE_TIMEOUT + 20)
        assert rows, "the probe printed nothing"
        return sorted(rows)


def _probe_row(line: str) -> Row:
    t, ok, ms, err = line.split()
    return (float(t), ok == "1", float(ms), err)


@dataclass(frozen=True)
class Gap:
    """What new flows saw from a fault on."""

    gap_s: float
    """The longest time with no successful connection: from the fault, or the last success
    before a failure, to the next success (or to the end of the window if none came)."""
    failed: int
    attempts: int
    recovered: bool
    """The last second of the window had only successes."""
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def failed_pct(self) -> float:
        return 100.0 * self.failed / self.attempts if self.attempts else math.nan

    @classmethod
    def of(cls, rows: list[Row], fault_at: float, end: float) -> Gap:
        window = [r for r in rows if fault_at <= r[0] <= end]
        gap, last_ok = 0.0, fault_at
        errors: dict[str, int] = {}
        for start, ok, _, err in window:
            if ok:
                gap = max(gap, start - last_ok)
                last_ok = start
            else:
                errors[err] = errors.get(err, 0) + 1
        gap = max(gap, end - last_ok - 1.0)  # no success in the window's last second
        tail = [ok for start, ok, _, _ in window if start >= end - 1.0]
        return cls(
            gap_s=round(gap, 3),
            failed=sum(errors.values()),
            attempts=len(window),
            recovered=bool(tail) and all(tail),
            errors=errors,
        )

    def line(self, what: str) -> str:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"{what}: longest gap for new flows {self.gap_s:.2f} s, "
            f"{self.failed} of {self.attempts} connections failed ({self.failed_pct:.2f} %; "
            f"{errs}){'' if self.recovered else ', NOT recovered'}"
        )


# -- the clusters' meshlink pods ------------------------------------------------------------


def pods(c: KindCluster) -> list[dict[str, Any]]:
    return c.meshlink_pods()


def pod_named(c: KindCluster, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = c.get_json("pod", name, "-n", MESHLINK_NS)
    return pod


def ready(pod: dict[str, Any]) -> bool:
    return any(
        x["type"] == "Ready" and x["status"] == "True"
        for x in pod["status"].get("conditions") or []
    )


def container_id(pod: dict[str, Any]) -> str:
    (status,) = pod["status"]["containerStatuses"]
    cid = str(status["containerID"])
    return cid.split("://", 1)[1]


def signal_container(pod: dict[str, Any], sig: str) -> None:
    """Send `sig` (SIGKILL, SIGSTOP, SIGCONT) to the meshlink process of `pod`, from its
    node (containerd's task: PID 1 of the container ignores a SIGKILL sent from inside)."""
    node = pod["spec"]["nodeName"]
    docker(
        "exec", node, "ctr", "-n", "k8s.io", "task", "kill", "--signal", sig, container_id(pod),
        timeout=30,
    )  # fmt: skip


def restarts(pod: dict[str, Any]) -> int:
    (status,) = pod["status"]["containerStatuses"]
    return int(status["restartCount"])


def settled(c: KindCluster, replicas: int) -> list[dict[str, Any]]:
    """Wait until `replicas` meshlink pods run Ready and no other is left (a rollout over,
    a deleted pod replaced); return them."""
    wait_rollout(c, MESHLINK_NS, "deploy/meshlink", timeout=240)

    def done() -> list[dict[str, Any]] | None:
        every = c.get_json("pods", "-n", MESHLINK_NS, "-l", SELECTOR)["items"]
        live = [p for p in every if ready(p) and not p["metadata"].get("deletionTimestamp")]
        return live if len(every) == len(live) == replicas else None

    return wait_until(done, 240, f"{replicas} Ready meshlink pods in {c.name}", interval=0.5)


def spread(c: KindCluster, replicas: int) -> list[dict[str, Any]]:
    """The pods on separate nodes where there are enough: preferred anti-affinity cannot
    promise it after a rolling update (a surge pod may tie between two nodes that both
    still hold an old pod), so move one if two share a node (what a descheduler does)."""
    for _ in range(3):
        live = settled(c, replicas)
        nodes = [p["spec"]["nodeName"] for p in live]
        schedulable = {
            n["metadata"]["name"]
            for n in c.get_json("nodes")["items"]
            if not any(t.get("effect") == "NoSchedule" for t in n["spec"].get("taints") or [])
        }
        if len(set(nodes)) == min(replicas, len(schedulable)):
            return live
        leader = c.leader()
        extra = next(
            p
            for p in live
            if nodes.count(p["spec"]["nodeName"]) > 1 and p["metadata"]["name"] != leader
        )
        c.kubectl("-n", MESHLINK_NS, "delete", "pod", extra["metadata"]["name"], "--wait=true")
    raise AssertionError(f"meshlink's pods in {c.name} stay on one node: {nodes}")


def link_instances(status: dict[str, Any], peer: str) -> set[str]:
    """The instances of `peer` a replica has an up link with (the site itself where links
    carry no instance)."""
    return {
        str(lk.get("instance") or lk["peer"])
        for lk in status["links"]
        if lk["peer"] == peer and lk["state"] == "up"
    }


def linked(c: KindCluster, peer: str, instances: int, timeout: float = 120) -> None:
    """Every replica of `c` has up links with `instances` instances of `peer`."""

    def check() -> bool:
        statuses = c.meshlink_statuses()
        return bool(statuses) and all(
            len(link_instances(s, peer)) >= instances for s in statuses.values()
        )

    wait_until(
        check,
        timeout,
        f"every replica of {c.name} linked to {instances} instance(s) of {peer}",
        interval=1,
        ignore=(KubeError,),
    )


# -- faults ---------------------------------------------------------------------------------


@dataclass
class Bed:
    """The exporter c1 (where most faults happen), the importer c2, hweb's clusterset IP."""

    c1: KindCluster
    c2: KindCluster
    ip: str
    replicas: int = 2

    def settle(self) -> None:
        """Both sites back to full strength, spread, linked, and flows passing."""
        spread(self.c1, self.replicas)
        settled(self.c2, self.replicas)
        linked(self.c2, "c1", self.instances())

    def instances(self) -> int:
        """How many c1 instances a c2 replica links with: every one where links carry an
        instance id (active/active), else one link per site."""
        status = next(iter(self.c2.meshlink_statuses().values()))
        keyed = any("instance" in lk for lk in status["links"])
        return self.replicas if keyed else 1


@dataclass(frozen=True)
class Fault:
    """One fault: `inject` acts and returns how to undo it (or None) and the probe window's
    length from the fault on."""

    name: str
    what: str
    inject: Callable[[Bed, str], tuple[Callable[[], None] | None, float]]
    target_leader: bool = True
    """Aim at the Lease holder (else at the other replica)."""


WINDOW = 15.0
"""Seconds of probing after an instantaneous fault (recovery, then calm)."""
RECOVERY_LIMIT = 60.0
"""At most this long past the window, waiting for connections to succeed again."""
STOP_SECONDS = 10.0
CUT_SECONDS = 10.0


def _kill(bed: Bed, target: str) -> tuple[Callable[[], None] | None, float]:
    signal_container(pod_named(bed.c1, target), "SIGKILL")
    return None, WINDOW


def _delete(bed: Bed, target: str) -> tuple[Callable[[], None] | None, float]:
    bed.c1.kubectl("-n", MESHLINK_NS, "delete", "pod", target, "--wait=false")
    return None, WINDOW


def _for_a_while(seconds: float, undo: Callable[[], object]) -> Callable[[], None]:
    """Undo after `seconds` (a timer), or when the returned function is called, once."""
    done = threading.Lock()
    state = {"undone": False}

    def once() -> None:
        with done:
            if not state["undone"]:
                state["undone"] = True
                undo()

    timer = threading.Timer(seconds, once)
    timer.start()

    def now() -> None:
        timer.cancel()
        once()

    return now


def _cut(bed: Bed, target: str) -> tuple[Callable[[], None] | None, float]:
    node = pod_named(bed.c1, target)["spec"]["nodeName"]
    ip = docker(
        "inspect", "-f", "{{.NetworkSettings.Networks.kind.IPAddress}}", node, timeout=30
    ).strip()
    docker("network", "disconnect", "kind", node)
    heal = _for_a_while(CUT_SECONDS, lambda: docker("network", "connect", "--ip", ip, "kind", node))
    return heal, max(WINDOW, CUT_SECONDS + 5)


def _stop(bed: Bed, target: str) -> tuple[Callable[[], None] | None, float]:
    pod = pod_named(bed.c1, target)
    signal_container(pod, "SIGSTOP")
    wake = _for_a_while(STOP_SECONDS, lambda: signal_container(pod, "SIGCONT"))
    return wake, max(WINDOW, STOP_SECONDS + 5)


def _rollout(which: str) -> Callable[[Bed, str], tuple[Callable[[], None] | None, float]]:
    def inject(bed: Bed, target: str) -> tuple[Callable[[], None] | None, float]:
        c = bed.c1 if which == "c1" else bed.c2
        t0 = time.monotonic()
        c.kubectl("-n", MESHLINK_NS, "rollout", "restart", "deploy/meshlink")
        settled(c, bed.replicas)
        return None, time.monotonic() - t0 + 3

    return inject


FAULTS: tuple[Fault, ...] = (
    Fault("kill9", "kill -9 of a c1 meshlink container", _kill, target_leader=False),
    Fault("pod_delete", "delete of c1's leader pod", _delete),
    Fault("node_cut", "c1's leader's node cut off the network for 10 s", _cut),
    Fault("sigstop_leader", "SIGSTOP of c1's leader for 10 s", _stop),
    Fault("rollout_c1", "rollout restart of c1's meshlink (exporter)", _rollout("c1")),
    Fault("rollout_c2", "rollout restart of c2's meshlink (importer)", _rollout("c2")),
)


def target_of(bed: Bed, fault: Fault) -> str:
    leader: str = wait_until(bed.c1.leader, 30, "a leader in c1")
    if fault.target_leader:
        return leader
    names = [str(p["metadata"]["name"]) for p in pods(bed.c1)]
    return next((n for n in names if n != leader), leader)  # one replica: the only one


@dataclass(frozen=True)
class Outcome:
    fault: Fault
    target: str
    gap: Gap
    fault_at: float
    rows: list[Row]


def through(
    bed: Bed,
    fault: Fault,
    target: str | None = None,
    hold: Callable[[], None] | None = None,
) -> Outcome:
    """Probe new flows from c2 across `fault` (at `target`, else its usual one), undo it at
    the end of its window, and measure. `hold` runs between the injection and the end of
    the window (a test's checks while the fault lasts)."""
    target = target or target_of(bed, fault)
    probe = Probe(bed.c2, bed.ip)
    undo: Callable[[], None] | None = None
    try:
        probe.wait_ok()
        fault_at = time.time()
        undo, window = fault.inject(bed, target)
        if hold is not None:
            hold()
        left = fault_at + window - time.time()
        if left > 0:
            time.sleep(left)
        if undo is not None:
            undo()
            undo = None
        # Past the window only while connections still fail (a slow recovery is measured
        # to its end, up to RECOVERY_LIMIT).
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: probe.calm(time.time() - 1.0 - PROBE_TIMEOUT, time.time() - PROBE_TIMEOUT),
                RECOVERY_LIMIT,
                "new connections succeeding again",
                interval=0.2,
            )
        end = time.time()
    finally:
        if undo is not None:
            undo()
        rows = probe.stop()
    return Outcome(fault, target, Gap.of(rows, fault_at, end), fault_at, rows)


def iter_faults(names: str | None = None) -> Iterator[Fault]:
    wanted = None if names is None else set(names.split(","))
    for f in FAULTS:
        if wanted is None or f.name in wanted:
            yield f


__all__ = [
    "BULK",
    "FAULTS",
    "NAME",
    "NS",
    "Bed",
    "Fault",
    "Gap",
    "Outcome",
    "Probe",
    "client_pod",
    "objects",
    "stream_sha256",
    "through",
    "wait_pod_ready",
]

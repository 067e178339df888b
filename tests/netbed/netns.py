"""Clusters as network namespaces joined by a WAN namespace (design.md, "The testbed").

Layout for a `Testbed(n)` (cluster indexes 1..n; index 0 names the WAN namespace)::

    cluster i netns  <prefix>-c<i>       WAN netns <prefix>-wan (ip_forward=1)
      lo: 127.0.0.1, pod addresses /32     w<i>: 10.250.<i>.1/24  (one veth per cluster)
      eth0: 10.250.<i>.2/24  <--veth-->
      default via 10.250.<i>.1
      nat POSTROUTING: pod CIDR leaving eth0 is masqueraded to the node address

Node networks route to each other through the WAN; pod CIDRs (10.<200+i>.0.0/16) are not
routed across clusters (traffic between clusters goes node to node, as with real clusters
behind NAT). The kernel here has no `dummy` link type, so pod addresses live on `lo` of
the cluster namespace, which is just as local. Faults: `drop(i, j)` puts DROP rules in the
WAN's FORWARD chain; `isolate(i)` cuts cluster i off the WAN.

Processes run inside a cluster with `ip netns exec`; `popen` tracks them and `close` kills
them, then kills whatever else is left in the namespaces and deletes them. A cluster's
kube-apiserver listens on 127.0.0.1 of the ROOT namespace; `connect_apiserver` bridges it
into the cluster namespace with two socat processes joined by a unix socket, so the
cluster's kubeconfig (https://127.0.0.1:PORT) works unchanged inside.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.kube import KubeCluster, wait_until
from tests.netbed.kubeproxy import KubeProxy

REPO = Path(__file__).resolve().parent.parent.parent
WAN = 0
"""The index that names the WAN namespace in `cmd`, `run` and `popen`."""
MAX_CLUSTERS = 40
CMD_TIMEOUT = 30.0
TOOLS = ("ip", "iptables", "iptables-restore", "socat", "curl")
"""What the testbed runs besides Python (`require_root` checks them)."""
_STOP_GRACE = 3.0
_NAME_RE = re.compile(r"^nb(\d+)-\d+-(?:wan|c\d+)$")
_counter = itertools.count(1)


class NetbedError(RuntimeError):
    """The testbed could not be built or used; the message says which command failed."""


def require_root() -> None:
    """For a test that builds a testbed: skip it unless root (fail it under CI, which runs
    as root), and fail it when one of `TOOLS` is missing."""
    import pytest

    if os.geteuid() != 0:
        reason = "the netns testbed needs root (network namespaces, iptables)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI runs as root", pytrace=False)
        pytest.skip(reason)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run `bash hack/setup.sh --test`", pytrace=False)


def _run(
    argv: Sequence[str],
    *,
    timeout: float = CMD_TIMEOUT,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise NetbedError(f"{' '.join(argv)} timed out after {timeout:g} s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise NetbedError(f"{' '.join(argv)} failed (exit {proc.returncode}): {detail}")
    return proc


def _sh(argv: Sequence[str], *, timeout: float = CMD_TIMEOUT, input: str | None = None) -> str:
    return _run(argv, timeout=timeout, input=input).stdout


def netns_list() -> list[str]:
    """Names of every network namespace `ip netns` knows."""
    return [line.split()[0] for line in _sh(["ip", "netns", "list"]).splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_pids(ns: str) -> None:
    try:
        out = _sh(["ip", "netns", "pids", ns], timeout=10)
    except NetbedError:
        return
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _delete_netns(ns: str) -> None:
    _kill_netns_pids(ns)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


def sweep_stale() -> list[str]:
    """Delete testbed namespaces left by test processes that no longer run (a crash or
    SIGKILL skipped their teardown). Returns the names deleted."""
    gone = []
    for ns in netns_list():
        m = _NAME_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            _delete_netns(ns)
            gone.append(ns)
    return gone


@dataclass(frozen=True)
class ClusterNet:
    """The addresses of one cluster namespace."""

    index: int
    netns: str
    node_ip: str
    """10.250.<i>.2, on eth0: what other clusters reach (gateway traffic goes here)."""
    wan_ip: str
    """10.250.<i>.1, the WAN side of the veth and the cluster's default gateway."""
    node_cidr: str
    pod_cidr: str
    """10.<200+i>.0.0/16, local to the cluster."""
    wan_if: str
    """The veth's name in the WAN namespace."""


@dataclass(frozen=True)
class Pod:
    """A pod server started by `Testbed.start_pod`."""

    cluster: int
    name: str
    ip: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}/"


class Testbed:
    """One WAN namespace and `n` cluster namespaces; a context manager that leaves nothing.

    `workdir` (default: a fresh short temporary directory, removed at close) holds the
    logs of the processes started here; unix sockets always go to the short directory.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, n: int, workdir: Path | None = None) -> None:
        if not 1 <= n <= MAX_CLUSTERS:
            raise ValueError(f"n must be between 1 and {MAX_CLUSTERS}, not {n}")
        self.n = n
        self.prefix = f"nb{os.getpid()}-{next(_counter)}"
        self.wan = f"{self.prefix}-wan"
        self.clusters: list[ClusterNet] = [
            ClusterNet(
                index=i,
                netns=f"{self.prefix}-c{i}",
                node_ip=f"10.250.{i}.2",
                wan_ip=f"10.250.{i}.1",
                node_cidr=f"10.250.{i}.0/24",
                pod_cidr=f"10.{200 + i}.0.0/16",
                wan_if=f"w{i}",
            )
            for i in range(1, n + 1)
        ]
        self._rundir = Path(tempfile.mkdtemp(prefix="nb", dir="/tmp"))
        self.workdir = Path(workdir) if workdir is not None else self._rundir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._drops: set[tuple[str, ...]] = set()
        self._bridges: dict[int, int] = {}
        self._pod_ips: dict[int, set[str]] = {i: set() for i in range(1, n + 1)}
        self._next_host: dict[int, int] = dict.fromkeys(range(1, n + 1), 10)
        self._log_seq = itertools.count(1)
        self.closed = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Testbed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Create the namespaces, links, addresses and routes. On failure, undo it all."""
        try:
            sweep_stale()
            names = [self.wan, *(c.netns for c in self.clusters)]
            self._created = names  # close() deletes whichever of them exist
            _sh(["ip", "-batch", "-"], input="".join(f"netns add {ns}\n" for ns in names))
            wan_batch = ["link set lo up"]
            for c in self.clusters:
                veth = ["link", "add", c.wan_if, "type", "veth", "peer", "name", "eth0"]
                _sh(["ip", "-n", self.wan, *veth, "netns", c.netns])
                wan_batch += [f"addr add {c.wan_ip}/24 dev {c.wan_if}", f"link set {c.wan_if} up"]
                _sh(
                    ["ip", "-n", c.netns, "-batch", "-"],
                    input=(
                        "link set lo up\n"
                        f"addr add {c.node_ip}/24 dev eth0\n"
                        "link set eth0 up\n"
                        f"route add default via {c.wan_ip}\n"
                    ),
                )
                masq = ["-s", c.pod_cidr, "-o", "eth0", "-j", "MASQUERADE"]
                self._iptables(c.index, ["-t", "nat", "-A", "POSTROUTING", *masq])
            _sh(["ip", "-n", self.wan, "-batch", "-"], input="".join(f"{x}\n" for x in wan_batch))
            self.run(WAN, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill tracked processes, then any other process in our namespaces; delete them.
        Idempotent, and safe after a partial `start`."""
        if self.closed:
            return
        self.closed = True
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + _STOP_GRACE
        for p in self._procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        existing = set(netns_list()) if self._created else set()
        for ns in self._created:
            if ns in existing:
                _delete_netns(ns)
        shutil.rmtree(self._rundir, ignore_errors=True)

    # ------------------------------------------------------------------ processes

    def cluster(self, i: int) -> ClusterNet:
        if not 1 <= i <= self.n:
            raise ValueError(f"no cluster {i} in this testbed (1..{self.n})")
        return self.clusters[i - 1]

    def netns(self, i: int) -> str:
        """The namespace name of cluster `i`, or of the WAN for i == WAN (0)."""
        return self.wan if i == WAN else self.cluster(i).netns

    def cmd(self, i: int, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed so that it runs inside cluster i (or the WAN for 0)."""
        return ["ip", "netns", "exec", self.netns(i), *argv]

    def run(
        self,
        i: int,
        argv: Sequence[str],
        *,
        timeout: float = CMD_TIMEOUT,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` to completion inside cluster i (bounded by `timeout`)."""
        return _run(self.cmd(i, argv), timeout=timeout, check=check, input=input)

    def popen(
        self, i: int | None, argv: Sequence[str], *, log: str | None = None, **popen_kw: Any
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process inside cluster i (the WAN for 0, the root namespace
        for None); `close` stops it. Output goes to workdir/<log>.log unless `popen_kw`
        redirects it."""
        full = list(argv) if i is None else self.cmd(i, argv)
        name = log or f"proc{next(self._log_seq)}-{Path(argv[0]).name}"
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        popen_kw.setdefault("cwd", str(REPO))
        if "stdout" in popen_kw:
            proc: subprocess.Popen[bytes] = subprocess.Popen(full, **popen_kw)
        else:
            with (self.workdir / f"{name}.log").open("ab") as out:
                popen_kw.setdefault("stderr", subprocess.STDOUT)
                proc = subprocess.Popen(full, stdout=out, **popen_kw)
        self._procs.append(proc)
        return proc

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last `lines` lines of the log of the process `popen` started as `name`."""
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_running(
        self,
        proc: subprocess.Popen[bytes],
        log: str,
        ready: Callable[[], bool],
        timeout: float,
        what: str,
    ) -> None:
        """Wait until `ready()` is true; fail at once, with the tail of its log, if `proc`
        (started by `popen` with `log`) exits first."""

        def check() -> bool:
            if proc.poll() is not None:
                raise NetbedError(f"{log} exited with {proc.returncode}: {self.log_tail(log)}")
            return ready()

        wait_until(check, timeout, what)

    # ------------------------------------------------------------------ addresses

    def add_pod_ip(self, i: int, ip: str | None = None) -> str:
        """Add a pod address (the next free one of the pod CIDR unless given) to cluster i."""
        c = self.cluster(i)
        net = ipaddress.ip_network(c.pod_cidr)
        if ip is None:
            while True:
                host = self._next_host[i]
                self._next_host[i] += 1
                ip = str(net[host])
                if ip not in self._pod_ips[i]:
                    break
        if ipaddress.ip_address(ip) not in net:
            raise ValueError(f"{ip} is not in cluster {i}'s pod CIDR {c.pod_cidr}")
        _sh(["ip", "-n", c.netns, "addr", "add", f"{ip}/32", "dev", "lo"])
        self._pod_ips[i].add(ip)
        return ip

    def start_pod(self, i: int, name: str, *, ip: str | None = None, port: int = 8080) -> Pod:
        """Start a pod server in cluster i answering `name` on GET; wait until it listens.

        `ip`: a new pod address by default; a pod-CIDR address is added if need be; any
        other address (the node address, 0.0.0.0) is used as it is."""
        in_pods = ip is not None and ipaddress.ip_address(ip) in ipaddress.ip_network(
            self.cluster(i).pod_cidr
        )
        if ip is None or (in_pods and ip not in self._pod_ips[i]):
            ip = self.add_pod_ip(i, ip)
        ready = self._rundir / f"pod-{i}-{name}-{port}.ready"
        ready.unlink(missing_ok=True)  # a pod restarted under the same name: wait for the new one
        argv = [sys.executable, "-m", "tests.netbed.podserver", "--name", name]
        argv += ["--bind", ip, "--port", str(port), "--ready-file", str(ready)]
        log = f"pod-c{i}-{name}"
        proc = self.popen(i, argv, log=log)
        self.wait_running(
            proc, log, ready.exists, 15, f"pod {name} listening on {ip}:{port} in cluster {i}"
        )
        return Pod(cluster=i, name=name, ip=ip, port=port, proc=proc)

    def curl(self, i: int, *urls: str, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
        """GET each URL from inside cluster i with curl, one new connection per URL. Each
        body is followed by a newline in stdout; errors go to stderr (curl's exit code is
        that of the last URL: 7 = connection refused, 28 = timed out)."""
        argv = ["curl", "-sS", "--max-time", f"{timeout:g}", "-w", r"\n"]
        argv += [x for u in urls for x in ("-H", "Connection: close", u)]
        return self.run(i, argv, check=False, timeout=timeout * len(urls) + 10)

    # ------------------------------------------------------------------ faults

    def _iptables(self, i: int, args: Sequence[str]) -> None:
        self.run(i, ["iptables", "-w", "5", *args], timeout=15)

    def _forward_rules(self, i: int, j: int) -> list[tuple[str, ...]]:
        a, b = self.cluster(i).node_cidr, self.cluster(j).node_cidr
        return [("-s", a, "-d", b, "-j", "DROP"), ("-s", b, "-d", a, "-j", "DROP")]

    def _add_drops(self, rules: list[tuple[str, ...]]) -> None:
        for r in rules:
            if r not in self._drops:
                self._iptables(WAN, ["-I", "FORWARD", *r])
                self._drops.add(r)

    def _del_drops(self, rules: list[tuple[str, ...]]) -> None:
        for r in rules:
            if r in self._drops:
                self._iptables(WAN, ["-D", "FORWARD", *r])
                self._drops.discard(r)

    def drop(self, i: int, j: int) -> None:
        """Drop every packet between the node networks of clusters i and j (both ways)."""
        self._add_drops(self._forward_rules(i, j))

    def undrop(self, i: int, j: int) -> None:
        self._del_drops(self._forward_rules(i, j))

    def _isolate_rules(self, i: int) -> list[tuple[str, ...]]:
        w = self.cluster(i).wan_if
        return [("-i", w, "-j", "DROP"), ("-o", w, "-j", "DROP")]

    def isolate(self, i: int) -> None:
        """Cut cluster i off every other cluster (its WAN link forwards nothing)."""
        self._add_drops(self._isolate_rules(i))

    def unisolate(self, i: int) -> None:
        self._del_drops(self._isolate_rules(i))

    # ------------------------------------------------------------------ kube-apiserver

    def connect_apiserver(self, i: int, kube: KubeCluster, *, timeout: float = 30.0) -> Path:
        """Make `kube`'s API server (127.0.0.1:PORT in the root namespace) answer on
        127.0.0.1:PORT inside cluster i, and wait until /readyz answers from inside.
        Returns the kubeconfig to use inside (the cluster's own, unchanged). Calling it
        again for the same cluster and API server does nothing."""
        u = urlsplit(kube.server)
        if u.hostname != "127.0.0.1" or u.port is None:
            raise NetbedError(f"cannot bridge API server {kube.server}: not 127.0.0.1:PORT")
        port = u.port
        if self._bridges.get(i) == port:
            return kube.kubeconfig
        if i in self._bridges:
            raise NetbedError(f"cluster {i} is already bridged to another API server")
        sock = self._rundir / f"api-c{i}.sock"
        log = f"apibridge-root-c{i}"
        root = self.popen(
            None, ["socat", f"UNIX-LISTEN:{sock},fork,mode=600", f"TCP:127.0.0.1:{port}"], log=log
        )
        self.wait_running(root, log, sock.exists, 10, f"unix socket {sock} of the API bridge")
        log = f"apibridge-ns-c{i}"
        listen = f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"
        inner = self.popen(i, ["socat", listen, f"UNIX-CONNECT:{sock}"], log=log)

        def ready() -> bool:
            readyz = ("--request-timeout=5s", "get", "--raw", "/readyz")
            return self.kubectl(i, kube, *readyz, timeout=10).stdout.strip() == "ok"

        self.wait_running(
            inner, log, ready, timeout, f"{kube.name}'s API server /readyz from inside cluster {i}"
        )
        self._bridges[i] = port
        return kube.kubeconfig

    def start_kubeproxy(
        self, i: int, kubeconfig: Path, *, chain_prefix: str = "MLKP", timeout: float = 20.0
    ) -> KubeProxy:
        """Start the kube-proxy stand-in inside cluster i (call `connect_apiserver` first)
        and wait for its first full sync."""
        state = self._rundir / f"kubeproxy-c{i}-{chain_prefix}.json"
        name = f"kubeproxy-c{i}-{chain_prefix}"
        argv = [sys.executable, "-m", "tests.netbed.kubeproxy", "--kubeconfig", str(kubeconfig)]
        argv += ["--state-file", str(state), "--chain-prefix", chain_prefix]
        proc = self.popen(i, argv, log=name)
        kp = KubeProxy(cluster=i, state_file=state, proc=proc, log=self.log_path(name))
        self.wait_running(
            proc, name, lambda: bool(kp.state()), timeout, f"kubeproxy's first sync in cluster {i}"
        )
        return kp

    def kubectl(
        self, i: int, kube: KubeCluster, *args: str, timeout: float = CMD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """kubectl against `kube`, run inside cluster i (after `connect_apiserver`)."""
        argv = [str(kube.kubectl_bin), "--kubeconfig", str(kube.kubeconfig), *args]
        return self.run(i, argv, check=False, timeout=timeout)

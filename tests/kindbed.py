"""Real clusters for the end-to-end tests: kind clusters from hack/kind.sh, meshlink deployed
from manifests/ as a pod from its own image (hack/image.sh), linked through `kubectl exec`.

Everything runs for real: kubelet, containerd, kube-proxy, CoreDNS and the rest of each
cluster's control plane, each cluster a Docker container on one Docker network. The test
workloads run the testbed tools image (hack/kind/tools-image.sh: curl, dig, socat, python3
from Debian). `KindTestbed.up()` is what the session fixture calls; `down()` removes it all.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from tests.kube import REPO, Kubectl, KubeError, wait_until

KIND_SH = REPO / "hack" / "kind.sh"
PREFIX = os.environ.get("MESHLINK_TEST_KIND_PREFIX", "mltest")
"""Cluster names mltest-c1...: apart from a user's `hack/kind.sh up` (prefix meshlink). Set
MESHLINK_TEST_KIND_PREFIX to run two test sessions on one machine at once."""


def _run(
    argv: list[str], *, timeout: float, env: dict[str, str] | None = None, check: bool = True
) -> str:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        raise KubeError(f"{shlex.join(argv)} timed out after {timeout:g} s") from None
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise KubeError(f"{shlex.join(argv)} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


@dataclass(frozen=True)
class KindCluster(Kubectl):
    """One kind cluster (`name` is its site id, c1...)."""

    node: str
    """The control-plane node's container."""

    def meshlink(
        self, *args: str, stdin: str | None = None, timeout: float = 60, pod: str | None = None
    ) -> str:
        """Run a meshlink command in a meshlink pod, the way a user does: `pod`, or any one
        of the Deployment's (what `kubectl exec deploy/meshlink` picks: fine for commands
        on the site state, which every replica shares)."""
        exec_args = ["-n", "meshlink-system", "exec"]
        if stdin is not None:
            exec_args.append("-i")
        return self.kubectl(
            *exec_args,
            pod or "deploy/meshlink",
            "--",
            "meshlink",
            *args,
            input=stdin,
            timeout=timeout,
        ).stdout

    def exec(self, ns: str, pod: str, *cmd: str, timeout: float = 60) -> str:
        return self.kubectl("-n", ns, "exec", pod, "--", *cmd, timeout=timeout).stdout

    def node_ip(self, node: str | None = None) -> str:
        """The address of `node` (default: the control plane) on the kind network."""
        out = _run(
            [
                "docker", "inspect", "-f", "{{.NetworkSettings.Networks.kind.IPAddress}}",
                node or self.node,
            ],
            timeout=30,
        )  # fmt: skip
        return out.strip()

    def nodes(self) -> list[str]:
        """Every node's container (kind names a node as its container)."""
        return sorted(
            n.removeprefix("node/")
            for n in self.kubectl("get", "nodes", "-o", "name").stdout.split()
        )

    def meshlink_logs(self, tail: int = 60) -> str:
        """The last lines of every meshlink pod's log (and of its previous container, if
        it restarted): what a failed test prints."""
        out: list[str] = []
        pods = self.get_json(
            "pods", "-n", "meshlink-system", "-l", "app.kubernetes.io/name=meshlink"
        )
        for pod in pods["items"]:
            name = pod["metadata"]["name"]
            restarted = any(
                c.get("restartCount") for c in pod["status"].get("containerStatuses", [])
            )
            for previous in (True, False) if restarted else (False,):
                args = ["-n", "meshlink-system", "logs", name, f"--tail={tail}"]
                got = self.kubectl(*args, *(["--previous"] if previous else []), check=False)
                out.append(f"--- {self.name} {name}{' (previous)' if previous else ''}:")
                out.append(got.stdout or got.stderr)
        return "\n".join(out)

    def meshlink_pods(self) -> list[dict[str, Any]]:
        """The meshlink pods that are Running and not being deleted, by name."""
        pods = self.get_json(
            "pods", "-n", "meshlink-system", "-l", "app.kubernetes.io/name=meshlink"
        )
        live = [
            p
            for p in pods["items"]
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        ]
        return sorted(live, key=lambda p: str(p["metadata"]["name"]))

    def meshlink_statuses(self) -> dict[str, dict[str, Any]]:
        """`meshlink status --json` of every live meshlink pod, by pod name (each replica
        has links and listeners of its own)."""
        return {
            name: json.loads(self.meshlink("status", "--json", pod=name))
            for name in (p["metadata"]["name"] for p in self.meshlink_pods())
        }

    def leader(self) -> str | None:
        """The pod holding the Lease meshlink-leader (the site's one writer), if any."""
        lease = self.find("lease", "meshlink-leader", "-n", "meshlink-system")
        if lease is None:
            return None
        holder = lease["spec"].get("holderIdentity")
        return str(holder) if holder else None


@dataclass
class KindTestbed:
    """`n` kind clusters with meshlink, all linked (hack/kind.sh up), plus the tools image."""

    n: int
    state: Path
    prefix: str
    clusters: list[KindCluster]
    tools_image: str
    image_seconds: float
    """Building meshlink's image (hack/image.sh)."""
    up_seconds: float
    """hack/kind.sh up: clusters created, meshlink deployed, Ready and linked."""

    @classmethod
    def up(cls, n: int, state: Path, prefix: str = PREFIX, workers: str = "0") -> KindTestbed:
        """`hack/kind.sh up n --workers workers` (a count for every cluster, or one per
        cluster: "2,0,0")."""
        env = {**os.environ, "MESHLINK_KIND_PREFIX": prefix, "MESHLINK_KIND_STATE": str(state)}
        t0 = time.monotonic()
        # The image of the code under test, always rebuilt (28 s warm): a stale image would
        # test yesterday's meshlink.
        _run(["bash", str(REPO / "hack" / "image.sh")], timeout=1800, env=env)
        t1 = time.monotonic()
        out = _run(
            ["bash", str(KIND_SH), "up", str(n), "--workers", workers], timeout=2400, env=env
        )
        up_seconds = time.monotonic() - t1
        kubectl_bin = (
            Path(
                _run(
                    ["bash", str(REPO / "hack" / "kube-bin.sh"), "--print-dir"], timeout=1800
                ).strip()
            )
            / "kubectl"
        )
        configs = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
        clusters = [
            KindCluster(
                name=f"c{i}",
                kubeconfig=Path(configs[f"c{i}"]),
                kubectl_bin=kubectl_bin,
                node=f"{prefix}-c{i}-control-plane",
            )
            for i in range(1, n + 1)
        ]
        archive, tools_image = _run(
            ["bash", str(REPO / "hack" / "kind" / "tools-image.sh")], timeout=1800
        ).split()
        _run(["bash", str(KIND_SH), "load", archive], timeout=600, env=env)
        return cls(
            n=n,
            state=state,
            prefix=prefix,
            clusters=clusters,
            tools_image=tools_image,
            image_seconds=t1 - t0,
            up_seconds=up_seconds,
        )

    @staticmethod
    def kept_state(prefix: str = PREFIX) -> Path:
        cache = Path(os.environ.get("MESHLINK_CACHE", Path.home() / ".cache" / "meshlink"))
        return cache / "kind" / prefix

    @staticmethod
    def teardown(state: Path, prefix: str = PREFIX) -> None:
        """Delete the clusters (also after a failed `up`) and stop a dockerd kind.sh started."""
        env = {**os.environ, "MESHLINK_KIND_PREFIX": prefix, "MESHLINK_KIND_STATE": str(state)}
        _run(["bash", str(KIND_SH), "down"], timeout=600, env=env)


def docker(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None, check: bool = True
) -> str:
    """Run the docker CLI (against the dockerd hack/kind.sh uses); stdout."""
    return _run(["docker", *args], timeout=timeout, env={**os.environ, **(env or {})}, check=check)


def wait_rollout(c: KindCluster, ns: str, what: str, timeout: float = 180) -> None:
    c.kubectl(
        "-n", ns, "rollout", "status", what, f"--timeout={int(timeout)}s", timeout=timeout + 10
    )


def wait_pod_ready(c: KindCluster, ns: str, pod: str, timeout: float = 120) -> None:
    c.kubectl(
        "-n",
        ns,
        "wait",
        "--for=condition=Ready",
        f"pod/{pod}",
        f"--timeout={int(timeout)}s",
        timeout=timeout + 10,
    )


__all__ = ["KindCluster", "KindTestbed", "docker", "wait_pod_ready", "wait_rollout", "wait_until"]


R = TypeVar("R")


class Follow(Generic[R]):
    """A command in the background (kubectl exec of a client loop, kubectl get --watch)
    whose output lines `parse` turns into `rows` as they come (None: nothing yet). The
    caller ends the command its own way (closing `proc.stdin`, terminate), then `finish`."""

    def __init__(
        self, argv: Sequence[str], parse: Callable[[str], R | None], *, stdin: bool = False
    ) -> None:
        self.rows: list[R] = []
        self._parse = parse
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            row = self._parse(line)
            if row is not None:
                self.rows.append(row)

    def finish(self, timeout: float) -> list[R]:
        """Wait up to `timeout` for the command to end (killed past it, and the timeout
        raised), then every row."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self._reader.join(timeout=10)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        return list(self.rows)

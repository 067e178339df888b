"""A real Kubernetes control plane for tests: etcd + kube-apiserver processes on loopback.

Each `KubeCluster` is its own etcd (own data dir and ports) and its own kube-apiserver (own
CA, serving certificate, admin client certificate, service-account key and service CIDR),
started from the binaries `hack/kube-bin.sh` builds from the official Kubernetes Go
modules. Nothing here imitates the API: no kubelet or controller-manager runs, so tests
create EndpointSlices themselves, the way the endpoints controller would.

Typical use (pytest fixtures in tests/e2e/conftest.py wrap this)::

    with KubeControlPlane(2, tmp_path) as cp:
        c1, c2 = cp.clusters
        c1.kubectl("create", "namespace", "demo")
        install_crds(c1)
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import ipaddress
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlink.pki import create_ca, new_key, utcnow, write_cert, write_private_key

REPO = Path(__file__).resolve().parent.parent
KUBE_BIN_SCRIPT = REPO / "hack" / "kube-bin.sh"
CRD_DIR = REPO / "manifests" / "crds"
MCS_CRDS = (
    "serviceexports.multicluster.x-k8s.io",
    "serviceimports.multicluster.x-k8s.io",
    "clusterproperties.about.k8s.io",
)
CLUSTER_ID_PROPERTY = "cluster.clusterset.k8s.io"

ETCD_READY_TIMEOUT = 20.0
APISERVER_READY_TIMEOUT = 60.0
_PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range: bind(0) users never collide
_START_ATTEMPTS = 3

T = TypeVar("T")


class KubeError(RuntimeError):
    """The control plane could not be built, started or used; the message says why."""


class KubectlError(KubeError):
    """A kubectl command failed; carries its argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = stderr.strip() or stdout.strip()
        super().__init__(f"kubectl {' '.join(argv)} failed (exit {returncode}): {detail}")


# ----------------------------------------------------------------------------- waiting


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll `predicate` until it returns something truthy, and return that.

    Fails with AssertionError naming `what` (and the last ignored error) at the deadline.
    Exceptions listed in `ignore` count as "not yet"; any other exception propagates.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as e:
            last_error, value = e, None
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_error})" if last_error is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Awaitable[T | None]],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """The asyncio twin of `wait_until`: `predicate` is an async callable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = await predicate()
        except ignore as e:
            last_error, value = e, None
        if value:
            return value
        if loop.time() >= deadline:
            extra = f" (last error: {last_error})" if last_error is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        await asyncio.sleep(interval)


# ----------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class KubeBinaries:
    bin_dir: Path
    etcd: Path
    kube_apiserver: Path
    kubectl: Path


_bin_lock = threading.Lock()
_bin_cache: KubeBinaries | None = None


def service_export_v1alpha1(namespace: str, name: str, spec: dict[str, Any] | None = None) -> str:
    """A ServiceExport manifest in the older MCS version (the CRDs serve both)."""
    obj: dict[str, Any] = {
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceExport",
        "metadata": {"name": name, "namespace": namespace},
    }
    if spec is not None:
        obj["spec"] = spec
    return json.dumps(obj)


def kube_binaries() -> KubeBinaries:
    """Build (or take from the cache) etcd, kube-apiserver and kubectl via hack/kube-bin.sh.

    Raises KubeError carrying the script's output when the build fails: a test that needs
    the control plane must fail loudly, never skip.
    """
    global _bin_cache
    with _bin_lock:
        if _bin_cache is not None:
            return _bin_cache
        try:
            proc = subprocess.run(
                ["bash", str(KUBE_BIN_SCRIPT), "--print-dir"],
                capture_output=True,
                text=True,
                timeout=3600,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise KubeError(f"{KUBE_BIN_SCRIPT} did not finish within {e.timeout} s") from None
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
            raise KubeError(f"{KUBE_BIN_SCRIPT} failed (exit {proc.returncode}):\n{tail}")
        bin_dir = Path(proc.stdout.strip().splitlines()[-1])
        bins = KubeBinaries(
            bin_dir=bin_dir,
            etcd=bin_dir / "etcd",
            kube_apiserver=bin_dir / "kube-apiserver",
            kubectl=bin_dir / "kubectl",
        )
        for p in (bins.etcd, bins.kube_apiserver, bins.kubectl):
            if not os.access(p, os.X_OK):
                raise KubeError(f"{KUBE_BIN_SCRIPT} printed {bin_dir} but {p.name} is missing")
        _bin_cache = bins
        return bins


# ----------------------------------------------------------------------------- PKI


_SIGNING_ONLY = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class _Pki:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path


def _make_pki(d: Path, name: str, service_ip: str) -> _Pki:
    d.mkdir(parents=True, exist_ok=True)
    start = utcnow() - datetime.timedelta(minutes=5)
    end = utcnow() + datetime.timedelta(days=2)
    # meshlink's own CA profile (pki.create_ca) serves the test API server as well.
    ca_pair = create_ca(f"kube-{name}")
    ca, ca_key, ca_name = ca_pair.cert, ca_pair.key, ca_pair.cert.subject
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    def leaf(
        subject: x509.Name, eku: x509.ObjectIdentifier, san: x509.SubjectAlternativeName | None
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = new_key()
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_SIGNING_ONLY, critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        if san is not None:
            b = b.add_extension(san, critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    serving, serving_key = leaf(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        ExtendedKeyUsageOID.SERVER_AUTH,
        x509.SubjectAlternativeName(
            [
                x509.DNSName("localhost"),
                x509.DNSName("kubernetes"),
                x509.DNSName("kubernetes.default"),
                x509.DNSName("kubernetes.default.svc"),
                x509.DNSName("kubernetes.default.svc.cluster.local"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address(service_ip)),
            ]
        ),
    )
    admin, admin_key = leaf(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "meshlink-test-admin"),
            ]
        ),
        ExtendedKeyUsageOID.CLIENT_AUTH,
        None,
    )
    pki = _Pki(
        ca_cert=d / "ca.crt",
        serving_cert=d / "apiserver.crt",
        serving_key=d / "apiserver.key",
        admin_cert=d / "admin.crt",
        admin_key=d / "admin.key",
        sa_key=d / "sa.key",
        sa_pub=d / "sa.pub",
    )
    write_cert(pki.ca_cert, ca)
    write_cert(pki.serving_cert, serving)
    write_private_key(pki.serving_key, serving_key)
    write_cert(pki.admin_cert, admin)
    write_private_key(pki.admin_key, admin_key)
    sa_key = new_key()
    write_private_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


def _kubeconfig(name: str, server: str, pki: _Pki) -> dict[str, Any]:
    import base64

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": name,
                "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": f"{name}-admin",
                "user": {
                    "client-certificate-data": b64(pki.admin_cert),
                    "client-key-data": b64(pki.admin_key),
                },
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-admin"}}],
        "current-context": name,
    }


# ----------------------------------------------------------------------------- processes


def _free_port(taken: set[int]) -> int:
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*_PORT_RANGE)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise KubeError(f"no free loopback port found in {_PORT_RANGE}")


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _stop_all(procs: Sequence[_Procs], grace: float = 10.0) -> None:
    """Terminate API servers, then etcds, each group in parallel; kill what outlives `grace`."""
    for attr in ("apiserver", "etcd"):
        running: list[subprocess.Popen[bytes]] = []
        for p in procs:
            with p.lock:
                proc: subprocess.Popen[bytes] | None = getattr(p, attr)
                setattr(p, attr, None)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                running.append(proc)
        deadline = time.monotonic() + grace
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _port_clash(log: Path) -> bool:
    return "address already in use" in _log_tail(log, 80)


@dataclass
class _Procs:
    """The mutable half of a cluster: its processes and their command lines."""

    etcd_args: list[str]
    apiserver_args: list[str]
    etcd_log: Path
    apiserver_log: Path
    etcd_url: str
    ssl_ctx: ssl.SSLContext
    port: int
    etcd: subprocess.Popen[bytes] | None = None
    apiserver: subprocess.Popen[bytes] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def launch_etcd(self) -> None:
        with self.etcd_log.open("ab") as log:
            self.etcd = subprocess.Popen(
                self.etcd_args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def launch_apiserver(self) -> None:
        with self.apiserver_log.open("ab") as log:
            self.apiserver = subprocess.Popen(
                self.apiserver_args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def etcd_healthy(self) -> bool:
        if self.etcd is not None and self.etcd.poll() is not None:
            raise KubeError(f"etcd exited with {self.etcd.returncode}:\n{_log_tail(self.etcd_log)}")
        host, port = self.etcd_url.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=2)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            return resp.status == 200 and b'"true"' in resp.read()
        except OSError:
            return False
        finally:
            conn.close()

    def apiserver_ready(self) -> bool:
        if self.apiserver is not None and self.apiserver.poll() is not None:
            raise KubeError(
                f"kube-apiserver exited with {self.apiserver.returncode}:\n"
                f"{_log_tail(self.apiserver_log)}"
            )
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=2, context=self.ssl_ctx)
        try:
            conn.request("GET", "/readyz")
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def wait_etcd(self) -> None:
        try:
            wait_until(self.etcd_healthy, ETCD_READY_TIMEOUT, f"etcd at {self.etcd_url} healthy")
        except AssertionError as e:
            raise KubeError(f"{e}\n{_log_tail(self.etcd_log)}") from None

    def wait_apiserver(self) -> None:
        try:
            wait_until(
                self.apiserver_ready,
                APISERVER_READY_TIMEOUT,
                f"kube-apiserver on 127.0.0.1:{self.port} /readyz",
                interval=0.1,
            )
        except AssertionError as e:
            raise KubeError(f"{e}\n{_log_tail(self.apiserver_log)}") from None


# ----------------------------------------------------------------------------- clusters


@dataclass(frozen=True)
class Kubectl:
    """kubectl bound to one cluster's admin kubeconfig: what every test harness shares (the
    process-level control planes here, the kind clusters of tests/kindbed.py)."""

    name: str
    kubeconfig: Path
    """Admin kubeconfig; its current context is this cluster."""
    kubectl_bin: Path

    def kubectl(
        self, *args: str, input: str | None = None, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raises KubectlError (with stderr) on failure."""
        argv = [str(self.kubectl_bin), "--kubeconfig", str(self.kubeconfig), *args]
        try:
            proc = subprocess.run(
                argv,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
            )
        except subprocess.TimeoutExpired as e:
            raise KubeError(f"kubectl {' '.join(args)} timed out after {e.timeout} s") from None
        if check and proc.returncode != 0:
            raise KubectlError(args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def get_json(self, *args: str, timeout: float = 30) -> dict[str, Any]:
        """`kubectl get ARGS -o json`, decoded."""
        out = self.kubectl("get", *args, "-o", "json", timeout=timeout).stdout
        data: dict[str, Any] = json.loads(out)
        return data

    def find(self, *args: str, timeout: float = 30) -> dict[str, Any] | None:
        """`kubectl get ARGS -o json` decoded, or None when it is NotFound: one GET,
        so an object deleted meanwhile cannot turn into an error (exists-then-get can)."""
        proc = self.kubectl("get", *args, "-o", "json", timeout=timeout, check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise KubectlError(["get", *args], proc.returncode, proc.stdout, proc.stderr)
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def exists(self, *args: str) -> bool:
        """True when `kubectl get ARGS` finds the object (NotFound gives False)."""
        proc = self.kubectl("get", *args, "-o", "name", check=False)
        if proc.returncode == 0:
            return True
        if "NotFound" in proc.stderr or "not found" in proc.stderr:
            return False
        raise KubectlError(["get", *args], proc.returncode, proc.stdout, proc.stderr)

    def apply(self, manifest: str, *, field_manager: str = "meshlink-tests") -> str:
        """Server-side apply of YAML/JSON text; returns kubectl's output."""
        return self.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            f"--field-manager={field_manager}",
            "-f",
            "-",
            input=manifest,
        ).stdout

    def wait_for(
        self, predicate: Callable[[], T | None], timeout: float, what: str = "condition"
    ) -> T:
        return wait_until(predicate, timeout, f"{what} in cluster {self.name}")


@dataclass(frozen=True)
class KubeCluster(Kubectl):
    """One running control plane: etcd + kube-apiserver on loopback."""

    server: str
    """https://127.0.0.1:PORT"""
    service_cidr: str
    workdir: Path
    _procs: _Procs = field(repr=False, compare=False)

    @property
    def apiserver_running(self) -> bool:
        p = self._procs.apiserver
        return p is not None and p.poll() is None

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver (etcd keeps running and keeps the data)."""
        with self._procs.lock:
            _stop(self._procs.apiserver)
            self._procs.apiserver = None

    def start_apiserver(self, *, wait: bool = True) -> None:
        """Start kube-apiserver again on the same port, with the same certificates."""
        with self._procs.lock:
            if self.apiserver_running:
                return
            self._procs.launch_apiserver()
        if wait:
            self._procs.wait_apiserver()

    def stop(self) -> None:
        """Stop kube-apiserver and etcd (the data directory stays until the workdir goes)."""
        _stop_all([self._procs])


def _prepare(bins: KubeBinaries, name: str, index: int, root: Path, taken: set[int]) -> KubeCluster:
    workdir = root / name
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    net = ipaddress.ip_network(f"10.{96 + index}.0.0/16")
    pki = _make_pki(workdir / "pki", name, str(net[1]))
    client, peer, port = _free_port(taken), _free_port(taken), _free_port(taken)
    etcd_url = f"http://127.0.0.1:{client}"
    peer_url = f"http://127.0.0.1:{peer}"
    etcd_args = [
        str(bins.etcd),
        f"--name={name}",
        f"--data-dir={workdir / 'etcd'}",
        f"--listen-client-urls={etcd_url}",
        f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster={name}={peer_url}",
        "--initial-cluster-state=new",
        "--unsafe-no-fsync",  # throwaway data: fsync only slows the tests down
        "--log-level=warn",
        "--quota-backend-bytes=2147483648",
    ]
    server = f"https://127.0.0.1:{port}"
    apiserver_args = [
        str(bins.kube_apiserver),
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={port}",
        f"--etcd-servers={etcd_url}",
        f"--cert-dir={workdir / 'apiserver-certs'}",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-cluster-ip-range={net}",
        "--authorization-mode=RBAC",
        # No controller-manager runs: nothing would create the "default" ServiceAccount the
        # ServiceAccount admission plugin insists on.
        "--disable-admission-plugins=ServiceAccount",
        "--enable-priority-and-fairness=false",
        "--profiling=false",
        "--v=1",
    ]
    ssl_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ssl_ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(json.dumps(_kubeconfig(name, server, pki), indent=2))
    kubeconfig.chmod(0o600)
    procs = _Procs(
        etcd_args=etcd_args,
        apiserver_args=apiserver_args,
        etcd_log=workdir / "etcd.log",
        apiserver_log=workdir / "kube-apiserver.log",
        etcd_url=etcd_url,
        ssl_ctx=ssl_ctx,
        port=port,
    )
    return KubeCluster(
        name=name,
        server=server,
        kubeconfig=kubeconfig,
        service_cidr=str(net),
        workdir=workdir,
        kubectl_bin=bins.kubectl,
        _procs=procs,
    )


class KubeControlPlane:
    """Context manager owning N independent clusters; tears all of them down on exit."""

    def __init__(
        self,
        n: int,
        workdir: Path,
        *,
        first_index: int = 0,
        binaries: KubeBinaries | None = None,
    ):
        if not 1 <= n <= 20:
            raise ValueError(f"n must be between 1 and 20, not {n}")
        self.n = n
        self.workdir = Path(workdir)
        self.first_index = first_index
        self._binaries = binaries
        self.clusters: list[KubeCluster] = []
        self.started = False

    def __enter__(self) -> KubeControlPlane:
        if not self.started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> list[KubeCluster]:
        """Start every cluster (in parallel) and wait until each API server is ready."""
        if self.started:
            raise KubeError("this control plane is already started")
        self.started = True
        bins = self._binaries or kube_binaries()
        try:
            pending = list(range(self.first_index, self.first_index + self.n))
            for attempt in range(_START_ATTEMPTS):
                started = self._start_batch(bins, pending, last=attempt == _START_ATTEMPTS - 1)
                self.clusters.extend(started)
                done = {c.name for c in started}
                pending = [i for i in pending if f"c{i + 1}" not in done]
                if not pending:
                    break
        except BaseException:
            self.close()
            raise
        self.clusters.sort(key=lambda c: int(c.name[1:]))
        return self.clusters

    def _start_batch(self, bins: KubeBinaries, indexes: list[int], last: bool) -> list[KubeCluster]:
        """Start clusters in parallel; on a port clash (and attempts left) drop and retry it."""
        taken: set[int] = set()
        batch = [_prepare(bins, f"c{i + 1}", i, self.workdir, taken) for i in indexes]

        def came_up(c: KubeCluster, wait: Callable[[], None], log: Path) -> bool:
            try:
                wait()
            except KubeError:
                if last or not _port_clash(log):
                    raise
                c.stop()
                return False
            return True

        ok: list[KubeCluster] = []
        try:
            for c in batch:
                c._procs.launch_etcd()
            for c in batch:
                if came_up(c, c._procs.wait_etcd, c._procs.etcd_log):
                    c._procs.launch_apiserver()
                    ok.append(c)
            ready = [c for c in ok if came_up(c, c._procs.wait_apiserver, c._procs.apiserver_log)]
        except BaseException:
            for c in batch:
                c.stop()
            raise
        return ready

    def close(self) -> None:
        """Stop every process (API servers first, then etcd), all in parallel. Idempotent."""
        _stop_all([c._procs for c in self.clusters])


# ----------------------------------------------------------------------------- CRDs


def install_crds(cluster: KubeCluster, *, timeout: float = 30) -> None:
    """Apply manifests/crds/ (MCS ServiceExport/ServiceImport, ClusterProperty) and wait
    until every CRD is Established, so its API can be used at once."""
    cluster.kubectl("apply", "--server-side", "--field-manager=meshlink-tests", "-k", str(CRD_DIR))
    wait_crds_established(cluster, timeout=timeout)


def wait_crds_established(cluster: KubeCluster, *, timeout: float = 30) -> None:
    """Wait until the MCS CRDs are Established and their group is in discovery."""

    # Poll rather than `kubectl wait`, which errors out on a CRD that has no status yet.
    def established() -> bool:
        out = cluster.kubectl(
            "get",
            *(f"crd/{name}" for name in MCS_CRDS),
            "-o",
            'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Established")].status} {end}',
            check=False,
        ).stdout
        return out.split() == ["True"] * len(MCS_CRDS)

    cluster.wait_for(established, timeout, "MCS CRDs Established")
    # Established does not mean discovery already lists the group; wait for that too.
    cluster.wait_for(
        lambda: (
            cluster.kubectl(
                "api-resources", "--api-group=multicluster.x-k8s.io", check=False
            ).stdout.count("multicluster.x-k8s.io")
            >= 2
        ),
        timeout,
        "MCS API resources in discovery",
    )


CRD_CREATE_DELAY = 2.0
"""kube-apiserver sleeps this long in every *create* of a custom resource while its CRD has
been Established for less than this (k8s.io/apiextensions-apiserver,
pkg/apiserver/customresource_handler.go, ``justCreated``: kubernetes/kubernetes#99199, for
HA consistency). Patches and server-side applies are not delayed."""


def wait_crd_create_delay(cluster: KubeCluster, *, timeout: float = 30) -> None:
    """Return once creates of the MCS custom resources are no longer delayed (see
    CRD_CREATE_DELAY): a benchmark that times its first create sooner measures the sleep."""
    crds = cluster.get_json("crd", *MCS_CRDS)["items"]
    established = max(
        datetime.datetime.fromisoformat(c["lastTransitionTime"]).timestamp()
        for crd in crds
        for c in crd["status"]["conditions"]
        if c["type"] == "Established"
    )
    # The condition's time has whole seconds, as the API server compares it.
    cluster.wait_for(
        lambda: time.time() >= established + CRD_CREATE_DELAY + 0.05,
        timeout,
        "the API server's new-CRD create delay to pass",
    )


def set_cluster_id(cluster: KubeCluster, cluster_id: str) -> None:
    """Create or update the ClusterProperty `cluster.clusterset.k8s.io` (KEP-2149)."""
    cluster.apply(
        json.dumps(
            {
                "apiVersion": "about.k8s.io/v1alpha1",
                "kind": "ClusterProperty",
                "metadata": {"name": CLUSTER_ID_PROPERTY},
                "spec": {"value": cluster_id},
            }
        )
    )


def endpoint_slice(
    namespace: str,
    service: str,
    addresses: Sequence[str],
    ports: Sequence[tuple[str, int, str]] = (("http", 80, "TCP"),),
    *,
    name: str | None = None,
    ready: bool = True,
    address_type: str = "IPv4",
) -> str:
    """An EndpointSlice as the endpoints controller would write it, as JSON text for apply."""
    return json.dumps(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name or f"{service}-test",
                "namespace": namespace,
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": address_type,
            "endpoints": [
                {"addresses": [a], "conditions": {"ready": ready, "serving": ready}}
                for a in addresses
            ],
            "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
        }
    )


def assert_ha_deployment(deployment: dict[str, Any]) -> None:
    """The settings of meshlink's Deployment with more than one replica (issue 12), as
    manifests/ and the chart both render them: a RollingUpdate that never goes below the
    count, preferred (not required) anti-affinity on the node, readiness that flips within
    2 s, and a preStop sleep long enough for the slices and every kube-proxy to drop the
    pod (kube-proxy syncs at most once a second), short enough for a quick rollout, inside
    the grace period with room for meshlink's own stop."""
    spec = deployment["spec"]
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pod = spec["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    labels = spec["template"]["metadata"]["labels"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    (ctr,) = pod["containers"]
    probe = ctr["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] <= 2
    pre_stop = ctr["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 3 <= pre_stop <= 10
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 5

"""The site state in the API server (meshlink/k8s/secrets.py) against a real kube-apiserver:
optimistic writes that lose nothing between replicas, one use of a token taken once, one
identity created once, and the manifests' RBAC and admission policy being enough (and no
more) for the ServiceAccount that uses it."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshlink import links
from meshlink.config import KubernetesConfig
from meshlink.errors import ConfigError
from meshlink.k8s.secrets import SecretStore, SyncKube
from meshlink.links.issuer import GrantRefused
from meshlink.pki import SiteIdentity, cert_to_pem, csr_to_pem, make_csr
from meshlink.store import Doc, StoreConflict, StoreError, update
from tests.kube import REPO, KubeCluster, wait_until

pytestmark = pytest.mark.timeout(240)

NS = "meshlink-system"
SA = "system:serviceaccount:meshlink-system:meshlink"


_OPEN: list[SecretStore] = []


def _store(c: KubeCluster, root: Path, kubeconfig: Path | None = None) -> SecretStore:
    kube = KubernetesConfig(kubeconfig=kubeconfig or c.kubeconfig, namespace=NS)
    store = SecretStore(SyncKube.from_config(kube), NS, root)
    _OPEN.append(store)
    return store


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _together(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run the jobs in threads released at once; their results (or the exceptions raised)."""
    start = threading.Barrier(len(jobs))
    out: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        start.wait(timeout=30)
        try:
            out[i] = jobs[i]()
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return out


@pytest.fixture
def cluster(kube_cluster: KubeCluster) -> KubeCluster:
    kube_cluster.kubectl("create", "namespace", NS)
    return kube_cluster


def test_a_document_round_trips_and_a_stale_write_is_refused(
    cluster: KubeCluster, tmp_path: Path
) -> None:
    a, b = _store(cluster, tmp_path / "a"), _store(cluster, tmp_path / "b")
    assert a.read("links") == Doc()
    first = a.write("links", {"x.json": b"{}", "x.crt": b"PEM"}, Doc())
    assert first.version
    got = b.read("links")
    assert got.files == {"x.json": b"{}", "x.crt": b"PEM"}
    # The local copy TLS loads from: keys and records 0600, certificates 0644.
    assert (tmp_path / "b" / "links" / "x.crt").read_bytes() == b"PEM"
    assert (tmp_path / "b" / "links" / "x.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "b" / "links" / "x.crt").stat().st_mode & 0o777 == 0o644
    b.write("links", {"y.json": b"{}"}, got)
    with pytest.raises(StoreConflict):
        a.write("links", {"x.json": b"[]"}, first)  # written meanwhile by b
    with pytest.raises(StoreConflict):
        a.write("links", {"z.json": b"{}"}, Doc())  # it exists: no second create
    assert a.read("links").files == {"y.json": b"{}"}
    assert not (tmp_path / "a" / "links" / "x.crt").exists()  # the copy follows
    secret = cluster.get_json("secret", "meshlink-links", "-n", NS)
    assert secret["metadata"]["labels"]["meshlink.io/state"] == "links"


def test_concurrent_writers_lose_no_update(cluster: KubeCluster, tmp_path: Path) -> None:
    """Two replicas (two stores) adding records at once: every record is there."""
    stores = [_store(cluster, tmp_path / f"r{i}") for i in range(2)]

    def add(store: SecretStore, n: int) -> None:
        for k in range(5):
            update(store, "tokens", lambda f, n=n, k=k: f.setdefault(f"t{n}-{k}", b"1") == b"1")

    _together([lambda s=stores[i % 2], n=i: add(s, n) for i in range(6)])
    files = stores[0].read("tokens", fresh=True).files
    assert sorted(files) == sorted(f"t{n}-{k}" for n in range(6) for k in range(5))


def test_one_use_of_a_token_is_taken_once(cluster: KubeCluster, tmp_path: Path) -> None:
    """Two replicas of the issuer decide two redemptions of a one-use token at the same
    time: one links, the other is told the token is used up."""
    issuer = [_store(cluster, tmp_path / f"issuer{i}") for i in range(2)]
    ident = SiteIdentity.load_or_create(issuer[0], "hub")
    token = links.decode_token(links.create_token(ident, "192.0.2.1:7444", uses=1))
    bodies = []
    for site in ("east", "west"):
        red = SiteIdentity.load_or_create(tmp_path / site, site)
        bodies.append(
            {
                "token_id": token.id,
                "secret": token.secret,
                "site": site,
                "ca_pem": red.ca_pem.decode(),
                "csr_pem": csr_to_pem(make_csr(site, red.gateway.key)).decode(),
                "gateway_pem": cert_to_pem(red.gateway.cert).decode(),
            }
        )
    idents = [SiteIdentity.load_or_create(s, "hub") for s in issuer]
    results = _together(
        [
            lambda i=i: links.decide_redeem(
                idents[i], issuer[i], bodies[i], endpoints=["192.0.2.1:7443"]
            )
            for i in range(2)
        ]
    )
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if isinstance(r, GrantRefused)]
    assert len(won) == 1, results
    assert len(lost) == 1, results
    assert lost[0].code == "token_used_up"
    (rec,) = links.TOKENS.list(issuer[1])
    assert rec.uses_left == 0
    winner = bodies[results.index(won[0])]["site"]
    assert [p.site for p in links.PEERS.list(issuer[1])] == [winner]


def test_a_token_made_on_one_replica_is_redeemable_at_the_other_at_once(
    cluster: KubeCluster, tmp_path: Path
) -> None:
    """`kubectl exec deploy/meshlink -- meshlink token create` lands on one replica, the
    redemption through the gateway Service on the other, whose cache (refreshed every
    second) does not hold the token yet: the decision reads past the cache."""
    maker, server = _store(cluster, tmp_path / "maker"), _store(cluster, tmp_path / "server")
    ident = SiteIdentity.load_or_create(maker, "hub")
    server_ident = SiteIdentity.load_or_create(server, "hub")
    server.caching = True
    server.refresh()  # the running replica's cache, from before the token
    token = links.decode_token(links.create_token(ident, "192.0.2.1:7444", uses=1))
    assert links.TOKENS.load(server, token.id) is None  # the cache does not have it yet
    red = SiteIdentity.load_or_create(tmp_path / "east", "east")
    body = {
        "token_id": token.id,
        "secret": token.secret,
        "site": "east",
        "ca_pem": red.ca_pem.decode(),
        "csr_pem": csr_to_pem(make_csr("east", red.gateway.key)).decode(),
        "gateway_pem": cert_to_pem(red.gateway.cert).decode(),
    }
    answer = links.decide_redeem(server_ident, server, body, endpoints=["192.0.2.1:7443"])
    assert answer["site"] == "hub"
    assert [p.site for p in links.PEERS.list(maker)] == ["east"]


def test_the_site_identity_is_created_once(cluster: KubeCluster, tmp_path: Path) -> None:
    """Replicas starting together on an empty namespace end up with one CA and one gateway
    key: the losers of the create take what the winner wrote."""
    stores = [_store(cluster, tmp_path / f"r{i}") for i in range(4)]
    idents = _together([lambda s=s: SiteIdentity.load_or_create(s, "hub") for s in stores])
    assert all(isinstance(i, SiteIdentity) for i in idents), idents
    assert len({i.pin for i in idents}) == 1
    assert len({cert_to_pem(i.gateway.cert) for i in idents}) == 1
    for i in idents:
        assert (i.pki_dir / "ca.key").stat().st_mode & 0o777 == 0o600
        assert i.gateway_chain_path.is_file()


def _sa_kubeconfig(c: KubeCluster, path: Path) -> Path:
    token = c.kubectl("create", "token", "meshlink", "-n", NS).stdout.strip()
    cfg = json.loads(c.kubeconfig.read_text())
    cfg["users"] = [{"name": "meshlink", "user": {"token": token}}]
    for ctx in cfg["contexts"]:
        ctx["context"]["user"] = "meshlink"
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    return path


def test_the_manifests_rbac_is_what_the_store_needs(
    kube_cluster: KubeCluster, tmp_path: Path
) -> None:
    """As meshlink's own ServiceAccount: its four Secrets can be created, read and updated;
    another name is refused (RBAC for reads, the admission policy for a create)."""
    c = kube_cluster
    c.kubectl("apply", "--server-side", "-k", str(REPO / "manifests"))
    store = _store(c, tmp_path / "sa", _sa_kubeconfig(c, tmp_path / "sa.kubeconfig"))

    def identity_or_none() -> SiteIdentity | None:
        try:
            return SiteIdentity.load_or_create(store, "hub")
        except Exception:
            return None

    ident = wait_until(identity_or_none, 30, "the identity created as meshlink's ServiceAccount")
    assert ident is not None
    links.create_token(ident, "192.0.2.1:7444")
    assert len(links.TOKENS.list(store)) == 1
    for doc in ("peers", "links"):
        update(store, doc, lambda f: f.setdefault("a.json", b"{}") == b"{}")
    c.kubectl("create", "secret", "generic", "other", "-n", NS, "--from-literal=k=v")  # an admin's
    status, _ = store.client.request("GET", f"/api/v1/namespaces/{NS}/secrets/other")
    assert status == 403
    status, _ = store.client.request("GET", f"/api/v1/namespaces/{NS}/secrets")
    assert status == 403  # no list
    attempts = iter(range(1000))

    def refused() -> str | None:
        try:
            store.write(f"evil{next(attempts)}", {"k": b"v"}, Doc())
        except StoreError as e:
            return str(e)
        return None  # the policy is not loaded yet: another name next time

    assert "its own state" in wait_until(refused, 30, "the policy to refuse another name")


def test_a_kubeconfig_with_a_plugin_is_one_clear_error(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "current-context": "x",
                "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
                "clusters": [{"name": "x", "cluster": {"server": "https://192.0.2.1:6443"}}],
                "users": [{"name": "x", "user": {"exec": {"command": "aws"}}}],
            }
        )
    )
    with pytest.raises(ConfigError, match="plugin") as e:
        SyncKube.from_config(KubernetesConfig(kubeconfig=kubeconfig))
    assert "\n" not in str(e.value)

"""Fixtures for end-to-end tests against real kube-apiservers (see tests/kube.py).

- `kube_bin` (session): the binaries of hack/kube-bin.sh, built on first use. A failed build
  fails the test with the build's output; it never skips.
- `kube_clusters` (factory): `clusters = kube_clusters(2)` starts two independent clusters in
  parallel and stops them at the end of the test; later calls continue the numbering (c3...).
- `kube_cluster`: one cluster.
- `kind_testbed` (session): three kind clusters running meshlink as pods (tests/kindbed.py),
  c1 with two worker nodes (the HA tests put its two meshlink replicas on separate nodes).
  A test on them that fails prints the end of every meshlink pod's log with its report.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kindbed import KindTestbed
from tests.kube import KubeBinaries, KubeCluster, KubeControlPlane, KubeError, kube_binaries
from tests.netbed.netns import require_root


@pytest.fixture(scope="session")
def kube_bin() -> KubeBinaries:
    try:
        return kube_binaries()
    except KubeError as e:
        pytest.fail(f"cannot provide the test control plane: {e}", pytrace=False)


@pytest.fixture
def kube_clusters(
    kube_bin: KubeBinaries, tmp_path: Path
) -> Iterator[Callable[[int], list[KubeCluster]]]:
    planes: list[KubeControlPlane] = []
    count = 0

    def start(n: int) -> list[KubeCluster]:
        nonlocal count
        cp = KubeControlPlane(n, tmp_path / "kube", first_index=count, binaries=kube_bin)
        planes.append(cp)
        count += n
        return cp.start()

    yield start
    for cp in reversed(planes):
        cp.close()


@pytest.fixture
def kube_cluster(kube_clusters: Callable[[int], list[KubeCluster]]) -> KubeCluster:
    return kube_clusters(1)[0]


# A socket left open to an API server is a failure here as everywhere (pyproject's
# filterwarnings = error). Collect at the end of each module so such a leak is reported in
# the module that made it, not in a later, unrelated test. (The intermittent "unclosed
# socket" of cancelled API requests was fixed in meshlink/k8s/api.py; see
# tests/e2e/test_k8s_api_sockets.py.)
@pytest.fixture(autouse=True, scope="module")
def _collect_leaked_sockets() -> Iterator[None]:
    yield
    gc.collect()


KIND_WORKERS = "2,0,0"
"""Worker nodes of c1, c2, c3 (hack/kind.sh up --workers)."""


@pytest.fixture(scope="session")
def kind_testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KindTestbed]:
    """Three kind clusters with meshlink deployed from manifests/ and linked (hack/kind.sh),
    c1 with two worker nodes besides its control plane (so that the anti-affinity of the
    manifests puts its two meshlink replicas on separate nodes: test_kind_ha.py), brought
    up once per test session and removed at its end. MESHLINK_TEST_KIND_KEEP=1
    keeps them for the next run, which then reuses them (for working on these tests)."""
    require_root()
    keep = os.environ.get("MESHLINK_TEST_KIND_KEEP") == "1"
    state = KindTestbed.kept_state() if keep else tmp_path_factory.mktemp("kind")
    if not keep:
        KindTestbed.teardown(state)  # what a killed earlier run may have left
    try:
        bed = KindTestbed.up(3, state, workers=KIND_WORKERS)
    except KubeError as e:
        KindTestbed.teardown(state)
        pytest.fail(f"cannot bring up the kind clusters: {e}", pytrace=False)
    print(f"\nkind: 3 clusters up, meshlink deployed and linked in {bed.up_seconds:.0f} s")
    try:
        yield bed
    finally:
        if not keep:
            KindTestbed.teardown(state)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test on the kind clusters carries the end of meshlink's logs there: the
    clusters are gone by the time anyone reads CI's output."""
    report: pytest.TestReport = yield  # type: ignore[misc]
    bed = getattr(item, "funcargs", {}).get("kind_testbed")
    if report.failed and isinstance(bed, KindTestbed):
        for c in bed.clusters[:2]:
            try:
                report.sections.append((f"meshlink logs in {c.name}", c.meshlink_logs()))
            except KubeError as e:
                report.sections.append((f"meshlink logs in {c.name}", f"unavailable: {e}"))
    return report  # type: ignore[return-value]

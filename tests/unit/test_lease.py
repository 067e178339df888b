"""Leader election (meshlink/k8s/lease.py) against an in-memory Lease with optimistic
writes: who may write when, on each replica's own clock."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from meshlink.errors import KubeError
from meshlink.k8s.api import NotFound, Resource
from meshlink.k8s.lease import LeaderElection


class FakeKube:
    """One Lease, resourceVersions checked like the API server's."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = None
        self.rv = 0
        self.down = False
        self.stale: dict[str, Any] | None = None
        """Answer the next get with this (an older version than the stored one)."""

    def _check(self) -> None:
        if self.down:
            raise KubeError("get Lease: connection refused (HTTP 0)")

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> Any:
        self._check()
        if self.stale is not None:
            stale, self.stale = self.stale, None
            return stale
        if self.obj is None:
            raise NotFound("404")
        return copy.deepcopy(self.obj)

    async def create(self, res: Resource, obj: Any, *, fenced: bool = True) -> Any:
        self._check()
        if self.obj is not None:
            raise KubeError("create Lease: already exists (HTTP 409)")
        self.rv += 1
        self.obj = {
            **copy.deepcopy(obj),
            "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)},
        }
        return copy.deepcopy(self.obj)

    async def replace(self, res: Resource, obj: Any, *, fenced: bool = True) -> Any:
        self._check()
        assert self.obj is not None
        if obj["metadata"]["resourceVersion"] != self.obj["metadata"]["resourceVersion"]:
            raise KubeError("update Lease: the object has been modified (HTTP 409)")
        self.rv += 1
        self.obj = {
            **copy.deepcopy(obj),
            "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)},
        }
        return copy.deepcopy(self.obj)

    def _store(self, obj: Any) -> Any:
        self.rv += 1
        meta = {**obj["metadata"], "resourceVersion": str(self.rv)}
        self.obj = {**copy.deepcopy(obj), "metadata": meta}
        return copy.deepcopy(self.obj)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _election(
    kube: FakeKube, name: str, clock: Clock, changes: list[bool] | None = None
) -> LeaderElection:
    return LeaderElection(
        kube,  # type: ignore[arg-type]
        "ns",
        name,
        duration=4.0,
        clock=clock,
        on_change=changes.append if changes is not None else None,
    )


async def test_one_holder_and_a_takeover_on_the_takers_clock() -> None:
    kube, ca, cb = FakeKube(), Clock(), Clock()
    changes: list[bool] = []
    a, b = _election(kube, "a", ca, changes), _election(kube, "b", cb)
    await a.step()
    await b.step()
    assert (a.leading(), b.leading()) == (True, False)
    assert changes == [True]
    # a renews as long as it can reach the API server: b never takes over.
    for _ in range(10):
        ca.now += 1.0
        cb.now += 1.0
        await a.step()
        await b.step()
    assert (a.leading(), b.leading()) == (True, False)
    # a can no longer renew: its right ends 2.4 s after its last renewal was sent...
    kube.down = True
    ca.now += 2.3
    await a.step()
    assert a.leading()
    ca.now += 0.2
    await a.step()
    assert not a.leading()
    assert changes == [True, False]
    # ... while b takes over only 4 s after it last saw the Lease change.
    kube.down = False
    cb.now += 3.9
    await b.step()
    assert not b.leading()
    cb.now += 0.2
    await b.step()
    assert b.leading()
    assert b.view.transitions == 1
    await a.step()
    assert not a.leading()
    assert a.view.holder == "b"


async def test_a_lost_race_is_no_write_right() -> None:
    """Two replicas see a handed-over Lease; the one whose update comes second carries a
    stale resourceVersion, is refused, and does not lead."""
    kube, ca, cb = FakeKube(), Clock(), Clock()
    a, b = _election(kube, "a", ca), _election(kube, "b", cb)
    await a.step()
    await a.release()
    assert kube.obj is not None
    seen_by_b = copy.deepcopy(kube.obj)
    await a.step()  # a takes it back first
    kube.stale = seen_by_b
    await b.step()  # b acts on the version it read: refused
    assert a.leading()
    assert not b.leading()
    assert kube.obj["spec"]["holderIdentity"] == "a"


async def test_release_hands_over_at_once() -> None:
    kube, ca, cb = FakeKube(), Clock(), Clock()
    a, b = _election(kube, "a", ca), _election(kube, "b", cb)
    await a.step()
    await b.step()
    await a.release()
    assert not a.leading()
    await b.step()
    assert b.leading()
    await a.release()  # not the holder: nothing to do
    assert kube.obj is not None
    assert kube.obj["spec"]["holderIdentity"] == "b"


def test_timings_must_nest() -> None:
    with pytest.raises(ValueError, match="retry < renew_deadline < duration"):
        LeaderElection(FakeKube(), "ns", "a", duration=4.0, renew_deadline=5.0)  # type: ignore[arg-type]

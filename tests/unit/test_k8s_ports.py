"""Gateway target-port allocation of Kubernetes imports (meshlink/k8s/ports.py)."""

from __future__ import annotations

import pytest

from meshlink.catalog.records import ServiceKey
from meshlink.k8s.ports import PortAllocator, PortOwner, PortsExhausted

WEB = ServiceKey("shop", "web")
API = ServiceKey("shop", "api")


def test_each_imported_port_gets_its_own_stable_port() -> None:
    a = PortAllocator(20000, 20009)
    web80 = a.get(PortOwner(WEB, "TCP", 80))
    api80 = a.get(PortOwner(API, "TCP", 80))
    web443 = a.get(PortOwner(WEB, "TCP", 443))
    assert len({web80, api80, web443}) == 3  # two imports on port 80 are told apart
    assert all(20000 <= p <= 20009 for p in (web80, api80, web443))
    assert a.get(PortOwner(WEB, "TCP", 80)) == web80  # asking again changes nothing
    assert a.owner_of(api80) == PortOwner(API, "TCP", 80)
    assert len(a) == 3


def test_seeded_ports_survive_a_restart_and_are_not_given_to_others() -> None:
    first = PortAllocator(20000, 20009)
    before = {k: first.get(PortOwner(k, "TCP", 80)) for k in (WEB, API)}
    # A restarted controller claims what the derived Services carry, then allocates.
    second = PortAllocator(20000, 20009)
    assert second.claim(PortOwner(API, "TCP", 80), before[API])
    assert second.claim(PortOwner(WEB, "TCP", 80), before[WEB])
    assert {k: second.get(PortOwner(k, "TCP", 80)) for k in (WEB, API)} == before
    new = second.get(PortOwner(ServiceKey("shop", "db"), "TCP", 5432))
    assert new not in before.values()


def test_claims_that_cannot_be_honoured_are_refused() -> None:
    a = PortAllocator(20000, 20009)
    assert not a.claim(PortOwner(WEB, "TCP", 80), 80)  # outside the range (an old Service)
    assert a.claim(PortOwner(WEB, "TCP", 80), 20005)
    assert not a.claim(PortOwner(API, "TCP", 80), 20005)  # someone else's
    assert not a.claim(PortOwner(WEB, "TCP", 80), 20006)  # the owner already has one
    assert a.claim(PortOwner(WEB, "TCP", 80), 20005)  # the same claim again is fine
    assert len(a) == 1


def test_release_and_retain_free_ports_for_reuse() -> None:
    a = PortAllocator(20000, 20001)
    a.get(PortOwner(WEB, "TCP", 80))
    keep = PortOwner(WEB, "TCP", 443)
    kept = a.get(keep)
    with pytest.raises(PortsExhausted, match=r"widen kubernetes\.importPorts"):
        a.get(PortOwner(API, "TCP", 80))
    a.retain(WEB, {keep})  # the import dropped port 80
    assert a.get(keep) == kept
    freed = a.get(PortOwner(API, "TCP", 80))
    assert freed != kept
    a.release(API)
    a.release(WEB)
    assert len(a) == 0
    assert a.owner_of(kept) is None

"""Catalog replication with several instances of one site (active/active, issue 12).

Each instance is its own speaker with its own version counter; a peer keeps one RIB-in per
linked instance. What these tests pin: losing one instance of a site while another stays
linked changes nothing anywhere (no update sent, the same ``services()``, so a platform
writes nothing), a dead instance's records that the live one lacks go at once (no ghost),
the newest content wins whichever instance brings it, and a path through another site
never beats a direct link because another instance stamped a higher version.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from meshlink.catalog.control import Update, decode, encode
from meshlink.catalog.records import ExportRecord, Port, ServiceKey, ServiceType
from meshlink.catalog.sync import Catalog, Send

Node = tuple[str, str]  # (site, instance)


def rec(origin: str, name: str = "web", port: int = 80) -> ExportRecord:
    return ExportRecord(
        origin=origin,
        namespace="demo",
        name=name,
        type=ServiceType.CLUSTERSET_IP,
        ports=(Port(port, "TCP", "http"),),
        created=1000.0,
        version=0,
        ready_endpoints=1,
    )


class Bus:
    """Catalogs of site instances joined by links, every message through the codec."""

    def __init__(self, *nodes: Node) -> None:
        self.cat = {n: Catalog(n[0], gateway_endpoints=[f"{n[0]}.gw:7443"]) for n in nodes}
        self.links: set[frozenset[Node]] = set()
        self.queue: deque[tuple[Node, Send]] = deque()
        self.sent: list[tuple[Node, Node, Update]] = []

    def post(self, sender: Node, sends: list[Send]) -> None:
        self.queue.extend((sender, s) for s in sends)

    def link(self, a: Node, b: Node) -> None:
        self.links.add(frozenset((a, b)))
        self.post(a, self.cat[a].peer_up(*b))
        self.post(b, self.cat[b].peer_up(*a))
        self.run()

    def kill(self, a: Node) -> None:
        for link in [link for link in self.links if a in link]:
            (other,) = link - {a}
            self.links.discard(link)
            self.post(other, self.cat[other].peer_down(*a))
        del self.cat[a]
        self.run()

    def run(self) -> None:
        for _ in range(10_000):
            if not self.queue:
                return
            sender, send = self.queue.popleft()
            to = (send.peer, send.instance)
            if frozenset((sender, to)) not in self.links or to not in self.cat:
                continue
            for part in encode(send.message):
                msg = decode(part)
                assert isinstance(msg, Update)
                self.sent.append((sender, to, msg))
                out, refused = self.cat[to].receive(sender[0], msg, sender[1])
                assert not refused
                self.post(to, out)
        raise AssertionError("catalog messages did not converge")


A1, A2, B, C = ("a", "a-1"), ("a", "a-2"), ("b", "b-1"), ("c", "c-1")
KEY = ServiceKey("demo", "web")


def two_instances_of_a(first: list[ExportRecord], second: list[ExportRecord]) -> Bus:
    """a-1 and a-2 (their own versions), both linked to b, which is linked to c."""
    bus = Bus(A1, A2, B, C)
    bus.post(A1, bus.cat[A1].set_local(first))
    bus.post(A2, bus.cat[A2].set_local(second))
    bus.link(A1, B)
    bus.link(A2, B)
    bus.link(B, C)
    return bus


def test_each_instance_link_gets_the_whole_catalog() -> None:
    bus = two_instances_of_a([rec("a")], [rec("a")])
    bus.post(C, bus.cat[C].set_local([rec("c", name="db")]))
    bus.run()
    for node in (A1, A2):
        assert ServiceKey("demo", "db") in bus.cat[node].services()
    assert bus.cat[B].peers() == ("a", "c")


def test_losing_one_instance_changes_nothing_anywhere() -> None:
    bus = two_instances_of_a([rec("a")], [rec("a")])
    v1 = bus.cat[A1].services()[KEY][0].version
    v2 = bus.cat[A2].services()[KEY][0].version
    assert v1 != v2  # each instance stamps its own version
    before = {n: bus.cat[n].services() for n in (B, C)}
    generations = {n: bus.cat[n].generation for n in (B, C)}
    routes = {n: bus.cat[n].sites() for n in (B, C)}
    for dead in (A1, A2):
        bus.sent.clear()
        bus.kill(dead)
        assert bus.sent == []  # no update at all, not even a version bump
        for n in (B, C):
            assert bus.cat[n].services() == before[n]
            assert bus.cat[n].generation == generations[n]
            assert bus.cat[n].sites() == routes[n]
            assert bus.cat[n].stale() == {}
        if dead == A1:  # and back: a new instance, the same content, nothing changes
            bus.cat[A1] = Catalog("a", gateway_endpoints=["a.gw:7443"])
            bus.post(A1, bus.cat[A1].set_local([rec("a")]))
            bus.link(A1, B)
            assert bus.cat[B].services() == before[B]
            assert [m for m in bus.sent if m[0] == B and m[1] != A1] == []  # but its snapshot


def test_a_dead_instances_records_the_live_one_lacks_go_at_once() -> None:
    # a-2 already saw db withdrawn; a-1 died before it did
    bus = two_instances_of_a([rec("a"), rec("a", name="db")], [rec("a")])
    assert ServiceKey("demo", "db") in bus.cat[C].services()  # the union meanwhile
    bus.kill(A1)
    for n in (B, C):
        assert set(bus.cat[n].services()) == {KEY}
        assert bus.cat[n].stale() == {}  # withdrawn at a reachable origin: no grace


def test_the_newest_content_wins_whichever_instance_brings_it() -> None:
    bus = two_instances_of_a([rec("a")], [rec("a")])
    bus.post(A2, bus.cat[A2].set_local([rec("a", port=8080)]))  # a-2 sees the change first
    bus.run()
    assert bus.cat[C].services()[KEY][0].ports[0].port == 8080
    bus.sent.clear()
    bus.post(A1, bus.cat[A1].set_local([rec("a", port=8080)]))  # a-1 catches up
    bus.run()
    assert [m for m in bus.sent if m[0] == B] == []  # b has that content already
    bus.kill(A2)
    assert bus.cat[C].services()[KEY][0].ports[0].port == 8080


def test_a_direct_link_beats_a_longer_path_with_another_instances_higher_version() -> None:
    """c links to a-1 directly, and to b, which links to a-2 (stamped later: a higher
    version of the same content). The best path to a stays the direct one."""
    bus = Bus(A1, B, C)
    bus.post(A1, bus.cat[A1].set_local([rec("a")]))
    bus.link(A1, C)
    bus.cat[A2] = Catalog("a", gateway_endpoints=["a.gw:7443"])  # created after a-1
    bus.post(A2, bus.cat[A2].set_local([rec("a")]))
    bus.link(A2, B)
    bus.link(B, C)
    assert bus.cat[C].next_hop("a") == "a"
    (web,) = bus.cat[C].services()[KEY]
    assert web.version == bus.cat[A1].services()[KEY][0].version
    route = bus.cat[C].route_to("a")
    assert route is not None
    assert route.path == ("a",)


def test_an_update_from_one_instance_replaces_only_that_instances_entries() -> None:
    bus = two_instances_of_a([rec("a")], [rec("a")])
    bus.post(A1, bus.cat[A1].set_local([]))  # a-1 withdraws; a-2 still exports
    bus.run()
    assert set(bus.cat[C].services()) == {KEY}
    bus.post(A2, bus.cat[A2].set_local([]))
    bus.run()
    assert bus.cat[C].services() == {}


def test_sends_name_the_instance_they_are_for() -> None:
    cat = Catalog("b")
    sends = cat.peer_up("a", "a-1") + cat.peer_up("a", "a-2")
    assert [(s.peer, s.instance) for s in sends] == [("a", "a-1"), ("a", "a-2")]
    sends = cat.set_local([dataclasses.replace(rec("a"), origin="b")])
    assert sorted((s.peer, s.instance) for s in sends) == [("a", "a-1"), ("a", "a-2")]
    assert cat.peer_down("a", "a-1") == []
    assert cat.peers() == ("a",)

"""Catalog replication (sans-IO): convergence, loop freedom, withdrawal, refusals.

Catalogs are joined by an in-memory message bus that encodes and decodes every message
with the control codec, as the tunnel does.
"""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlink.catalog.control import Update, decode, encode
from meshlink.catalog.records import (
    Endpoint,
    ExportRecord,
    Port,
    ServiceKey,
    ServiceType,
    record_to_wire,
)
from meshlink.catalog.sync import Catalog, Send


def rec(
    origin: str,
    name: str = "web",
    ns: str = "demo",
    port: int = 80,
    type: ServiceType = ServiceType.CLUSTERSET_IP,
    endpoints: tuple[Endpoint, ...] = (),
) -> ExportRecord:
    return ExportRecord(
        origin=origin,
        namespace=ns,
        name=name,
        type=type,
        ports=(Port(port, "TCP", "http"),),
        created=1000.0,
        version=0,
        ready_endpoints=1,
        endpoints=endpoints,
    )


class Bus:
    def __init__(self, *sites: str) -> None:
        self.cat = {s: Catalog(s) for s in sites}
        self.links: set[frozenset[str]] = set()
        self.queue: deque[tuple[str, Send]] = deque()
        self.refused: list[str] = []

    def post(self, sender: str, sends: list[Send]) -> None:
        self.queue.extend((sender, s) for s in sends)

    def link(self, a: str, b: str) -> None:
        self.links.add(frozenset((a, b)))
        self.post(a, self.cat[a].peer_up(b))
        self.post(b, self.cat[b].peer_up(a))
        self.run()

    def unlink(self, a: str, b: str) -> None:
        self.links.discard(frozenset((a, b)))
        self.post(a, self.cat[a].peer_down(b))
        self.post(b, self.cat[b].peer_down(a))
        self.run()

    def kill(self, a: str) -> None:
        for link in [link for link in self.links if a in link]:
            (other,) = link - {a}
            self.links.discard(link)
            self.post(other, self.cat[other].peer_down(a))
        del self.cat[a]
        self.run()

    def run(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if not self.queue:
                return
            sender, send = self.queue.popleft()
            if frozenset((sender, send.peer)) not in self.links or send.peer not in self.cat:
                continue  # link went down while the message was in flight
            for part in encode(send.message):
                msg = decode(part)
                assert isinstance(msg, Update)
                out, refused = self.cat[send.peer].receive(sender, msg)
                self.refused += refused
                self.post(send.peer, out)
        raise AssertionError("catalog messages did not converge (loop?)")

    def seen(self, at: str) -> dict[ServiceKey, tuple[str, ...]]:
        return {k: tuple(r.origin for r in v) for k, v in self.cat[at].services().items()}


KEY = ServiceKey("demo", "web")


def test_chain_a_b_c_reaches_two_hops_and_routes_via_b() -> None:
    bus = Bus("a", "b", "c")
    bus.post("a", bus.cat["a"].set_local([rec("a")]))
    bus.link("b", "a")
    bus.link("c", "b")
    assert bus.seen("c") == {KEY: ("a",)}
    assert bus.cat["c"].next_hop("a") == "b"
    assert bus.cat["c"].sites()["a"].path == ("b", "a")
    assert bus.cat["c"].route_to("a") == bus.cat["c"].sites()["a"]
    assert bus.cat["c"].route_to("c") == bus.cat["c"].sites()["c"]  # this site, no path
    assert bus.cat["c"].route_to("zz") is None
    assert bus.cat["a"].next_hop("c") == "b"
    assert not bus.refused


def test_updates_and_removals_propagate_as_deltas() -> None:
    bus = Bus("a", "b", "c")
    bus.link("a", "b")
    bus.link("b", "c")
    bus.post("a", bus.cat["a"].set_local([rec("a"), rec("a", name="db", port=5432)]))
    bus.run()
    assert set(bus.seen("c")) == {KEY, ServiceKey("demo", "db")}
    v1 = bus.cat["c"].services()[KEY][0].version
    bus.post("a", bus.cat["a"].set_local([rec("a", port=8080)]))
    bus.run()
    (r,) = bus.cat["c"].services()[KEY]
    assert r.ports[0].port == 8080
    assert r.version > v1
    assert ServiceKey("demo", "db") not in bus.seen("c")


def test_unchanged_local_set_sends_nothing() -> None:
    cat = Catalog("a")
    cat.peer_up("b")
    assert cat.set_local([rec("a")])
    assert cat.set_local([rec("a")]) == []


def test_withdrawn_when_no_path_remains_and_kept_while_one_does() -> None:
    bus = Bus("a", "b", "c")
    bus.post("a", bus.cat["a"].set_local([rec("a")]))
    for x, y in (("a", "b"), ("b", "c"), ("a", "c")):
        bus.link(x, y)
    assert bus.cat["c"].sites()["a"].hops == 1
    bus.unlink("a", "c")  # c still reaches a through b
    assert bus.seen("c") == {KEY: ("a",)}
    assert bus.cat["c"].next_hop("a") == "b"
    bus.kill("a")  # no path at all: withdrawn everywhere
    assert bus.seen("c") == {}
    assert bus.seen("b") == {}
    assert "a" not in bus.cat["c"].sites()


def test_multiple_origins_grouped_per_service() -> None:
    bus = Bus("a", "b", "c")
    bus.post("a", bus.cat["a"].set_local([rec("a")]))
    bus.post("c", bus.cat["c"].set_local([rec("c")]))
    bus.link("a", "b")
    bus.link("b", "c")
    for site in ("a", "b", "c"):
        assert bus.seen(site) == {KEY: ("a", "c")}


def test_large_snapshot_is_chunked() -> None:
    # One update per peer; the codec splits it by size (tests/unit/test_catalog_control.py).
    a = Catalog("a")
    a.set_local([rec("a", name=f"s{i}") for i in range(405)])
    sends = a.peer_up("b")
    parts = [p for s in sends for p in encode(s.message, limit=32 * 1024)]
    assert len(parts) > 1
    assert all(len(p) <= 32 * 1024 for p in parts)
    assert sum(len(m.add) for p in parts if isinstance(m := decode(p), Update)) == 406


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"path": ["b"], "rec": None}, "not an object"),
        ({"path": ["x"], "rec": {}}, "link is to b"),
        ({"path": ["b"], "rec": "REC_C"}, "direct peer carries a record of origin c"),
        ({"path": ["b", "z"], "rec": "REC_C"}, "path b>z carries a record of origin c"),
        ({"path": ["b"], "rec": "REC_A"}, "claims this site (a)"),
        ({"path": ["b", "b"], "rec": "REC_B"}, "loop"),
        ({"path": ["b"], "rec": "REC_B_LOOPBACK"}, "127.0.0.1 is loopback"),
        ({"path": ["b"], "rec": "REC_B_METADATA"}, "169.254.169.254 is loopback, link-local"),
        ({"path": [], "rec": "REC_B"}, "path must be a list"),
    ],
)
def test_refused_entries_name_their_cause(entry: dict[str, object], why: str) -> None:
    samples = {
        "REC_A": rec("a"),
        "REC_B": rec("b"),
        "REC_C": rec("c"),
        "REC_B_LOOPBACK": rec(
            "b", type=ServiceType.HEADLESS, endpoints=(Endpoint(("127.0.0.1",)),)
        ),
        "REC_B_METADATA": rec(
            "b", type=ServiceType.HEADLESS, endpoints=(Endpoint(("169.254.169.254",)),)
        ),
    }
    if isinstance(entry.get("rec"), str):
        entry = {**entry, "rec": record_to_wire(samples[entry["rec"]])}  # type: ignore[index]
    a = Catalog("a")
    a.peer_up("b")
    good = {"path": ["b"], "rec": record_to_wire(rec("b", name="ok"))}
    _, refused = a.receive("b", Update((entry, good)))
    assert len(refused) == 1
    assert why in refused[0], refused[0]
    assert list(a.services()) == [ServiceKey("demo", "ok")]  # the good entry still applied


def test_message_from_unlinked_peer_or_unknown_type_is_an_error() -> None:
    from meshlink.errors import CatalogError

    a = Catalog("a")
    with pytest.raises(CatalogError, match="no live link"):
        a.receive("b", Update())
    a.peer_up("b")
    with pytest.raises(CatalogError, match="unknown control message type"):
        decode(b'{"t": "bogus"}')


@settings(max_examples=60, deadline=None)
@given(
    edges=st.lists(
        st.tuples(st.sampled_from("abcde"), st.sampled_from("abcde")).filter(
            lambda e: e[0] != e[1]
        ),
        min_size=1,
        max_size=10,
        unique=True,
    ),
    exporters=st.sets(st.sampled_from("abcde"), min_size=1),
    cut=st.integers(min_value=0, max_value=9),
)
def test_random_topologies_converge_to_exactly_the_reachable_exports(
    edges: list[tuple[str, str]], exporters: set[str], cut: int
) -> None:
    bus = Bus(*"abcde")
    for s in exporters:
        bus.post(s, bus.cat[s].set_local([rec(s)]))
    uniq = list(dict.fromkeys(frozenset(e) for e in edges))
    for e in uniq:
        x, y = sorted(e)
        if frozenset((x, y)) not in bus.links:
            bus.link(x, y)
    if uniq:
        x, y = sorted(uniq[cut % len(uniq)])
        bus.unlink(x, y)
    for site in "abcde":
        # Reachability by graph search over the live links.
        seen, todo = {site}, [site]
        while todo:
            cur = todo.pop()
            for link in bus.links:
                if cur in link:
                    (nxt,) = link - {cur}
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
        expected = tuple(sorted(exporters & seen))
        got = bus.seen(site).get(KEY, ())
        assert got == expected, (site, bus.links)
        routes = bus.cat[site].sites()
        assert set(routes) == seen
        # The per-flow lookup agrees with the full walk, and knows no other site.
        assert {x: bus.cat[site].route_to(x) for x in "abcde"} == {
            x: routes.get(x) for x in "abcde"
        }


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"path": ["b"], "site": "x"}, "site entry is not an object"),
        ({"path": ["b"], "site": {"site": "b", "version": -1}}, "site version -1"),
        ({"path": ["b"], "site": {"site": "b", "version": True}}, "site version True"),
        ({"path": ["b"], "site": {"site": "b", "version": 1, "gw": "x"}}, "site gw must be"),
        ({"path": ["b"], "site": {"site": "B", "version": 1}}, "site id 'B' is not a DNS"),
        ({"path": ["b"]}, "entry has neither rec nor site"),
        ("x", "entry is not an object"),
    ],
)
def test_refused_site_entries_name_their_cause(entry: object, why: str) -> None:
    a = Catalog("a")
    a.peer_up("b")
    _, refused = a.receive("b", Update((entry,)))
    assert len(refused) == 1
    assert why in refused[0], refused[0]


def test_an_entry_whose_path_crosses_this_site_is_dropped_without_a_word() -> None:
    a = Catalog("a")
    a.peer_up("b")
    looped = {"path": ["b", "a", "c"], "rec": record_to_wire(rec("c"))}
    sends, refused = a.receive("b", Update((looped,)))
    assert (sends, refused) == ([], [])
    assert a.services() == {}


def test_local_records_must_be_ours_and_peers_are_listed() -> None:
    a = Catalog("a")
    with pytest.raises(ValueError, match="has origin b, not a"):
        a.set_local([rec("b")])
    a.peer_up("c")
    a.peer_up("b")
    assert a.peers() == ("b", "c")
    assert a.route_to("a") is not None
    assert a.route_to("zz") is None
    assert a.next_hop("a") is None  # this site: no hop


def test_an_unchanged_entry_is_not_advertised_again() -> None:
    bus = Bus("a", "b", "c")
    bus.link("a", "b")
    bus.link("b", "c")
    r = rec("a")
    bus.post("a", bus.cat["a"].set_local([r]))
    bus.run()
    # Same content again: the version stays, and nothing goes out.
    assert bus.cat["a"].set_local([r]) == []


# -- the grace period ----------------------------------------------------------------------


class GraceBus(Bus):
    """A Bus whose catalogs keep unreachable sites' records for 300 s of a fake clock."""

    def __init__(self, *sites: str) -> None:
        super().__init__(*sites)
        self.now = 0.0
        self.cat = {s: self.catalog(s) for s in sites}

    def catalog(self, site: str) -> Catalog:
        return Catalog(site, grace=300.0, clock=lambda: self.now)

    def restart(self, site: str, exports: list[ExportRecord], *peers: str) -> None:
        """``site`` comes back (a new process: a new catalog) with ``exports``."""
        self.cat[site] = self.catalog(site)
        self.post(site, self.cat[site].set_local(exports))
        for p in peers:
            self.link(site, p)

    def ready(self, at: str) -> dict[ServiceKey, tuple[tuple[str, int], ...]]:
        """Each service's origins with their ready endpoint counts."""
        return {
            k: tuple((r.origin, r.ready_endpoints) for r in v)
            for k, v in self.cat[at].services().items()
        }


def test_an_unreachable_site_keeps_its_names_not_its_endpoints_for_the_grace_period() -> None:
    bus = GraceBus("a", "b", "c")
    bus.post("a", bus.cat["a"].set_local([rec("a")]))
    bus.link("a", "b")
    bus.link("b", "c")
    assert bus.ready("c") == {KEY: (("a", 1),)}
    bus.kill("a")
    for site in ("b", "c"):  # b saw the link go, c saw b withdraw: both keep it, unready
        assert bus.ready(site) == {KEY: (("a", 0),)}
        assert "a" not in bus.cat[site].sites()
        assert bus.cat[site].route_to("a") is None
        assert bus.cat[site].stale() == {"a": (1, 300.0)}
    bus.now = 299.0
    assert not bus.cat["c"].expire()
    bus.now = 300.0
    gen = bus.cat["c"].generation
    assert bus.cat["c"].expire()
    assert bus.cat["c"].generation > gen
    assert bus.seen("c") == {}
    assert bus.cat["c"].stale() == {}


def test_a_restarted_origin_takes_over_its_records_without_a_withdrawal() -> None:
    bus = GraceBus("a", "b", "c")
    bus.post("a", bus.cat["a"].set_local([rec("a"), rec("a", name="db")]))
    bus.link("a", "b")
    bus.link("b", "c")
    bus.kill("a")
    assert bus.ready("c") == {KEY: (("a", 0),), ServiceKey("demo", "db"): (("a", 0),)}
    # a comes back without db (withdrawn while it was away): web is live again at once,
    # db goes at once (a is reachable and did not re-advertise it), nothing waits for
    # the grace period.
    bus.restart("a", [rec("a")], "b")
    for site in ("b", "c"):
        assert bus.ready(site) == {KEY: (("a", 1),)}
        assert bus.cat[site].stale() == {}


def test_an_export_withdrawn_at_its_reachable_origin_goes_at_once() -> None:
    bus = GraceBus("a", "b", "c")
    bus.post("a", bus.cat["a"].set_local([rec("a"), rec("a", name="db")]))
    bus.link("a", "b")
    bus.link("b", "c")
    bus.post("a", bus.cat["a"].set_local([rec("a")]))
    bus.run()
    assert bus.seen("c") == {KEY: ("a",)}
    assert bus.cat["c"].stale() == {}


def test_an_unlink_keeps_nothing() -> None:
    bus = GraceBus("a", "b", "c")
    bus.post("a", bus.cat["a"].set_local([rec("a")]))
    bus.post("c", bus.cat["c"].set_local([rec("c", name="db")]))
    bus.link("a", "b")
    bus.link("c", "b")
    bus.links.discard(frozenset("ab"))
    bus.post("b", bus.cat["b"].peer_down("a", unlinked=True))
    bus.post("a", bus.cat["a"].peer_down("b", unlinked=True))
    bus.run()
    assert bus.seen("b") == {ServiceKey("demo", "db"): ("c",)}
    assert bus.seen("a") == {KEY: ("a",)}
    # c heard only a withdrawal (an unreachable origin): it keeps a's record, until told
    # to forget it.
    assert bus.ready("c")[KEY] == (("a", 0),)
    assert bus.cat["c"].forget("a")
    assert KEY not in bus.seen("c")
    assert not bus.cat["c"].forget("a")


def test_a_fragmented_snapshot_is_applied_whole() -> None:
    """Fragments are held until the last: a site reachable again never looks as if it
    withdrew the records of a later fragment."""
    a, b = Catalog("a"), Catalog("b", grace=300.0)
    a.set_local([rec("a", name=f"s{i:03}") for i in range(300)])
    a.peer_up("b")
    b.peer_up("a")
    (send,) = a.peer_up("b")
    parts = [decode(p) for p in encode(send.message, limit=16 * 1024)]
    assert len(parts) > 2
    assert [m.more for m in parts if isinstance(m, Update)] == [True] * (len(parts) - 1) + [False]
    b.peer_down("a")
    b.peer_up("a")
    for m in parts[:-1]:
        assert isinstance(m, Update)
        assert b.receive("a", m) == ([], [])
        assert b.services() == {}
    assert isinstance(parts[-1], Update)
    b.receive("a", parts[-1])
    assert len(b.services()) == 300


def test_too_many_fragments_are_refused() -> None:
    from meshlink.errors import CatalogError

    b = Catalog("b")
    b.peer_up("a")
    for _ in range(64):
        b.receive("a", Update(more=True))
    with pytest.raises(CatalogError, match="more than 64 fragments"):
        b.receive("a", Update(more=True))
    b.receive("a", Update())  # a whole update again afterwards


@settings(max_examples=60, deadline=None)
@given(
    edges=st.lists(
        st.tuples(st.sampled_from("abcde"), st.sampled_from("abcde")).filter(
            lambda e: e[0] != e[1]
        ),
        min_size=1,
        max_size=10,
        unique=True,
    ),
    exporters=st.sets(st.sampled_from("abcde"), min_size=1),
    cut=st.integers(min_value=0, max_value=9),
)
def test_random_cuts_keep_every_name_and_only_reachable_endpoints(
    edges: list[tuple[str, str]], exporters: set[str], cut: int
) -> None:
    """After any cut, a site still lists every export it saw before, ready exactly when
    its origin is still reachable; healing the cut restores everything with no record
    ever missing in between; the grace period then removes nothing."""
    bus = GraceBus(*"abcde")
    for s in exporters:
        bus.post(s, bus.cat[s].set_local([rec(s)]))
    uniq = list(dict.fromkeys(frozenset(e) for e in edges))
    for e in uniq:
        x, y = sorted(e)
        bus.link(x, y)
    before = {s: dict(bus.ready(s)) for s in "abcde"}
    x, y = sorted(uniq[cut % len(uniq)])
    bus.unlink(x, y)
    for site in "abcde":
        seen = bus.cat[site].sites().keys()
        had = before[site].get(KEY, ())
        assert bus.ready(site).get(KEY, ()) == tuple((o, 1 if o in seen else 0) for o, _ in had), (
            site
        )
    bus.link(x, y)
    bus.now = 1000.0
    for site in "abcde":
        bus.cat[site].expire()
        assert bus.ready(site) == before[site]


def test_a_restarted_site_keeps_what_it_knew_for_the_rest_of_the_grace_period() -> None:
    bus = GraceBus("a", "b", "c")
    bus.post("a", bus.cat["a"].set_local([rec("a")]))
    bus.post("c", bus.cat["c"].set_local([rec("c", name="db")]))
    bus.link("a", "b")
    bus.link("c", "b")
    bus.links.discard(frozenset("ab"))  # a away for 100 s of the fake clock
    bus.post("b", bus.cat["b"].peer_down("a"))
    bus.run()
    bus.now = 100.0
    saved = bus.cat["b"].remembered(now=5000.0)
    assert sorted((d["rec"]["origin"], d["seen"]) for d in saved) == [("a", 4900.0), ("c", 5000.0)]
    b2 = bus.catalog("b")
    saved.append({"rec": {"origin": "x"}, "seen": 1.0})
    saved.append("junk")
    taken, refused = b2.restore(saved, now=5010.0)
    assert taken == 2
    assert len(refused) == 2
    st = b2.stale()
    assert st == {"a": (1, 100.0 + 190.0), "c": (1, 100.0 + 290.0)}
    assert {r.origin: r.ready_endpoints for v in b2.services().values() for r in v} == {
        "a": 0,
        "c": 0,
    }
    # c is back: its snapshot replaces its stale record; a's waits for a or its grace.
    bus.cat["b"] = b2
    bus.post("b", b2.peer_up("c"))
    bus.post("c", bus.cat["c"].peer_up("b"))
    bus.links.add(frozenset("bc"))
    bus.run()
    assert bus.ready("b")[ServiceKey("demo", "db")] == (("c", 1),)
    assert b2.stale() == {"a": (1, 290.0)}
    # Nothing is kept when the grace period is 0, nor what is past its grace period.
    assert Catalog("b").restore(saved, now=5010.0) == (0, [])
    assert bus.catalog("b").restore(saved, now=9999.0)[0] == 0


def test_a_restarted_origin_linked_before_it_knows_its_exports_withdraws_nothing() -> None:
    """A restarted site whose platform has not listed its exports yet when a link comes up
    (a Kubernetes controller's first list takes a while) says nothing until it has: an
    empty snapshot would make its peers withdraw every import, and recreate it a moment
    later with a new ClusterSetIP (seen on CI: test_restart_k8s)."""
    bus = GraceBus("a", "b")
    bus.post("a", bus.cat["a"].set_local([rec("a")]))
    bus.link("a", "b")
    bus.kill("a")
    assert bus.ready("b") == {KEY: (("a", 0),)}
    bus.cat["a"] = Catalog("a", grace=300.0, clock=lambda: bus.now, hold_until_local=True)
    bus.link("a", "b")  # before a's exports are known
    assert bus.ready("b") == {KEY: (("a", 0),)}  # kept, stale: a said nothing yet
    assert "a" not in bus.cat["b"].sites()
    assert bus.seen("a") == {}  # a hears b as usual
    assert "b" in bus.cat["a"].sites()
    bus.post("a", bus.cat["a"].set_local([rec("a")]))
    bus.run()
    assert bus.ready("b") == {KEY: (("a", 1),)}
    assert "a" in bus.cat["b"].sites()
    assert bus.cat["b"].stale() == {}


def test_a_holding_catalog_releases_one_snapshot_per_link_at_its_first_export_set() -> None:
    a = Catalog("a", hold_until_local=True)
    assert a.peer_up("b") == []
    assert a.peer_up("c") == []
    # An empty set is known too: each link gets the SiteInfo.
    assert [s.peer for s in a.set_local([])] == ["b", "c"]
    a2 = Catalog("a", hold_until_local=True)
    a2.peer_up("b")
    (send,) = a2.set_local([rec("a"), rec("a", name="db")])
    assert send.peer == "b"
    assert len(send.message.add) == 3  # SiteInfo and both records, in one update
    assert a2.set_local([rec("a"), rec("a", name="db")]) == []  # then deltas as usual

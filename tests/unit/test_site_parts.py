"""The parts of a running site, joined in memory: the control channel (two sites' channels
over a fake link), the router's policy, and the coalescing and periodic task helpers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest

from meshlink import links
from meshlink.catalog import control
from meshlink.catalog.records import ExportRecord, Port, ServiceKey, ServiceType
from meshlink.catalog.sync import Catalog
from meshlink.catalog.view import ListenerSpec
from meshlink.proto import FlowTarget
from meshlink.site import ControlChannel, CurrentIdentity, Metrics, Router
from meshlink.tasks import Coalescer, every, pace
from meshlink.tunnel import LocalRoute, NoRoute, PeerRoute

KEY = ServiceKey("shop", "web")


def rec(origin: str) -> ExportRecord:
    return ExportRecord(origin, "shop", "web", ServiceType.CLUSTERSET_IP, (Port(80),), 1.0, 0)


@dataclass
class Wire:
    """Two sites' gateways as far as their control channels can tell: frames queue and are
    delivered by ``flush``, as a link would, in order."""

    up: set[str] = field(default_factory=set)
    frames: deque[tuple[str, str, bytes]] = field(default_factory=deque)
    channels: dict[str, ControlChannel] = field(default_factory=dict)

    def end(self, site: str) -> End:
        return End(self, site)

    def flush(self) -> None:
        while self.frames:
            src, dst, payload = self.frames.popleft()
            self.channels[dst].control_received(src, "", payload)


@dataclass
class End:
    wire: Wire
    site: str

    def send_control(self, peer_site: str, payload: bytes, instance: str | None = None) -> bool:
        if peer_site not in self.wire.up:
            return False
        self.wire.frames.append((self.site, peer_site, payload))
        return True

    def broadcast_control(self, peer_site: str, payload: bytes) -> bool:
        return self.send_control(peer_site, payload)

    def instances(self, peer_site: str) -> list[str]:
        return [""] if peer_site in self.wire.up else []

    def live_peers(self) -> list[str]:
        return sorted(self.wire.up - {self.site})


class Platform:
    """What the channel feeds: the services it was last given."""

    def __init__(self) -> None:
        self.fed: list[Mapping[ServiceKey, Sequence[ExportRecord]]] = []
        self.unlinked: list[str] = []

    def catalog_changed(self, services: Mapping[ServiceKey, Sequence[ExportRecord]]) -> None:
        self.fed.append(services)


def channel(
    tmp_path: Path, site: str, wire: Wire, platform: Platform, grace: float = 0.0
) -> ControlChannel:
    ch = ControlChannel(
        Catalog(site, grace=grace),
        identity=CurrentIdentity(tmp_path / site, site),
        renewals=links.Renewals(tmp_path / site, lifetime=timedelta(hours=1)),
        metrics=Metrics(),
        on_services=platform.catalog_changed,
        on_unlinked=platform.unlinked.append,
    )
    ch.attach(wire.end(site))
    wire.channels[site] = ch
    return ch


def up(ch: ControlChannel, peer: str) -> None:
    """The gateway's events for a link with a peer that names no instance."""
    ch.link_up(peer)
    ch.instance_up(peer, "")


def down(ch: ControlChannel, peer: str, reason: str) -> None:
    ch.instance_down(peer, "", reason)
    ch.link_down(peer, reason)


async def until(cond: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Let the tasks run until ``cond()`` holds (bounded)."""
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_two_channels_replicate_exports_and_feed_their_platforms(tmp_path: Path) -> None:
    wire, pa, pb = Wire(), Platform(), Platform()
    a, b = channel(tmp_path, "a", wire, pa), channel(tmp_path, "b", wire, pb)
    tasks = [asyncio.create_task(ch.run(set)) for ch in (a, b)]
    try:
        await until(lambda: pa.fed and pb.fed, "the first feeds")
        assert pa.fed == [{}]
        assert pb.fed == [{}]  # the first (empty) view at once
        a.publish([rec("a")])
        wire.up |= {"a", "b"}
        up(a, "b")
        up(b, "a")
        wire.flush()
        await until(lambda: KEY in pb.fed[-1], "a's export fed to b's platform")
        assert [r.origin for r in pb.fed[-1][KEY]] == ["a"]
        assert b.catalog.next_hop("a") == "a"
        wire.up.clear()
        down(b, "a", "test")
        await until(lambda: pb.fed[-1] == {}, "withdrawn with the only path")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_platform_waits_for_the_peers_snapshots(tmp_path: Path) -> None:
    """A starting site hands its platform the catalog once every peer on record has sent
    its snapshot (a restarted controller would otherwise take every import for an
    orphan), or once the initial sync times out."""
    wire, pa, pb = Wire(), Platform(), Platform()
    a, b = channel(tmp_path, "a", wire, pa), channel(tmp_path, "b", wire, pb)
    b.publish([rec("b")])
    tasks = [asyncio.create_task(a.run(lambda: {"b"})), asyncio.create_task(b.run(set))]
    try:
        await until(lambda: pb.fed, "b's first feed (no peer on record)")
        await asyncio.sleep(0.05)
        assert not pa.fed
        assert not a.synced
        assert a.waiting_for == ("b",)
        wire.up |= {"a", "b"}
        up(a, "b")
        up(b, "a")
        wire.flush()
        await until(lambda: pa.fed, "a's first feed")
        assert a.synced
        assert [r.origin for r in pa.fed[0][KEY]] == ["b"]  # never an empty first view
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lonely, pl = channel(tmp_path, "c", wire, Platform()), Platform()
    lonely._on_services = pl.catalog_changed
    task = asyncio.create_task(lonely.run(lambda: {"z"}, sync_for=0.1))
    try:
        await until(lambda: pl.fed, "the first feed once the initial sync timed out")
        assert lonely.synced
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_an_unlink_is_told_and_keeps_nothing_in_a_grace_period(tmp_path: Path) -> None:
    wire, pa, pb = Wire(), Platform(), Platform()
    a = channel(tmp_path, "a", wire, pa, grace=300)
    b = channel(tmp_path, "b", wire, pb, grace=300)
    a.publish([rec("a")])
    wire.up |= {"a", "b"}
    up(a, "b")
    up(b, "a")
    wire.flush()
    assert [r.origin for r in b.catalog.services()[KEY]] == ["a"]
    a.unlink("b")
    wire.flush()
    assert pb.unlinked == ["a"]
    wire.up.clear()
    down(a, "b", "link deleted")
    down(b, "a", "peer closed the link")
    assert b.catalog.services() == {}
    a.unlink("b")  # once only
    assert pb.unlinked == ["a"]
    # An outage instead keeps a's records for the grace period, unready.
    c = channel(tmp_path, "c", wire, Platform(), grace=300)
    wire.up |= {"a", "c"}
    up(a, "c")
    up(c, "a")
    wire.flush()
    wire.up.clear()
    down(c, "a", "no heartbeat")
    assert [(r.origin, r.ready_endpoints) for r in c.catalog.services()[KEY]] == [("a", 0)]
    c.unlink("a")  # deleted while a was unreachable: forgotten at once
    assert c.catalog.services() == {}


async def test_a_burst_of_changes_feeds_the_platform_once(tmp_path: Path) -> None:
    wire, pa = Wire(), Platform()
    a = channel(tmp_path, "a", wire, pa)
    task = asyncio.create_task(a.run(set))
    try:
        await until(lambda: pa.fed, "the first feed")
        for i in range(10):
            a.publish([dataclasses.replace(rec("a"), name=f"s{i}")])
        await until(lambda: len(pa.fed) > 1, "the burst fed")
        assert len(pa.fed) == 2
        assert list(pa.fed[-1]) == [ServiceKey("shop", "s9")]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_bad_control_messages_are_one_line_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wire = Wire()
    a = channel(tmp_path, "a", wire, Platform())
    caplog.set_level(logging.WARNING)
    a.control_received("b", "", b"not json")
    a.control_received("b", "", b'{"t": "update"}')  # b has no live link
    (frame,) = control.encode(control.RenewRequest("csr"))
    a.control_received("b", "", frame)  # b is no peer of a
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert all(line.startswith("bad control message from b: ") for line in lines)
    assert "not JSON" in lines[0]
    assert "no live link" in lines[1]
    assert "not a peer" in lines[2]


class FakePlatform:
    def __init__(self) -> None:
        self.served: dict[tuple[str, str, int], tuple[str, int]] = {}

    def local_endpoint(self, namespace: str, name: str, port: int) -> tuple[str, int] | None:
        return self.served.get((namespace, name, port))


def test_router_serves_here_forwards_to_the_next_hop_or_says_why_not() -> None:
    cat = Catalog("a")
    cat.peer_up("b")
    for m in control.encode(Catalog("b").peer_up("a")[0].message):
        msg = control.decode(m)
        assert isinstance(msg, control.Update)
        cat.receive("b", msg)
    platform = FakePlatform()
    platform.served[("shop", "web", 80)] = ("10.0.0.1", 8080)
    router = Router("a", cat, platform)  # type: ignore[arg-type]
    assert router.route(FlowTarget("a", "shop", "web", 80)) == LocalRoute("10.0.0.1", 8080)
    assert router.route(FlowTarget("a", "shop", "web", 81)) == NoRoute(
        "shop/web:81 is not served here"
    )
    assert router.route(FlowTarget("b", "shop", "web", 80)) == PeerRoute("b")
    assert router.route(FlowTarget("c", "shop", "web", 80)) == NoRoute("no live path to site c")


def test_router_candidates_prefer_this_site_then_hops_then_rtt() -> None:
    # a - b, a - c, and d behind b: a's candidates for origins d, c, b, a, z.
    sites = {s: Catalog(s) for s in "abcd"}
    edges = [("a", "b"), ("a", "c"), ("b", "d")]
    queue: deque[tuple[str, control.ControlMessage, str]] = deque()
    for x, y in edges:
        queue += [(x, s.message, s.peer) for s in sites[x].peer_up(y)]
        queue += [(y, s.message, s.peer) for s in sites[y].peer_up(x)]
    while queue:
        src, message, dst = queue.popleft()
        assert isinstance(message, control.Update)
        sends, _ = sites[dst].receive(src, message)
        queue += [(dst, s.message, s.peer) for s in sends]

    class Rtts:
        def rtt_ms(self, peer: str) -> float | None:
            return {"b": 5.0, "c": 1.0}.get(peer)

    router = Router("a", sites["a"], FakePlatform())  # type: ignore[arg-type]
    router.attach(Rtts())
    spec = ListenerSpec(KEY, "127.0.0.1", 80, 80, ("d", "b", "c", "a", "z"))
    assert [t.site for t in router.candidates(spec)] == ["a", "c", "b", "d"]
    assert {(t.namespace, t.name, t.port) for t in router.candidates(spec)} == {("shop", "web", 80)}


async def test_coalescer_runs_once_per_burst_and_sees_the_latest_state() -> None:
    seen: list[int] = []
    state = [0]
    gate = asyncio.Event()

    async def job() -> None:
        seen.append(state[0])
        await gate.wait()

    c = Coalescer(job)
    task = asyncio.create_task(c.run())
    try:
        await asyncio.sleep(0)
        assert seen == []  # asleep until woken
        state[0] = 1
        c.wake()
        await until(lambda: seen, "the first run")
        assert seen == [1]  # running, blocked on the gate
        for i in range(2, 6):  # a burst while it runs
            state[0] = i
            c.wake()
        gate.set()
        await until(lambda: len(seen) > 1, "the second run")
        assert seen == [1, 5]  # one more run, with the latest state
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_pace_waits_as_long_as_the_run_took_at_most_a_second() -> None:
    assert pace(0.02) == 0.02
    assert pace(3.0) == 1.0


async def test_every_runs_a_job_on_its_interval() -> None:
    calls: list[float] = []
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def job() -> None:
        calls.append(loop.time())
        if len(calls) == 3:
            done.set()

    task = asyncio.create_task(every(0.05, job, first=0.02))
    try:
        t0 = loop.time()
        await asyncio.wait_for(done.wait(), 5)
        assert calls[0] - t0 >= 0.02
        assert calls[2] - calls[0] >= 0.1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

"""Every flow end passes the same conformance suite (tests/ends.py): here a Flow joined to
a Flow, and StreamEnds over two Links joined in memory (no sockets, no TLS)."""

from __future__ import annotations

import asyncio

import pytest

from meshlink.proto import FlowTarget
from meshlink.tunnel.splice import Flow, join
from tests import ends

pytestmark = pytest.mark.timeout(60)


async def test_flow_pair_conforms() -> None:
    await ends.check_end_pair(ends.flow_pair, bound=Flow.LIMIT + 65536)


async def test_stream_ends_over_a_link_conform() -> None:
    window = 1 << 20
    await ends.check_end_pair(
        lambda: ends.stream_pair(stream_window=window), bound=window + (1 << 20)
    )


async def test_a_small_stream_is_not_stuck_behind_a_bulk_one() -> None:
    """The link's round robin over the in-memory transport: while a bulk stream keeps the
    link's buffer full, a small request still gets through after a quantum or so of it."""
    async with ends.memory_links(stream_window=8 << 20, high=64 * 1024) as (la, _lb, owner):
        bulk_end = la.open_stream(FlowTarget("b", "ns", "bulk", 80), 0)
        bulk = Flow()
        join(bulk, bulk_end)
        bulk_end.start()
        bulk_far = await asyncio.wait_for(owner.accepted.get(), 5)
        got = 0
        total = 4 << 20

        async def read_bulk() -> None:
            nonlocal got
            while chunk := await bulk_far.read():
                got += len(chunk)

        async def write_bulk() -> None:
            for _ in range(total // 65536):
                bulk.write(b"B" * 65536)
                await bulk.drain()
                await asyncio.sleep(0)  # one read of a socket per loop iteration, as a TcpEnd
            bulk.write_eof()

        tasks = [asyncio.create_task(read_bulk()), asyncio.create_task(write_bulk())]
        try:
            async with asyncio.timeout(10):
                while got < 256 * 1024:  # the bulk flow is well under way
                    await asyncio.sleep(0.001)
            small_end = la.open_stream(FlowTarget("b", "ns", "small", 80), 0)
            small = Flow()
            join(small, small_end)
            small_end.start()
            small.write(b"ping")
            small.write_eof()
            far = await asyncio.wait_for(owner.accepted.get(), 5)
            at_open = got
            assert await asyncio.wait_for(far.read_all(), 5) == b"ping"
            behind = got - at_open
            assert behind < 1 << 20, f"the small stream waited for {behind} bulk bytes"
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
            assert got == total
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

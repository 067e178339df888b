"""The flow-end conformance suite (tests/ends.py) for TcpEnds over a loopback socket."""

from __future__ import annotations

import pytest

from tests import ends

pytestmark = pytest.mark.timeout(60)


async def test_tcp_ends_conform() -> None:
    # Loopback socket buffers (autotuned, several MiB each way) are part of the pair.
    await ends.check_end_pair(ends.tcp_pair, bound=64 << 20)

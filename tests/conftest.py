"""Test-suite wiring: markers by folder, and a guard that fails tests leaving tasks behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

_KINDS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in _KINDS:
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fail any async test that leaves tasks running on its loop (kopf's habit)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # pragma: no cover - sync tests
        yield
        return
    before = asyncio.all_tasks(loop)
    yield
    leftover = {t for t in asyncio.all_tasks(loop) - before if not t.done()}
    leftover.discard(asyncio.current_task())  # type: ignore[arg-type]
    if leftover:
        deadline = loop.time() + 2.0
        while leftover and loop.time() < deadline:
            await asyncio.sleep(0.01)
            leftover = {t for t in leftover if not t.done()}
    if leftover:
        for t in leftover:
            t.cancel()
        pytest.fail(f"test left {len(leftover)} task(s) running: {sorted(map(repr, leftover))[:3]}")

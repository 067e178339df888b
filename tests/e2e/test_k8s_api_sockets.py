"""No socket to the API server outlives its event loop, even when the server is unresponsive.

Regression test for the intermittent ``ResourceWarning: unclosed <socket ...>`` of the e2e
runs: a watch cancelled at controller stop was closed with ``resp.close()``, which starts a
TLS shutdown that waits for the server's close_notify. Under load the loop ended first and
the socket was never closed; a request cancelled in flight (closed inside aiohttp) did the
same. A SIGSTOPped kube-apiserver makes both deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import config as kconfig

from meshlink.k8s.api import NAMESPACE, Kube
from meshlink.k8s.watch import ApiHealth, Watcher
from tests.kube import KubeCluster, wait_until

pytestmark = pytest.mark.timeout(60)


def _signal_apiserver(cluster: KubeCluster, sig: signal.Signals) -> None:
    """Send `sig`; for SIGSTOP and SIGCONT, return once every thread of the API server has
    stopped or resumed (a loaded machine delivers a group stop late: the server once
    answered a request sent after the signal)."""
    proc = cluster._procs.apiserver
    assert proc is not None
    os.kill(proc.pid, sig)
    if sig not in (signal.SIGSTOP, signal.SIGCONT):
        return

    def states() -> set[str]:
        found = set()
        for stat in Path(f"/proc/{proc.pid}/task").glob("*/stat"):
            try:
                found.add(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue  # a thread that just exited
        return found

    stopped = sig == signal.SIGSTOP
    wait_until(
        lambda: (states() <= {"T", "t"}) if stopped else not (states() & {"T"}),
        10,
        f"kube-apiserver {'stopped' if stopped else 'resumed'}",
    )


async def cancel_watch_then_stall(cluster: KubeCluster) -> None:
    """Open a watch, stop the API server (SIGSTOP: it answers nothing, not even the TLS
    close_notify), then cancel the watch and close the client, as a controller stop does.
    The caller resumes the server only after the event loop has ended."""
    api = await kconfig.new_client_from_config(str(cluster.kubeconfig))
    try:
        kube = Kube(api, 5.0)
        watcher = Watcher(kube, NAMESPACE, lambda *_: None, ApiHealth(cluster.name))
        task = asyncio.create_task(watcher.run())
        await asyncio.wait_for(watcher.synced.wait(), 20)
        await asyncio.wait_for(_watching(kube), 10)
        _signal_apiserver(cluster, signal.SIGSTOP)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await api.close()


async def _watching(kube: Kube) -> None:
    while kube.requests["watch namespaces"] < 1:
        await asyncio.sleep(0.01)
    # The generator has the response once the watch request counts; give it the loop turn.
    await asyncio.sleep(0.1)


def assert_no_socket_left(
    cluster: KubeCluster, scenario: Callable[[KubeCluster], Coroutine[Any, Any, None]]
) -> None:
    """Run ``scenario`` in an event loop of its own three times (without the fixes, every
    round leaked), resume the API server only after the loop ended, and collect: no
    ResourceWarning may come out."""
    for _ in range(3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            try:
                asyncio.run(scenario(cluster))
            finally:
                _signal_apiserver(cluster, signal.SIGCONT)
            gc.collect()
        leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert leaks == []


def test_a_cancelled_watch_leaves_no_socket_behind(kube_cluster: KubeCluster) -> None:
    assert_no_socket_left(kube_cluster, cancel_watch_then_stall)


async def cancel_request_on_stalled_server(cluster: KubeCluster) -> None:
    """A request in flight (sent, no answer yet) cancelled while the API server is stopped:
    aiohttp closes that connection itself, before meshlink ever sees a response."""
    api = await kconfig.new_client_from_config(str(cluster.kubeconfig))
    try:
        kube = Kube(api, 5.0)
        await kube.list(NAMESPACE)  # a pooled, warmed-up connection
        _signal_apiserver(cluster, signal.SIGSTOP)
        task = asyncio.create_task(kube.get(NAMESPACE, "default"))
        while kube.requests["get Namespace"] < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the request is on the wire, waiting for headers
        assert not task.done()  # cancelled in flight, not after an answer
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await api.close()


def test_a_cancelled_request_leaves_no_socket_behind(kube_cluster: KubeCluster) -> None:
    assert_no_socket_left(kube_cluster, cancel_request_on_stalled_server)

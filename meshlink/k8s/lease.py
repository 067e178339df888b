"""One writer among a site's replicas: a ``coordination.k8s.io/v1`` Lease in meshlink's
namespace (``meshlink-leader``), as client-go's leader election does it.

Every replica runs ``LeaderElection.run``. The holder renews the Lease every ``retry``
seconds; the others read it as often and take it over (an update carrying the
resourceVersion they read, so two candidates cannot both win) once it has not changed for
``duration`` seconds *on their own clock* (never comparing clocks across machines). A
replica that stops gracefully hands the Lease over at once (``release``).

The fence, not the Lease, is what keeps a second writer out. A holder may write only until
``renew_deadline`` seconds after it *sent* its last successful renewal (``leading``), and
every write of the controller checks that first (``Kube(fence=...)``). Another replica can
only take over ``duration`` seconds after it *saw* that renewal, which is later still: so
the old holder's right to write ends ``duration - renew_deadline`` seconds (the margin)
before anyone else's begins, whatever happened to it meanwhile. A holder paused by SIGSTOP
for 10 s wakes with its right long expired: its pending reconciles see ``leading`` false
and write nothing; it learns it lost on its next read of the Lease. The residual risk is
the one every lease-based fence has: a write whose check passed and that then waited more
than the margin before reaching the API server (a process frozen between the check and
the send), which is why the margin is seconds and the check sits right before each request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from meshlink.errors import KubeError
from meshlink.k8s.api import Kube, NotFound, Resource
from meshlink.k8s.model import Obj

log = logging.getLogger(__name__)

LEASE: Final = Resource("coordination.k8s.io", "v1", "leases", "Lease")
LEASE_NAME: Final = "meshlink-leader"


def _micro_time(epoch: float) -> str:
    """metav1.MicroTime, as a Lease's times are."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))
    return f"{whole}.{int(epoch % 1 * 1e6):06d}Z"


def replica_id() -> str:
    """This replica's name: the pod's (POD_NAME from the downward API, else the host name,
    which is the pod name in a pod)."""
    return os.environ.get("POD_NAME") or socket.gethostname() or f"pid-{os.getpid()}"


class Conflict(KubeError):
    """409: another replica wrote the Lease first."""


@dataclass(frozen=True, slots=True)
class LeaseView:
    """The Lease as last read: who holds it, since how many hand-overs."""

    holder: str | None
    transitions: int
    renewed: str | None
    """renewTime as written by the holder (its clock: shown, never compared)."""


class LeaderElection:
    """See the module docstring. ``on_change(leading)`` is called on every transition."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        identity: str,
        *,
        duration: float = 4.0,
        renew_deadline: float | None = None,
        retry: float | None = None,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.identity = identity
        self.duration = duration
        self.renew_deadline = renew_deadline if renew_deadline is not None else duration * 0.6
        self.retry = retry if retry is not None else duration / 8
        if not 0 < self.retry < self.renew_deadline < duration:
            raise ValueError("leader election needs 0 < retry < renew_deadline < duration")
        self._on_change = on_change
        self._clock = clock
        self._valid_until = 0.0
        self._was_leading = False
        self._seen: tuple[Any, ...] | None = None
        self._seen_at = 0.0
        self.view = LeaseView(None, 0, None)
        self.renewals = 0
        """Successful renewals (and acquisitions) by this replica."""

    # -- the fence -------------------------------------------------------------------------

    def leading(self) -> bool:
        """Whether this replica may write now (see the module docstring)."""
        return self._clock() < self._valid_until

    def _transition(self) -> None:
        now = self.leading()
        if now != self._was_leading:
            self._was_leading = now
            if now:
                log.info("leader: this replica (%s) writes for the site now", self.identity)
            else:
                log.warning(
                    "leader: this replica (%s) stopped writing (lease %s)",
                    self.identity,
                    f"held by {self.view.holder}"
                    if self.view.holder and self.view.holder != self.identity
                    else "not renewed in time",
                )
            if self._on_change is not None:
                self._on_change(now)

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Acquire, renew, or watch the Lease until cancelled; hand it over on the way out."""
        try:
            while True:
                await self.step()
                left = self._valid_until - self._clock()
                await asyncio.sleep(self.retry if left <= 0 else min(self.retry, left))
                self._transition()  # a renewal that failed for too long ends the right
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.release())

    async def step(self) -> None:
        """One look at the Lease: renew it, take it over, or note who holds it."""
        sent = self._clock()
        try:
            lease = await self._get()
            if lease is None:
                await self._write(None, sent, acquire=True)
            else:
                self._observe(lease)
                holder = self.view.holder
                expired = self._clock() - self._seen_at > self.duration
                if holder == self.identity or not holder or expired:
                    await self._write(lease, sent, acquire=holder != self.identity)
        except Conflict:
            self._seen = None  # someone else wrote it: read again at the next step
        except KubeError as e:
            log.debug("leader election: %s", e)
        self._transition()

    async def release(self) -> None:
        """Give the Lease up if this replica holds it (a clean stop): the next replica
        takes it at its next look instead of waiting ``duration``."""
        if not self._was_leading and not self.leading():
            return
        self._valid_until = 0.0
        self._transition()
        try:
            lease = await self._get()
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            spec = dict(lease.get("spec") or {})
            spec.update(holderIdentity=None, leaseDurationSeconds=1)
            await self._put({**lease, "spec": spec})
            log.info("leader: lease handed over (this replica is stopping)")
        except KubeError as e:
            log.info("leader: could not hand the lease over (%s); it expires by itself", e)

    # -- requests ------------------------------------------------------------------------

    def _observe(self, lease: Obj) -> None:
        spec = lease.get("spec") or {}
        key = (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"))
        if key != self._seen:
            self._seen, self._seen_at = key, self._clock()
        self.view = LeaseView(
            holder=spec.get("holderIdentity") or None,
            transitions=int(spec.get("leaseTransitions") or 0),
            renewed=spec.get("renewTime"),
        )

    async def _get(self) -> Obj | None:
        try:
            return await self.kube.get(LEASE, LEASE_NAME, self.namespace)
        except NotFound:
            return None

    async def _write(self, lease: Obj | None, sent: float, *, acquire: bool) -> None:
        now = _micro_time(time.time())
        spec: dict[str, Any] = dict((lease or {}).get("spec") or {})
        transitions = int(spec.get("leaseTransitions") or 0)
        if acquire:
            spec.update(acquireTime=now, leaseTransitions=transitions + (lease is not None))
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=max(1, round(self.duration)),
            renewTime=now,
        )
        if lease is None:
            body: Obj = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": LEASE_NAME, "namespace": self.namespace},
                "spec": spec,
            }
            written = await self._create(body)
        else:
            written = await self._put({**lease, "spec": spec})
        # The right to write runs from when the renewal was sent, not from its answer.
        self._valid_until = sent + self.renew_deadline
        self.renewals += 1
        self._observe(written)
        if acquire:
            log.info(
                "leader: %s acquired the lease (transition %d)",
                self.identity,
                self.view.transitions,
            )

    async def _create(self, body: Obj) -> Obj:
        try:
            return await self.kube.create(LEASE, body, fenced=False)
        except KubeError as e:
            if "already exists" in str(e) or "409" in str(e):
                raise Conflict(str(e)) from None
            raise

    async def _put(self, lease: Obj) -> Obj:
        try:
            return await self.kube.replace(LEASE, lease, fenced=False)
        except KubeError as e:
            if "409" in str(e) or "the object has been modified" in str(e):
                raise Conflict(str(e)) from None
            raise

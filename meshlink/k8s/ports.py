"""Gateway target ports of imports: which port of the gateway pods carries which import.

A derived Service's endpoints are the gateway pods, so its ``targetPort`` is all that
tells the gateway which import a connection is for (kube-proxy DNATs on the client's node; the
original ClusterIP is gone by the time the connection reaches the pod). Every imported TCP
port (service, protocol, port) therefore gets a gateway port of its own from the configured
range. The allocation is recorded where it is used, in the derived Service's
``targetPort``: a restarted controller seeds this table from the derived Services it finds
before it reconciles anything, so no import changes port across restarts.

Pure bookkeeping, no I/O.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from meshlink.catalog.records import ServiceKey
from meshlink.errors import MeshlinkError


class PortsExhausted(MeshlinkError):
    """Every port of the import range is taken."""


class PortOwner(NamedTuple):
    key: ServiceKey
    protocol: str
    port: int


class PortAllocator:
    """Allocate gateway ports from ``[first, last]``, one per ``PortOwner``."""

    def __init__(self, first: int, last: int) -> None:
        if not 0 < first <= last <= 65535:
            raise ValueError(f"bad port range {first}-{last}")
        self.first, self.last = first, last
        self._by_owner: dict[PortOwner, int] = {}
        self._by_port: dict[int, PortOwner] = {}
        self._by_key: dict[ServiceKey, set[PortOwner]] = {}

    def __len__(self) -> int:
        return len(self._by_owner)

    def claim(self, owner: PortOwner, port: int) -> bool:
        """Record an allocation found on the API server. False (and nothing recorded) if the
        port is outside the range or already someone else's, or the owner has another."""
        if not self.first <= port <= self.last:
            return False
        if self._by_port.get(port, owner) != owner or self._by_owner.get(owner, port) != port:
            return False
        self._add(owner, port)
        return True

    def _add(self, owner: PortOwner, port: int) -> None:
        self._by_owner[owner] = port
        self._by_port[port] = owner
        self._by_key.setdefault(owner.key, set()).add(owner)

    def get(self, owner: PortOwner) -> int:
        """The owner's port, allocated now if it has none. The search starts at a point
        derived from the owner, so a port freed by one import is rarely the next one's."""
        port = self._by_owner.get(owner)
        if port is not None:
            return port
        size = self.last - self.first + 1
        if len(self._by_port) >= size:
            raise PortsExhausted(
                f"all {size} import ports {self.first}-{self.last} are in use; widen "
                "kubernetes.importPorts"
            )
        digest = hashlib.sha256(f"{owner.key}/{owner.protocol}/{owner.port}".encode()).digest()
        start = int.from_bytes(digest[:4], "big") % size
        for i in range(size):
            cand = self.first + (start + i) % size
            if cand not in self._by_port:
                self._add(owner, cand)
                return cand
        raise AssertionError("unreachable: a free port was counted")

    def retain(self, key: ServiceKey, owners: set[PortOwner]) -> None:
        """Release the ports of ``key`` whose owner is not in ``owners``."""
        mine = self._by_key.get(key, set())
        for owner in [o for o in mine if o not in owners]:
            del self._by_port[self._by_owner.pop(owner)]
            mine.discard(owner)
        if not mine:
            self._by_key.pop(key, None)

    def release(self, key: ServiceKey) -> None:
        """Release every port of one imported service."""
        self.retain(key, set())

    def owner_of(self, port: int) -> PortOwner | None:
        return self._by_port.get(port)

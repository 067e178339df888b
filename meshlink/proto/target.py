"""FlowTarget: where a tunnelled flow goes (site, namespace, service name, port, protocol).

This is the payload of an OPEN frame; the rest of meshlink imports it from `meshlink.proto`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from meshlink.names import PROTOCOLS

MAX_HOPS: Final = 8
"""A flow may cross at most this many relaying gateways (stops relay loops)."""

_MAX_FIELD: Final = 253


@dataclass(frozen=True, slots=True)
class FlowTarget:
    """The service port a flow is for, as named in the clusterset."""

    site: str
    """Site id of the exporting site the flow should reach."""
    namespace: str
    name: str
    port: int
    """The exported (service) port, not the endpoint's target port."""
    protocol: str = "TCP"

    def problem(self) -> str | None:
        """What is wrong with this target for the wire, or None when it can be sent."""
        for field_name in ("site", "namespace", "name"):
            value: str = getattr(self, field_name)
            if not value:
                return f"{field_name} is empty"
            if len(value.encode("utf-8", "surrogatepass")) > _MAX_FIELD:
                return f"{field_name} is longer than {_MAX_FIELD} bytes"
        if not 1 <= self.port <= 65535:
            return f"port {self.port} is not in 1..65535"
        if self.protocol not in PROTOCOLS:
            return f"protocol {self.protocol!r} is not one of {sorted(PROTOCOLS)}"
        return None

    def __str__(self) -> str:
        return f"{self.name}.{self.namespace}@{self.site}:{self.port}/{self.protocol}"

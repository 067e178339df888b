"""The clusterset's catalog as the controller last received it: the live export records of
every service (ours included) and their merge. Both reconcilers read it: imports are made
from the merge, and an export is Ready once the catalog carries it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meshlink.catalog.merge import MergedService, merge
from meshlink.catalog.records import ExportRecord, ServiceKey


class ClustersetCatalog:
    def __init__(self) -> None:
        self.records: dict[ServiceKey, tuple[ExportRecord, ...]] = {}
        self.merged: dict[ServiceKey, MergedService] = {}

    def update(self, records: Mapping[ServiceKey, Sequence[ExportRecord]]) -> list[ServiceKey]:
        """Take a new catalog; returns the services whose records changed."""
        new = {k: tuple(sorted(v, key=lambda r: r.origin)) for k, v in records.items() if v}
        old = self.records
        changed = [k for k, v in new.items() if old.get(k) != v]
        changed.extend(k for k in old if k not in new)
        self.records = new
        for key in changed:
            recs = new.get(key)
            if recs:
                self.merged[key] = merge(recs)
            else:
                self.merged.pop(key, None)
        return changed

    def carries(self, rec: ExportRecord) -> bool:
        """Whether the catalog has an export of ``rec``'s service from ``rec``'s origin."""
        return any(r.origin == rec.origin for r in self.records.get(rec.key, ()))

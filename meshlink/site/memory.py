"""The catalog's memory across restarts: the other sites' export records this site knew,
kept in ``<stateDir>/catalog.json`` (0600, written atomically, at most every few seconds
and at a clean stop), taken back as stale records when the site starts (``Catalog.restore``).

So an importer restarted while an exporter is away still serves that exporter's names and
clusterset IPs for what is left of the grace period, and in Kubernetes mode keeps its
ServiceImports, derived Services and EndpointSlices (their endpoints not ready) instead of
deleting them. With no grace period (``importGracePeriod: 0``) nothing is kept.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Final

from meshlink.catalog.sync import Catalog
from meshlink.errors import MeshlinkError
from meshlink.pki.files import atomic_write

log = logging.getLogger(__name__)

FILE: Final = "catalog.json"
SAVE_EVERY: Final = 5.0
"""Seconds between saves (when the catalog changed): a killed site loses at most that."""


class CatalogMemory:
    """See the module docstring."""

    def __init__(self, state_dir: Path, catalog: Catalog) -> None:
        self.path = Path(state_dir) / FILE
        self._catalog = catalog
        self._saved = -1  # the catalog generation last saved

    def load(self) -> None:
        """Take back what the last run knew (a missing or damaged file: nothing)."""
        if self._catalog.grace <= 0:
            return
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("%s is unreadable (%s): the last run's imports are not kept", self.path, e)
            return
        records = data.get("records") if isinstance(data, dict) else None
        if not isinstance(records, list):
            log.warning("%s holds no records list: the last run's imports are not kept", self.path)
            return
        taken, refused = self._catalog.restore(records, time.time())
        if refused:
            log.warning("%s: %d records refused (first: %s)", self.path, len(refused), refused[0])
        if taken:
            sites = sorted(self._catalog.stale())
            log.info(
                "kept %d exports of %s from the last run, for what is left of their grace "
                "period, until their sites are back",
                taken,
                ", ".join(sites),
            )

    def save(self) -> None:
        """Write the catalog down if it changed since the last save (a periodic job)."""
        if self._catalog.grace <= 0 or self._catalog.generation == self._saved:
            return
        generation = self._catalog.generation
        body = {"records": self._catalog.remembered(time.time())}
        try:
            atomic_write(self.path, json.dumps(body, separators=(",", ":")).encode(), 0o600)
        except (MeshlinkError, OSError) as e:
            log.warning("cannot keep the catalog in %s: %s", self.path, e)
            return
        self._saved = generation

"""What /metrics says, read from real `meshlink run` processes the way Prometheus reads it."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from tests.sites import SiteProc, sites, wait_until

pytestmark = pytest.mark.timeout(90)

EXPORT = {
    "name": "svc",
    "namespace": "test",
    "ports": [{"port": 9000, "targetPort": 1}],
    "endpoints": ["127.0.0.1"],
}


def metric_samples(site: SiteProc, name: str) -> dict[str, float]:
    """Every sample of metric family ``name``, keyed by its full sample text before the value."""
    url = f"http://127.0.0.1:{site.ports['ops']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_propagation_counts_from_the_link_up_not_from_the_export(tmp_path: Path) -> None:
    """An export 4 s older than the link reaches the peer right after the link comes up:
    the histogram records that short delay, not the export's age."""
    with sites(tmp_path, ("a", [EXPORT]), ("b", [])) as (a, b):
        started = time.monotonic()
        wait_until("a's export to be 4 s old", lambda: time.monotonic() - started > 4, 10)
        b.link_to(a)
        wait_until("b imports a's export", lambda: b.import_addr("test/svc"))
        h = "meshlink_catalog_propagation_seconds"
        samples = metric_samples(b, h)
        count = samples[f"{h}_count"]
        assert count >= 1
        # Every observation below 2.5 s (the record itself is >= 4 s old at that point).
        assert samples[f'{h}_bucket{{le="2.5"}}'] == count, samples

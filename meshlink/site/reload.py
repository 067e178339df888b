"""A running site's configuration read again on SIGHUP (``reload``).

What applies at once: the exports and namespaces of local mode (the platform publishes the
new exports and recomputes its imports; links and flows stay up) and the grace period.
Anything else that changed is named in one line, as needing a restart, and left as it
was. A file that does not parse is one ERROR line, and the site keeps its configuration.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Final

from meshlink.catalog.sync import Catalog
from meshlink.catalog.view import Platform
from meshlink.config import SiteConfig, load
from meshlink.errors import MeshlinkError

log = logging.getLogger(__name__)

LIVE: Final = frozenset({"exports", "namespaces", "import_grace_period", "source"})
"""The SiteConfig fields a reload applies (``source`` only names the file)."""


def reload(path: Path, current: SiteConfig, platform: Platform, catalog: Catalog) -> SiteConfig:
    """Read ``path`` again and apply what can be (see the module docstring); returns the
    configuration in force afterwards."""
    try:
        new = load(path)
    except MeshlinkError as e:
        log.error("SIGHUP: the configuration is not reloaded (the site keeps its own): %s", e)
        return current
    later = sorted(
        f.name
        for f in dataclasses.fields(SiteConfig)
        if f.name not in LIVE and getattr(new, f.name) != getattr(current, f.name)
    )
    if later:
        log.warning(
            "SIGHUP: %s changed; that takes a restart (`meshlink run` again) and is not applied",
            ", ".join(later),
        )
        new = dataclasses.replace(
            current,
            exports=new.exports,
            namespaces=new.namespaces,
            import_grace_period=new.import_grace_period,
        )
    catalog.grace = new.import_grace_period
    try:
        platform.reload(new)
    except MeshlinkError as e:
        log.error("SIGHUP: the configuration is not reloaded: %s", e)
        return current
    log.info("SIGHUP: configuration reloaded from %s (%d export(s))", path, len(new.exports))
    return new

"""What a site's configuration asks for: the platform (local mode, or Kubernetes mode,
imported only then: kubernetes_asyncio is heavy), the store of its state (the state
directory, or Secrets) and this process's instance id."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from typing import Final

from meshlink.catalog.view import Platform
from meshlink.config import SiteConfig
from meshlink.errors import MeshlinkError
from meshlink.local.site import LocalSite
from meshlink.store import FileStore, Store

log = logging.getLogger(__name__)

STATE_REFRESH: Final = 1.0
"""Seconds between reads of a shared state store (Secrets): what `kubectl exec` on another
replica wrote is seen within that."""


def make_platform(config: SiteConfig, components: frozenset[str]) -> Platform:
    if config.kubernetes is None:
        return LocalSite(config)
    from meshlink.k8s.platform import KubernetesPlatform

    return KubernetesPlatform(config, controller="controller" in components)


def instance_id(config: SiteConfig) -> str:
    """This process's instance id (``gateway.instance``, else the pod name in Kubernetes
    mode, which the Lease names the replica by too, else a random id per process)."""
    if config.instance:
        return config.instance
    if config.kubernetes is not None:
        from meshlink.k8s.lease import replica_id

        return re.sub(r"[^A-Za-z0-9._-]", "-", replica_id())[:253]
    return secrets.token_hex(4)


def open_store(config: SiteConfig) -> Store:
    """Secrets (Kubernetes mode with ``kubernetes.state: secrets``), else the state
    directory."""
    kube = config.kubernetes
    if kube is None or kube.state != "secrets":
        return FileStore(config.state_dir)
    from meshlink.k8s.secrets import SecretStore, SyncKube

    return SecretStore(SyncKube.from_config(kube), kube.namespace, config.state_dir)


async def follow_store(store: Store) -> None:
    """Keep a shared store's cache fresh, until cancelled (returns at once for a directory,
    which every reader reads itself)."""
    if isinstance(store, FileStore):
        return
    store.caching = True
    while True:
        try:
            await asyncio.to_thread(store.refresh)
        except MeshlinkError as e:
            log.warning("site state: %s", e)
        await asyncio.sleep(STATE_REFRESH)

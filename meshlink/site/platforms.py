"""The platform a site's configuration asks for: local mode, or Kubernetes mode (imported
only then: kubernetes_asyncio is heavy)."""

from __future__ import annotations

from meshlink.catalog.view import Platform
from meshlink.config import SiteConfig
from meshlink.local.site import LocalSite


def make_platform(config: SiteConfig, components: frozenset[str]) -> Platform:
    if config.kubernetes is None:
        return LocalSite(config)
    from meshlink.k8s.platform import KubernetesPlatform

    return KubernetesPlatform(config, controller="controller" in components)

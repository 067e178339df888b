"""Kubernetes mode: the MCS ServiceExport/ServiceImport controller (kubernetes_asyncio)."""

from meshlink.k8s.controller import Controller
from meshlink.k8s.platform import KubernetesPlatform

__all__ = ["Controller", "KubernetesPlatform"]

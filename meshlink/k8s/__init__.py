"""Kubernetes mode: the MCS ServiceExport/ServiceImport controller (kubernetes_asyncio)."""

from meshlink.k8s.controller import Controller

__all__ = ["Controller"]

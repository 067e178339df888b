"""Kubernetes mode: the MCS ServiceExport/ServiceImport controller (kubernetes_asyncio)."""

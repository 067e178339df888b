"""Fixtures of the integration tests: a test backend (tests/backends.py) per test."""

from tests.backends import backend

__all__ = ["backend"]

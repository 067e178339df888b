"""meshlink test suite (a package so tests can share helpers: `from tests.kube import ...`)."""

"""meshlink: cross-cluster service discovery and connectivity over mTLS tunnels.

Package layout follows the architecture (see README "Architecture"); imports go one way:
cli -> runtime -> {k8s, local, tunnel, dns, ops} -> {catalog, proto, pki} -> {errors, config, log}.
"""

__version__ = "0.1.0"

"""The gateway data plane: TLS links, dialer with backoff, heartbeats, TCP flow forwarding."""

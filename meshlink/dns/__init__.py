"""The clusterset.local DNS server: sans-IO answering from snapshots, thin UDP/TCP servers."""

"""The clusterset.local DNS server: sans-IO answering from snapshots, thin UDP/TCP servers.

``build_snapshot`` (snapshot.py) turns the import view into an immutable zone (a
``SnapshotBuilder`` does it again and again, reusing unchanged services), ``answer``
(answer.py) answers one query from it, ``DnsServer`` (server.py) serves it over UDP and TCP,
``load_services`` (static.py) reads records files, ``serve``/``serve_file`` (run.py) run it
on its own.
"""

from meshlink.dns.answer import answer
from meshlink.dns.run import serve, serve_file, start_server
from meshlink.dns.server import DnsServer
from meshlink.dns.snapshot import Snapshot, SnapshotBuilder, build_snapshot, dashed_ip
from meshlink.dns.static import load_services, parse_services

__all__ = [
    "DnsServer",
    "Snapshot",
    "SnapshotBuilder",
    "answer",
    "build_snapshot",
    "dashed_ip",
    "load_services",
    "parse_services",
    "serve",
    "serve_file",
    "start_server",
]

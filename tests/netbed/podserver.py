"""A "pod" for the testbed: an HTTP server that answers every GET with its own name.

    python -m tests.netbed.podserver --name NAME --bind IP --port PORT [--ready-file PATH]

The body is exactly NAME (no newline), so a client can tell which endpoint answered. Every
response closes its connection, so each request is a new TCP connection and takes a fresh
load-balancing decision. The ready file is written once the socket listens.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import signal
import socketserver
import sys
from pathlib import Path
from types import FrameType


def _handler(name: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(name)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(name)
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the address up in DNS (getfqdn), which inside a
        # namespace without a resolver waits for a timeout; the name is not needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="podserver", description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--ready-file", type=Path)
    args = p.parse_args(argv)
    server = _Server((args.bind, args.port), _handler(args.name.encode()))

    def stop(signum: int, frame: FrameType | None) -> None:
        server.server_close()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    if args.ready_file is not None:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(f"{args.bind}:{server.server_address[1]}\n")
        tmp.replace(args.ready_file)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever(poll_interval=0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

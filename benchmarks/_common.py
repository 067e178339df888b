"""Shared benchmark helpers: free loopback ports, waiting for a port, apt installs, reading
wrk's output, the side-by-side table and the JSON output. Generic on purpose: any benchmark
may use it.

Benchmarks run the real tools (iperf3, wrk, dnsperf, ...) and compare meshlink against a
reference measured in the same run; performance is reported here, never asserted in tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free a moment ago on `host` (the caller binds it soon after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until a TCP connect to host:port succeeds, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


def ensure_tools(tools: Mapping[str, str]) -> None:
    """Install the Debian packages of missing tools ({binary: package}) with apt-get."""
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if not missing:
        return
    print(f"installing {' '.join(missing)} with apt-get ...", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*prefix, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*prefix, "apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def cpu_s(pid: int) -> float:
    """user + system CPU seconds (all threads) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_result(out: str, label: str) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) from the output of `wrk --latency` (NaN where missing);
    socket errors and non-2xx answers are printed to stderr, after `wrk <label>:`."""
    if "Non-2xx" in out or "Socket errors" in out:
        errs = re.findall(r"(Non-2xx.*|Socket errors.*)", out)
        print(f"wrk {label}: {'; '.join(errs)}", file=sys.stderr)
    return (
        _grab(r"Requests/sec:\s+([\d.]+)", out),
        _ms(_grab_str(r"\s50%\s+([\d.]+\w+)", out)),
        _ms(_grab_str(r"\s99%\s+([\d.]+\w+)", out)),
    )


def _grab(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else float("nan")


def _grab_str(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else ""


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


NGINX_PAGE = 612
"""nginx's default page size: the body the request benchmarks fetch."""


def nginx_config(workdir: Path, listen: str) -> Path:
    """A one-worker nginx serving a NGINX_PAGE-byte page on ``listen`` (HOST:PORT), with
    every file under ``workdir``; returns the config (run ``nginx -c CONF -p WORKDIR``)."""
    www = workdir / "www"
    www.mkdir()
    workdir.chmod(0o711)  # nginx workers run as nobody: let them reach www/
    www.chmod(0o755)
    (www / "index.html").write_text("x" * NGINX_PAGE)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf_text(str(workdir), listen))
    return conf


def nginx_conf_text(workdir: str, listen: str) -> str:
    """The config of `nginx_config`, for a ``workdir`` that holds ``www/index.html``."""
    return f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen {listen} backlog=4096;
        root {workdir}/www;
    }}
}}
"""


def http_setup_times(host: str, port: int, count: int) -> tuple[list[float], int]:
    """``count`` times: connect, send one GET, read the whole NGINX_PAGE body, close.
    Returns the times (ms) of the successful ones and the number of failures."""
    req = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    times: list[float] = []
    failures = 0
    for _ in range(count):
        t0 = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(req)
                got = b""
                # The whole body, not NGINX_PAGE bytes of headers and body.
                while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < NGINX_PAGE:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
        except OSError:
            failures += 1
            continue
        times.append((time.perf_counter() - t0) * 1000)
    return times, failures


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN (a failed run)
    return statistics.median(vals) if vals else float("nan")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of `values` (pct in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def load_line() -> str:
    """The machine's load average, to print next to the numbers (shared machines vary)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load: unknown"
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def ratio(a: float, b: float) -> str:
    if b != b or a != a or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned text table on stdout."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        pairs = enumerate(zip(row, widths, strict=True))
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in pairs))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_json(path: str | Path | None, data: Mapping[str, object]) -> None:
    """Write `data` as JSON to `path` (if given); NaN becomes null."""
    if not path:
        return
    clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in data.items()}
    Path(path).write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}", file=sys.stderr)

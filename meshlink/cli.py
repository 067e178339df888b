"""The command line: parses arguments and hands off; prints one line per expected error.

Every MeshlinkError becomes ``meshlink: <message>`` on stderr and exit code 1; usage
errors exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any

from meshlink import __version__, config, log
from meshlink.errors import ConfigError, MeshlinkError

DEFAULT_CONFIG = os.environ.get("MESHLINK_CONFIG", "/etc/meshlink/site.yaml")
_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``7d``."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 2h or 7d")
    n, unit = int(m.group(1)), m.group(2)
    return timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]: n})


def _run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    import uvloop

    return uvloop.run(coro)


def _load(args: argparse.Namespace) -> config.SiteConfig:
    return config.load(args.config)


def _state(cfg: config.SiteConfig) -> Any:
    """The site's state store (the state directory, or Secrets in Kubernetes mode)."""
    from meshlink.site.platforms import open_store

    return open_store(cfg)


# -- commands ------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from meshlink import runtime

    cfg = _load(args)
    log.setup(args.log_level, args.log_format, cfg.site)
    comps = frozenset(c.strip() for c in args.components.split(",") if c.strip())
    unknown = comps - runtime.ALL_COMPONENTS
    if unknown:
        raise ConfigError(
            f"unknown component(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(runtime.ALL_COMPONENTS))}",
            key="--components",
        )
    _run_async(runtime.run_site(cfg, comps, Path(args.config)))
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from meshlink import links

    cfg = _load(args)
    out = links.cmd_token_create(
        cfg,
        expiry=args.expiry,
        uses=args.uses,
        output=Path(args.output) if args.output else None,
        state=_state(cfg),
    )
    print(out, file=sys.stderr if args.output else sys.stdout)
    return 0


def cmd_link_create(args: argparse.Namespace) -> int:
    from meshlink import links

    cfg = _load(args)
    print(_run_async(links.cmd_link_create(cfg, args.token, name=args.name, state=_state(cfg))))
    return 0


def cmd_link_delete(args: argparse.Namespace) -> int:
    from meshlink import links

    cfg = _load(args)
    print(
        links.cmd_link_delete(cfg, args.name, _state(cfg))
        + "; a running site drops it within a second"
    )
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from meshlink.links import commands

    cfg = _load(args)
    print(commands.cmd_token_list(cfg, _state(cfg)))
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from meshlink.links import commands

    cfg = _load(args)
    print(commands.cmd_token_revoke(cfg, args.token_id, _state(cfg)))
    return 0


def cmd_link_list(args: argparse.Namespace) -> int:
    from meshlink.links import commands

    cfg = _load(args)
    print(commands.cmd_link_list(cfg, _state(cfg)))
    return 0


def cmd_peer_list(args: argparse.Namespace) -> int:
    from meshlink.links import commands

    cfg = _load(args)
    print(commands.cmd_peer_list(cfg, _state(cfg)))
    return 0


def cmd_peer_revoke(args: argparse.Namespace) -> int:
    from meshlink.links import commands

    cfg = _load(args)
    print(commands.cmd_peer_revoke(cfg, args.site, _state(cfg)))
    return 0


def _status_url(args: argparse.Namespace) -> str:
    return str(args.url) if args.url else f"http://{_load(args).ops_listen}"


def cmd_status(args: argparse.Namespace) -> int:
    from meshlink import status

    url = _status_url(args)
    data = status.fetch(url)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        k = data.get("kubernetes") or {}
        print(status.render(data))
        for line in status.render_replicas(status.replicas(data, url), k.get("leader")):
            print(line)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from meshlink import status

    url = _status_url(args)
    data = status.fetch(url)
    results = status.check(data) + status.probes(data)
    k = data.get("kubernetes") or {}
    results += status.check_replicas(
        status.replicas(data, url), k.get("leader"), elected="replica" in k
    )
    probed = status.fetch_probes(url)
    if probed is not None:
        results += status.check_exports(probed)
    for verdict, line in results:
        print(f"{verdict}  {line}")
    return 1 if any(verdict == "FAIL" for verdict, _ in results) else 0


def cmd_dns(args: argparse.Namespace) -> int:
    from meshlink import runtime

    log.setup(args.log_level, args.log_format)
    listen = config.parse_hostport(args.listen, "--listen")
    _run_async(
        runtime.run_dns(args.records, listen.host, listen.port, zone=args.zone, ttl=args.ttl)
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meshlink import demo

    code: int = _run_async(demo.run(keep=args.keep, verbose=args.verbose))
    return code


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshlink",
        description="Cross-cluster service discovery and connectivity over mTLS tunnels.",
    )
    p.add_argument("--version", action="version", version=f"meshlink {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        fn: Callable[[argparse.Namespace], int],
        help: str,
        *,
        cfg: bool = True,
        parent: Any = sub,
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        if cfg:
            sp.add_argument(
                "-c",
                "--config",
                default=DEFAULT_CONFIG,
                help=f"site config file (default {DEFAULT_CONFIG}, or $MESHLINK_CONFIG)",
            )
        return sp

    def group(name: str, help: str) -> Any:
        return sub.add_parser(name, help=help).add_subparsers(
            dest="sub", required=True, metavar="SUBCOMMAND"
        )

    def logging_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--log-level", default="info", choices=["debug", "info", "warning", "error"]
        )
        sp.add_argument("--log-format", default="text", choices=["text", "json"])

    sp = add("run", cmd_run, "run a site (gateway, catalog, DNS, grant endpoint, ops server)")
    sp.add_argument(
        "--components",
        default="gateway,controller,dns,ops,grant",
        help="comma-separated subset of gateway,controller,dns,ops,grant",
    )
    logging_opts(sp)

    token = group("token", "link tokens")
    sp = add(
        "create", cmd_token_create, "create a link token for another site to redeem", parent=token
    )
    sp.add_argument(
        "--expiry",
        type=parse_duration,
        default=timedelta(minutes=15),
        help="how long the token is valid (default 15m)",
    )
    sp.add_argument("--uses", type=int, default=1, help="how many sites may redeem it (default 1)")
    sp.add_argument("-o", "--output", help="write the token to this file (0600) instead of stdout")
    add(
        "list",
        cmd_token_list,
        "list tokens issued by this site (never their secrets)",
        parent=token,
    )
    sp = add(
        "revoke",
        cmd_token_revoke,
        "revoke an unredeemed token",
        parent=token,
    )
    sp.add_argument("token_id")

    link = group("link", "links to other sites")
    sp = add("create", cmd_link_create, "redeem a token: link this site to its issuer", parent=link)
    sp.add_argument("token", help="token file, '-' for stdin, or the token text")
    sp.add_argument("--name", help="link name (default: the issuer's site id)")
    add("list", cmd_link_list, "list the links this site dials", parent=link)
    sp = add("delete", cmd_link_delete, "delete a link this site dials", parent=link)
    sp.add_argument("name")

    peer = group("peer", "sites that redeemed our tokens")
    add("list", cmd_peer_list, "list peers allowed to link to this site", parent=peer)
    sp = add(
        "revoke",
        cmd_peer_revoke,
        "revoke a peer: its link is dropped and refused",
        parent=peer,
    )
    sp.add_argument("site")

    for name, fn, help in (
        ("status", cmd_status, "one screen: links, RTT, sites, exports, imports"),
        ("check", cmd_check, "check the site's health; exit 1 if anything fails"),
    ):
        sp = add(name, fn, help)
        sp.add_argument("--url", help="ops URL of the site (default: from the config)")
        if name == "status":
            sp.add_argument("--json", action="store_true", help="print the raw status JSON")

    sp = add("dns", cmd_dns, "serve clusterset DNS from a records file (standalone)", cfg=False)
    sp.add_argument("--records", required=True, help="YAML/JSON file of imported services")
    sp.add_argument("--listen", default="127.0.0.1:5353")
    sp.add_argument("--zone", default=config.DEFAULT_ZONE)
    sp.add_argument("--ttl", type=int, default=config.DEFAULT_TTL)
    logging_opts(sp)

    sp = add(
        "demo",
        cmd_demo,
        "three sites on loopback, linked by tokens, one service 2 hops away",
        cfg=False,
    )
    sp.add_argument("--keep", action="store_true", help="keep the demo's state directory")
    sp.add_argument("-v", "--verbose", action="store_true", help="show the sites' logs")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.fn(args)
        return code
    except MeshlinkError as e:
        print(f"meshlink: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

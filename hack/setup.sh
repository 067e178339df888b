#!/usr/bin/env bash
# Set up a machine for meshlink: Debian packages (as root, only what is missing) and the
# project's virtualenv (.venv) with meshlink installed editable.
#   hack/setup.sh            what the demo needs (Python 3.11+, venv, meshlink)
#   hack/setup.sh --test     plus what the tests need (DNS clients, iproute2, iptables, ...)
#   hack/setup.sh --bench    plus what the benchmarks need (stunnel4, iperf3, wrk, nginx,
#                            unbound, dnsperf)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

want_test=0
want_bench=0
for arg in "$@"; do
	case "$arg" in
	--test) want_test=1 ;;
	--bench) want_test=1 want_bench=1 ;;
	*) echo "setup: unknown option $arg" >&2; exit 2 ;;
	esac
done

pkgs=()
need() { # need BINARY PACKAGE
	command -v "$1" >/dev/null 2>&1 || pkgs+=("$2")
}
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
	{ echo "setup: meshlink needs Python >= 3.11 (found $(python3 --version))" >&2; exit 1; }
python3 -c 'import venv, ensurepip' 2>/dev/null || pkgs+=(python3-venv)
if [ "$want_test" = 1 ]; then
	need dig dnsutils
	need kdig knot-dnsutils
	need ip iproute2
	need iptables iptables
	need go golang-go
	need curl curl
	need socat socat
	need openssl openssl
fi
if [ "$want_bench" = 1 ]; then
	need stunnel4 stunnel4
	need iperf3 iperf3
	need wrk wrk
	need nginx nginx-light
	need unbound unbound
	need dnsperf dnsperf
fi
if [ ${#pkgs[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "setup: missing Debian packages: ${pkgs[*]} (run as root, or: sudo apt-get install ${pkgs[*]})" >&2
		exit 1
	fi
	echo "setup: installing ${pkgs[*]}" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
	# The Debian packages start services on install where systemd runs; the tests and
	# benchmarks start their own instances on loopback ports instead.
fi

if [ ! -x .venv/bin/python ]; then
	python3 -m venv .venv
fi
extras=""
[ "$want_test" = 1 ] && extras="[dev]"
stamp=".venv/.meshlink-installed${extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
	.venv/bin/pip install -q --upgrade pip >/dev/null
	.venv/bin/pip install -q -e ".${extras}"
	touch "$stamp"
fi

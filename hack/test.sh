#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: first the fast loop (hack/check.sh:
# lint, types, import contracts, unit tests with coverage), then pytest on the rest
# (integration on loopback, e2e against real kube-apiservers built from the official Go
# modules and cached under ${MESHLINK_CACHE:-~/.cache/meshlink}).
# Extra arguments go to that pytest instead, e.g. `bash hack/test.sh tests/e2e -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "== the fast loop: hack/check.sh" >&2
bash hack/check.sh
echo "== control plane (kube-apiserver, etcd, kubectl; cached by version)" >&2
bash hack/kube-bin.sh >&2
echo "== pytest (integration, e2e)" >&2
[ $# -gt 0 ] || set -- tests/integration tests/e2e
set +e
.venv/bin/pytest --durations=25 "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
	echo "test: pytest collected no tests: that is a failure here" >&2
	exit 1
fi
exit "$code"

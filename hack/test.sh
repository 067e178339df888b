#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: lint, types, layering, then pytest
# (unit, integration on loopback, e2e against real kube-apiservers built from the official
# Go modules and cached under ${MESHLINK_CACHE:-~/.cache/meshlink}).
# Extra arguments go to pytest, e.g. `bash hack/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash hack/setup.sh --test
echo "== control plane (kube-apiserver, etcd, kubectl; cached by version)" >&2
bash hack/kube-bin.sh >&2
echo "== ruff, mypy, import layering" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
echo "== pytest" >&2
set +e
.venv/bin/pytest "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
	echo "test: pytest collected no tests: that is a failure here" >&2
	exit 1
fi
exit "$code"

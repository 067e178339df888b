#!/usr/bin/env bash
# The fast loop, under a minute on an idle machine: lint, format, types, import contracts
# (layers, and the sans-IO cores free of asyncio, sockets, TLS and HTTP), then the unit
# tests with coverage: a floor for meshlink as a whole, and a higher one for the sans-IO
# cores (SANS_IO_FLOOR; the aim is every line). No servers, no kube binaries; hack/test.sh
# runs this first.
# Extra arguments go to pytest, e.g. `bash hack/check.sh -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash hack/setup.sh --test
echo "== ruff, format, mypy, import contracts" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
echo "== unit tests, with coverage" >&2
export COVERAGE_FILE="${TMPDIR:-/tmp}/meshlink-check.coverage"
set +e
.venv/bin/pytest -q -p no:cacheprovider tests/unit --cov=meshlink --cov-report= "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
	echo "check: pytest collected no tests: that is a failure here" >&2
	exit 1
fi
[ "$code" = 0 ] || exit "$code"
# The floor for meshlink is [tool.coverage.report] fail_under in pyproject.toml.
total=$(.venv/bin/coverage report --format=total) ||
	{ echo "check: unit-test coverage of meshlink fell below its floor (pyproject.toml)" >&2; exit 1; }
SANS_IO_FLOOR=99
sans_io='meshlink/proto/*,meshlink/catalog/*,meshlink/dns/answer.py,meshlink/dns/snapshot.py,meshlink/k8s/model.py'
core=$(.venv/bin/coverage report --format=total --fail-under="$SANS_IO_FLOOR" --include="$sans_io") || {
	.venv/bin/coverage report --show-missing --skip-covered --include="$sans_io" >&2 || true
	echo "check: unit-test coverage of the sans-IO cores fell below $SANS_IO_FLOOR%" >&2
	exit 1
}
echo "coverage by the unit tests: meshlink ${total}%, its sans-IO cores ${core}%" >&2

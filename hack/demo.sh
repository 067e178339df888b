#!/usr/bin/env bash
# Set up (if needed) and run `meshlink demo`: three sites on loopback, two hops.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash hack/setup.sh
exec .venv/bin/meshlink demo "$@"

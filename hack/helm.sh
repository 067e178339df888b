#!/usr/bin/env bash
# Helm, built from its Go module (helm.sh/helm/v4) once per version and cached like the kind
# testbed's other tools (hack/kind/tools.sh go_tool); then run with the arguments given.
#
#   bash hack/helm.sh ARGS...       e.g. bash hack/helm.sh template meshlink charts/meshlink
#   bash hack/helm.sh --print-path  the binary's path (built if needed)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/kind/tools.sh
source "$here/kind/tools.sh"
helm=$(go_tool helm helm.sh/helm/v4 "$HELM_VERSION" helm.sh/helm/v4/cmd/helm)
if [[ "${1:-}" == --print-path ]]; then
	echo "$helm"
	exit 0
fi
exec "$helm" "$@"

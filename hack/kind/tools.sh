# shellcheck shell=bash
# The versions the kind testbed pins, and `go_tool`, which builds a Go command from the module
# proxy once and caches it by version. Sourced by hack/kind.sh, hack/kind/node-image.sh and
# hack/helm.sh.
#
# The Kubernetes version is hack/kube-bin.sh's (K8S_VERSION); these go with it:
KIND_VERSION=v0.33.0                # sigs.k8s.io/kind (its node base files come from this module)
COREDNS_VERSION=v1.12.1             # what kubeadm 1.34 deploys (constants.CoreDNSVersion)
CRICTL_VERSION=v1.34.0              # sigs.k8s.io/cri-tools
LOCAL_PATH_VERSION=v0.0.30          # github.com/rancher/local-path-provisioner (kind's default storage)
KIND_NODE_STOCK=kindest/node:v1.34.0 # the stock node image, used where a registry is reachable
HELM_VERSION=v4.3.2                 # helm.sh/helm/v4 (hack/helm.sh; 14 min cold on 2 busy cores)

kind_cache=${MESHLINK_CACHE:-$HOME/.cache/meshlink}

# go_tool NAME MODULE_PATH VERSION [PACKAGE]: print the path of NAME, built with
# `go install PACKAGE@VERSION` (static, stripped) into the cache the first time.
go_tool() {
	local name=$1 module=$2 version=$3 pkg=${4:-$2}
	local dir="$kind_cache/tools/$name-$version"
	if [[ ! -x "$dir/$name" ]]; then
		command -v go >/dev/null 2>&1 || {
			echo "go_tool: go is not installed; install Go >= 1.26 and run again" >&2
			return 1
		}
		mkdir -p "$dir" "$kind_cache/go/mod" "$kind_cache/go/build"
		echo "go_tool: go install $pkg@$version (first run only)" >&2
		GOMODCACHE="$kind_cache/go/mod" GOCACHE="$kind_cache/go/build" GOBIN="$dir" \
			CGO_ENABLED=0 GOFLAGS= go install -trimpath -ldflags="-s -w" "$pkg@$version" >&2 || {
			echo "go_tool: building $name from $pkg@$version failed (see above)" >&2
			return 1
		}
		[[ -x "$dir/$name" ]] || mv "$dir/$(basename "$pkg")" "$dir/$name"
	fi
	echo "$dir/$name"
}

# go_module_dir MODULE VERSION: the module's source in the cache (downloaded if needed).
go_module_dir() {
	GOMODCACHE="$kind_cache/go/mod" GOFLAGS=-mod=mod go mod download -json "$1@$2" |
		python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])'
}

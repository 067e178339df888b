#!/usr/bin/env bash
# Build, once, the real Kubernetes control plane the tests run, and cache it by version:
#   kube-apiserver and kubectl  from the official k8s.io/kubernetes Go module (hack/kube/apiserver)
#   etcd                        from go.etcd.io/etcd/server/v3          (hack/kube/etcd)
# and, with --node, what a kind node image needs besides (hack/kind/node-image.sh): kubelet,
# kubeadm, kube-proxy, kube-controller-manager and kube-scheduler, from the same module set.
#
# k8s.io/kubernetes lists its staging modules (k8s.io/api, k8s.io/apiserver, ...) at v0.0.0,
# which the module proxy does not serve, so `go install k8s.io/kubernetes/cmd/...@v1.x` is
# refused. hack/kube/apiserver/go.mod is a small helper module that requires k8s.io/kubernetes
# and replaces every staging module with its published twin v0.<minor>.<patch>; its go.sum
# pins every checksum. The distribution's etcd (3.4) is older than what Kubernetes 1.34 is
# tested with and lacks --unsafe-no-fsync, so etcd is built the same way.
#
# Usage: hack/kube-bin.sh [--node] [--print-dir]
#   --node        also build the node binaries
#   --print-dir   print only the bin directory on stdout (building first if needed)
# Environment: MESHLINK_CACHE (default ~/.cache/meshlink). GOPROXY etc. as usual.
# Cache layout:
#   $MESHLINK_CACHE/kube/<k8s>-etcd<etcd>-r<recipe>/bin/{kube-apiserver,kubectl,etcd,...}
#   $MESHLINK_CACHE/kube/<k8s>-etcd<etcd>-r<recipe>/BUILD-INFO   versions, go version, build seconds
#   $MESHLINK_CACHE/go/{mod,build}                      GOMODCACHE and GOCACHE
set -euo pipefail

K8S_VERSION=v1.34.4   # also in hack/kube/apiserver/go.mod (require + every replace)
ETCD_VERSION=v3.6.16  # also in hack/kube/etcd/go.mod

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${MESHLINK_CACHE:-$HOME/.cache/meshlink}
# Like the official release builds, every binary but kubelet is static (CGO_ENABLED=0), so
# the kind node image can ship them in images without a libc. Bump RECIPE when the way the
# binaries are built changes, so a cache made the old way is not reused.
RECIPE=2
key="${K8S_VERSION#v}-etcd${ETCD_VERSION#v}-r$RECIPE"
top="$cache/kube/$key"
bin_dir="$top/bin"

log() { echo "kube-bin: $*" >&2; }
die() {
	echo "kube-bin: error: $*" >&2
	exit 1
}

print_dir=0
names=(etcd kube-apiserver kubectl)
for arg in "$@"; do
	case "$arg" in
	--print-dir) print_dir=1 ;;
	--node) names+=(kubelet kubeadm kube-proxy kube-controller-manager kube-scheduler) ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown argument '$arg' (usage: hack/kube-bin.sh [--node] [--print-dir])" ;;
	esac
done

have_all() {
	local name
	for name in "${names[@]}"; do
		[[ -x "$bin_dir/$name" ]] || return 1
	done
}

if ! have_all; then
	command -v go >/dev/null 2>&1 ||
		die "go is not installed; install Go >= 1.26 (https://go.dev/dl/) and run again"
	command -v flock >/dev/null 2>&1 || die "flock (util-linux) is not installed"
	for f in apiserver/go.mod apiserver/go.sum etcd/go.mod etcd/go.sum; do
		[[ -f "$here/kube/$f" ]] || die "missing $here/kube/$f (the helper modules are part of the repo)"
	done
	mkdir -p "$bin_dir" "$cache/go/mod" "$cache/go/build"
	# Two test runs may start at once: one builds, the other waits and then finds the binaries.
	exec 9>"$cache/kube/.lock"
	flock 9
fi

if ! have_all; then
	export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build"
	# go.mod and go.sum are committed: never let the build rewrite them.
	export GOFLAGS="${GOFLAGS:-} -mod=readonly"
	log "go: $(go version)"
	log "building the control plane into $bin_dir (first run only; several minutes on 2 cores)"
	started=$SECONDS
	vpkg=k8s.io/component-base/version
	cpkg=k8s.io/client-go/pkg/version
	minor=${K8S_VERSION#v1.}
	minor=${minor%%.*}
	k8s_ldflags="-s -w"
	for p in $vpkg $cpkg; do
		k8s_ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
		k8s_ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
	done

	build() { # build MODULE_DIR PACKAGE NAME LDFLAGS
		local mod=$1 pkg=$2 name=$3 ldflags=$4 t0=$SECONDS
		[[ -x "$bin_dir/$name" ]] && return 0
		log "go build $pkg ..."
		local cgo=0
		[[ "$name" = kubelet ]] && cgo=1
		if ! (cd "$here/kube/$mod" && CGO_ENABLED=$cgo go build -trimpath -ldflags "$ldflags" -o "$bin_dir/.$name.tmp" "$pkg"); then
			rm -f "$bin_dir/.$name.tmp"
			die "building $name from $pkg failed (see the go output above)"
		fi
		mv -f "$bin_dir/.$name.tmp" "$bin_dir/$name"
		log "built $name in $((SECONDS - t0)) s"
	}
	for name in "${names[@]}"; do
		if [[ "$name" = etcd ]]; then
			build etcd go.etcd.io/etcd/server/v3 etcd "-s -w"
		else
			build apiserver "k8s.io/kubernetes/cmd/$name" "$name" "$k8s_ldflags"
		fi
	done

	"$bin_dir/kube-apiserver" --version >/dev/null 2>&1 || die "$bin_dir/kube-apiserver does not run"
	"$bin_dir/etcd" --version >/dev/null 2>&1 || die "$bin_dir/etcd does not run"
	{
		echo "kubernetes $K8S_VERSION (${names[*]:1} from k8s.io/kubernetes)"
		echo "etcd $ETCD_VERSION (go.etcd.io/etcd/server/v3)"
		echo "$(go version)"
		echo "build_seconds $((SECONDS - started))"
		echo "built_at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
	} >"$top/BUILD-INFO"
	log "done in $((SECONDS - started)) s"
fi

if ((print_dir)); then
	echo "$bin_dir"
else
	# First lines only, without `| head -1`: under pipefail, head closing the pipe early
	# made kubectl die of SIGPIPE (exit 141) about one run in 15, failing the whole build.
	first_line() { local out; out=$("$@" 2>/dev/null) || true; echo "${out%%$'\n'*}"; }
	echo "control plane binaries in $bin_dir:"
	first_line "$bin_dir/kube-apiserver" --version
	first_line "$bin_dir/etcd" --version
	first_line "$bin_dir/kubectl" version --client
fi

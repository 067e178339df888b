#!/usr/bin/env bash
# Real Kubernetes clusters running meshlink, on kind, in one command (as root).
#
#   bash hack/kind.sh up [N] [--workers W]   N clusters (default 2), each with W worker nodes
#                                             (default 0; W1,W2,... gives cluster I its own
#                                             count), meshlink deployed and all linked
#   bash hack/kind.sh down                    delete them; stop the dockerd this script started
#   bash hack/kind.sh kubeconfig I            print cluster I's kubeconfig path
#   bash hack/kind.sh load ARCHIVE            load a docker-archive (e.g. a rebuilt meshlink
#                                             image) into every cluster
#
# `up` does, per cluster <prefix>-cI (I = 1..N), on one Docker network ("kind"):
#   - kind create cluster with pods in 10.(240+I).0.0/16 and Services in 10.(100+I).0.0/16;
#   - kind load image-archive of meshlink's image (dist/image/, from hack/image.sh; built
#     if missing);
#   - kubectl apply --server-side -k of an overlay of manifests/ (written under the state
#     directory): site id cI, the gateway as a NodePort (components/gateway-nodeport),
#     advertised at the control-plane node's address;
#   - the CoreDNS stub domain for clusterset.local (hack/coredns-stub.sh);
# then links every pair of clusters with `meshlink token create` on one and
# `meshlink link create` on the other, through kubectl exec, and prints the kubeconfigs.
#
# Where kindest/node cannot be pulled (no registry, as in CI here), the node image is built
# by hack/kind/node-image.sh and cached. Where root lacks CAP_SYS_RESOURCE (kind's
# `docker run --privileged` then fails), dockerd runs with hack/kind/runc-shim as its runtime.
# dockerd (Debian's docker.io, installed if missing) is started when none runs.
#
# Environment:
#   MESHLINK_KIND_PREFIX      cluster name prefix (default meshlink)
#   MESHLINK_KIND_STATE       kubeconfigs and overlays (default $MESHLINK_CACHE/kind/<prefix>)
#   MESHLINK_KIND_NODE_IMAGE  use this node image
#   MESHLINK_IMAGE_ARCHIVE    meshlink's docker-archive (default dist/image/meshlink-<version>.tar)
#   MESHLINK_KIND_SUBNET      the Docker network's subnet when this script creates it
#                             (default 172.18.0.0/16)
# Note: `up` raises fs.inotify.max_user_instances and max_user_watches (kind needs more than
# the defaults for a few nodes) and leaves them raised. Each node's kubelet sets
# vm.overcommit_memory, kernel.panic and kernel.panic_on_oops
# for the whole machine (they are not namespaced); `down` puts back the values `up` found.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=hack/kind/tools.sh
source "$here/kind/tools.sh"

prefix=${MESHLINK_KIND_PREFIX:-meshlink}
state=${MESHLINK_KIND_STATE:-$kind_cache/kind/$prefix}
network=kind
# Fixed node ports of the gateway Service (manifests/components/gateway-nodeport).
TUNNEL_NODEPORT=30443
GRANT_NODEPORT=30444
SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops)

log() { echo "kind.sh: $*" >&2; }
die() {
	echo "kind.sh: error: $*" >&2
	exit 1
}
usage() {
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
	exit "${1:-0}"
}

kubeconfig_of() { echo "$state/c$1.kubeconfig"; }
kc() { # kc I KUBECTL_ARGS...
	local i=$1
	shift
	kubectl --kubeconfig "$(kubeconfig_of "$i")" "$@"
}

# -- the machine: root, Docker --------------------------------------------------------------

cap_sys_resource_missing() {
	local bnd
	bnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
	(((16#$bnd >> 24 & 1) == 0))
}

ensure_packages() {
	local missing=()
	command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
	command -v ctr >/dev/null 2>&1 || missing+=(containerd)
	((${#missing[@]} == 0)) && return 0
	log "installing ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_docker() {
	if docker info >/dev/null 2>&1; then
		if cap_sys_resource_missing &&
			[[ $(docker info --format '{{.DefaultRuntime}}' 2>/dev/null) != meshlink-runc ]]; then
			die "this machine lacks CAP_SYS_RESOURCE and the running dockerd uses plain runc, so kind's privileged nodes cannot start; stop that dockerd and run again (this script starts one with hack/kind/runc-shim)"
		fi
		return 0
	fi
	ensure_packages
	mkdir -p "$state"
	local args=(--host unix:///var/run/docker.sock --pidfile "$state/dockerd.pid")
	if cap_sys_resource_missing; then
		# A stable copy: dockerd keeps the path for as long as it runs.
		install -D -m 0755 "$here/kind/runc-shim" "$kind_cache/kind/runc-shim"
		args+=(--add-runtime "meshlink-runc=$kind_cache/kind/runc-shim" --default-runtime meshlink-runc)
		log "starting dockerd (CAP_SYS_RESOURCE is missing: runc through hack/kind/runc-shim)"
	else
		log "starting dockerd"
	fi
	nohup dockerd "${args[@]}" >"$state/dockerd.log" 2>&1 &
	echo "$!" >"$state/dockerd.ours"
	local deadline=$((SECONDS + 60))
	until docker info >/dev/null 2>&1; do
		((SECONDS < deadline)) || die "dockerd did not start within 60 s: $(tail -n 3 "$state/dockerd.log")"
		kill -0 "$(cat "$state/dockerd.ours")" 2>/dev/null || die "dockerd exited: $(tail -n 3 "$state/dockerd.log")"
		sleep 0.5
	done
}

ensure_network() {
	# kind uses a Docker network named "kind", creating it if absent. Created here with an
	# explicit subnet instead, so that a node cut off the network (docker network
	# disconnect) can come back with its address (`docker network connect --ip`): what
	# peers were told to dial.
	docker network inspect "$network" >/dev/null 2>&1 && return 0
	docker network create -d bridge --subnet "${MESHLINK_KIND_SUBNET:-172.18.0.0/16}" \
		-o com.docker.network.bridge.enable_ip_masquerade=true \
		-o com.docker.network.driver.mtu=1500 "$network" >/dev/null
}

node_image() {
	if [[ -n "${MESHLINK_KIND_NODE_IMAGE:-}" ]]; then
		echo "$MESHLINK_KIND_NODE_IMAGE"
	elif docker image inspect "$KIND_NODE_STOCK" >/dev/null 2>&1 ||
		timeout 30 docker pull -q "$KIND_NODE_STOCK" >/dev/null 2>&1; then
		echo "$KIND_NODE_STOCK"
	else
		log "cannot pull $KIND_NODE_STOCK: using a node image built here (hack/kind/node-image.sh)"
		bash "$here/kind/node-image.sh"
	fi
}

save_sysctls() {
	[[ -f "$state/sysctl.saved" ]] && return 0
	local s
	for s in "${SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s")"; done >"$state/sysctl.saved"
}

raise_inotify_limits() {
	# Every node's kubelet, containerd, kube-proxy and pods take inotify instances from one
	# per-user pool; at the default 128, a few nodes exhaust it and kube-proxy dies of "too
	# many open files" (kind's known-issues page). Raised, never lowered, and left raised:
	# other clusters may still need them.
	local key want
	for key in fs.inotify.max_user_instances=1024 fs.inotify.max_user_watches=524288; do
		want=${key#*=}
		(($(sysctl -n "${key%=*}") >= want)) || sysctl -q -w "$key" >/dev/null
	done
}

restore_sysctls() {
	[[ -f "$state/sysctl.saved" ]] || return 0
	local line
	while read -r line; do sysctl -q -w "$line" >/dev/null || log "cannot restore $line"; done <"$state/sysctl.saved"
	rm -f "$state/sysctl.saved"
}

# -- one cluster ----------------------------------------------------------------------------

node_ip() { # node_ip I: the control-plane node's address on the Docker network
	docker inspect -f "{{(index .NetworkSettings.Networks \"$network\").IPAddress}}" "$prefix-c$1-control-plane"
}

create_cluster() { # create_cluster I WORKERS IMAGE
	local i=$1 workers=$2 image=$3 name="$prefix-c$1" own_cni=false w
	if kind get clusters 2>/dev/null | grep -qx "$name"; then
		log "$name exists"
		kind export kubeconfig --name "$name" --kubeconfig "$(kubeconfig_of "$i")" >/dev/null 2>&1
		return 0
	fi
	# The node image built here brings its own pod network (no kindnetd); the stock one
	# gets kind's default CNI.
	[[ $(docker image inspect -f '{{index .Config.Labels "io.meshlink.kind-cni"}}' "$image") == 1 ]] &&
		own_cni=true
	{
		echo "kind: Cluster"
		echo "apiVersion: kind.x-k8s.io/v1alpha4"
		echo "networking:"
		echo "  podSubnet: 10.$((240 + i)).0.0/16"
		echo "  serviceSubnet: 10.$((100 + i)).0.0/16"
		echo "  disableDefaultCNI: $own_cni"
		echo "nodes:"
		echo "  - role: control-plane"
		for ((w = 0; w < workers; w++)); do echo "  - role: worker"; done
	} >"$state/c$i.kind.yaml"
	log "creating $name ($((workers + 1)) node(s))"
	kind create cluster --name "$name" --image "$image" --config "$state/c$i.kind.yaml" \
		--kubeconfig "$(kubeconfig_of "$i")" --wait 0s >&2
}

allow_node_routes() { # allow_node_routes I
	# The node image built here routes other nodes' pod ranges itself (hack/kind/cni.sh
	# lists the Nodes with the kubelet's credentials); since Kubernetes 1.32 the Node
	# authorizer lets a kubelet read only its own Node object, so without this binding a
	# multi-node cluster has no routes between its nodes' pods.
	kc "$1" apply --server-side -f - >/dev/null <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: meshlink-kind-cni}
rules: [{apiGroups: [""], resources: [nodes], verbs: [get, list, watch]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: meshlink-kind-cni}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: meshlink-kind-cni}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:nodes"}]
EOF
}

write_overlay() { # write_overlay I ADDRESS IMAGE_ID
	local i=$1 address=$2 image_id=$3 dir="$state/c$1" tag
	tag=$(python3 -c 'import tomllib; print(tomllib.load(open("'"$repo"'/pyproject.toml", "rb"))["project"]["version"])')
	mkdir -p "$dir"
	local manifests
	manifests=$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$repo/manifests" "$dir")
	cat >"$dir/kustomization.yaml" <<EOF
# Cluster c$i's overlay of meshlink's manifests, written by hack/kind.sh.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $manifests
components:
  - $manifests/components/gateway-nodeport
configMapGenerator:
  - name: meshlink-config
    namespace: meshlink-system
    behavior: merge
    files:
      - site.yaml
images:
  - name: ghcr.io/meshlink/meshlink
    newTag: "$tag"
# The loaded image's id: a rebuilt image (same tag) rolls the pods on the next \`up\`.
patches:
  - target: {kind: Deployment, name: meshlink}
    patch: |-
      - {op: add, path: /spec/template/metadata/annotations, value: {meshlink.io/image-id: "$image_id"}}
EOF
	cat >"$dir/site.yaml" <<EOF
site: c$i
gateway:
  advertise: [$address:$TUNNEL_NODEPORT]
grant:
  advertise: $address:$GRANT_NODEPORT
EOF
}

archive_image_id() { # archive_image_id ARCHIVE: the image config's digest in a docker-archive
	python3 - "$1" <<'PY'
import json, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    manifest = json.load(t.extractfile("manifest.json"))
print(manifest[0]["Config"].rsplit("/", 1)[-1].removesuffix(".json")[:16])
PY
}

deploy_meshlink() { # deploy_meshlink I ARCHIVE
	local i=$1 archive=$2 name="$prefix-c$1"
	kind load image-archive "$archive" --name "$name" >&2
	write_overlay "$i" "$(node_ip "$i")" "$(archive_image_id "$archive")"
	kc "$i" apply --server-side -k "$state/c$i" >/dev/null
}

wait_ready() { # wait_ready I: nodes Ready, CoreDNS and meshlink rolled out
	local what
	for what in "wait --for=condition=Ready nodes --all" "-n kube-system rollout status deploy/coredns" \
		"-n meshlink-system rollout status deploy/meshlink"; do
		# shellcheck disable=SC2086 # word splitting of $what is wanted
		kc "$1" $what --timeout=300s >/dev/null 2>&1 && continue
		log "c$1: timed out: kubectl $what"
		kc "$1" get nodes,pods -A -o wide >&2 || true
		kc "$1" -n meshlink-system logs deploy/meshlink --tail=20 >&2 || true
		die "cluster c$1 did not become ready (above: its nodes and pods)"
	done
}

link() { # link I J: cluster J redeems a token of cluster I (unless it has a link to I)
	if kc "$2" -n meshlink-system exec deploy/meshlink -- meshlink link list |
		awk 'NR > 1 {print $2}' | grep -qx "c$1"; then
		return 0
	fi
	local token
	token=$(kc "$1" -n meshlink-system exec deploy/meshlink -- meshlink token create --expiry 5m)
	printf '%s\n' "$token" | kc "$2" -n meshlink-system exec -i deploy/meshlink -- \
		meshlink link create - --name "c$1" >&2
}

# -- commands -------------------------------------------------------------------------------

workers_of() { # workers_of I SPEC: cluster I's worker count from --workers W or W1,W2,...
	local spec=$2 list
	IFS=, read -r -a list <<<"$spec"
	if ((${#list[@]} == 1)); then echo "${list[0]}"; else echo "${list[$1 - 1]:-0}"; fi
}

cmd_up() {
	local n=2 workers=0
	while (($# > 0)); do
		case "$1" in
		--workers)
			workers=${2:?--workers needs a number or a list N1,N2,...}
			[[ $workers =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--workers takes a number or a list like 2,0,0"
			shift 2
			;;
		[0-9]*)
			n=$1
			shift
			;;
		*) usage 2 ;;
		esac
	done
	((n >= 1 && n <= 9)) || die "N must be 1 to 9"
	[[ $(id -u) == 0 ]] || die "run as root (dockerd, kind's privileged nodes)"
	local started=$SECONDS version archive image i j
	mkdir -p "$state"
	ensure_docker
	PATH="$(dirname "$(go_tool kind sigs.k8s.io/kind "$KIND_VERSION")"):$PATH"
	PATH="$(bash "$repo/hack/kube-bin.sh" --print-dir):$PATH"
	export PATH
	version=$(python3 -c 'import tomllib; print(tomllib.load(open("'"$repo"'/pyproject.toml", "rb"))["project"]["version"])')
	archive=${MESHLINK_IMAGE_ARCHIVE:-$repo/dist/image/meshlink-$version.tar}
	if [[ ! -s "$archive" ]]; then
		log "no meshlink image at $archive: building it (hack/image.sh)"
		bash "$repo/hack/image.sh" >/dev/null
	fi
	image=$(node_image)
	ensure_network
	save_sysctls
	raise_inotify_limits
	for ((i = 1; i <= n; i++)); do
		create_cluster "$i" "$(workers_of "$i" "$workers")" "$image"
		allow_node_routes "$i"
	done
	for ((i = 1; i <= n; i++)); do deploy_meshlink "$i" "$archive"; done
	for ((i = 1; i <= n; i++)); do
		wait_ready "$i"
		KUBECONFIG=$(kubeconfig_of "$i") bash "$repo/hack/coredns-stub.sh" --restart
	done
	for ((i = 1; i <= n; i++)); do
		for ((j = i + 1; j <= n; j++)); do link "$i" "$j"; done
	done
	log "$n cluster(s) up and linked in $((SECONDS - started)) s"
	for ((i = 1; i <= n; i++)); do echo "c$i: $(kubeconfig_of "$i")"; done
}

cmd_load() { # cmd_load ARCHIVE
	[[ -s "$1" ]] || die "no image archive at $1"
	PATH="$(dirname "$(go_tool kind sigs.k8s.io/kind "$KIND_VERSION")"):$PATH"
	local name
	for name in $(kind get clusters 2>/dev/null | grep "^$prefix-c[0-9]*$" || true); do
		kind load image-archive "$1" --name "$name" >&2
	done
}

cmd_down() {
	local name
	if command -v kind >/dev/null 2>&1 || [[ -x "$kind_cache/tools/kind-$KIND_VERSION/kind" ]]; then
		PATH="$kind_cache/tools/kind-$KIND_VERSION:$PATH"
		if docker info >/dev/null 2>&1; then
			for name in $(kind get clusters 2>/dev/null | grep "^$prefix-c[0-9]*$" || true); do
				log "deleting $name"
				kind delete cluster --name "$name" >&2
			done
		fi
	fi
	restore_sysctls
	if [[ -f "$state/dockerd.ours" ]]; then
		local pid
		pid=$(cat "$state/dockerd.ours")
		if kill -0 "$pid" 2>/dev/null && [[ -z $(docker ps -q 2>/dev/null) ]]; then
			log "stopping the dockerd this script started"
			kill "$pid"
			local deadline=$((SECONDS + 30))
			while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
		fi
		rm -f "$state/dockerd.ours"
	fi
	rm -rf "$state"/c[0-9]* "$state"/c[0-9]*.kubeconfig "$state"/c[0-9]*.kind.yaml
}

case "${1:-}" in
up)
	shift
	cmd_up "$@"
	;;
down) cmd_down ;;
load)
	[[ -n "${2:-}" ]] || usage 2
	cmd_load "$2"
	;;
kubeconfig)
	[[ -n "${2:-}" ]] || usage 2
	kubeconfig_of "$2"
	;;
-h | --help | "") usage ;;
*) usage 2 ;;
esac

#!/usr/bin/env bash
# Build a kind node image for hack/kind.sh where kindest/node cannot be pulled (no registry),
# from the official sources and Debian packages only, and cache it by its inputs.
#
#   bash hack/kind/node-image.sh     print the image name (building it, or loading the cached
#                                    rootfs into dockerd, if needed); needs root and dockerd
#
# What goes in (each from its official Go module or Debian bookworm):
# - a Debian root filesystem with systemd, Debian's containerd, runc and CNI plugins, and
#   kind's own node files (entrypoint, systemd units, sysctl.d) from the kind module;
# - kubelet, kubeadm, kubectl (hack/kube-bin.sh --node), crictl;
# - preloaded in containerd's store, under the names `kubeadm config images list` wants:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy (with Debian's
#   iptables), etcd (hack/kube-bin.sh's version), CoreDNS, pause (Debian's catatonit), and
#   for the default StorageClass local-path-provisioner with a busybox helper;
# - /kind/manifests/default-storage.yaml (local-path-provisioner's manifest, its class made
#   the default), /kind/version.
# Deviations from kind's own image, each because this machine or the proxy requires it:
# - no kindnetd (its nested Go module is not served by the module proxy): meshlink-kind-cni, a
#   small node service (kind/cni.sh), writes the same ptp + host-local CNI configuration from
#   the node's podCIDR, routes other nodes' pod ranges and masquerades traffic leaving the
#   cluster, which is what kindnetd does for kind; clusters are created with
#   disableDefaultCNI;
# - containerd: restrict_oom_score_adj = true, no OOMScoreAdjust/Limit* lines in units
#   (CAP_SYS_RESOURCE may be missing); Debian's containerd 1.6 instead of 2.x.
# Cache: $MESHLINK_CACHE/kind/node-<key>.tar (the node rootfs), plus the image in dockerd.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
OCI_LOG_PREFIX=node-image
# shellcheck source=hack/lib/oci.sh
source "$repo/hack/lib/oci.sh"
# shellcheck source=hack/kind/tools.sh
source "$here/tools.sh"

[[ $(id -u) == 0 ]] || oci_die "run as root"
K8S_VERSION=$(sed -n 's/^K8S_VERSION=\(v[^ ]*\).*/\1/p' "$repo/hack/kube-bin.sh")
NODE_PACKAGES=systemd,dbus,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,bash,ca-certificates,curl,jq,procps,containerd,runc,containernetworking-plugins,e2fsprogs,socat,catatonit,busybox-static,hostname
PROXY_PACKAGES=iptables,conntrack,nftables,ipset,kmod
key=$(cat "$0" "$here/cni.sh" "$repo/hack/lib/oci.sh" "$here/tools.sh" "$repo/hack/kube-bin.sh" |
	{
		cat
		echo "$NODE_PACKAGES $PROXY_PACKAGES $OCI_DEBIAN_SUITE"
	} | sha256sum | cut -c1-12)
image="meshlink.local/kind-node:$K8S_VERSION-$key"
cached="$kind_cache/kind/node-$key.tar"
import_changes=(--change 'ENV container=docker' --change 'LABEL io.meshlink.kind-cni=1'
	--change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]')

if docker image inspect "$image" >/dev/null 2>&1; then
	echo "$image"
	exit 0
fi
if [[ -s "$cached" ]]; then
	oci_log "importing the cached node rootfs $cached"
	docker import "${import_changes[@]}" "$cached" "$image" >/dev/null
	echo "$image"
	exit 0
fi

oci_need_tools
started=$SECONDS
kube=$(bash "$repo/hack/kube-bin.sh" --node --print-dir)
kind_src=$(go_module_dir sigs.k8s.io/kind "$KIND_VERSION")
lpp_src=$(go_module_dir github.com/rancher/local-path-provisioner "$LOCAL_PATH_VERSION")
coredns=$(go_tool coredns github.com/coredns/coredns "$COREDNS_VERSION")
crictl=$(go_tool crictl sigs.k8s.io/cri-tools "$CRICTL_VERSION" sigs.k8s.io/cri-tools/cmd/crictl)
lpp=$(go_tool local-path-provisioner github.com/rancher/local-path-provisioner "$LOCAL_PATH_VERSION")

work=$(mktemp -d "${TMPDIR:-/tmp}/kind-node.XXXXXX")
ctd_pid=""
cleanup() {
	[[ -n "$ctd_pid" ]] && kill "$ctd_pid" 2>/dev/null && wait "$ctd_pid" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT

# The image names kubeadm will look for.
mapfile -t wanted < <("$kube/kubeadm" config images list --kubernetes-version "$K8S_VERSION" 2>/dev/null)
want() { # want COMPONENT: the full name kubeadm wants for it
	local w
	for w in "${wanted[@]}"; do
		[[ "${w##*/}" == "$1":* ]] && {
			echo "$w"
			return
		}
	done
	oci_die "kubeadm lists no image for $1 (${wanted[*]})"
}
pause_image=$(want pause)

# 1. Component images, as docker-archives under $work/images.
mkdir -p "$work/images"
component() { # component NAME:TAG ROOTFS_DIR ENTRYPOINT...
	local ref=$1 dir=$2 name tag
	shift 2
	name=${ref%:*}
	tag=${ref##*:}
	local ep=()
	local arg
	for arg in "$@"; do ep+=(--config.entrypoint "$arg"); done
	oci_image_from_dir "$work/oci" "$tag-${name##*/}" "$dir" "${ep[@]}" \
		--config.env PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--config.label "org.opencontainers.image.description=built by meshlink hack/kind/node-image.sh"
	oci_to_docker_archive "$work/oci" "$tag-${name##*/}" "$work/images/${name##*/}.tar" "$ref"
}
static_image() { # static_image BINARY...: a root filesystem holding only those binaries
	local dir
	dir=$(mktemp -d "$work/rootfs.XXXXXX")
	mkdir -p "$dir/usr/local/bin" "$dir/tmp" "$dir/etc"
	chmod 1777 "$dir/tmp"
	echo 'root:x:0:0:root:/root:/sbin/nologin' >"$dir/etc/passwd"
	echo 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >>"$dir/etc/passwd"
	printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/etc/group"
	cp -a /etc/ssl/certs/ca-certificates.crt "$dir/etc/" 2>/dev/null || true
	local bin
	for bin in "$@"; do cp "$bin" "$dir/usr/local/bin/"; done
	echo "$dir"
}
oci_log "component images"
node="$work/node"
mkdir -p "$node"
tar -C "$node" -xf "$(debian_rootfs_tar kind-node "$NODE_PACKAGES")"
for c in kube-apiserver kube-controller-manager kube-scheduler; do
	component "$(want "$c")" "$(static_image "$kube/$c")" "/usr/local/bin/$c"
done
component "$(want etcd)" "$(static_image "$kube/etcd")" /usr/local/bin/etcd
dir=$(static_image "$coredns")
mv "$dir/usr/local/bin/coredns" "$dir/coredns"
component "$(want coredns)" "$dir" /coredns
dir=$(static_image)
cp "$node/usr/bin/catatonit" "$dir/catatonit"
component "$pause_image" "$dir" /catatonit -P
dir=$(mktemp -d "$work/rootfs.XXXXXX")
tar -xf "$(debian_rootfs_tar kube-proxy "$PROXY_PACKAGES")" -C "$dir"
cp "$kube/kube-proxy" "$dir/usr/local/bin/"
rm -rf "$dir"/var/cache/apt/* "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc "$dir"/usr/share/man
component "$(want kube-proxy)" "$dir" /usr/local/bin/kube-proxy
component "docker.io/rancher/local-path-provisioner:$LOCAL_PATH_VERSION" "$(static_image "$lpp")" \
	/usr/local/bin/local-path-provisioner
dir=$(static_image)
mkdir -p "$dir/bin"
cp "$node/bin/busybox" "$dir/bin/busybox"
for applet in sh ash rm mkdir rmdir ls cat chmod chown mv cp echo test sleep; do
	ln -s busybox "$dir/bin/$applet"
done
component docker.io/library/busybox:latest "$dir" /bin/sh

# 2. The node's root filesystem.
oci_log "node rootfs"
files="$kind_src/images/base/files"
install -m 0755 "$files"/usr/local/bin/* "$node/usr/local/bin/"
mkdir -p "$node/kind/bin" "$node/LICENSES"
cp -r "$files/kind/." "$node/kind/"
chmod -R u=rwX,go=rX "$node/kind"
chmod 0755 "$node/kind/bin"/*
cp -r "$files/etc/." "$node/etc/"
find "$node/etc/systemd" "$node/etc/sysctl.d" "$node/etc/default" "$node/etc/containerd" -type f -exec chmod 0644 {} +
cp "$files/LICENSES/README.txt" "$node/LICENSES/kind-README.txt"
# Debian's binaries where kind's units expect its own; no rlimits or OOM score changes.
ln -sf /usr/bin/containerd "$node/usr/local/bin/containerd"
sed -i -e '/^OOMScoreAdjust=/d' -e '/^Limit[A-Z]*=/d' -e '/^TasksMax=/d' "$node/etc/systemd/system/containerd.service"
rm -f "$node/etc/systemd/system/containerd-fuse-overlayfs.service"
python3 - "$node/etc/containerd/config.toml" "$pause_image" <<'EOF'
import re, sys
path, pause = sys.argv[1], sys.argv[2]
text = open(path).read()
# fuse-overlayfs serves rootless setups only, and its snapshotter is not installed.
text = re.sub(r'\[proxy_plugins\]\n# fuse-overlayfs[^\n]*\n\[proxy_plugins\."fuse-overlayfs"\]\n(?:  [^\n]*\n)+', "", text)
text = re.sub(r'sandbox_image = "[^"]*"', f'sandbox_image = "{pause}"', text)
text = text.replace("restrict_oom_score_adj = false", "restrict_oom_score_adj = true")
assert "restrict_oom_score_adj = true" in text and pause in text, "kind's containerd config changed shape"
open(path, "w").write(text)
EOF
ctr oci spec | python3 -c '
import json, sys
spec = json.load(sys.stdin)
spec.setdefault("hooks", {}).setdefault("createContainer", []).append({"path": "/kind/bin/mount-product-files.sh"})
spec["process"].pop("rlimits", None)
json.dump(spec, sys.stdout, indent=2)' >"$node/etc/containerd/cri-base.json"
# systemd as kind's Dockerfile leaves it.
rm -f "$node"/lib/systemd/system/multi-user.target.wants/* "$node"/etc/systemd/system/*.wants/* \
	"$node"/lib/systemd/system/local-fs.target.wants/* "$node"/lib/systemd/system/basic.target.wants/* \
	"$node"/lib/systemd/system/sockets.target.wants/*udev* "$node"/lib/systemd/system/sockets.target.wants/*initctl*
find "$node/lib/systemd/system/sysinit.target.wants/" -name systemd-tmpfiles-setup.service -delete
echo "ReadKMsg=no" >>"$node/etc/systemd/journald.conf"
ln -sf /usr/lib/systemd/systemd "$node/sbin/init"
install -m 0755 "$here/cni.sh" "$node/kind/bin/meshlink-kind-cni.sh"
cat >"$node/etc/systemd/system/meshlink-kind-cni.service" <<'EOF'
[Unit]
Description=meshlink kind CNI (pod network config and routes; a stand-in for kindnetd)
After=kubelet.service

[Service]
ExecStart=/kind/bin/meshlink-kind-cni.sh
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$node/etc/systemd/system/multi-user.target.wants"
for unit in kubelet containerd undo-mount-hacks meshlink-kind-cni; do
	ln -sf "/etc/systemd/system/$unit.service" "$node/etc/systemd/system/multi-user.target.wants/$unit.service"
done
ln -sf /dev/null "$node/etc/systemd/system/systemd-binfmt.service"
mkdir -p "$node/etc/kubernetes/manifests" "$node/opt/cni/bin" "$node/etc/cni/net.d"
cp /dev/null "$node/etc/cni/net.d/.keep"
cp -a "$node"/usr/lib/cni/. "$node/opt/cni/bin/"
install -m 0755 "$kube/kubelet" "$kube/kubeadm" "$kube/kubectl" "$node/usr/bin/"
install -m 0755 "$crictl" "$node/usr/local/bin/crictl"
rm -rf "$node"/var/cache/apt/* "$node"/var/lib/apt/lists/*
echo "$K8S_VERSION" >"$node/kind/version"
mkdir -p "$node/kind/manifests"
python3 - "$lpp_src/deploy/local-path-storage.yaml" "$LOCAL_PATH_VERSION" >"$node/kind/manifests/default-storage.yaml" <<'EOF'
import sys
text = open(sys.argv[1]).read()
marker = "kind: StorageClass\nmetadata:\n  name: local-path\n"
assert marker in text, "local-path-storage.yaml changed shape"
text = text.replace(marker, marker + "  annotations:\n    storageclass.kubernetes.io/is-default-class: \"true\"\n")
text = text.replace("image: busybox\n", "image: docker.io/library/busybox:latest\n")
print(text)
EOF

# 3. Preload the component images into the node's containerd store, with the host's
#    containerd (the same Debian build) running on the node's directories.
oci_log "preloading images"
mkdir -p "$work/ctd"
cat >"$work/ctd/config.toml" <<EOF
version = 2
root = "$node/var/lib/containerd"
state = "$work/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/ctd/sock"
EOF
containerd --config "$work/ctd/config.toml" >"$work/ctd/log" 2>&1 &
ctd_pid=$!
for _ in $(seq 100); do
	[[ -S "$work/ctd/sock" ]] && ctr --address "$work/ctd/sock" version >/dev/null 2>&1 && break
	sleep 0.1
done
ctr --address "$work/ctd/sock" version >/dev/null || oci_die "containerd for preloading did not start: $(tail -3 "$work/ctd/log")"
for archive in "$work"/images/*.tar; do
	ctr --address "$work/ctd/sock" -n k8s.io images import --all-platforms --no-unpack "$archive" >/dev/null
done
ctr --address "$work/ctd/sock" -n k8s.io images list -q | sed 's/^/  /' >&2
kill "$ctd_pid"
wait "$ctd_pid" 2>/dev/null || true
ctd_pid=""

# 4. The rootfs tarball (cached) and the image.
mkdir -p "$kind_cache/kind"
tar -C "$node" --numeric-owner -cf "$cached.tmp" .
mv -f "$cached.tmp" "$cached"
docker import "${import_changes[@]}" "$cached" "$image" >/dev/null
oci_log "$image built in $((SECONDS - started)) s ($(du -sm "$cached" | cut -f1) MB)"
echo "$image"

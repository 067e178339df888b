# shellcheck shell=bash
# Container images without a daemon or a registry, for hack/image.sh and hack/kind/node-image.sh:
# Debian root filesystems from mmdebstrap (cached by their inputs) and OCI images made from a
# root filesystem with umoci, exported with skopeo. Source this file; it defines functions only.
#
#   oci_need_tools                          install mmdebstrap, umoci, skopeo if missing (root)
#   debian_rootfs_tar NAME PKG,PKG,...      print the path of a cached minbase rootfs tarball
#   oci_image_from_dir LAYOUT REF DIR [umoci config args...]
#                                           one-layer image REF (name:tag) in the OCI layout
#   oci_to_docker_archive LAYOUT TAG FILE IMAGE_REF
#
# Cache: ${MESHLINK_CACHE:-~/.cache/meshlink}/rootfs/NAME-<hash of the inputs>.tar

OCI_DEBIAN_SUITE=${OCI_DEBIAN_SUITE:-bookworm}
OCI_DEBIAN_MIRROR=${OCI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
oci_cache=${MESHLINK_CACHE:-$HOME/.cache/meshlink}

oci_log() { echo "${OCI_LOG_PREFIX:-oci}: $*" >&2; }
oci_die() {
	echo "${OCI_LOG_PREFIX:-oci}: error: $*" >&2
	exit 1
}

oci_need_tools() {
	local missing=() tool pkg
	for tool in mmdebstrap:mmdebstrap umoci:umoci skopeo:skopeo; do
		pkg=${tool#*:}
		command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("$pkg")
	done
	((${#missing[@]} == 0)) && return 0
	[[ $(id -u) == 0 ]] || oci_die "missing ${missing[*]}: run as root, or apt-get install ${missing[*]}"
	oci_log "installing ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# debian_rootfs_tar NAME PACKAGES [EXTRA_MMDEBSTRAP_ARGS...]: a minbase Debian root filesystem
# with PACKAGES (comma-separated), built once per set of inputs and kept as a tarball.
debian_rootfs_tar() {
	local name=$1 packages=$2
	shift 2
	local key tar
	key=$(printf '%s\n' "$OCI_DEBIAN_SUITE" "$OCI_DEBIAN_MIRROR" "$packages" "$@" | sha256sum | cut -c1-16)
	tar="$oci_cache/rootfs/$name-$key.tar"
	if [[ ! -s "$tar" ]]; then
		mkdir -p "$oci_cache/rootfs"
		oci_log "mmdebstrap $OCI_DEBIAN_SUITE minbase + $packages (cached as $tar)"
		# --skip=cleanup/apt/lists would keep the index; the image has no use for it.
		mmdebstrap --quiet --format=tar --variant=minbase --include="$packages" \
			--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
			--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
			"$@" "$OCI_DEBIAN_SUITE" "$tar.tmp" "$OCI_DEBIAN_MIRROR" >&2 ||
			{
				rm -f "$tar.tmp"
				oci_die "mmdebstrap failed (is $OCI_DEBIAN_MIRROR reachable?)"
			}
		mv -f "$tar.tmp" "$tar"
	fi
	echo "$tar"
}

# oci_image_from_dir LAYOUT REF DIR [CONFIG_ARGS...]: make REF in the OCI layout LAYOUT a
# one-layer image holding DIR as its root filesystem, then apply `umoci config` CONFIG_ARGS.
oci_image_from_dir() {
	local layout=$1 ref=$2 dir=$3
	shift 3
	local bundle
	[[ -d "$layout" ]] || umoci init --layout "$layout"
	umoci new --image "$layout:$ref"
	bundle=$(mktemp -d "${TMPDIR:-/tmp}/oci-bundle.XXXXXX")
	rmdir "$bundle"
	umoci unpack --image "$layout:$ref" "$bundle" >/dev/null
	cp -a "$dir/." "$bundle/rootfs/"
	umoci repack --image "$layout:$ref" --history.created_by "meshlink hack/lib/oci.sh" "$bundle" >/dev/null
	rm -rf "$bundle"
	if (($# > 0)); then
		umoci config --image "$layout:$ref" "$@"
	fi
	umoci gc --layout "$layout"
}

# oci_to_docker_archive LAYOUT TAG FILE IMAGE_REF: a docker-archive (what `docker load`,
# `kind load image-archive` and `ctr images import` take) of LAYOUT:TAG, named IMAGE_REF
# (name:tag).
oci_to_docker_archive() {
	local layout=$1 tag=$2 file=$3 ref=$4
	rm -f "$file"
	skopeo --insecure-policy copy --quiet "oci:$layout:$tag" "docker-archive:$file:$ref" >&2
}

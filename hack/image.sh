#!/usr/bin/env bash
# Build meshlink's container image from Debian packages and the project's own wheels, with no
# Docker daemon and no registry (mmdebstrap, umoci, skopeo; run as root).
#
#   bash hack/image.sh            build; print the OCI layout, the docker-archive and the size
#   bash hack/image.sh --relock   rewrite hack/image/requirements.txt from pyproject.toml
#
# What the image is: Debian bookworm (minbase) with Debian's python3, a virtualenv at
# /opt/meshlink holding meshlink's wheel and exactly the dependencies pinned in
# hack/image/requirements.txt (binary wheels only: the image has no compiler), byte-compiled,
# run as uid/gid 65532, entrypoint `meshlink`. It works with a read-only root filesystem.
# The Containerfile builds the same image for docker/podman/buildah users.
#
# Output (paths printed on stdout, one per line):
#   dist/image/oci                      OCI layout, tag <version>
#   dist/image/meshlink-<version>.tar   docker-archive named ghcr.io/meshlink/meshlink:<version>
# Environment: MESHLINK_IMAGE (default ghcr.io/meshlink/meshlink), MESHLINK_CACHE.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OCI_LOG_PREFIX=image
# shellcheck source=hack/lib/oci.sh
source hack/lib/oci.sh

relock=0
for arg in "$@"; do
	case "$arg" in
	--relock) relock=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*) oci_die "unknown argument '$arg' (usage: hack/image.sh [--relock])" ;;
	esac
done

lock=hack/image/requirements.txt
if ((relock)); then
	venv=$(mktemp -d)
	python3 -m venv "$venv"
	"$venv/bin/pip" install -q .
	{
		sed -n '1,3p' "$lock"
		"$venv/bin/pip" freeze --exclude meshlink
	} >"$lock.tmp"
	mv -f "$lock.tmp" "$lock"
	rm -rf "$venv"
	oci_log "rewrote $lock"
	exit 0
fi

[[ $(id -u) == 0 ]] || oci_die "run as root (mmdebstrap and umoci keep file ownership only as root)"
oci_need_tools
started=$SECONDS
version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
name=${MESHLINK_IMAGE:-ghcr.io/meshlink/meshlink}
out=dist/image
archive="$out/meshlink-$version.tar"

# 1. Wheels, built and downloaded on the host (pip inside the chroot cannot verify the index
#    here). The dependency wheels are cached by the lock file's content.
lock_key=$(sha256sum "$lock" | cut -c1-16)
dep_wheels="$oci_cache/wheels/$lock_key"
if [[ ! -f "$dep_wheels/.complete" ]]; then
	oci_log "downloading the pinned wheels into $dep_wheels"
	mkdir -p "$dep_wheels"
	python3 -m pip download -q --only-binary=:all: --platform manylinux2014_x86_64 \
		--platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp \
		--no-deps -r "$lock" pip -d "$dep_wheels"
	touch "$dep_wheels/.complete"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/meshlink-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel -q --no-deps --no-build-isolation . -w "$work/wheels" 2>/dev/null ||
	python3 -m pip wheel -q --no-deps . -w "$work/wheels"
cp "$dep_wheels"/*.whl "$work/wheels/"

# 2. The root filesystem: the cached Debian base, plus the virtualenv, made inside a chroot
#    so that its paths and its interpreter are the image's own.
base=$(debian_rootfs_tar meshlink-base python3)
rootfs="$work/rootfs"
mkdir -p "$rootfs"
tar -C "$rootfs" -xf "$base"
cp -a "$work/wheels" "$rootfs/tmp/wheels"
cp "$lock" "$rootfs/tmp/wheels/requirements.txt"
pip_whl=$(cd "$rootfs/tmp/wheels" && ls pip-*.whl)
# A clean environment: the host's PIP_* settings and paths mean nothing inside.
inroot() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$rootfs" "$@"; }
inroot /usr/bin/python3 -m venv --without-pip /opt/meshlink
# pip runs from its own wheel inside the chroot; it is not left in the image.
inroot /opt/meshlink/bin/python "/tmp/wheels/$pip_whl/pip" install -q --no-index \
	--no-compile --find-links /tmp/wheels -r /tmp/wheels/requirements.txt meshlink
inroot /opt/meshlink/bin/python -m compileall -q -j 0 /opt/meshlink/lib >/dev/null
rm -rf "$rootfs/tmp/wheels" "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/*
inroot /opt/meshlink/bin/meshlink --help >/dev/null ||
	oci_die "the image's meshlink does not start"
mkdir -p "$rootfs/etc/meshlink" "$rootfs/var/lib/meshlink"
chown 65532:65532 "$rootfs/var/lib/meshlink"
chmod 0700 "$rootfs/var/lib/meshlink"

# 3. The OCI image and its docker-archive.
rm -rf "$out/oci"
mkdir -p "$out"
oci_image_from_dir "$out/oci" "$version" "$rootfs" \
	--config.user 65532:65532 \
	--config.entrypoint /opt/meshlink/bin/meshlink \
	--config.cmd run \
	--config.workingdir / \
	--config.env PATH=/opt/meshlink/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	--config.env PYTHONDONTWRITEBYTECODE=1 \
	--config.env PYTHONUNBUFFERED=1 \
	--config.label "org.opencontainers.image.title=meshlink" \
	--config.label "org.opencontainers.image.version=$version" \
	--config.label "org.opencontainers.image.source=https://github.com/meshlink/meshlink"
oci_to_docker_archive "$out/oci" "$version" "$archive" "$name:$version"

size=$(du -sm "$archive" | cut -f1)
layers=$(python3 - "$out/oci" <<'EOF'
import json, sys
from pathlib import Path
layout = Path(sys.argv[1])
def blob(d): return layout / "blobs" / d["digest"].replace(":", "/")
manifest = json.loads(blob(json.loads((layout / "index.json").read_text())["manifests"][0]).read_text())
print(sum(layer["size"] for layer in manifest["layers"]) // 2**20)
EOF
)
oci_log "$name:$version built in $((SECONDS - started)) s: ${layers} MB compressed, ${size} MB as a docker-archive"
echo "$out/oci"
echo "$archive"

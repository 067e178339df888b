#!/usr/bin/env bash
# The image of the test workloads on the kind clusters, from Debian packages (no registry):
# sh, curl, dig/nslookup, socat, nc, awk, grep, iproute2, python3 (for a small HTTP server),
# and for benchmarks/kind_datapath.py iperf3, wrk and nginx. One image, tagged three ways:
#   meshlink.local/testbed-tools:<key>   the kind e2e tests' and benchmarks' workloads
#   docker.io/alpine/socat:1.7.4.4       what the upstream MCS conformance suite's pods use
#   docker.io/nicolaka/netshoot:v0.15    (sh, socat / sh, nslookup, nc, grep, awk, tail)
# so that pods with imagePullPolicy IfNotPresent find them once loaded with `kind load`.
#
#   bash hack/kind/tools-image.sh      print the docker-archive's path, then the image name
#                                      (built once per key)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
OCI_LOG_PREFIX=tools-image
# shellcheck source=hack/lib/oci.sh
source "$repo/hack/lib/oci.sh"

[[ $(id -u) == 0 ]] || oci_die "run as root"
PACKAGES=bash,curl,bind9-dnsutils,socat,netcat-openbsd,mawk,grep,iproute2,procps,python3,ca-certificates,iperf3,wrk,nginx-light
key=$(cat "$0" "$repo/hack/lib/oci.sh" | { cat; echo "$PACKAGES"; } | sha256sum | cut -c1-12)
TOOLS_IMAGE="meshlink.local/testbed-tools:$key"
archive="$oci_cache/images/testbed-tools-$key.tar"
if [[ ! -s "$archive" ]]; then
	oci_need_tools
	work=$(mktemp -d "${TMPDIR:-/tmp}/tools-image.XXXXXX")
	trap 'rm -rf "$work"' EXIT
	mkdir -p "$work/rootfs" "$(dirname "$archive")"
	tar -C "$work/rootfs" -xf "$(debian_rootfs_tar testbed-tools "$PACKAGES")"
	rm -rf "$work/rootfs"/var/cache/apt/* "$work/rootfs"/var/lib/apt/lists/*
	oci_image_from_dir "$work/oci" tools "$work/rootfs" --config.cmd /bin/sh \
		--config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
	rm -f "$archive.tmp"
	skopeo --insecure-policy copy --quiet "oci:$work/oci:tools" "docker-archive:$archive.tmp:$TOOLS_IMAGE" \
		--additional-tag docker.io/alpine/socat:1.7.4.4 --additional-tag docker.io/nicolaka/netshoot:v0.15 >&2
	mv -f "$archive.tmp" "$archive"
	oci_log "$TOOLS_IMAGE: $(du -sm "$archive" | cut -f1) MB"
fi
echo "$archive"
echo "$TOOLS_IMAGE"

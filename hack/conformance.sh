#!/usr/bin/env bash
# Run the upstream MCS conformance suite (kubernetes-sigs/mcs-api, conformance/) against
# meshlink on two clusters, and write its report.
#
#   bash hack/conformance.sh --suite-src DIR [options] [-- SUITE_ARGS...]
#
#   --suite-src DIR        a checkout of kubernetes-sigs/mcs-api (DIR is the repository root).
#                          The suite is a nested Go module (conformance/go.mod replaces
#                          sigs.k8s.io/mcs-api with ..) that the Go module proxy does not
#                          serve, so it builds only from such a checkout. It is not ours:
#                          nothing of it enters this repository.
#   --kubeconfig A,B       run against these clusters (each file's current context), meshlink
#                          already deployed, linked, and the suite's images
#                          (alpine/socat:1.7.4.4, nicolaka/netshoot:v0.15) pullable there.
#                          Without it: `hack/kind.sh up 2` (prefix $MESHLINK_KIND_PREFIX,
#                          default meshlink), and the testbed tools image loaded under
#                          those two names (hack/kind/tools-image.sh).
#   --out DIR              where report.yaml, report.html, junit.xml and suite.log go
#                          (default dist/conformance)
#   --dns-domain D         the clusterset zone (default clusterset.local)
#   --organization O, --project P, --version V, --url U
#                          who and what the report is about (default meshlink, meshlink,
#                          this checkout's version, no URL)
#   --down                 delete the kind clusters afterwards (only those this run used)
#   -- SUITE_ARGS          passed to the suite, e.g. -- --ginkgo.label-filter=Required
#
# The suite binary is built once per suite source (`go test -c`, static) and cached under
# ${MESHLINK_CACHE:-~/.cache/meshlink}/conformance/. It prints `N/27 passed` (N/T) and exits
# 0 only when every spec passed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=hack/kind/tools.sh
source "$here/kind/tools.sh"

log() { echo "conformance: $*" >&2; }
die() {
	echo "conformance: error: $*" >&2
	exit 1
}
usage() {
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
	exit "${1:-0}"
}

suite_src="" kubeconfigs="" out="$repo/dist/conformance" dns_domain=clusterset.local down=0
organization=meshlink project=meshlink url=""
version=$(python3 -c 'import tomllib, sys; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$repo/pyproject.toml")
suite_args=()
while (($# > 0)); do
	case "$1" in
	--suite-src | --kubeconfig | --out | --dns-domain | --organization | --project | --version | --url)
		(($# >= 2)) || die "$1 needs a value"
		case "$1" in
		--suite-src) suite_src=$2 ;;
		--kubeconfig) kubeconfigs=$2 ;;
		--out) out=$2 ;;
		--dns-domain) dns_domain=$2 ;;
		--organization) organization=$2 ;;
		--project) project=$2 ;;
		--version) version=$2 ;;
		--url) url=$2 ;;
		esac
		shift 2
		;;
	--down)
		down=1
		shift
		;;
	--)
		shift
		suite_args=("$@")
		break
		;;
	-h | --help) usage ;;
	*) usage 2 ;;
	esac
done

[[ -n "$suite_src" ]] ||
	die "pass --suite-src DIR, a checkout of kubernetes-sigs/mcs-api (tag v0.5.0 or later; the suite is not served by the Go module proxy, so it cannot be fetched here)"
[[ -f "$suite_src/conformance/go.mod" && -f "$suite_src/go.mod" ]] ||
	die "$suite_src is not the root of a kubernetes-sigs/mcs-api checkout (no conformance/go.mod)"
suite_src=$(cd "$suite_src" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
command -v go >/dev/null 2>&1 || die "go is not installed; install Go >= 1.23 and run again"

# -- the suite binary, cached by its sources ------------------------------------------------

suite_ref() { # what the report was made with: a tag or commit when DIR is a git checkout
	local described
	if described=$(git -C "$suite_src" describe --tags --always --dirty 2>/dev/null); then
		echo "$described ($(git -C "$suite_src" rev-parse HEAD))"
	else
		echo "unknown (not a git checkout; sources hash $1)"
	fi
}

build_suite() { # print the path of the suite binary
	local key bin
	key=$(
		cd "$suite_src"
		{
			go version
			find go.mod go.sum pkg conformance -type f \( -name '*.go' -o -name 'go.*' -o -name '*.gohtml' \) -print0 |
				sort -z | xargs -0 sha256sum
		} | sha256sum | cut -c1-16
	)
	bin="$kind_cache/conformance/$key/conformance.test"
	if [[ ! -x "$bin" ]]; then
		log "building the suite from $suite_src (go test -c, first run only)"
		mkdir -p "$(dirname "$bin")" "$kind_cache/go/mod" "$kind_cache/go/build"
		(
			cd "$suite_src/conformance"
			GOMODCACHE="$kind_cache/go/mod" GOCACHE="$kind_cache/go/build" CGO_ENABLED=0 GOFLAGS= \
				go test -c -trimpath -ldflags="-s -w" -o "$bin.tmp" .
		) >&2 || die "building the suite failed (see above)"
		mv -f "$bin.tmp" "$bin"
	fi
	echo "$bin"
}

# -- the clusters ---------------------------------------------------------------------------

kind_up() { # bring up (or reuse) two kind clusters; print their kubeconfigs, comma-separated
	local tools
	[[ $(id -u) == 0 ]] || die "run as root to bring up kind clusters (or pass --kubeconfig A,B)"
	bash "$repo/hack/kind.sh" up 2 >&2
	# Its first line is the archive (no pipe into head: SIGPIPE under pipefail).
	mapfile -t tools < <(bash "$repo/hack/kind/tools-image.sh")
	[[ -s "${tools[0]:-}" ]] || die "hack/kind/tools-image.sh built no image archive (see above)"
	bash "$repo/hack/kind.sh" load "${tools[0]}" >&2
	echo "$(bash "$repo/hack/kind.sh" kubeconfig 1),$(bash "$repo/hack/kind.sh" kubeconfig 2)"
}

started=$SECONDS
bin=$(build_suite)
ref=$(suite_ref "$(basename "$(dirname "$bin")")")
log "suite: $ref"
ours=0
if [[ -z "$kubeconfigs" ]]; then
	kubeconfigs=$(kind_up)
	ours=1
fi
PATH="$(bash "$repo/hack/kube-bin.sh" --print-dir):$PATH"
IFS=, read -r -a files <<<"$kubeconfigs"
((${#files[@]} >= 1)) || die "--kubeconfig needs at least one file"
contexts=()
for f in "${files[@]}"; do
	[[ -r "$f" ]] || die "cannot read kubeconfig $f"
	contexts+=("$(kubectl --kubeconfig "$f" config current-context)")
done
# The suite takes one kubeconfig file and a context per cluster: merge them.
merged="$out/kubeconfig"
KUBECONFIG=$(
	IFS=:
	echo "${files[*]}"
) kubectl config view --flatten >"$merged"
chmod 0600 "$merged"

# -- the run --------------------------------------------------------------------------------

log "running the suite on ${contexts[*]} (report in $out)"
rm -f "$out/report.yaml" "$out/report.html" "$out/junit.xml"
set +e
(
	cd "$out"
	"$bin" -test.timeout=60m \
		--kubeconfig "$merged" \
		--contexts "$(
			IFS=,
			echo "${contexts[*]}"
		)" \
		--dns-domain "$dns_domain" \
		--organization "$organization" \
		--project "$project" \
		--version "$version" \
		--url "$url" \
		--ginkgo.v --ginkgo.no-color --ginkgo.junit-report=junit.xml \
		"${suite_args[@]}"
) 2>&1 | tee "$out/suite.log" >&2
suite_rc=${PIPESTATUS[0]}
set -e
rm -f "$merged"
{
	echo "suite: kubernetes-sigs/mcs-api conformance, $ref"
	echo "clusters: ${contexts[*]}"
	echo "meshlink: $version"
	echo "seconds: $((SECONDS - started))"
} >"$out/run.txt"

if ((down && ours)); then
	bash "$repo/hack/kind.sh" down >&2
fi
[[ -s "$out/report.yaml" ]] || die "the suite wrote no report.yaml (exit $suite_rc; see $out/suite.log)"
passed=$(awk '/^passed:/ {print $2}' "$out/report.yaml")
total=$(awk '/^total:/ {print $2}' "$out/report.yaml")
log "report: $out/report.yaml ($((SECONDS - started)) s)"
echo "$passed/$total passed"
[[ "$suite_rc" == 0 && "$passed" == "$total" ]]

#!/usr/bin/env bash
# Make the cluster's CoreDNS forward clusterset.local to meshlink's DNS Service: the stub
# domain of manifests/coredns-stub-domain.md, added to (or updated in) the Corefile of
# ConfigMap kube-system/coredns. Idempotent. Uses kubectl's current context (KUBECONFIG).
#
#   bash hack/coredns-stub.sh [--restart]
#     --restart   restart CoreDNS and wait for it, instead of letting its reload plugin pick
#                 the change up (within about a minute)
set -euo pipefail
restart=0
case "${1:-}" in
"") ;;
--restart) restart=1 ;;
*)
	echo "usage: hack/coredns-stub.sh [--restart]" >&2
	exit 2
	;;
esac
zone=clusterset.local
ip=$(kubectl -n meshlink-system get service meshlink-dns -o jsonpath='{.spec.clusterIP}')
[[ -n "$ip" ]] || {
	echo "coredns-stub: service meshlink-system/meshlink-dns has no ClusterIP; deploy meshlink first" >&2
	exit 1
}
corefile=$(kubectl -n kube-system get configmap coredns -o jsonpath='{.data.Corefile}')
patch=$(
	python3 - "$zone" "$ip" "$corefile" <<'PY'
import json, re, sys
zone, ip, corefile = sys.argv[1:]
block = f"{zone}:53 {{\n    errors\n    cache 5\n    forward . {ip}\n}}\n"
# Drop a block for the zone written earlier (by this script or by hand), then add ours.
kept = re.sub(rf"(?ms)^{re.escape(zone)}:53 \{{.*?^\}}\n?", "", corefile).rstrip("\n")
print(json.dumps({"data": {"Corefile": kept + "\n" + block}}))
PY
)
kubectl -n kube-system patch configmap coredns --type merge -p "$patch" >/dev/null
echo "coredns-stub: $zone -> $ip (meshlink-dns)" >&2
if ((restart)); then
	kubectl -n kube-system rollout restart deploy/coredns >/dev/null
	kubectl -n kube-system rollout status deploy/coredns --timeout=120s >/dev/null
fi

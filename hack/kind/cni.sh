#!/bin/bash
# meshlink-kind-cni: the pod network of a kind node built by hack/kind/node-image.sh, doing
# what kindnetd does in stock kind (its Go module is not served by the module proxy, so it
# cannot be built here). It runs on every node as a systemd service and:
#   1. writes the CNI configuration for the node's podCIDR: Debian's reference plugins, ptp
#      with host-local IPAM and portmap (the configuration kindnetd writes);
#   2. masquerades traffic from pods to anything outside the cluster's pod range (kindnetd's
#      ip-masq-agent part), so pods reach other clusters' nodes through the Docker network;
#   3. keeps a route to every other node's pod range via that node (multi-node clusters).
# IPv4 only, like the clusters hack/kind.sh creates.
set -u
kubeconfig=/etc/kubernetes/kubelet.conf
conf=/etc/cni/net.d/10-kindnet.conflist
node=$(hostname)
log() { echo "meshlink-kind-cni: $*"; }
kctl() { kubectl --kubeconfig="$kubeconfig" --request-timeout=10s "$@"; }

until [[ -s "$kubeconfig" ]]; do sleep 1; done
cluster_cidr=$(sed -n 's/^ *podSubnet: *"\{0,1\}\([0-9./]*\)"\{0,1\}.*/\1/p' /kind/kubeadm.conf | head -n1)
[[ -n "$cluster_cidr" ]] || {
	log "no podSubnet in /kind/kubeadm.conf"
	exit 1
}

pod_cidr=""
until [[ -n "$pod_cidr" ]]; do
	pod_cidr=$(kctl get node "$node" -o jsonpath='{.spec.podCIDR}' 2>/dev/null) || pod_cidr=""
	[[ -n "$pod_cidr" ]] || sleep 1
done

cat >"$conf.tmp" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "kindnet",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "mtu": 1500,
      "ipam": {
        "type": "host-local",
        "dataDir": "/run/cni-ipam-state",
        "routes": [{"dst": "0.0.0.0/0"}],
        "ranges": [[{"subnet": "$pod_cidr"}]]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
mv -f "$conf.tmp" "$conf"
log "node $node: pods in $pod_cidr (cluster $cluster_cidr)"

iptables -t nat -N MESHLINK-KIND-MASQ 2>/dev/null || true
iptables -t nat -F MESHLINK-KIND-MASQ
iptables -t nat -A MESHLINK-KIND-MASQ -d "$cluster_cidr" -j RETURN
iptables -t nat -A MESHLINK-KIND-MASQ -j MASQUERADE
iptables -t nat -C POSTROUTING -s "$cluster_cidr" -j MESHLINK-KIND-MASQ 2>/dev/null ||
	iptables -t nat -A POSTROUTING -s "$cluster_cidr" -j MESHLINK-KIND-MASQ

# Routes to the other nodes' pod ranges, kept up to date as nodes come and go.
while true; do
	kctl get nodes -o jsonpath='{range .items[*]}{.metadata.name} {.spec.podCIDR} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}' 2>/dev/null |
		while read -r name cidr ip; do
			[[ "$name" == "$node" || -z "$cidr" || -z "$ip" ]] && continue
			ip route replace "$cidr" via "$ip" 2>/dev/null || log "cannot route $cidr via $ip ($name)"
		done
	sleep 5
done

"""The network-namespace testbed of design.md: clusters as network namespaces joined by a WAN.

- `netns.Testbed`: one WAN namespace and N cluster namespaces (node address, pod addresses,
  processes run inside a cluster, iptables DROP faults in the WAN, a bridge to the
  cluster's kube-apiserver on the root namespace's loopback).
- `kubeproxy`: a kube-proxy stand-in run inside a cluster namespace (Service ClusterIP ->
  EndpointSlice endpoints by iptables DNAT); `python -m tests.netbed.kubeproxy`.
- `podserver`: a "pod" answering its name on HTTP GET; `python -m tests.netbed.podserver`.
"""

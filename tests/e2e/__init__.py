"""End-to-end tests: real kube-apiservers, real processes, network namespaces."""

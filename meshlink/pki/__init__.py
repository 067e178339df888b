"""PKI: per-site CA, gateway certificates with SPIFFE URI SANs, CSR signing, TLS contexts."""

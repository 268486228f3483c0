"""Real devices: TLS certificates (certs), SuperNode names, keys and registration (nodes), a local launcher."""

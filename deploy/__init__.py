"""Real devices: TLS certificates (certs), SuperNode names, keys and registration (nodes), a local launcher
(launcher), and the warm ClientApp launcher a device runs beside its SuperNode (warm)."""

"""Real devices: TLS certificates, SuperNode keys and registration, a local SuperLink + SuperNodes launcher."""

"""Privacy: DP-SGD plans (dp), a device's own DP floor (policy), the hash-chained ledger (ledger), and the
attacks and the one-run DP audit (attacks)."""

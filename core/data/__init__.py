"""Data: decoding and preprocessing (images), folders and the decoded cache (dataset), splits and appearance
sites, the duplicate audit, per-client manifests (partition) and the offline synthetic generator (synth)."""

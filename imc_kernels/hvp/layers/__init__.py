"""Per-layer HVP rules for the fused engine, one layer type per file (BackPACK's layout)."""

"""Training core (two-stage contrastive instruction tuning)."""

"""Training and inference machinery: feature extraction, the epoch loop, checkpoints, logs."""

"""Layer 4: the training loop on accelerate, EMA, checkpoints and resume, the non-finite policy."""

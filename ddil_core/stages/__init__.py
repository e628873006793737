"""Layer 6: one function per pipeline stage, taking a typed config and paths."""

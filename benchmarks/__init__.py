"""Speed and cost benchmarks of the pipeline (one script each; see benchmarks/README.md)."""

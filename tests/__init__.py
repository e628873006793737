"""The tests of ddil_core, laid out like the package (see tests/README.md)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root: configs/, k8s/, pipelines/, docs/, ...

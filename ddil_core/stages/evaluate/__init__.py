"""Stage evaluate: the student against its teacher under one recorded protocol (stage.py runs the parts in order):
inputs.py (prompts, reference), sampling.py (how each model is sampled and shown), results.py (metrics, speed-ups,
verdict, report, JSON files)."""
from ddil_core.stages.evaluate.stage import check_model_uri, evaluate

__all__ = ["check_model_uri", "evaluate"]

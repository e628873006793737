"""Stage distill: train the few-step student with DDIL (stage.py), after checking its inputs belong together
(inputs.py). The training loop itself is ddil_core/training/."""
from ddil_core.stages.distill.stage import distill, objective_context

__all__ = ["distill", "objective_context"]

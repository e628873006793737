"""The base objectives DDIL wraps, behind one interface (`Objective`)."""
from ddil_core.method.objectives.base import Objective, ObjectiveContext


def build_objective(name: str, ctx: ObjectiveContext) -> Objective:
    if name == "pd":
        from ddil_core.method.objectives.pd import ProgressiveDistillation

        return ProgressiveDistillation(ctx)
    if name == "lcm":
        from ddil_core.method.objectives.lcm import LatentConsistencyDistillation

        return LatentConsistencyDistillation(ctx)
    if name == "dmd2":
        from ddil_core.method.objectives.dmd2 import DistributionMatchingDistillation

        return DistributionMatchingDistillation(ctx)
    raise ValueError(f"unknown objective '{name}' (pd, lcm or dmd2)")


__all__ = ["Objective", "ObjectiveContext", "build_objective"]

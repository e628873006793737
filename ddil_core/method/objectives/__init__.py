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
    if name == "tdd":
        from ddil_core.method.objectives.tdd import TargetDrivenDistillation

        return TargetDrivenDistillation(ctx)
    raise ValueError(f"unknown objective '{name}' (pd, lcm, dmd2 or tdd)")


__all__ = ["Objective", "ObjectiveContext", "build_objective"]

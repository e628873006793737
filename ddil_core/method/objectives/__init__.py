"""The base objectives DDIL wraps, behind one interface (`Objective`)."""
from ddil_core.method.objectives.base import Objective, ObjectiveContext


def build_objective(name: str, ctx: ObjectiveContext) -> Objective:
    if name == "pd":
        from ddil_core.method.objectives.pd import ProgressiveDistillation

        return ProgressiveDistillation(ctx)
    raise ValueError(f"objective '{name}' is not available (objectives: pd)")


__all__ = ["Objective", "ObjectiveContext", "build_objective"]

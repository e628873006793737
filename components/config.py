"""resolve-config and shard-indices: the pipeline's first, CPU-only steps.

resolve-config turns the pipeline parameters into one list of `a.b=c` overrides (on top of the recipe) that every
stage receives, and validates the result with the same schema as the CLI, so that a bad recipe, key or value fails
in seconds, before any GPU is requested. shard-indices makes the list [0, ..., num_shards - 1] that the
teacher-rollouts fan-out (dsl.ParallelFor) iterates over.
"""

from typing import List

from kfp.dsl import Artifact, Output

from components.common import ddil_component, stage_config

# Pipeline parameters that mean "keep the recipe's value" (KFP parameters cannot portably be None: optional
# pipeline inputs need a KFP 2.5+ backend, and some UIs refuse empty defaults).
KEEP = ""  # string parameters
KEEP_NUMBER = -1  # numeric parameters (student_steps, priors, gates)


def pipeline_overrides(
    overrides: list,
    teacher: str = "",
    dataset: str = "",
    objective: str = "",
    student_steps: int = -1,
    prior_forward: float = -1.0,
    prior_teacher: float = -1.0,
    prior_student: float = -1.0,
    registry_uri: str = "",
    kubeflow_registry_address: str = "",
    fid_factor: float = -1.0,
    min_coverage: float = -1.0,
    min_adherence: float = -1.0,
    pushgateway: str = "",
) -> list:
    """The config overrides of a run: the `overrides` parameter, then one `key=value` per pipeline parameter that is
    set (a string parameter "" and a numeric one below 0 keep the recipe's value). Later overrides win."""

    def quoted(value: str) -> str:  # YAML single-quoted: the value stays a string ("123", "true", "a: b")
        return "'" + str(value).replace("'", "''") + "'"

    out = [str(item) for item in overrides or []]
    for key, value in (("model.teacher", teacher), ("data.dataset", dataset), ("objective.name", objective),
                       ("registry.uri", registry_uri), ("registry.kubeflow_address", kubeflow_registry_address),
                       ("telemetry.pushgateway", pushgateway)):
        if value:
            out.append(f"{key}={quoted(value)}")
    if student_steps is not None and int(student_steps) >= 0:
        out.append(f"objective.student_steps={int(student_steps)}")
    for key, value in (("ddil.priors.forward", prior_forward), ("ddil.priors.teacher", prior_teacher),
                       ("ddil.priors.student", prior_student), ("registry.gates.fid_factor", fid_factor),
                       ("registry.gates.min_coverage", min_coverage),
                       ("registry.gates.min_adherence", min_adherence)):
        if value is not None and float(value) >= 0:
            out.append(f"{key}={float(value)!r}")
    return out


@ddil_component(stage_config, pipeline_overrides)
def resolve_config(
    recipe: str,
    overrides: List[str],
    teacher: str,
    dataset: str,
    objective: str,
    student_steps: int,
    prior_forward: float,
    prior_teacher: float,
    prior_student: float,
    registry_uri: str,
    kubeflow_registry_address: str,
    fid_factor: float,
    min_coverage: float,
    min_adherence: float,
    pushgateway: str,
    resolved_config: Output[Artifact],
) -> List[str]:
    """Merge the pipeline parameters into the overrides list, validate the config, record it (resolved_config)."""
    from ddil_core.config import dump_config

    merged = pipeline_overrides(
        overrides, teacher=teacher, dataset=dataset, objective=objective, student_steps=student_steps,
        prior_forward=prior_forward, prior_teacher=prior_teacher, prior_student=prior_student,
        registry_uri=registry_uri, kubeflow_registry_address=kubeflow_registry_address, fid_factor=fid_factor,
        min_coverage=min_coverage, min_adherence=min_adherence, pushgateway=pushgateway,
    )
    config = stage_config(recipe, merged)  # raises on a bad recipe, key or value: the run stops here
    with open(resolved_config.path, "w", encoding="utf-8") as handle:
        handle.write(dump_config(config))
    resolved_config.metadata.update({"recipe": recipe if "\n" not in recipe else "(inline YAML)",
                                     "overrides": merged, "teacher": config.model.teacher,
                                     "dataset": config.data.dataset, "objective": config.objective.name,
                                     "student_steps": config.objective.student_steps})
    print("config overrides:", *merged, sep="\n  ")
    return merged


@ddil_component()
def shard_indices(num_shards: int) -> List[int]:
    """[0, 1, ..., num_shards - 1]: the items of the teacher-rollouts fan-out."""
    if num_shards < 1:
        raise ValueError(f"num_shards = {num_shards} must be at least 1")
    return list(range(num_shards))

"""KFP components of the ddil pipeline: thin adapters from Kubeflow Pipelines to the stage functions of ddil_core.

Lightweight Python components on the ddil image (`DDIL_IMAGE`, overridable with the DDIL_IMAGE environment variable
at compile time). Each body imports ddil_core inside the function, builds the config from `recipe` + `overrides`
and calls one stage function.
"""
from components.common import DDIL_IMAGE, DEFAULT_IMAGE
from components.config import pipeline_overrides, resolve_config, shard_indices
from components.deploy import deploy
from components.stages import cache_latents, check_gates, diagnose, distill, evaluate, register, teacher_rollouts
from components.trainjob import launch_trainjob

__all__ = [
    "DDIL_IMAGE",
    "DEFAULT_IMAGE",
    "cache_latents",
    "check_gates",
    "diagnose",
    "deploy",
    "distill",
    "evaluate",
    "launch_trainjob",
    "pipeline_overrides",
    "register",
    "resolve_config",
    "shard_indices",
    "teacher_rollouts",
]

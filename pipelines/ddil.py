"""The ddil Kubeflow Pipelines v2 pipeline; `python -m pipelines.ddil` (`make compile`) writes pipelines/ddil.yaml.

Graph (task: inputs):

    resolve-config:   recipe, overrides, teacher, dataset, objective, student_steps, prior_*, registry_uri,
                      kubeflow_registry_address, fid_factor, min_coverage, min_adherence, pushgateway
                      -> the merged overrides list (validated) + resolved_config
    shard-indices:    num_shards -> [0 .. num_shards-1]
    cache-latents:    recipe, resolve-config.Output                                           [GPU] -> latents
    if not multi_node ("single-pod"):
        for shard in shard-indices.Output:
            teacher-rollouts: recipe, overrides, latents, shard, num_shards              [GPU] -> rollouts
        distill:        recipe, overrides, latents, Collected(rollouts)                  [GPU] -> student, training_log
        diagnose:       recipe, overrides, student        [GPU] -> metrics, curve, diagnosis (covariate shift)
        evaluate:       recipe, overrides, student, diagnosis  [GPU] -> metrics, report, report_html, evaluation
        check-gates:    recipe, overrides, evaluation -> bool
        if passed: register: recipe, overrides, student, evaluation                      [CPU] -> registration
            if deploy: deploy: student, registration, gpu_type   [CPU; applies a KServe InferenceService] -> URL
    else ("multi-node"):
        the same fan-out; launch-trainjob (CPU pod that runs the distill as a TrainJob / PyTorchJob on num_nodes
        nodes) instead of distill; then the same diagnose, evaluate, check-gates and register.

Why the fan-out and the tail are inside each branch: with kfp 2.17 a dsl.Collected list of artifacts cannot be
passed into a dsl.If group (the compiler fails on it), and the local runner cannot resolve dsl.OneOf over
artifacts; one branch per distill mode keeps the pipeline compilable and runnable locally. Only one branch runs;
the rollout tasks of both have the same cache key.

Kubernetes settings (kfp-kubernetes): GPU stages request `gpu_count` x `gpu_type` (pipeline parameters), run on
the GPU node pool (node selector nvidia.com/gpu.present=true, toleration nvidia.com/gpu:NoSchedule), get a
memory-backed /dev/shm, the hf-cache PVC at /cache/huggingface (HF_HOME) and the S3 / Hugging Face credentials
from the Secrets ddil-s3-credentials / ddil-hf-token (names only: no value is in the YAML). register and the
launcher run on CPU nodes.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import List

from kfp import compiler, dsl, kubernetes

from components import (
    DDIL_IMAGE,
    cache_latents,
    check_gates,
    diagnose,
    distill,
    evaluate,
    launch_trainjob,
    register,
    resolve_config,
    shard_indices,
    teacher_rollouts,
)
from components.deploy import deploy as deploy_student  # `deploy` is also the pipeline's parameter

PIPELINE_NAME = "ddil"
PIPELINE_YAML = Path(__file__).resolve().with_name("ddil.yaml")

# Cluster objects the pipeline refers to by name (k8s/base): Secrets, PVCs. Only names, never values.
S3_SECRET = "ddil-s3-credentials"
S3_SECRET_KEYS = {key: key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
HF_TOKEN_SECRET = "ddil-hf-token"
HF_TOKEN_KEYS = {"HF_TOKEN": "HF_TOKEN"}
HF_CACHE_PVC = "hf-cache"
HF_HOME = "/cache/huggingface"
DATA_PVC = "ddil-data"  # shared (ReadWriteMany) volume of the multi-node job
DATA_MOUNT = "/data"
# GPU node pool (k8s/overlays/gpu-cluster): label set by the NVIDIA GPU Operator, taint nvidia.com/gpu:NoSchedule.
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")
GPU_TAINT_KEY = "nvidia.com/gpu"
SHM_SIZE = "16Gi"  # memory-backed /dev/shm for DataLoader workers and NCCL
IO_RETRIES = 2  # stages that read or write remote storage retry on failure (60 s, then 120 s)
DISTILL_RETRIES = 3  # a preempted or killed distill pod is retried; each retry resumes from the durable checkpoint
# Pod deadline (activeDeadlineSeconds) of each attempt: a stuck GPU task does not hold its GPUs for ever.
TIMEOUTS = {"cache-latents": 24 * 3600, "teacher-rollouts": 24 * 3600, "distill": 7 * 24 * 3600,
            "evaluate": 12 * 3600, "diagnose": 12 * 3600, "launch-trainjob": 7 * 24 * 3600 + 3600}
# Telemetry settings of the cluster (k8s/base ConfigMap ddil-settings), read by every stage (stages/common.py).
SETTINGS_CONFIG_MAP = "ddil-settings"
SETTINGS_KEYS = {key: key for key in ("DDIL_PUSHGATEWAY", "DDIL_METRICS_PORT")}
# Labels of the distill pod: the PodMonitor of k8s/components/prometheus-operator scrapes its /metrics.
DISTILL_POD_LABELS = {"app.kubernetes.io/name": "ddil", "app.kubernetes.io/component": "distill",
                      "app.kubernetes.io/part-of": "ddil"}
RUN_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # one run id for every stage: telemetry grouping key, lineage, checkpoints


def _credentials(task: dsl.PipelineTask) -> None:
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS, optional=True)


def _settings(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """$DDIL_PUSHGATEWAY and $DDIL_METRICS_PORT from the cluster's ddil-settings ConfigMap (optional)."""
    return kubernetes.use_config_map_as_env(task, config_map_name=SETTINGS_CONFIG_MAP,
                                            config_map_key_to_env=SETTINGS_KEYS, optional=True)


def _gpu_stage(task: dsl.PipelineTask, gpu_type, gpu_count, cpu, memory) -> dsl.PipelineTask:
    """GPU, CPU and memory requests and limits, GPU node pool, /dev/shm, Hugging Face cache, credentials, the
    telemetry settings and a deadline."""
    task.set_accelerator_type(gpu_type).set_accelerator_limit(gpu_count)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    # kfp 2.17 does not pass channels used only in resource placeholders into ParallelFor / If groups (the task
    # then fails to resolve them): registering them as task inputs makes the compiler wire them through.
    task.register_pipeline_channels([gpu_type, gpu_count, cpu, memory])
    kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    kubernetes.add_toleration(task, key=GPU_TAINT_KEY, operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE)
    kubernetes.mount_pvc(task, pvc_name=HF_CACHE_PVC, mount_path=HF_HOME)
    task.set_env_variable("HF_HOME", HF_HOME)
    kubernetes.use_secret_as_env(task, secret_name=HF_TOKEN_SECRET, secret_key_to_env=HF_TOKEN_KEYS, optional=True)
    _credentials(task)
    _settings(task)
    kubernetes.set_timeout(task, TIMEOUTS[task.component_spec.name.replace("_", "-")])
    return task


def _io_retry(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return task.set_retry(num_retries=IO_RETRIES, backoff_duration="60s", backoff_factor=2.0)


def _teacher_rollouts(recipe, overrides, latents, shards, num_shards, resources) -> dsl.PipelineTask:
    """The fan-out: one teacher-rollouts task per shard index (collected by the caller with dsl.Collected)."""
    with dsl.ParallelFor(items=shards, name="rollout-shards") as shard:
        task = teacher_rollouts(recipe=recipe, overrides=overrides, run_id=RUN_ID, latents=latents, shard=shard,
                                num_shards=num_shards)
        task.set_display_name("teacher-rollouts")
        _io_retry(_gpu_stage(task, *resources)).set_caching_options(True)
    return task


def _evaluate_and_register(recipe, overrides, student, resources, deploy) -> None:
    """diagnose (GPU) -> evaluate (GPU) -> check-gates -> register behind dsl.If on the gates (CPU only) -> deploy
    (when asked)."""
    shift = diagnose(recipe=recipe, overrides=overrides, run_id=RUN_ID, student=student)
    _io_retry(_gpu_stage(shift, *resources))
    # evaluate takes diagnose's curve for its report instead of measuring it a second time
    ev = evaluate(recipe=recipe, overrides=overrides, run_id=RUN_ID, student=student,
                  diagnosis=shift.outputs["diagnosis"])
    _io_retry(_gpu_stage(ev, *resources))
    gates = check_gates(recipe=recipe, overrides=overrides, evaluation=ev.outputs["evaluation"])
    gates.set_caching_options(False)
    with dsl.If(gates.output == True, name="gates-passed"):  # noqa: E712 - a KFP condition, not a Python test
        reg = register(recipe=recipe, overrides=overrides, run_id=RUN_ID, student=student,
                       evaluation=ev.outputs["evaluation"])
        _credentials(_io_retry(reg))
        _settings(reg)
        reg.set_caching_options(False)  # registering is a side effect: never skipped as "cached"
        with dsl.If(deploy == True, name="deploy-enabled"):  # noqa: E712
            served = deploy_student(student=student, registration=reg.outputs["registration"],
                                    gpu_type=resources[0], image=DDIL_IMAGE)
            served.set_caching_options(False)  # applies the InferenceService: a side effect, as register


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="DDIL diffusion distillation: cache latents, teacher rollouts (fanned out over shards), distill a "
                "few-step student (one pod, or a multi-node Trainer job), evaluate against the teacher, register "
                "when the quality gates pass.",
)
def ddil_pipeline(
    teacher: str = "",
    dataset: str = "",
    recipe: str = "tiny",
    overrides: List[str] = [],
    objective: str = "",
    student_steps: int = -1,
    prior_forward: float = -1.0,
    prior_teacher: float = -1.0,
    prior_student: float = -1.0,
    num_shards: int = 2,
    gpu_type: str = "nvidia.com/gpu",
    gpu_count: int = 1,
    gpu_task_cpu: str = "8",
    gpu_task_memory: str = "64Gi",
    checkpoint_root: str = "/data/ddil-runs",
    registry_uri: str = "",
    kubeflow_registry_address: str = "",
    fid_factor: float = -1.0,
    min_coverage: float = -1.0,
    min_adherence: float = -1.0,
    pushgateway: str = "",
    multi_node: bool = False,
    num_nodes: int = 2,
    training_operator: str = "v2",
    deploy: bool = False,
):
    """Parameters "" (strings) and -1 (numbers) keep the recipe's value; `overrides` sets any config key
    (["training.steps=2000", ...]); the named parameters are applied after it. `deploy` (off by default: it
    changes what a live endpoint serves, and needs KServe on the cluster) serves a student that passed the gates
    with KServe (components/deploy.py, k8s/serving/)."""
    config = resolve_config(
        recipe=recipe, overrides=overrides, teacher=teacher, dataset=dataset, objective=objective,
        student_steps=student_steps, prior_forward=prior_forward, prior_teacher=prior_teacher,
        prior_student=prior_student, registry_uri=registry_uri, kubeflow_registry_address=kubeflow_registry_address,
        fid_factor=fid_factor, min_coverage=min_coverage, min_adherence=min_adherence, pushgateway=pushgateway,
    )
    config.set_caching_options(False)  # cheap, and it re-validates the recipe of the image every run
    merged = config.outputs["Output"]
    shards = shard_indices(num_shards=num_shards)

    resources = (gpu_type, gpu_count, gpu_task_cpu, gpu_task_memory)
    latents = cache_latents(recipe=recipe, overrides=merged, run_id=RUN_ID)
    _io_retry(_gpu_stage(latents, *resources)).set_caching_options(True)
    latents = latents.outputs["latents"]

    with dsl.If(multi_node == False, name="single-pod"):  # noqa: E712
        rollouts = _teacher_rollouts(recipe, merged, latents, shards.output, num_shards, resources)
        train = distill(recipe=recipe, overrides=merged, run_id=RUN_ID, latents=latents,
                        rollouts=dsl.Collected(rollouts.outputs["rollouts"]), checkpoint_root=checkpoint_root)
        _gpu_stage(train, *resources)
        train.set_retry(num_retries=DISTILL_RETRIES, backoff_duration="60s", backoff_factor=2.0)
        train.set_caching_options(False)
        kubernetes.mount_pvc(train, pvc_name=DATA_PVC, mount_path=DATA_MOUNT)  # checkpoint_root's default
        for key, value in DISTILL_POD_LABELS.items():
            kubernetes.add_pod_label(train, label_key=key, label_value=value)
        _evaluate_and_register(recipe, merged, train.outputs["student"], resources, deploy)

    with dsl.Else(name="multi-node"):
        rollouts = _teacher_rollouts(recipe, merged, latents, shards.output, num_shards, resources)
        job = launch_trainjob(
            recipe=recipe, overrides=merged, latents=latents, rollouts=dsl.Collected(rollouts.outputs["rollouts"]),
            num_nodes=num_nodes, gpu_type=gpu_type, gpu_count=gpu_count, training_operator=training_operator,
            run_id=RUN_ID, image=DDIL_IMAGE,
        )
        job.set_caching_options(False)
        kubernetes.mount_pvc(job, pvc_name=DATA_PVC, mount_path=DATA_MOUNT)
        kubernetes.set_timeout(job, TIMEOUTS["launch-trainjob"])
        _credentials(job)
        _settings(job)
        _evaluate_and_register(recipe, merged, job.outputs["student"], resources, deploy)


def compile_pipeline(path: os.PathLike | str = PIPELINE_YAML) -> Path:
    compiler.Compiler().compile(pipeline_func=ddil_pipeline, package_path=str(path))
    return Path(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ddil", description="compile the ddil pipeline")
    parser.add_argument("--output", default=str(PIPELINE_YAML), help=f"default: {PIPELINE_YAML}")
    args = parser.parse_args(argv)
    print(f"compiled {compile_pipeline(args.output)} (image {DDIL_IMAGE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One KFP component per ddil stage: a thin adapter that builds the typed config and calls ddil_core.

Every component takes the recipe (`recipe`: a name, a path in the image, or YAML text) and `overrides` (["a.b=c"])
and writes typed artifacts: Dataset folders for the latent cache and the rollout shards, a Model for the student,
Metrics / Markdown / HTML for the evaluation, and an Artifact holding the whole evaluation folder.
"""

from typing import List

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.common import (copy_folder, ddil_component, inline_images, stage_config, student_scalars,
                               watch_scalars)


@ddil_component(stage_config)
def cache_latents(recipe: str, overrides: List[str], run_id: str, latents: Output[Dataset]):
    """Encode the dataset with the teacher's VAE and text encoder(s) into fp16 latent shards (a folder)."""
    from ddil_core.stages.cache_latents import cache_latents as run_stage

    config = stage_config(recipe, overrides, run_id)
    manifest = run_stage(config, latents.path)
    latents.metadata.update({"count": manifest["count"], "shards": len(manifest["shards"]),
                             "teacher": config.model.teacher, "dataset": config.data.dataset,
                             "dataset_sha256": manifest.get("dataset_sha256"),
                             "resolution": manifest.get("resolution"), "skipped": manifest.get("skipped", 0)})


@ddil_component(stage_config)
def teacher_rollouts(recipe: str, overrides: List[str], run_id: str, latents: Input[Dataset], shard: int,
                     num_shards: int, rollouts: Output[Dataset]):
    """The teacher's reverse-process states for shard `shard` of `num_shards` (rollout i uses seed + i, so the
    union of the shards does not depend on the sharding)."""
    from ddil_core.stages.teacher_rollouts import teacher_rollouts as run_stage

    config = stage_config(recipe, overrides, run_id)
    manifest = run_stage(config, latents.path, rollouts.path, shard=shard, num_shards=num_shards)
    rollouts.metadata.update({"count": manifest["count"], "shard": shard, "num_shards": num_shards,
                              "timesteps": manifest.get("timesteps")})


def accelerate_distill_command(num_processes: int, config_path: str, latents: str, rollouts: list,
                               out: str) -> list:
    """`accelerate launch` of `ddil distill` over the GPUs of this pod (DDP, one process per GPU)."""
    command = ["accelerate", "launch", "--num_machines", "1", "--num_processes", str(int(num_processes))]
    if int(num_processes) > 1:
        command.append("--multi_gpu")
    command += ["-m", "ddil_core.cli", "distill", f"--config={config_path}", f"--latents={latents}"]
    command += [f"--rollouts={r}" for r in rollouts]
    return command + [f"--out={out}"]


def durable_distill_dir(checkpoint_root: str, run_id: str) -> str:
    """Where the distill of run `run_id` keeps its checkpoints: <checkpoint_root>/<run id>/distill, a PVC path (the
    ddil-data volume) or an s3:// prefix. Keyed by the run, so every retry of the task finds the same folder."""
    import re

    run = str(run_id or "")
    if not run or "{{" in run:
        raise ValueError("distill needs the pipeline run id (run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER) to key its "
                         f"checkpoints, got {run_id!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", run):
        raise ValueError(f"run_id {run_id!r}: not usable as a folder name")
    if not checkpoint_root:
        raise ValueError("checkpoint_root is empty: give a PVC path (/data/ddil-runs) or an s3:// prefix")
    return f"{checkpoint_root.rstrip('/')}/{run}/distill"


@ddil_component(stage_config, copy_folder, accelerate_distill_command, durable_distill_dir, watch_scalars)
def distill(recipe: str, overrides: List[str], run_id: str, latents: Input[Dataset], rollouts: Input[List[Dataset]],
            student: Output[Model], training_log: Output[Artifact], watch: Output[Metrics],
            checkpoint_root: str = "/data/ddil-runs"):
    """Train the few-step student in this pod: in-process on one GPU (or the CPU), with `accelerate launch` (DDP)
    when the pod has several GPUs (gpu_count > 1; $DDIL_NUM_PROCESSES overrides the count).

    Checkpoints survive the pod: they go to <checkpoint_root>/<run id>/distill (durable_distill_dir), on the
    ddil-data volume (a path) or mirrored to object storage after every checkpoint (an s3:// prefix). A retry of
    the task (preemption, node loss, OOM kill) resumes there from the last checkpoint to the weights of an
    uninterrupted run; the folder is removed once the student is out. Outputs: the student (a plain diffusers
    pipeline folder, lineage in its metadata), the training log (train_log.jsonl, resolved_config.yaml) and, for a
    watched run (training.eval_every), its in-training measures as metrics the KFP UI shows (watch_scalars).
    """
    import json
    import os
    import shutil
    import subprocess
    import tempfile
    import threading

    import torch
    from ddil_core.config import dump_config
    from ddil_core.stages.distill import distill as run_stage
    from ddil_core.training import durable

    config = stage_config(recipe, overrides, run_id)
    where = durable_distill_dir(checkpoint_root, run_id)
    remote = "://" in where
    scratch = tempfile.mkdtemp(prefix="ddil-distill-", dir=os.environ.get("DDIL_WORK_DIR") or None)
    if remote:
        out = os.path.join(scratch, "distill")
        os.makedirs(out, exist_ok=True)
        durable.pull(where, out)  # a retry: the checkpoints of the earlier attempts
    else:
        out = where
        os.makedirs(out, exist_ok=True)
        stale = os.path.join(os.path.dirname(out), ".distill.lock")
        if os.path.exists(stale):  # KFP starts a retry only after the failed attempt's pod ended: its lock is stale
            print(f"removing the lock of an earlier attempt: {stale}", flush=True)
            os.remove(stale)

    def mirror():
        if remote:
            durable.push(out, where)

    processes = int(os.environ.get("DDIL_NUM_PROCESSES") or torch.cuda.device_count() or 1)
    try:
        if processes > 1:
            config_path = os.path.join(scratch, "config.yaml")
            with open(config_path, "w", encoding="utf-8") as handle:
                handle.write(dump_config(config))
            command = accelerate_distill_command(processes, config_path, latents.path, [r.path for r in rollouts],
                                                 out)
            print("running:", " ".join(command), flush=True)
            done = threading.Event()

            def mirror_while_running():  # the ranks run in other processes: mirror what they write meanwhile
                while not done.wait(30):
                    mirror()

            watcher = threading.Thread(target=mirror_while_running, daemon=True)
            watcher.start()
            try:
                subprocess.run(command, check=True)
            finally:
                done.set()
                watcher.join()
                mirror()
            folder = os.path.join(out, "student")
        else:
            folder = run_stage(config, latents.path, [r.path for r in rollouts], out, on_checkpoint=mirror)
        copy_folder(str(folder), student.path)
        os.makedirs(training_log.path, exist_ok=True)
        for name in ("train_log.jsonl", "resolved_config.yaml"):
            if os.path.exists(os.path.join(out, name)):
                shutil.copy2(os.path.join(out, name), os.path.join(training_log.path, name))
        for name, value in watch_scalars(os.path.join(training_log.path, "train_log.jsonl")).items():
            watch.log_metric(name, value)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # the student is out: the run's checkpoints are no longer needed
    if remote:
        durable.remove(where)
    else:
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    info_path = os.path.join(student.path, "ddil_student.json")
    info = {}
    if os.path.exists(info_path):
        with open(info_path, encoding="utf-8") as handle:
            info = json.load(handle)
    student.metadata.update({"framework": "diffusers", "objective": config.objective.name,
                             "steps": info.get("num_inference_steps", config.objective.student_steps),
                             "guidance_scale": info.get("guidance_scale"), "teacher": config.model.teacher,
                             "steps_trained": info.get("steps_trained"), "rollout_shards": len(rollouts),
                             "processes": processes, **(info.get("lineage") or {})})


@ddil_component(stage_config, inline_images, student_scalars)
def evaluate(recipe: str, overrides: List[str], run_id: str, student: Input[Model], diagnosis: Input[Artifact],
             metrics: Output[Metrics], report: Output[Markdown], report_html: Output[HTML],
             evaluation: Output[Artifact]):
    """Compare the student with its teacher. `diagnosis`: diagnose's folder for this student, whose covariate-shift
    curve goes into the report instead of being measured twice (checked: same student, teacher and settings).
    `evaluation`: the whole folder (metrics.json, report.md/.html, PNGs); `metrics`: the student's scalars
    (teacher's as teacher_*); `report` / `report_html`: one self-contained file each, images embedded as data URIs,
    because the Kubeflow UI renders a single file per artifact."""
    import json
    import os

    from ddil_core.stages.evaluate import evaluate as run_stage

    config = stage_config(recipe, overrides, run_id)
    result = run_stage(config, student.path, config.model.teacher, evaluation.path,
                       covariate_shift=diagnosis.path)
    with open(os.path.join(evaluation.path, "metrics.json"), encoding="utf-8") as handle:
        result = json.load(handle)  # the file as written (strict JSON) rather than the in-memory dict
    for name, value in student_scalars(result).items():
        metrics.log_metric(name, value)
    for src, artifact in (("report.md", report), ("report.html", report_html)):
        path = os.path.join(evaluation.path, src)
        text = open(path, encoding="utf-8").read() if os.path.exists(path) else f"(evaluate wrote no {src})"
        with open(artifact.path, "w", encoding="utf-8") as handle:
            handle.write(inline_images(text, evaluation.path))
    evaluation.metadata.update({"files": sorted(os.listdir(evaluation.path))})


@ddil_component(stage_config, inline_images)
def diagnose(recipe: str, overrides: List[str], run_id: str, student: Input[Model], metrics: Output[Metrics],
             curve: Output[HTML], diagnosis: Output[Artifact]):
    """The student's covariate-shift curve against its teacher (ddil diagnose). `diagnosis`: the whole folder
    (diagnose.json with the intervals, the PNG plots); `metrics`: the headline scalars (covariate_*); `curve`: the
    plots in one self-contained page for the Kubeflow UI."""
    import os

    from ddil_core.stages.diagnose import HANDOVER_PLOT, SHIFT_PLOT
    from ddil_core.stages.diagnose import diagnose as run_stage

    config = stage_config(recipe, overrides, run_id)
    summary = run_stage(config, student.path, config.model.teacher, diagnosis.path)
    for name, value in summary["headline"].items():
        if value is not None:
            metrics.log_metric(f"covariate_{name}", value)
    page = "".join(f'<figure><img src="{name}"></figure>' for name in (SHIFT_PLOT, HANDOVER_PLOT))
    with open(curve.path, "w", encoding="utf-8") as handle:
        handle.write(inline_images(f"<html><body><h1>Covariate shift</h1>{page}</body></html>", diagnosis.path))
    diagnosis.metadata.update({"files": sorted(os.listdir(diagnosis.path))})


@ddil_component(stage_config)
def check_gates(recipe: str, overrides: List[str], evaluation: Input[Artifact]) -> bool:
    """True when the student passes every quality gate of registry.gates (none set: True); prints each gate."""
    import os

    from ddil_core.registry.gates import check_gates as run_gates
    from ddil_core.registry.gates import failed
    from ddil_core.stages.register import read_metrics

    config = stage_config(recipe, overrides)
    results = run_gates(read_metrics(os.path.join(evaluation.path, "metrics.json")), config.registry.gates)
    for result in results:
        print(("PASS " if result.passed else "FAIL ") + result.message)
    if not results:
        print("no quality gates set (registry.gates): nothing to check")
    passed = not failed(results)
    print("gates passed: the student will be registered" if passed else "gates failed: the student is not registered")
    return passed


@ddil_component(stage_config)
def register(recipe: str, overrides: List[str], run_id: str, student: Input[Model], evaluation: Input[Artifact],
             registration: Output[Artifact]):
    """Register the student (local registry folder registry.uri, or the Kubeflow Model Registry when
    registry.kubeflow_address is set) with its model card and lineage; `registration` holds the registry entry as
    JSON. The Model Registry records the artifact's s3:// URI (KFP's minio:// store seen through its S3 API), not
    this pod's copy; the lineage (git SHA, data and cache hashes, run id, s3:// URI) is in both and in the
    registration's metadata."""
    import json
    import os

    from ddil_core.stages.register import register as run_stage

    config = stage_config(recipe, overrides, run_id)
    uri = student.uri if "://" in (student.uri or "") and not student.uri.startswith("file://") else None
    entry = run_stage(config, student.path, os.path.join(evaluation.path, "metrics.json"), model_uri=uri)
    with open(registration.path, "w", encoding="utf-8") as handle:
        json.dump(entry, handle, indent=2, default=str)
    from ddil_core.registry.lineage import LINEAGE_KEYS

    lineage = entry.get("lineage") or {k: v for k, v in (entry.get("metadata") or {}).items() if k in LINEAGE_KEYS}
    registration.metadata.update({k: entry[k] for k in ("name", "version", "path", "model_uri", "uri") if k in entry
                                  and isinstance(entry[k], (str, int, float, bool))})
    registration.metadata.update(lineage)
    print(f"registered {entry.get('name')} version {entry.get('version')}")

"""One KFP component per ddil stage: a thin adapter that builds the typed config and calls ddil_core.

Every component takes the recipe (`recipe`: a name, a path in the image, or YAML text) and `overrides` (["a.b=c"])
and writes typed artifacts: Dataset folders for the latent cache and the rollout shards, a Model for the student,
Metrics / Markdown / HTML for the evaluation, and an Artifact holding the whole evaluation folder.
"""

from typing import List

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.common import copy_folder, ddil_component, inline_images, stage_config, student_scalars


@ddil_component(stage_config)
def cache_latents(recipe: str, overrides: List[str], latents: Output[Dataset]):
    """Encode the dataset with the teacher's VAE and text encoder(s) into fp16 latent shards (a folder)."""
    from ddil_core.stages.cache_latents import cache_latents as run_stage

    config = stage_config(recipe, overrides)
    manifest = run_stage(config, latents.path)
    latents.metadata.update({"count": manifest["count"], "shards": len(manifest["shards"]),
                             "teacher": config.model.teacher, "dataset": config.data.dataset,
                             "resolution": manifest.get("resolution"), "skipped": manifest.get("skipped", 0)})


@ddil_component(stage_config)
def teacher_rollouts(recipe: str, overrides: List[str], latents: Input[Dataset], shard: int, num_shards: int,
                     rollouts: Output[Dataset]):
    """The teacher's reverse-process states for shard `shard` of `num_shards` (rollout i uses seed + i, so the
    union of the shards does not depend on the sharding)."""
    from ddil_core.stages.teacher_rollouts import teacher_rollouts as run_stage

    config = stage_config(recipe, overrides)
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


@ddil_component(stage_config, copy_folder, accelerate_distill_command)
def distill(recipe: str, overrides: List[str], latents: Input[Dataset], rollouts: Input[List[Dataset]],
            student: Output[Model], training_log: Output[Artifact]):
    """Train the few-step student in this pod: in-process on one GPU (or the CPU), with `accelerate launch` (DDP)
    when the pod has several GPUs (gpu_count > 1; $DDIL_NUM_PROCESSES overrides the count).

    Checkpoints and the replay buffer go to a work folder ($DDIL_WORK_DIR, else a temporary one); the student (a
    plain diffusers pipeline folder) and the training log (train_log.jsonl, resolved_config.yaml) are the outputs.
    """
    import json
    import os
    import shutil
    import subprocess
    import tempfile

    import torch
    from ddil_core.config import dump_config
    from ddil_core.stages.distill import distill as run_stage

    config = stage_config(recipe, overrides)
    work = tempfile.mkdtemp(prefix="ddil-distill-", dir=os.environ.get("DDIL_WORK_DIR") or None)
    out = os.path.join(work, "distill")
    processes = int(os.environ.get("DDIL_NUM_PROCESSES") or torch.cuda.device_count() or 1)
    try:
        if processes > 1:
            config_path = os.path.join(work, "config.yaml")
            with open(config_path, "w", encoding="utf-8") as handle:
                handle.write(dump_config(config))
            command = accelerate_distill_command(processes, config_path, latents.path, [r.path for r in rollouts],
                                                 out)
            print("running:", " ".join(command), flush=True)
            subprocess.run(command, check=True)
            folder = os.path.join(out, "student")
        else:
            folder = run_stage(config, latents.path, [r.path for r in rollouts], out)
        copy_folder(str(folder), student.path)
        os.makedirs(training_log.path, exist_ok=True)
        for name in ("train_log.jsonl", "resolved_config.yaml"):
            if os.path.exists(os.path.join(out, name)):
                shutil.copy2(os.path.join(out, name), os.path.join(training_log.path, name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info_path = os.path.join(student.path, "ddil_student.json")
    info = {}
    if os.path.exists(info_path):
        with open(info_path, encoding="utf-8") as handle:
            info = json.load(handle)
    student.metadata.update({"framework": "diffusers", "objective": config.objective.name,
                             "steps": info.get("num_inference_steps", config.objective.student_steps),
                             "guidance_scale": info.get("guidance_scale"), "teacher": config.model.teacher,
                             "steps_trained": info.get("steps_trained"), "rollout_shards": len(rollouts),
                             "processes": processes})


@ddil_component(stage_config, inline_images, student_scalars)
def evaluate(recipe: str, overrides: List[str], student: Input[Model], metrics: Output[Metrics],
             report: Output[Markdown], report_html: Output[HTML], evaluation: Output[Artifact]):
    """Compare the student with its teacher. `evaluation`: the whole folder (metrics.json, report.md/.html, PNGs);
    `metrics`: the student's scalars (teacher's as teacher_*); `report` / `report_html`: one self-contained file
    each, images embedded as data URIs, because the Kubeflow UI renders a single file per artifact."""
    import json
    import os

    from ddil_core.stages.evaluate import evaluate as run_stage

    config = stage_config(recipe, overrides)
    result = run_stage(config, student.path, config.model.teacher, evaluation.path)
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
def register(recipe: str, overrides: List[str], student: Input[Model], evaluation: Input[Artifact],
             registration: Output[Artifact]):
    """Register the student (local registry folder registry.uri, or the Kubeflow Model Registry when
    registry.kubeflow_address is set) with its model card; `registration` holds the registry entry as JSON."""
    import json
    import os

    from ddil_core.stages.register import register as run_stage

    config = stage_config(recipe, overrides)
    source = student.path
    if config.registry.kubeflow_address and "://" in (student.uri or "") and not student.uri.startswith("file://"):
        source = student.uri  # the Model Registry records where the artifact lives, not this pod's copy
    entry = run_stage(config, source, os.path.join(evaluation.path, "metrics.json"))
    with open(registration.path, "w", encoding="utf-8") as handle:
        json.dump(entry, handle, indent=2, default=str)
    registration.metadata.update({k: entry[k] for k in ("name", "version", "path", "model_uri") if k in entry
                                  and isinstance(entry[k], (str, int, float, bool))})
    print(f"registered {entry.get('name')} version {entry.get('version')}")

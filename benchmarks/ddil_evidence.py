"""Does DDIL work? A paired benchmark powered to answer, on the digits teacher (docs/results.md, the design).

One question: does a DDIL student imitate its teacher better than the same student trained on forward states at the
same timesteps? Per objective and student step count, over seeds s (the same seeds in every arm):
- arms: `baseline` (forward states only), `control` (forward states at the DDIL arm's timestep distribution:
  ddil.control = timestep_matched), `ddil` (0.5 / 0.25 / 0.25, replay buffer, rollouts by the EMA), and for DMD2 its
  published `backward_sim` (the generator's own states only, fresh online rollouts from j = 0, pure noise); when
  named in `--arms`, `ddil_online` (the DDIL arm with rollouts by the online student: does the policy matter?) and
  `ddil_light` / `control_light` (0.8 / 0.1 / 0.1 and its timestep-matched control: a lower dose of DDIL);
- common random numbers: training.random_streams = separate, so arms differ only in their states; an EMA on every
  student; student states made by at least one student step (ddil.student_min_steps = 1);
- evaluation: `--images` images per student with their own noise each (the same noises in every arm), KID (unbiased,
  with its standard error) and FD to `--teacher-images` samples of the teacher (made once; the primary imitation
  measures) and to as many of its samples without guidance (secondary: DMD2's distribution matching follows the
  unguided teacher), FD, KID, precision, recall, density and coverage to the held-out digits, adherence; the
  covariate-shift curve of every student (stages/diagnose.py: R after the first step, C, final drift); the teacher
  at the student's N DDIM steps as the "no distillation" row;
- statistics: per-seed paired differences (ddil - control, ddil - baseline, control - baseline), their mean with a
  95% t-interval and an exact sign-flip p, Holm's correction over the (objective, steps, KID and FD) family of
  the primary comparison, and the smallest effect the run could detect (metrics/paired.py). The rule fixed in
  advance: start with `--seeds` seeds; while the primary interval contains 0 and the detectable effect exceeds
  `--target-effect`, add seeds, up to `--max-seeds`.
Go/no-go first: the baseline students' covariate-shift factors are reported before any comparison; R near 1 and
C near 1 mean there is little shift for DDIL to fix on this task.

    python benchmarks/ddil_evidence.py --demo runs/demo/demo --work runs/evidence --workers 2   # resumable
    # --student-steps 2 on the same --work: its own folder of runs (steps2-updates800), the teacher's samples shared
    # docs/results.md's LCM run (--objectives lcm --updates 400 --diagnose-noises 16): ~8 min a run, two at a time,
    # 18 runs in ~75 min on 2 cores, after ~15 min for the teacher's 5,000 samples. The diagnosis of a consistency
    # student is the dearest part after training: its teacher reference runs guided DDIM to 0 from every state.
    python benchmarks/ddil_evidence.py --quick --demo /tmp/demo-quick --work /tmp/ev  # smoke: tiny budgets
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.paper_table import base_overrides, demo_guidance, objective_overrides, prepare_quick_demo, rollouts_for
from ddil_core.config import load_config, recipe_path
from ddil_core.data.digits import DIGIT_WORDS, digit_caption, prompt_class
from ddil_core.metrics.extractors import load_extractor
from ddil_core.metrics.fid import frechet_distance
from ddil_core.metrics.kid import kid_with_se, standardiser
from ddil_core.metrics.paired import holm, paired
from ddil_core.metrics.prdc import precision_recall_density_coverage as prdc
from ddil_core.models.pipeline_io import load_pipeline, read_student_info
from ddil_core.models.sampling import generate
from ddil_core.stages.cache_latents import cache_latents
from ddil_core.stages.diagnose import measure as covariate_shift
from ddil_core.stages.distill import distill
from ddil_core.stages.evaluate.inputs import adherence, reference_features

PRIMARY = ("kid_teacher", "fd_teacher")  # imitation of the teacher: both primary, Holm over both
COMMON = ["training.random_streams=separate", "training.ema.enabled=true", "training.ema.decay=0.99",
          "ddil.student_min_steps=1", "ddil.reflection.mode=off",
          # no watching: it trains bit-identically but costs time, and its alarm must not stop one arm early
          "training.eval_every=0", "training.alarm.action=off"]
DDIL = ["ddil.priors.forward=0.5", "ddil.priors.teacher=0.25", "ddil.priors.student=0.25"]
DDIL_LIGHT = ["ddil.priors.forward=0.8", "ddil.priors.teacher=0.1", "ddil.priors.student=0.1"]
ARMS = {
    "baseline": ["ddil.priors.forward=1", "ddil.priors.teacher=0", "ddil.priors.student=0"],
    "control": DDIL + ["ddil.control=timestep_matched"],
    "ddil": DDIL + ["ddil.rollout_policy=ema"],
    # DMD2 only, as its reference simulates (tianweiy/DMD2 main/sd_unified_model.py, sample_backward): the
    # generator's own states, fresh every batch (no replay buffer), j uniform over 0..N-1 with j = 0 pure noise, so
    # its first step is trained too
    "backward_sim": ["ddil.priors.forward=0", "ddil.priors.teacher=0", "ddil.priors.student=1",
                     "ddil.student_min_steps=0", "ddil.buffer.enabled=false"],
    # optional (run when named in --arms): the DDIL arm with rollouts by the online student instead of its EMA
    "ddil_online": DDIL + ["ddil.rollout_policy=online"],
    # optional: a lower dose of DDIL and its own control. Where the timesteps DDIL brings cost more than its states
    # gain (LCM and TDD at 2 steps), does a fifth of the batch from rollouts keep the gain at less cost?
    "ddil_light": DDIL_LIGHT + ["ddil.rollout_policy=ema"],
    "control_light": DDIL_LIGHT + ["ddil.control=timestep_matched"],
}
OPTIONAL_ARMS = ("ddil_online", "ddil_light", "control_light")
COMPARISONS = (("ddil", "control"), ("ddil", "baseline"), ("control", "baseline"), ("backward_sim", "baseline"),
               ("ddil", "ddil_online"), ("ddil_light", "control_light"), ("ddil_light", "baseline"),
               ("control_light", "baseline"))
METRICS = ("kid_teacher", "fd_teacher", "kid_teacher_unguided", "fd_teacher_unguided", "kid_data", "fd_data",
           "precision", "recall", "density", "coverage", "adherence", "shift_factor", "compounding", "drift_final")
PROMPTS = [digit_caption(i) for i in range(len(DIGIT_WORDS))]


def arms_of(objective: str, optional: tuple = ()) -> list[str]:
    """The arms an objective runs: backward simulation for DMD2 only, the optional ones when asked for."""
    return [a for a in ARMS if (a != "backward_sim" or objective == "dmd2") and (a not in OPTIONAL_ARMS
                                                                                 or a in optional)]


IMAGE_SEED = 100_000  # image i of every evaluated model: seed 100000 + i (the same noises for every model)
REFERENCE_SEED = 200_000  # the teacher's reference samples: seeds 200000 + i, disjoint from every evaluated image
REFERENCE = "the teacher's samples from seeds 200000 + i, independent of the evaluated images (100000 + i)"


def images_features(pipe, extractor, n: int, steps: int, guidance: float, scheduler, eta=None, batch: int = 100,
                    first: int = 0, seed: int = IMAGE_SEED):
    """Features and predicted classes of images first..n-1, prompts cycled, image i from its own seed `seed` + i.

    The teacher's reference set must not share the evaluated images' noises: a student that imitates its teacher
    well maps noise i to nearly the teacher's image i, so a reference drawn from the same noises makes KID and FD
    partly per-image distances (a PD student scored KID -0.0005 and FD 1.5, below the 4.2 of the teacher at 4
    steps) instead of distances between distributions."""
    feats, preds = [], []
    with torch.no_grad():
        for start in range(first, n, batch):
            idx = range(start, min(n, start + batch))
            images = generate(pipe, [PROMPTS[i % len(PROMPTS)] for i in idx], [seed + i for i in idx], steps,
                              guidance, scheduler, eta=eta)
            feats.append(extractor.features(images))
            preds.append(extractor.classify(images))
    return torch.cat(feats), torch.cat(preds)


KID_SPACE = "classifier features standardised per dimension by the teacher's samples"
KID_SUBSET = 500  # disjoint subsets: 4 of the 2,000 images give KID's standard error


def image_metrics(feats, preds, teacher_feats, data_feats, unguided_feats, k: int = 5) -> dict:
    """KID in features standardised by the teacher's samples (metrics/kid.py: standardiser, as training/watch.py
    measures it). `unguided_feats`: the teacher's samples without guidance from the same seeds, a secondary target:
    DMD2's distribution matching follows the teacher's unguided score (the real score without guidance)."""
    standardise = standardiser(teacher_feats)
    z_feats, z_teacher, z_data, z_unguided = (standardise(f) for f in (feats, teacher_feats, data_feats,
                                                                       unguided_feats))
    wanted = [prompt_class(PROMPTS[i % len(PROMPTS)]) for i in range(len(feats))]
    to_teacher, to_data = kid_with_se(z_feats, z_teacher, KID_SUBSET), kid_with_se(z_feats, z_data, len(data_feats))
    to_unguided = kid_with_se(z_feats, z_unguided, KID_SUBSET)
    return {"kid_teacher": to_teacher["kid"], "kid_teacher_se": to_teacher["se"], "kid_space": KID_SPACE,
            "reference": REFERENCE, "kid_teacher_unguided": to_unguided["kid"],
            "fd_teacher_unguided": frechet_distance(unguided_feats, feats),
            "fd_teacher": frechet_distance(teacher_feats, feats), "kid_data": to_data["kid"],
            "fd_data": frechet_distance(data_feats, feats), **prdc(data_feats, feats, k),
            "adherence": adherence(preds, wanted)}


def rescore(args, key: str, metrics: dict, ctx) -> None:
    """Recompute a run's image metrics in the current KID_SPACE against the current REFERENCE from its saved
    features (or, for a run made before features were saved, from its saved student: the same seeds give the same
    images)."""
    objective, arm = key.split("/")
    if key == "teacher/ddim":
        feats, preds = images_features(ctx["teacher"], ctx["extractor"], args.images, args.student_steps,
                                       ctx["guidance"], "ddim")
    else:
        feats, preds = student_features(args, run_dir(args, objective, arm, metrics["seed"]) / "student", ctx)
    metrics.update(image_metrics(feats, preds, ctx["teacher_feats"], ctx["data_feats"], ctx["unguided_feats"]))


def student_features(args, student: Path, ctx):
    saved = student.parent / "image_features.pt"
    if saved.exists():
        both = torch.load(saved)
        return both["features"], both["classes"]
    info = read_student_info(student)
    feats, preds = images_features(load_pipeline(str(student)), ctx["extractor"], args.images,
                                   info["num_inference_steps"], info["guidance_scale"], "own", info.get("eta"))
    torch.save({"features": feats, "classes": preds}, saved)
    return feats, preds


def run_overrides(args, objective: str, arm: str, seed: int, ctx) -> list[str]:
    overrides = (base_overrides(ctx["demo"], args.updates, args.student_steps, ctx["guidance"], args.quick)
                 + objective_overrides(objective, ctx["guidance"]) + COMMON + ARMS[arm] + [f"training.seed={seed}"])
    if objective == "pd":
        overrides.append(f"objective.pd.teacher_steps={2 * args.student_steps}")
    return overrides


def run_one(args, objective, arm, seed, ctx) -> dict:
    config = load_config(ctx["recipe"], run_overrides(args, objective, arm, seed, ctx))
    out = run_dir(args, objective, arm, seed)
    student = distill(config, ctx["latents"], [rollouts_for(config, ctx["latents"], Path(args.work))], out)
    info = read_student_info(student)
    pipe = load_pipeline(str(student))
    feats, preds = student_features(args, student, ctx)
    metrics = image_metrics(feats, preds, ctx["teacher_feats"], ctx["data_feats"], ctx["unguided_feats"])
    shift = covariate_shift(config, pipe, info, ctx["teacher"], PROMPTS, 16, None, args.diagnose_noises)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    metrics.update({"shift_factor": shift["headline"]["shift_factor_mean"],
                    "compounding": shift["headline"]["compounding"], "drift_final": shift["headline"]["drift_final"],
                    "curves": {name: [point["value"] for point in shift[name]]  # the mechanism, per grid index k
                               for name in ("e_teacher", "e_student", "shift_factor", "drift", "handover")},
                    "student_induced_share": log[-1].get("student_induced_share"), "buffer": log[-1].get("buffer"),
                    "seconds_per_update": log[-1]["seconds_per_update"], "seed": seed,
                    "diagnose_noises": args.diagnose_noises})
    return metrics


_WORKER_CTX: dict = {}  # a worker's copy of the parent's context (inherited through fork, never pickled)


def _die_with_parent(parent: int) -> None:
    """Linux's parent-death signal: a worker whose parent is killed (SIGTERM, the OOM killer) stops too, instead of
    training on into a run folder that a resumed call would then write into as well. It fires when the thread that
    forked the worker ends: the pools are made on the main thread."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            print(f"worker {os.getpid()}: no parent-death signal ({os.strerror(ctypes.get_errno())}); it outlives "
                  "a killed parent", file=sys.stderr, flush=True)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _worker_init(ctx: dict, parent: int) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(1)
    _WORKER_CTX.update(ctx)


def _fork_pool(workers: int, ctx: dict) -> ProcessPoolExecutor:
    """Processes of one thread each, forked so they inherit `ctx` (loaded pipelines are never pickled)."""
    fork = multiprocessing.get_context("fork")
    return ProcessPoolExecutor(workers, mp_context=fork, initializer=_worker_init, initargs=(ctx, os.getpid()))


def _worker_run(args, objective, arm, seed):
    return objective, arm, run_one(args, objective, arm, seed, _WORKER_CTX)


def _teacher_part(n, first, guidance, ctx=None):
    ctx = ctx or _WORKER_CTX
    return images_features(ctx["teacher"], ctx["extractor"], n, 50, guidance, "ddim", first=first,
                           seed=REFERENCE_SEED)[0]


def teacher_features(args, teacher, extractor, guidance) -> torch.Tensor:
    """The teacher's own samples at 50 DDIM steps (the imitation target), split over --workers processes in
    contiguous index ranges: the same features as one process makes, since every image has its own seed."""
    n, parts = args.teacher_images, max(1, args.workers)
    bounds = [n * i // parts for i in range(parts + 1)]
    ctx = {"teacher": teacher, "extractor": extractor}
    if parts == 1:
        return _teacher_part(n, 0, guidance, ctx)
    with _fork_pool(parts, ctx) as pool:
        futures = [pool.submit(_teacher_part, bounds[i + 1], bounds[i], guidance) for i in range(parts)]
        return torch.cat([f.result() for f in futures])


def run_jobs(args, jobs, ctx):
    """(objective, arm, metrics) of each job as it finishes; --workers processes of one thread each. Every run is
    seeded by its own config, so the results do not depend on the number of workers or their order."""
    if args.workers <= 1 or len(jobs) <= 1:
        for objective, arm, seed in jobs:
            yield objective, arm, run_one(args, objective, arm, seed, ctx)
        return
    with _fork_pool(args.workers, ctx) as pool:
        for future in as_completed([pool.submit(_worker_run, args, *job) for job in jobs]):
            yield future.result()


def analyse(runs: dict, objectives, steps: int) -> dict:
    """Paired comparisons per objective; Holm over the family of the primary comparison."""
    out, primary_p = {}, {}
    for objective in objectives:
        by_arm = {arm: {m["seed"]: m for m in runs.get(f"{objective}/{arm}", [])}
                  for arm in arms_of(objective, OPTIONAL_ARMS) if runs.get(f"{objective}/{arm}")}
        for a, b in COMPARISONS:
            if a not in by_arm or b not in by_arm:
                continue
            seeds = sorted(set(by_arm[a]) & set(by_arm[b]))
            result = {metric: paired([by_arm[a][s][metric] for s in seeds], [by_arm[b][s][metric] for s in seeds])
                      for metric in METRICS if seeds and all(by_arm[x][s].get(metric) is not None
                                                             for x in (a, b) for s in seeds)}
            out[f"{objective}/{a}-{b}"] = result
            for metric in PRIMARY if (a, b) == ("ddil", "control") else ():
                if metric in result and result[metric]["p_sign_flip"] is not None:
                    primary_p[f"{objective}@{steps}/{metric}"] = result[metric]["p_sign_flip"]
    return {"comparisons": out, "primary_holm": holm(primary_p) if primary_p else {}}


def needs_more_seeds(analysis: dict, objective: str, target: float) -> bool:
    result = analysis["comparisons"].get(f"{objective}/ddil-control", {}).get(PRIMARY[0])
    if not result or result["ci95"] is None:
        return True
    low, high = result["ci95"]
    return low <= 0 <= high and result["detectable_effect"] > target


def frozen_recipe(work: Path) -> str:
    """The demo recipe every run of `work` is made with: configs/demo.yaml as it was when the work began, copied
    into it, so a run resumed later (or the repository edited while it runs) pairs with the same recipe."""
    frozen = work / "recipe.yaml"
    if not frozen.exists():
        shutil.copyfile(recipe_path("demo"), frozen)
    return str(frozen)


def protocol_dir(args) -> Path:
    """The folder of one protocol's runs (student steps, updates): the students, their ledger runs.json and the
    report. The latents, teacher rollouts and teacher reference samples beside it serve every protocol of `--work`."""
    return Path(args.work) / f"steps{args.student_steps}-updates{args.updates}"


def run_dir(args, objective: str, arm: str, seed: int) -> Path:
    """One student's folder: what run_one trains into and rescore reads back."""
    return protocol_dir(args) / f"{objective}-{arm}-{seed}"


def refuse_old_layout(work: Path) -> None:
    """A work folder made before the runs got a folder per protocol keeps its ledger at the top and names its
    teacher samples without their guidance: its runs would not be found, so every student would be trained again and
    the teacher's samples redrawn. Refused, naming what to move."""
    old = [p.name for p in [work / "runs.json", *sorted(work.glob("teacher-*.pt"))]
           if p.exists() and not re.fullmatch(r"teacher-\d+-seed\d+-g[0-9.]+\.pt", p.name)]
    if old:
        raise SystemExit(f"{work}: a work folder of the earlier layout ({', '.join(old)}); move its runs and runs.json "
                         f"into {work}/steps<N>-updates<U>/ and rename the teacher's samples teacher-<n>-seed<s>.pt to "
                         "-g<the demo's guidance>.pt and -unguided.pt to -g1.pt, or pass another --work")


def check_protocol(folder: Path, args, guidance: float) -> None:
    """A protocol's runs pair only if they were measured alike: its first run records the settings that shape every
    metric, and a later call with other values is refused (naming them) instead of mixing the two in one table."""
    wanted = {"images": args.images, "teacher_images": args.teacher_images, "guidance": guidance}
    record = folder / "protocol.json"
    if not record.exists():
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(wanted, indent=1))
        return
    had = json.loads(record.read_text())
    changed = [f"{key} {had.get(key)} (now {value})" for key, value in wanted.items() if had.get(key) != value]
    if changed:
        raise SystemExit(f"{record}: the runs of {folder.name} were measured with " + ", ".join(changed)
                         + "; pass the same values or another --work")


def run(args) -> dict:
    work = Path(args.work)
    refuse_old_layout(work)
    demo = Path(args.demo)
    if not (demo / "teacher" / "model_index.json").exists():
        if not args.quick:
            raise SystemExit(f"{demo}: no demo teacher; run `ddil prepare-demo --out {demo}` first")
        prepare_quick_demo(demo)
    work.mkdir(parents=True, exist_ok=True)
    recipe = frozen_recipe(work)
    guidance = args.guidance or demo_guidance(demo)
    runs_of = protocol_dir(args)
    check_protocol(runs_of, args, guidance)
    partial = runs_of / "runs.json"
    runs = json.loads(partial.read_text()) if partial.exists() else {}  # resumable: "objective/arm" -> per seed
    extractor = load_extractor(f"classifier:{demo / 'classifier'}")
    base = load_config(recipe, base_overrides(demo, args.updates, args.student_steps, guidance, args.quick))
    data_feats, _, _ = reference_features(base, str(demo / "dataset-eval"), 16, extractor)
    teacher = load_pipeline(str(demo / "teacher"))

    def made_once(guidance_scale: float) -> torch.Tensor:
        path = work / f"teacher-{args.teacher_images}-seed{REFERENCE_SEED}-g{guidance_scale:g}.pt"
        if not path.exists():
            torch.save(teacher_features(args, teacher, extractor, guidance_scale), path)
        return torch.load(path)

    ctx = {"demo": demo, "recipe": recipe, "guidance": guidance, "extractor": extractor, "data_feats": data_feats,
           "teacher": teacher, "latents": work / "latents",
           "teacher_feats": made_once(guidance),  # the teacher's own samples: the imitation target
           "unguided_feats": made_once(1.0)}  # the same seeds without guidance: a secondary target
    if not (ctx["latents"] / "manifest.json").exists():
        cache_latents(base, ctx["latents"])
    runs.setdefault("teacher/ddim", [{}])  # no distillation: the teacher at the student's step count
    for key, arm_runs in runs.items():
        for metrics in arm_runs:
            if (metrics.get("kid_space") != KID_SPACE or metrics.get("reference") != REFERENCE
                    or "kid_teacher_unguided" not in metrics):
                rescore(args, key, metrics, ctx)
    partial.write_text(json.dumps(runs, indent=1))
    for objective in args.objectives:  # made before any worker starts, so no two workers make one set
        rollouts_for(load_config(recipe, run_overrides(args, objective, "ddil", 0, ctx)), ctx["latents"], work)
    seeds = {objective: list(range(args.seeds)) for objective in args.objectives}
    while True:
        jobs = [(objective, arm, seed) for seed in range(max(map(len, seeds.values())))
                for objective in args.objectives if seed < len(seeds[objective])
                for arm in arms_of(objective, tuple(args.arms)) if arm in args.arms
                if not any(m["seed"] == seed for m in runs.get(f"{objective}/{arm}", []))]
        for objective, arm, metrics in run_jobs(args, jobs, ctx):
            runs.setdefault(f"{objective}/{arm}", []).append(metrics)
            partial.write_text(json.dumps(runs, indent=1))
            print(f"{objective} {arm} seed {metrics['seed']}: " + ", ".join(
                f"{k} {metrics[k]:.4g}" for k in METRICS if metrics.get(k) is not None), flush=True)
        if any(arm not in args.arms for objective in args.objectives for arm in arms_of(objective)):
            break  # a partial run (the go/no-go's baselines): no comparison to power
        analysis = analyse(runs, args.objectives, args.student_steps)
        grow = [o for o in args.objectives
                if len(seeds[o]) < args.max_seeds and needs_more_seeds(analysis, o, args.target_effect)]
        if not grow:
            break
        for objective in grow:  # the seed rule fixed in advance, one seed at a time
            seeds[objective].append(len(seeds[objective]))
    return {"command": "python benchmarks/ddil_evidence.py " + " ".join(args.argv),
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {args.workers} run(s) at once, 1 torch thread each",
            "protocol": {"student_steps": args.student_steps, "updates": args.updates, "images": args.images,
                         "teacher_images": args.teacher_images, "guidance": guidance, "primary": PRIMARY,
                         "diagnose_noises": args.diagnose_noises, "common": COMMON, "arms": ARMS,
                         "seed_rule": {"start": args.seeds, "max": args.max_seeds,
                                       "target_effect": args.target_effect}},
            "go_no_go": {o: runs.get(f"{o}/baseline", []) and
                         {k: [m.get(k) for m in runs[f"{o}/baseline"]] for k in ("shift_factor", "compounding")}
                         for o in args.objectives},
            # the imitation target beside the students: the teacher's first --images reference samples (50 steps)
            "teacher_reference": {"steps": 50, "images": args.images, "fd_data": frechet_distance(
                ctx["data_feats"], ctx["teacher_feats"][:args.images]), "unguided_fd_data": frechet_distance(
                ctx["data_feats"], ctx["unguided_feats"][:args.images])},
            "runs": runs, **analyse(runs, args.objectives, args.student_steps)}


def _mean_sd(values) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return "-"
    return f"{v.mean():.4g} ± {v.std(ddof=1):.2g}" if len(v) > 1 else f"{v[0]:.4g}"


def _curve(runs: list, name: str) -> str:
    curves = [m["curves"][name] for m in runs if "curves" in m]
    if not curves:
        return "-"
    return " / ".join(f"{x:.3g}" for x in np.nanmean(np.asarray(curves, dtype=np.float64), axis=0)) + f" (n={len(curves)})"


def to_markdown(result: dict) -> str:
    runs, table = result["runs"], ("kid_teacher", "fd_teacher", "fd_data", "coverage", "adherence", "shift_factor",
                                   "compounding", "drift_final", "student_induced_share")
    lines = ["# Does DDIL work? (generated by benchmarks/ddil_evidence.py)", "",
             f"Command: `{result['command']}`; {result['machine']}; {result['date']}.", "",
             "The teacher at 50 steps (the first {images} of its reference samples): FD {fd_data:.4g} to the "
             "held-out digits; without guidance {unguided:.4g}.".format(
                 unguided=result["teacher_reference"].get("unguided_fd_data", float("nan")),
                 **result["teacher_reference"]), "",
             "## Arms: mean ± sd over seeds (KID, FD, drift: lower is closer to the teacher; R, C: 1 is no shift, "
             "no compounding)", "",
             "| model | seeds | " + " | ".join(table) + " |", "|---|---:|" + "---:|" * len(table)]
    for key, arm_runs in runs.items():
        lines.append(f"| {key} | {len(arm_runs)} | " + " | ".join(_mean_sd(m.get(k) for m in arm_runs) for k in table)
                     + " |")
    lines += ["", "## Paired differences (first arm - second arm, seed by seed; KID and FD: lower is better)", "",
              "| comparison | metric | mean | 95% interval | sign-flip p | detectable effect | seeds |",
              "|---|---|---:|---|---:|---:|---:|"]
    for name, metrics in result["comparisons"].items():
        for metric in (*PRIMARY, "fd_teacher_unguided", "kid_teacher_unguided", "fd_data", "coverage",
                       "shift_factor", "drift_final"):
            r = metrics.get(metric)
            if r is None or r["ci95"] is None:
                continue
            lines.append(f"| {name} | {metric} | {r['mean_difference']:.4g} | [{r['ci95'][0]:.4g}, {r['ci95'][1]:.4g}]"
                         f" | {r['p_sign_flip']:.3g} | {r['detectable_effect']:.3g} | {r['n']} |")
    lines += ["", f"Holm-adjusted p of ddil - control ({' and '.join(PRIMARY)}, one family): "
              f"{json.dumps(result['primary_holm'])}", "",
              "## The mechanism: covariate-shift curves by grid index k (mean over seeds)", "",
              "R(k) = e_S(k) / e_T(k); D(k) the squared latent distance to the teacher's trajectory (k = 0..N); "
              "H(m) the final distance when the teacher takes the first m intervals (docs/method.md section 9).", "",
              "| model | R(k) | e_T(k) | e_S(k) | D(k) | H(m) |", "|---|---|---|---|---|---|"]
    for key, arm_runs in runs.items():
        if any("curves" in m for m in arm_runs):
            lines.append(f"| {key} | " + " | ".join(_curve(arm_runs, c) for c in
                                                     ("shift_factor", "e_teacher", "e_student", "drift", "handover"))
                         + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True)
    parser.add_argument("--work", required=True, help="latents, rollouts and the teacher's samples, shared; each "
                        "protocol's students and runs.json in a folder stepsN-updatesU (resumable)")
    parser.add_argument("--objectives", nargs="+", default=["pd", "lcm", "dmd2"],
                        choices=["pd", "lcm", "dmd2", "tdd"])
    parser.add_argument("--student-steps", type=int, default=4)
    parser.add_argument("--arms", nargs="+", default=[a for a in ARMS if a not in OPTIONAL_ARMS], choices=list(ARMS),
                        help="run only these arms (the go/no-go: --arms baseline; add ddil_online for the rollout "
                             "policy); a later full run reuses them")
    parser.add_argument("--seeds", type=int, default=6, help="seeds to start with (the same in every arm)")
    parser.add_argument("--max-seeds", type=int, default=12)
    parser.add_argument("--target-effect", type=float, default=0.0,
                        help=f"stop adding seeds once the detectable {PRIMARY[0]} effect is below this")
    parser.add_argument("--updates", type=int, default=800, help="training updates per student")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--teacher-images", type=int, default=5000)
    parser.add_argument("--diagnose-noises", type=int, default=256)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--workers", type=int, default=1, help="runs at once, one torch thread each (one per core)")
    parser.add_argument("--out", help="write OUT.json and OUT.md (default: evidence.* in the protocol's folder)")
    parser.add_argument("--quick", action="store_true", help="smoke: 2 seeds, 3 updates, few images")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.seeds, args.max_seeds, args.updates, args.images = 2, 2, 3, 40
        args.teacher_images, args.diagnose_noises = 60, 4
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    result = run(args)
    result["wall_seconds"] = time.time() - started
    out = Path(args.out or protocol_dir(args) / "evidence")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()

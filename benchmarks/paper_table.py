"""The DDIL paper's table in miniature, on the embedded digits teacher.

For PD, LCM and DMD2, each as baseline (priors 1/0/0), +DDIL (0.5/0.25/0.25, replay buffer) and +DDIL +reflection
(static per-channel bounds from the latent cache), at 4 student steps (and optionally 2), over several seeds: FID,
precision/recall/density/coverage (k = 5), prompted-digit adherence and diversity in the digit classifier's feature
space against the 297 held-out digits, and seconds per update; the teacher at 50 DDIM steps with CFG is the
reference row. Writes docs/paper-table.json and docs/paper-table.md (the evidence benchmark, benchmarks/ddil_evidence.py,
writes docs/results).

    python benchmarks/paper_table.py --demo runs/demo/demo                # the full table (about 1-2 h on 2 cores)
    python benchmarks/paper_table.py --quick --demo /tmp/demo-quick       # CI smoke: a fast demo, 1 seed, few steps

The demo folder is what `ddil prepare-demo --out DIR` writes (teacher/, dataset/, dataset-eval/, classifier/); with
--quick and no such folder, a fast low-budget demo is prepared first (its teacher is poor: smoke only).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddil_core.config import load_config
from ddil_core.metrics.extractors import load_extractor
from ddil_core.models.pipeline_io import load_pipeline, read_student_info
from ddil_core.stages.cache_latents import cache_latents
from ddil_core.stages.distill import distill
from ddil_core.data.digits import prompt_class
from ddil_core.stages.evaluate.inputs import adherence, reference_features
from ddil_core.stages.evaluate.results import model_metrics
from ddil_core.models.sampling import generate
from ddil_core.stages.teacher_rollouts import teacher_rollouts

OBJECTIVES = ("pd", "lcm", "dmd2", "tdd")


def objective_overrides(objective: str, guidance: float) -> list[str]:
    """Per-objective settings for a digits teacher guided at `guidance`; comments say where a value is ours."""
    return {
        "pd": ["objective.name=pd", "objective.pd.teacher_steps=8"],
        # ours: LCM's guidance range around the teacher's scale
        "lcm": ["objective.name=lcm", f"objective.lcm.w_min={max(1.0, guidance - 1)}",
                f"objective.lcm.w_max={guidance + 1}"],
        # the recipe docs/dmd2-sweep.md found on this teacher (GAN and regression at their defaults); digits-specific:
        # no CFG in the real score (FID against unguided data), TTUR 5, an EMA of the generator for 400 updates
        "dmd2": ["objective.name=dmd2", "objective.dmd2.real_guidance_scale=1", "objective.dmd2.dfake_gen_update_ratio=5",
                 "training.ema.enabled=true", "training.ema.decay=0.99"],
        # the teacher's CFG at the demo's scale; ours: the student samples without CFG (1 NFE per step, like the
        # others; the reference validates so too), eta 0.2 (README); rollouts on the 250-step trailing grid, TDD's
        # solver grid, the one that holds its 4-step timesteps [999, 751, 499, 251]
        "tdd": ["objective.name=tdd", f"objective.tdd.guidance_scale={guidance}", "objective.tdd.sampling_guidance=1",
                "rollouts.teacher_steps=250"],
    }[objective]


def demo_guidance(demo: Path) -> float:
    """The guidance the demo teacher was measured at (prepare-demo's recipe, demo.guidance_scale)."""
    import yaml

    recipe = demo / "resolved_config.yaml"
    if recipe.exists():
        return float((yaml.safe_load(recipe.read_text()).get("demo") or {}).get("guidance_scale", 2.0))
    return 2.0
VARIANTS = {
    "baseline": ["ddil.priors.forward=1", "ddil.priors.teacher=0", "ddil.priors.student=0", "ddil.reflection.mode=off"],
    "+DDIL": ["ddil.priors.forward=0.5", "ddil.priors.teacher=0.25", "ddil.priors.student=0.25",
              "ddil.reflection.mode=off"],
    # static per-channel bounds of the latent cache on the teacher's side: an SD 1.5-family student cannot carry a
    # static reflection of its own rollouts in plain diffusers (ddil_core/method/rollouts.py, scheduler_kwargs)
    "+DDIL +reflection": ["ddil.priors.forward=0.5", "ddil.priors.teacher=0.25", "ddil.priors.student=0.25",
                          "ddil.reflection.mode=static", "ddil.reflection.apply_to=[teacher_targets,teacher_rollouts]"],
}
METRICS = ("fid", "precision", "recall", "density", "coverage", "adherence", "diversity", "seconds_per_update")


def prepare_quick_demo(out: Path) -> None:
    from ddil_core.stages.prepare_demo import prepare_demo

    config = load_config("demo", ["demo.vae_steps=20", "demo.classifier_steps=60", "demo.teacher_steps=20",
                                  "demo.eval_steps=4", "demo.eval_few_steps=[2]", "demo.eval_images_per_digit=2"])
    prepare_demo(config, out)


def base_overrides(demo: Path, steps: int, student_steps: int, guidance: float, quick: bool = False) -> list[str]:
    smoke = ["data.limit=64", "rollouts.num_samples=16"] if quick else []
    return [f"model.teacher={demo / 'teacher'}", f"data.dataset={demo / 'dataset'}", "data.limit=null",
            f"objective.student_steps={student_steps}", f"objective.guidance_scale={guidance}",
            # a 100-step trailing grid passes through every student grid used here (PD/DMD2 and LCM timesteps)
            "rollouts.teacher_steps=100", "rollouts.num_samples=256", "rollouts.batch_size=64",
            f"training.steps={steps}", "training.batch_size=32", "training.lr=1e-4", f"training.log_every={steps}",
            f"training.checkpoint_every={steps}", "training.ema.enabled=false"] + smoke


def rollouts_for(config, latents: Path, work: Path) -> Path:
    """Teacher rollouts made with `config`'s reflection of teacher rollouts, one set per setting (reused): the
    "+DDIL +reflection" variant trains on reflected rollouts, the others on plain ones."""
    refl = config.ddil.reflection
    reflected = refl.mode != "off" and "teacher_rollouts" in refl.apply_to
    folder = work / (f"rollouts-reflected-{refl.mode}" if reflected else "rollouts")
    if config.rollouts.teacher_steps != 100:  # TDD's 250-step grid: its own set
        folder = folder.with_name(f"{folder.name}-{config.rollouts.teacher_steps}")
    if not (folder / "manifest.json").exists():
        teacher_rollouts(config, latents, folder)
    return folder


def measure(pipe, extractor, ref, prompts, per_prompt, steps, guidance, scheduler="own", eta=0.0):
    """Metrics of `pipe` sampled as plain diffusers samples it: a student with its own saved scheduler ("own") and
    its ddil_student.json's eta (TDD), the teacher with DDIM ("ddim")."""
    seeds = [1000 + j for j in range(per_prompt)]
    feats, predicted = [], []
    with torch.no_grad():
        for prompt in prompts:  # prompt-major, as model_metrics expects
            images = generate(pipe, [prompt] * per_prompt, seeds, steps, guidance, scheduler, eta=eta)
            feats.append(extractor.features(images))
            predicted.append(extractor.classify(images))
    wanted = [prompt_class(p) for p in prompts for _ in range(per_prompt)]
    metrics = model_metrics(torch.cat(feats), ref, len(prompts), per_prompt, 5)
    metrics["adherence"] = adherence(torch.cat(predicted), wanted)
    return metrics


def vars_protocol(args) -> dict:
    return {"seeds": args.seeds, "training_steps": args.steps, "images_per_prompt": args.images_per_prompt,
            "teacher_steps": args.teacher_steps, "student_steps": args.student_steps, "demo": str(args.demo)}


def resumed_rows(args) -> dict:
    """The rows of the --partial file a cut-short run of the same protocol left, keyed like run()'s table. Entries
    without a "seed" (files of older runs) are in seed order, seeds outermost, so the i-th is args.seeds[i]."""
    if not args.resume:
        return {}
    if not args.partial or not Path(args.partial).exists():
        raise SystemExit(f"--resume needs the --partial file of the run it continues ({args.partial}: not found)")
    partial = json.loads(Path(args.partial).read_text())
    theirs, ours = partial.get("partial_protocol", {}), vars_protocol(args)
    for key in ("training_steps", "images_per_prompt", "teacher_steps", "demo"):
        if theirs.get(key) != ours[key]:
            raise SystemExit(f"{args.partial}: {key} = {theirs.get(key)!r} there, {ours[key]!r} here; cannot resume")
    rows = {}
    for row in partial["rows"]:
        if row["variant"] != "reference":
            for i, m in enumerate(row["per_seed"]):
                m.setdefault("seed", theirs["seeds"][i])
        key = "reference" if row["variant"] == "reference" else (row["steps"], row["objective"], row["variant"])
        rows[key] = row
    return rows


def summarise(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def run(args) -> dict:
    demo = Path(args.demo)
    if not (demo / "teacher" / "model_index.json").exists():
        if not args.quick:
            raise SystemExit(f"{demo}: no demo teacher; run `ddil prepare-demo --out {demo}` first")
        prepare_quick_demo(demo)
    work = Path(args.work or tempfile.mkdtemp(prefix="ddil-table-"))
    extractor = load_extractor(f"classifier:{demo / 'classifier'}")
    guidance = args.guidance or demo_guidance(demo)
    base = load_config("demo", base_overrides(demo, args.steps, args.student_steps[0], guidance, args.quick))
    ref, _, _ = reference_features(base, str(demo / "dataset-eval"), 16, extractor)
    prompts = [f"a handwritten digit {w}" for w in
               ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
    done = resumed_rows(args)  # (steps, objective, variant) or "reference" -> row, from --resume
    if "reference" in done:
        rows = [done.pop("reference")]
    else:
        teacher = load_pipeline(str(demo / "teacher"))
        rows = [{"model": f"teacher ({args.teacher_steps} DDIM steps, CFG {guidance:g})", "objective": "-",
                 "variant": "reference", "steps": args.teacher_steps,
                 "per_seed": [measure(teacher, extractor, ref, prompts, args.images_per_prompt, args.teacher_steps,
                                      guidance, "ddim")]}]
    latents = work / "latents"
    if not (latents / "manifest.json").exists():
        cache_latents(base, latents)
    table = done  # (steps, objective, variant) -> row; seeds outermost so every row has a first seed early
    for seed in args.seeds:
        for student_steps in args.student_steps:
            for objective in args.objectives:
                for variant in VARIANTS:
                    if seed in [m.get("seed") for m in table.get((student_steps, objective, variant), {})
                                .get("per_seed", [])]:
                        continue  # measured before the run was cut short (--resume)
                    overrides = (base_overrides(demo, args.steps, student_steps, guidance, args.quick)
                                 + objective_overrides(objective, guidance) + VARIANTS[variant]
                                 + [f"training.seed={seed}"])
                    if objective == "pd":
                        overrides.append(f"objective.pd.teacher_steps={2 * student_steps}")
                    config = load_config("demo", overrides)
                    out = work / f"{objective}-{variant.replace(' ', '').replace('+', '_')}-{student_steps}-{seed}"
                    student = distill(config, latents, [rollouts_for(config, latents, work)], out)
                    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
                    info = read_student_info(student)
                    pipe = load_pipeline(str(student))
                    metrics = measure(pipe, extractor, ref, prompts, args.images_per_prompt,
                                      info["num_inference_steps"], info["guidance_scale"], eta=info.get("eta", 0.0))
                    metrics["seconds_per_update"] = log[-1]["seconds_per_update"]
                    metrics["seed"] = seed
                    row = table.setdefault((student_steps, objective, variant), {
                        "model": f"{objective} {variant}", "objective": objective, "variant": variant,
                        "steps": student_steps, "per_seed": []})
                    row["per_seed"].append(metrics)
                    print(f"{objective:5s} {variant:18s} {student_steps} steps seed {seed}: "
                          + ", ".join(f"{k} {metrics[k]:.3f}" for k in METRICS if metrics.get(k) is not None),
                          flush=True)
                    if args.partial:  # what is done so far, in case a long run is cut short
                        Path(args.partial).write_text(json.dumps({"rows": rows + list(table.values()),
                                                                  "partial_protocol": vars_protocol(args)}, indent=1))
    rows += [table[key] for key in sorted(table, key=lambda k: (k[0], list(OBJECTIVES).index(k[1]),
                                                                 list(VARIANTS).index(k[2])))]
    for row in rows:
        row["summary"] = {k: summarise([m.get(k) for m in row["per_seed"]]) for k in METRICS}
    return {
        "command": "python benchmarks/paper_table.py " + " ".join(args.argv),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "protocol": {"extractor": extractor.name, "reference": "297 held-out digits", "k": 5,
                     "prompts": prompts, "images_per_prompt": args.images_per_prompt, "seeds": args.seeds,
                     "training_steps": args.steps, "batch_size": 32, "teacher_steps": args.teacher_steps,
                     "guidance_scale": guidance},
        "rows": rows,
    }


def fmt(summary: dict) -> str:
    if summary["mean"] is None:
        return "—"
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}" if summary["n"] > 1 else f"{summary['mean']:.3f}"


def to_markdown(result: dict) -> str:
    lines = ["# The DDIL table in miniature (digits teacher)", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}; date {result['date']}.  ",
             f"Protocol: {json.dumps(result['protocol'])}", "",
             "Mean ± standard deviation over seeds. Lower FID is better; higher precision, recall, density, coverage "
             "and adherence are better.", "",
             "| model | steps | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    for row in result["rows"]:
        lines.append(f"| {row['model']} | {row['steps']} | " + " | ".join(fmt(row["summary"][k]) for k in METRICS) + " |")
    lines += ["", "## Does DDIL beat its baseline? (FID, mean over seeds)", ""]
    for steps in sorted({r["steps"] for r in result["rows"] if r["objective"] != "-"}):
        for objective in OBJECTIVES:
            fid = {r["variant"]: r["summary"]["fid"] for r in result["rows"]
                   if r["objective"] == objective and r["steps"] == steps}
            if "baseline" not in fid or fid["baseline"]["mean"] is None:
                continue
            b = fid["baseline"]
            for variant in ("+DDIL", "+DDIL +reflection"):
                v = fid.get(variant)
                if v is None or v["mean"] is None:
                    continue
                spread = (b["std"] or 0.0) + (v["std"] or 0.0)
                if abs(v["mean"] - b["mean"]) <= spread:
                    verdict = "no clear difference (within the spread over seeds)"
                else:
                    verdict = "yes, better" if v["mean"] < b["mean"] else "no, worse"
                lines.append(f"- {objective} {steps} steps {variant}: FID {v['mean']:.2f} vs baseline "
                             f"{b['mean']:.2f} -> {verdict}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True)
    parser.add_argument("--work", help="where latents, rollouts and students go (default: a temp folder)")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="training steps per run")
    parser.add_argument("--student-steps", nargs="+", type=int, default=[4])
    parser.add_argument("--images-per-prompt", type=int, default=30)
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, help="the teacher's CFG scale (default: the demo's own)")
    parser.add_argument("--out", default="docs/paper-table")
    parser.add_argument("--quick", action="store_true", help="CI smoke: 1 seed, 3 steps, few images")
    parser.add_argument("--partial", help="also write the results so far to this JSON file after every run")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run whose --partial file this is: runs it measured are not run again")
    parser.add_argument("--from-partial", help="write the table from a --partial file of a run cut short")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    if args.quick:
        args.seeds, args.steps, args.images_per_prompt, args.teacher_steps = [0], 3, 3, 4
    torch.set_num_threads(1)
    started = time.time()
    if args.from_partial:
        result = {"command": "python benchmarks/paper_table.py " + " ".join(args.argv), "date": datetime.date.today()
                  .isoformat(), "machine": f"{platform.processor() or platform.machine()}, 1 torch thread",
                  "protocol": {"note": "rendered from a partial run; see --partial"},
                  **json.loads(Path(args.from_partial).read_text())}
        for row in result["rows"]:
            row["summary"] = {k: summarise([m.get(k) for m in row["per_seed"]]) for k in METRICS}
    else:
        result = run(args)
    result["wall_seconds"] = time.time() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()

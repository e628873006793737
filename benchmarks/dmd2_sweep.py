"""Which DMD2 recipe makes a few-step student learn on the digits teacher? A sweep over DMD2's ingredients.

Each recipe is a list of config overrides on top of `sweep_base` (the first paper table's DMD2: 400 updates at batch
32, real guidance = the teacher's, TTUR 5, 4 student steps, GAN on, no regression); every run distills a student and measures it on
the paper table's protocol (FID, precision/recall/density/coverage with k = 5, adherence and diversity in the digit
classifier's features against the 297 held-out digits, 300 images). Runs are interleaved (seeds outermost, recipes
inside) so a change in the machine's load touches every recipe alike, and a seed fixes every training draw, so the
recipes of one seed are paired. One torch thread per run.

    python benchmarks/dmd2_sweep.py --demo demo --recipes base gan lr3e-5 --seeds 0 --out docs/dmd2-sweep

Every run is appended to OUT.json as it finishes (a sweep cut short keeps what it measured); OUT.md is the table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.paper_table import (VARIANTS, base_overrides, demo_guidance, measure,  # noqa: E402
                                    rollouts_for)
from ddil_core.config import load_config  # noqa: E402
from ddil_core.metrics.extractors import load_extractor  # noqa: E402
from ddil_core.models.pipeline_io import load_pipeline, read_student_info  # noqa: E402
from ddil_core.stages.cache_latents import cache_latents  # noqa: E402
from ddil_core.stages.distill import distill  # noqa: E402
from ddil_core.stages.evaluate.inputs import reference_features  # noqa: E402

def sweep_base(guidance: float) -> list[str]:
    """What every recipe starts from, pinned so the recipes keep their meaning as the defaults move: the first paper
    table's DMD2 (real guidance = the teacher's, TTUR 5), with the GAN head on at the reference weights and no
    regression (the defaults when the sweep ran)."""
    return ["objective.name=dmd2", f"objective.dmd2.real_guidance_scale={guidance}",
            "objective.dmd2.dfake_gen_update_ratio=5", "objective.dmd2.gan=true", "objective.dmd2.gan_gen_weight=5e-3",
            "objective.dmd2.gan_disc_weight=1e-2", "objective.dmd2.regression_weight=0"]


GAN_OFF = ["objective.dmd2.gan=false"]
# What to run: name -> (what it changes, overrides). "old" is the DMD2 of the first paper table (no GAN, the grid
# and GAN draws of before are not reproducible any more: it differs from those runs only in the
# sampler fixes of 2026-11: DMD2's GAN on real latents, pure noise at its first step).
RECIPES: dict[str, tuple[str, list[str]]] = {
    "old": ("GAN off, TTUR 5, real guidance = teacher's", GAN_OFF),
    "gan": ("+ GAN head, weights 5e-3 / 1e-2 (SDXL recipe)", []),
    "gan-x10": ("+ GAN head, weights 5e-2 / 1e-1", ["objective.dmd2.gan_gen_weight=5e-2",
                                                     "objective.dmd2.gan_disc_weight=1e-1"]),
    "rg1": ("+ GAN, real guidance 1 (no CFG in the DM gradient)", ["objective.dmd2.real_guidance_scale=1"]),
    "rg1.5": ("+ GAN, real guidance 1.5", ["objective.dmd2.real_guidance_scale=1.5"]),
    "ttur10": ("+ GAN, TTUR 10 (SD 1.5 recipe)", ["objective.dmd2.dfake_gen_update_ratio=10"]),
    "ttur2": ("+ GAN, TTUR 2", ["objective.dmd2.dfake_gen_update_ratio=2"]),
    "lr3e-5": ("+ GAN, lr 3e-5 (generator and fake score)", ["training.lr=3e-5"]),
    "lr1e-5": ("+ GAN, lr 1e-5", ["training.lr=1e-5"]),
    "lr3e-4": ("+ GAN, lr 3e-4", ["training.lr=3e-4"]),
    "fake2x": ("+ GAN, fake score lr 2x the generator's", ["objective.dmd2.fake_lr=2e-4"]),
    "reg0.25": ("+ GAN, regression 0.25 on teacher pairs", ["objective.dmd2.regression_weight=0.25"]),
    "reg1": ("+ GAN, regression 1", ["objective.dmd2.regression_weight=1"]),
    "optim": ("+ GAN, AdamW wd 0.01, clip 10 (DMD2's optimizer)", ["training.weight_decay=0.01",
                                                                     "training.grad_clip=10"]),
    "no-gan-reg1": ("GAN off, regression 1", GAN_OFF + ["objective.dmd2.regression_weight=1"]),
}
# Round 2: on real guidance 1, the lever of round 1 (docs/dmd2-sweep.md).
RG1 = ["objective.dmd2.real_guidance_scale=1"]
RECIPES.update({
    "r1-nogan": ("real guidance 1, GAN off", RG1 + GAN_OFF),
    "r1-gan-x10": ("real guidance 1, GAN 5e-2 / 1e-1", RG1 + ["objective.dmd2.gan_gen_weight=5e-2",
                                                           "objective.dmd2.gan_disc_weight=1e-1"]),
    "r1-lr3e-5": ("real guidance 1, GAN, lr 3e-5", RG1 + ["training.lr=3e-5"]),
    "r1-lr3e-4": ("real guidance 1, GAN, lr 3e-4", RG1 + ["training.lr=3e-4"]),
    "r1-ttur2": ("real guidance 1, GAN, TTUR 2", RG1 + ["objective.dmd2.dfake_gen_update_ratio=2"]),
    "r1-ttur10": ("real guidance 1, GAN, TTUR 10", RG1 + ["objective.dmd2.dfake_gen_update_ratio=10"]),
    "r1-reg0.25": ("real guidance 1, GAN, regression 0.25", RG1 + ["objective.dmd2.regression_weight=0.25"]),
    "r1-reg1": ("real guidance 1, GAN, regression 1", RG1 + ["objective.dmd2.regression_weight=1"]),
    "r1-fake2x": ("real guidance 1, GAN, fake score lr 2e-4", RG1 + ["objective.dmd2.fake_lr=2e-4"]),
    "r1-optim": ("real guidance 1, GAN, AdamW wd 0.01, clip 10", RG1 + ["training.weight_decay=0.01",
                                                                      "training.grad_clip=10"]),
    "r1-ema": ("real guidance 1, GAN, EMA 0.99 of the generator", RG1 + ["training.ema.enabled=true",
                                                                       "training.ema.decay=0.99"]),
})
# Round 3: the regression term (the lever of round 2) with the other helpful changes.
REG1 = RG1 + ["objective.dmd2.regression_weight=1"]
GAN10 = ["objective.dmd2.gan_gen_weight=5e-2", "objective.dmd2.gan_disc_weight=1e-1"]
OPTIM = ["training.weight_decay=0.01", "training.grad_clip=10"]
EMA = ["training.ema.enabled=true", "training.ema.decay=0.99"]
RECIPES.update({
    "r3-reg2": ("real guidance 1, GAN, regression 2", RG1 + ["objective.dmd2.regression_weight=2"]),
    "r3-reg1-lr3e-5": ("real guidance 1, GAN, regression 1, lr 3e-5", REG1 + ["training.lr=3e-5"]),
    "r3-reg1-gan10": ("real guidance 1, GAN 5e-2 / 1e-1, regression 1", REG1 + GAN10),
    "r3-reg1-optim": ("real guidance 1, GAN, regression 1, wd 0.01, clip 10", REG1 + OPTIM),
    "r3-reg1-ttur10": ("real guidance 1, GAN, regression 1, TTUR 10", REG1 + ["objective.dmd2.dfake_gen_update_ratio=10"]),
    "r3-reg1-gan10-optim": ("real guidance 1, GAN 5e-2 / 1e-1, regression 1, wd 0.01, clip 10", REG1 + GAN10 + OPTIM),
    "r3-reg1-rg1.5": ("real guidance 1.5, GAN, regression 1", ["objective.dmd2.real_guidance_scale=1.5",
                                                              "objective.dmd2.regression_weight=1"]),
    "r3-reg1-ema": ("real guidance 1, GAN, regression 1, EMA 0.99", REG1 + EMA),
    "r3-reg1-ema-optim": ("real guidance 1, GAN, regression 1, EMA 0.99, wd 0.01, clip 10", REG1 + EMA + OPTIM),
})
METRICS = ("fid", "precision", "recall", "density", "coverage", "adherence", "diversity")


def run_one(demo: Path, work: Path, latents: Path, recipe: str, extra: list[str], variant: str,
            steps: int, student_steps: int, seed: int, guidance: float, extractor, ref, prompts,
            images_per_prompt: int) -> dict:
    overrides = (base_overrides(demo, steps, student_steps, guidance) + sweep_base(guidance)
                 + VARIANTS[variant] + RECIPES[recipe][1] + list(extra) + [f"training.seed={seed}"])
    config = load_config("demo", overrides)
    out = work / f"{recipe}-{variant.replace(' ', '').replace('+', '_')}-{student_steps}-{steps}-{seed}"
    started = time.perf_counter()
    student = distill(config, latents, [rollouts_for(config, latents, work)], out)
    seconds = time.perf_counter() - started
    info = read_student_info(student)
    metrics = measure(load_pipeline(str(student)), extractor, ref, prompts, images_per_prompt,
                      info["num_inference_steps"], info["guidance_scale"])
    return {"recipe": recipe, "variant": variant, "student_steps": student_steps, "updates": steps, "seed": seed,
            "generator_updates": -(-steps // config.objective.dmd2.dfake_gen_update_ratio),
            "train_seconds": seconds, **{k: metrics.get(k) for k in METRICS}}


def to_markdown(result: dict) -> str:
    lines = ["# DMD2 sweep on the digits teacher", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}; {result['date']}; {result['wall_seconds'] / 60:.0f} min.  ",
             f"Teacher: {result['teacher']}", "",
             "| recipe | what it changes | variant | steps | updates (G) | seed | FID | recall | coverage | precision "
             "| diversity | train s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['recipe']} | {RECIPES.get(r['recipe'], ('?',))[0]} | {r['variant']} | "
                     f"{r['student_steps']} | {r['updates']} ({r['generator_updates']}) | {r['seed']} | "
                     f"{r['fid']:.1f} | {r['recall']:.3f} | {r['coverage']:.3f} | {r['precision']:.3f} | "
                     f"{r['diversity']:.2f} | {r['train_seconds']:.0f} |")
    groups: dict[tuple, list] = {}
    for r in result["runs"]:
        groups.setdefault((r["recipe"], r["variant"], r["student_steps"], r["updates"]), []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        lines += ["", "Mean ± standard deviation over seeds:", "",
                  "| recipe | variant | steps | updates | seeds | FID | recall | coverage |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for (recipe, variant, steps, updates), runs in groups.items():
            def ms(key):
                vals = [r[key] for r in runs]
                return f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"
            lines.append(f"| {recipe} | {variant} | {steps} | {updates} | {len(runs)} | {ms('fid')} | {ms('recall')} | "
                         f"{ms('coverage')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True)
    parser.add_argument("--work", help="latents, rollouts and students (default: a temp folder)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--variants", nargs="+", default=["baseline"], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", nargs="+", type=int, default=[400], help="training updates per run")
    parser.add_argument("--student-steps", nargs="+", type=int, default=[4])
    parser.add_argument("--set", action="append", default=[], help="an extra override for every run (repeatable)")
    parser.add_argument("--images-per-prompt", type=int, default=30)
    parser.add_argument("--out", default="docs/dmd2-sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    demo, started = Path(args.demo), time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="ddil-dmd2-"))
    extractor = load_extractor(f"classifier:{demo / 'classifier'}")
    guidance = demo_guidance(demo)
    base = load_config("demo", base_overrides(demo, 400, 4, guidance))
    ref, _, _ = reference_features(base, str(demo / "dataset-eval"), 16, extractor)
    prompts = [f"a handwritten digit {w}" for w in
               ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
    latents = work / "latents"
    if not (latents / "manifest.json").exists():
        cache_latents(base, latents)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/dmd2_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, 1 torch thread",
              "teacher": str(demo / "teacher"), "runs": []}
    for seed in args.seeds:
        for student_steps in args.student_steps:
            for steps in args.steps:
                for variant in args.variants:
                    for recipe in args.recipes:
                        row = run_one(demo, work, latents, recipe, args.set, variant, steps, student_steps,
                                      seed, guidance, extractor, ref, prompts, args.images_per_prompt)
                        result["runs"].append(row)
                        result["wall_seconds"] = time.time() - started
                        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
                        out.with_suffix(".md").write_text(to_markdown(result))
                        print(f"{recipe:12s} {variant:18s} {student_steps} steps {steps} upd seed {seed}: FID "
                              f"{row['fid']:.1f} recall {row['recall']:.3f} coverage {row['coverage']:.3f} "
                              f"({row['train_seconds']:.0f} s)", flush=True)
    print(to_markdown(result))


if __name__ == "__main__":
    main()

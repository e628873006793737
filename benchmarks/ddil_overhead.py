"""Training cost of DDIL against its baseline, per objective (docs/method.md section 8).

For PD (2-step), LCM (2-step) and DMD2 (4-step) on the tiny recipe, three variants of the same objective:
  baseline       priors (1, 0, 0): forward-diffused states only
  ddil           priors (0.5, 0.25, 0.25), replay buffer on (the recipe's buffer: capacity 32, refresh 0.5)
  ddil_nobuffer  the same priors, buffer off: every student-backward state is a fresh rollout
The data is built once (cache-latents + teacher-rollouts on the 4-step grid [999, 749, 499, 249], which holds the
student grids of all three). Then `distill` runs for every variant, `--reps` rounds with the variants interleaved and
their order rotated each round; seconds_per_update comes from train_log.jsonl (log_every=1), skipping the first
`--warmup-steps` steps of each run. Ratios are taken inside each round (variant / baseline of the same round) and
their median over rounds is reported, with the pooled-median ratio beside it.

DMD2 updates its generator once every `dfake_gen_update_ratio` (10) steps, so its steps are not alike: its seconds
per update is amortised over a cycle, (median generator step + (r - 1) x median critic step) / r.

    python benchmarks/ddil_overhead.py                 # ~3 minutes on 2 cores
    python benchmarks/ddil_overhead.py --quick         # smoke test
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

OBJECTIVES = {
    "pd": ["objective.name=pd", "objective.student_steps=2", "objective.pd.teacher_steps=4"],
    "lcm": ["objective.name=lcm", "objective.student_steps=2"],
    "dmd2": ["objective.name=dmd2", "objective.student_steps=4"],
}
VARIANTS = {
    "baseline": ["ddil.priors.forward=1", "ddil.priors.teacher=0", "ddil.priors.student=0"],
    "ddil": ["ddil.priors.forward=0.5", "ddil.priors.teacher=0.25", "ddil.priors.student=0.25",
             "ddil.buffer.enabled=true"],
    "ddil_nobuffer": ["ddil.priors.forward=0.5", "ddil.priors.teacher=0.25", "ddil.priors.student=0.25",
                      "ddil.buffer.enabled=false"],
}
TARGET = 1.25  # DDIL with buffer <= 1.25 x baseline seconds per update


def run_variant(objective: str, variant: str, steps: int, latents: Path, rollouts: Path, out: Path,
                extra: list[str]) -> tuple[list[dict], object]:
    from ddil_core.stages.distill import distill

    config = common.tiny_config(
        *OBJECTIVES[objective], *VARIANTS[variant], f"training.steps={steps}",
        "training.log_every=1", f"training.checkpoint_every={steps}", "training.keep_checkpoints=1", *extra)
    distill(config, latents, [rollouts], out)
    return common.read_log(out), config


def step_kind(objective: str, log_step: int, config) -> str:
    if objective == "dmd2" and (log_step - 1) % config.objective.dmd2.dfake_gen_update_ratio == 0:
        return "generator"
    return "critic" if objective == "dmd2" else "step"


def seconds_per_update(objective: str, records: list[dict], config) -> dict:
    """Median seconds per update of the kept steps; DMD2: amortised over its generator/critic cycle."""
    values = [r["seconds_per_update"] for r in records]
    out = {"median": common.median(values), "mean": statistics.mean(values) if values else None, "n": len(values)}
    if objective == "dmd2":
        ratio = config.objective.dmd2.dfake_gen_update_ratio
        gen = [r["seconds_per_update"] for r in records if step_kind(objective, r["step"], config) == "generator"]
        critic = [r["seconds_per_update"] for r in records if step_kind(objective, r["step"], config) == "critic"]
        out.update(generator_median=common.median(gen), critic_median=common.median(critic),
                   generator_steps=len(gen), critic_steps=len(critic), gen_update_ratio=ratio)
        if gen and critic:
            out["amortised"] = (common.median(gen) + (ratio - 1) * common.median(critic)) / ratio
    out["headline"] = out.get("amortised", out["median"])
    return out


def mean_split(records: list[dict]) -> dict:
    """Mean seconds of each part of a step over the kept steps (means add up, medians do not)."""
    keys = sorted({k for r in records for k in r.get("seconds_split", {})})
    return {k: statistics.mean(r["seconds_split"].get(k, 0.0) for r in records) for k in keys} if records else {}


TABLE_HEADERS = ["objective", "student steps", "baseline s/update", "DDIL+buffer s/update", "ratio (range over rounds)",
                 "DDIL no buffer s/update", "ratio (range over rounds)", "rollout s/step: baseline / buffer / no buffer",
                 "fresh student rollouts/step: buffer / no buffer", f"DDIL+buffer <= {TARGET}x"]


def overhead_row(objective: str, res: dict) -> list:
    """One table row; absolute seconds are medians over rounds, ratios medians of per-round ratios."""
    v = res["variants"]

    def rng(name):
        rounds = [x for x in v[name]["ratio_per_round"] if x is not None]
        return f"{v[name]['ratio_to_baseline']:.3f} ({min(rounds):.2f}-{max(rounds):.2f})" if rounds else "n/a"

    split = "/".join(f"{1000 * v[n]['seconds_split_mean'].get('rollout', 0):.1f}ms" for n in VARIANTS)
    fresh = "/".join(common.fmt(v[n]["fresh_student_rollouts_per_step"], 2) for n in ("ddil", "ddil_nobuffer"))
    return [objective, res["student_steps"], common.median(v["baseline"]["per_round"]),
            common.median(v["ddil"]["per_round"]), rng("ddil"), common.median(v["ddil_nobuffer"]["per_round"]),
            rng("ddil_nobuffer"), split, fresh, res["meets_target"]]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=30, help="distill steps per run")
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds (every variant once per round)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="first steps of each run left out")
    parser.add_argument("--objectives", default="pd,lcm,dmd2")
    parser.add_argument("--data", help="folder for (or with) the latent cache and rollouts; default: a temp dir")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run, a.b=c")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.reps, args.warmup_steps = 2, 1, 1
    threads = common.setup(args.threads)
    objectives = [o for o in args.objectives.split(",") if o]
    work = Path(tempfile.mkdtemp(prefix="ddil-overhead-"))
    try:
        data = Path(args.data) if args.data else work / "data"
        sizes = {"limit": 32 if args.quick else 64, "rollouts": 8 if args.quick else 16}
        latents, rollouts = common.build_data(data, **sizes)
        kept: dict = {o: {v: [] for v in VARIANTS} for o in objectives}
        per_round: dict = {o: {v: [] for v in VARIANTS} for o in objectives}
        configs = {}
        for r in range(args.reps):
            for objective in common.rotated(objectives, r):
                for variant in common.rotated(list(VARIANTS), r):
                    out = work / f"round{r}" / objective / variant
                    records, config = run_variant(objective, variant, args.steps, latents, rollouts, out,
                                                  [*common.data_overrides(**sizes), *args.set])
                    configs[objective] = config
                    records = [x for x in records if x["step"] > args.warmup_steps]
                    kept[objective][variant] += records
                    per_round[objective][variant].append(seconds_per_update(objective, records, config)["headline"])
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"round {r} {objective:5s} {variant:14s} "
                          f"{common.fmt(per_round[objective][variant][-1])} s/update", flush=True)

        results = {}
        rows = []
        for objective in objectives:
            config = configs[objective]
            res = {"variants": {}}
            for variant in VARIANTS:
                recs = kept[objective][variant]
                res["variants"][variant] = {
                    "seconds_per_update": seconds_per_update(objective, recs, config),
                    "per_round": per_round[objective][variant],
                    "seconds_split_mean": mean_split(recs),
                    "fresh_student_rollouts_per_step": statistics.mean(x["fresh_student_rollouts"] for x in recs) if recs else None,
                    "source_share": {s: statistics.mean(x["source_share"][s] for x in recs) for s in ("forward", "teacher", "student")} if recs else None,
                    "samples_per_second_median": common.median(x["samples_per_second"] for x in recs),
                }
            base = res["variants"]["baseline"]
            for variant in ("ddil", "ddil_nobuffer"):
                v = res["variants"][variant]
                rounds = [common.ratio(a, b) for a, b in zip(per_round[objective][variant], per_round[objective]["baseline"])]
                v["ratio_to_baseline"] = common.median(rounds)
                v["ratio_per_round"] = rounds
                v["ratio_pooled"] = common.ratio(v["seconds_per_update"]["headline"], base["seconds_per_update"]["headline"])
                v["ratio_of_means"] = common.ratio(v["seconds_per_update"]["mean"], base["seconds_per_update"]["mean"])
                split_b, split_v = base["seconds_split_mean"], v["seconds_split_mean"]
                v["extra_seconds_by_part"] = {k: split_v.get(k, 0.0) - split_b.get(k, 0.0) for k in set(split_b) | set(split_v)}
            ddil = res["variants"]["ddil"]
            res["meets_target"] = None if ddil["ratio_to_baseline"] is None else ddil["ratio_to_baseline"] <= TARGET
            res["student_steps"] = config.objective.student_steps
            results[objective] = res
            rows.append(overhead_row(objective, res))
        headers = TABLE_HEADERS
        print(common.table(headers, rows))
        result = {
            "settings": {"steps": args.steps, "reps": args.reps, "warmup_steps": args.warmup_steps,
                         "threads": threads, "quick": args.quick, "extra_overrides": args.set,
                         "recipe": "tiny", "batch_size": configs[objectives[0]].training.batch_size,
                         "buffer": vars(configs[objectives[0]].ddil.buffer),
                         "rollouts_teacher_steps": 4, "target_ratio": TARGET},
            "objectives": results,
            "table_markdown": common.table(headers, rows),
        }
        common.write_results("ddil_overhead", result, args.out, args.update_docs)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

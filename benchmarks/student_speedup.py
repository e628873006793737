"""Seconds per image of a few-step student against the teacher at 50 steps with classifier-free guidance
(must-show target: the student at 4 steps >= 15x faster).

Both run `ddil_core.stages.sample.generate` on the same tiny://sd15 pipeline (text encoding, the sampler and the VAE
decode are all timed, as a user would see them): the teacher with DDIM at 50 steps and CFG (two UNet evaluations per
step, batched), the student as the same tiny UNet without CFG at 1, 2, 4 and 8 DDIM steps (what a PD student runs),
plus the multistep consistency sampler at 4 steps (what LCM and DMD2 students run). A batch of prompts is generated
per call; the cases are interleaved and their order rotated each round, and a short case repeats its call within a
round until it lasts about as long as the teacher's (so load bursts from other processes hit both sides of a ratio
alike). The speedup is the median over rounds of the per-round ratio. Weights are random: only time is measured.
The fixed cost of a call (prompt encoding + VAE decode, no UNet) is measured the same way, to explain the gap between
the measured speedup and the NFE ratio.

    python benchmarks/student_speedup.py            # ~2 minutes on 2 cores
    python benchmarks/student_speedup.py --quick
"""
from __future__ import annotations

import argparse
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

TARGET = 15.0  # student at 4 steps >= 15x faster than the teacher at 50 steps with CFG
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate() call")
    parser.add_argument("--reps", type=int, default=6, help="interleaved timed rounds")
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5, help="teacher CFG scale (>1: guided)")
    parser.add_argument("--student-steps", default="1,2,4,8")
    parser.add_argument("--teacher", default="tiny://sd15", help="pipeline to time (a folder works too)")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.batch, args.teacher_steps = 1, 2, 6
    threads = common.setup(args.threads)
    import torch

    from ddil_core.models.conditioning import encode_prompts, encode_unconditional
    from ddil_core.models.latents import decode_latents
    from ddil_core.models.pipeline_io import load_pipeline
    from ddil_core.models.sampling import generate

    pipe = load_pipeline(args.teacher)
    prompts = [f"a handwritten digit {DIGITS[i % 10]}" for i in range(args.batch)]
    seeds = list(range(args.batch))
    student_steps = [int(s) for s in args.student_steps.split(",") if s]
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    side = pipe.unet.config.sample_size
    latents = torch.randn(args.batch, pipe.unet.config.in_channels, side, side)

    def case(steps, guidance, sampler="ddim"):
        from diffusers import LCMScheduler

        def run():
            scheduler = LCMScheduler.from_config(pipe.scheduler.config) if sampler == "consistency" else sampler
            return generate(pipe, prompts, seeds, steps, guidance, scheduler)
        return run

    def fixed():  # what every generate() call pays besides the UNet: prompt (and empty prompt) encoding, VAE decode
        encode_prompts(pipe, prompts, res)
        encode_unconditional(pipe, res)
        decode_latents(pipe.vae, latents)

    teacher_name = f"teacher_{args.teacher_steps}_cfg"
    cases = {teacher_name: case(args.teacher_steps, args.guidance)}
    for n in student_steps:
        cases[f"student_{n}"] = case(n, 1.0)
    if 4 in student_steps:
        cases["student_4_consistency"] = case(4, 1.0, "consistency")
    cases["fixed_cost_no_unet"] = fixed
    with torch.no_grad():
        times = common.interleaved(cases, args.reps, warmup=1, equalize=not args.quick)

    per_image = {name: common.median(t) / args.batch for name, t in times.items()}
    teacher_nfe = args.teacher_steps * (2 if args.guidance > 1 else 1)
    rows, students = [], {}
    rows.append([teacher_name, teacher_nfe, per_image[teacher_name], 1.0, 1.0])
    for name in cases:
        if not name.startswith("student_"):
            continue
        n = int(name.split("_")[1])
        # the speedup is taken inside each round (teacher and student timed back to back), median over rounds
        per_round = [common.ratio(a, b) for a, b in zip(times[teacher_name], times[name])]
        speedup = common.median(per_round)
        students[name] = {"steps": n, "sampler": "consistency" if name.endswith("consistency") else "ddim",
                          "seconds_per_image": per_image[name], "speedup": speedup, "speedup_per_round": per_round,
                          "speedup_of_medians": common.ratio(per_image[teacher_name], per_image[name]),
                          "speedup_of_minima": common.ratio(min(times[teacher_name]), min(times[name])),
                          "nfe": n, "nfe_ratio": teacher_nfe / n, "times": times[name]}
        rows.append([name, n, per_image[name], speedup, teacher_nfe / n])
    rows.append(["fixed cost (prompt encode + decode, no UNet)", 0, per_image["fixed_cost_no_unet"], None, None])
    headers = ["sampler", "UNet evaluations per image", "s/image (median)", "speedup vs teacher (median of rounds)",
               "NFE ratio"]
    print(common.table(headers, rows))
    speedup_4 = students.get("student_4", {}).get("speedup")
    result = {
        "settings": {"teacher": args.teacher, "batch": args.batch, "reps": args.reps, "threads": threads,
                     "teacher_steps": args.teacher_steps, "guidance": args.guidance, "quick": args.quick,
                     "student_steps": student_steps, "resolution": res},
        "teacher": {"name": teacher_name, "seconds_per_image": per_image[teacher_name], "nfe": teacher_nfe,
                    "times": times[teacher_name]},
        "students": students,
        "fixed_cost_seconds_per_image": per_image["fixed_cost_no_unet"],
        "target": {"student_4_min_speedup": TARGET, "student_4_speedup": speedup_4,
                   "met": None if speedup_4 is None else speedup_4 >= TARGET},
        "table_markdown": common.table(headers, rows),
    }
    common.write_results("student_speedup", result, args.out, args.update_docs)
    return result


if __name__ == "__main__":
    main()

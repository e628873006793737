"""prepare-demo's teacher update on one thread, on torch's intra-op threads over all cores, and as 2 `demo.workers`
data-parallel threads (ddil_core/demo/parallel.py), and the other demo.unet architectures on one thread: seconds per
update and their ratios, measured in one run, and whether a rebuild gives the same weights.

Each case runs `--steps` updates of the demo teacher's loop (demo/training.py with demo/teacher.py's batch and loss:
demo.unet's UNet (`--unet`, the recipe's mid-attention one by default), batch 64 of 4x8x8 latents, Min-SNR loss, AdamW,
clipping) on random latents and embeddings; the cases are interleaved and rotated per round (benchmarks/common.py),
the ratios taken inside each round. Then `--steps` updates from the same seed are trained twice per worker count
and their weights hashed: equal hashes are the bit-for-bit rebuild the recipe promises, whatever the machine's load.

    python benchmarks/demo_workers.py --update-docs     # about 2 minutes on 2 idle cores
    python benchmarks/demo_workers.py --quick           # smoke test (tests/benchmarks/test_benchmarks_smoke.py)
"""
from __future__ import annotations

import argparse
import hashlib
import typing
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from ddil_core.config.schema import DemoConfig


def teacher_trainer(batch_size: int, workers: int, unet: str, seed: int = 0):
    """A function running n updates of the demo teacher's loop with `workers` workers; returns the UNet."""
    import torch

    from ddil_core.demo import teacher

    torch.manual_seed(seed)
    latents, labels = torch.randn(256, 4, 8, 8), torch.arange(256) % 10
    classes, uncond = torch.randn(10, 16, 32), torch.randn(1, 16, 32)

    def run(steps: int):
        trained, _ = teacher.train_teacher_unet(latents, labels, classes, uncond, steps, batch_size, seed=seed,
                                                workers=workers, unet=unet)
        return trained
    return run


def weights_hash(module) -> str:
    h = hashlib.sha256()
    for value in module.state_dict().values():
        h.update(value.numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=10, help="teacher updates per timed call")
    parser.add_argument("--batch", type=int, default=64, help="the recipe's demo.teacher_batch_size")
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed rounds")
    kinds = typing.get_args(typing.get_type_hints(DemoConfig)["unet"])  # the schema's (no torch imported)
    parser.add_argument("--unet", choices=kinds, default=DemoConfig().unet, help="demo.unet")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.reps = 2, 8, 1
    threads = common.setup(args.threads)
    import os

    import torch

    cores = os.cpu_count() or 2

    def intra_op(run):
        def call():
            torch.set_num_threads(cores)
            try:
                run(args.steps)
            finally:
                torch.set_num_threads(threads)
        return call

    def timed(run):
        return lambda: run(args.steps)

    one, two = teacher_trainer(args.batch, 1, args.unet), teacher_trainer(args.batch, 2, args.unet)
    cases = {"one thread": timed(one), "intra-op threads on all cores": intra_op(one), "2 workers": timed(two)}
    for kind in kinds:  # the other architectures on one thread, in the same rounds: their cost as a ratio
        if kind != args.unet:
            cases[f"one thread, demo.unet {kind}"] = timed(teacher_trainer(args.batch, 1, kind))
    times = common.interleaved(cases, args.reps, warmup=1)
    per_update = {name: common.median(t) / args.steps for name, t in times.items()}
    speedups = {name: common.median([common.ratio(a, b) for a, b in zip(times["one thread"], times[name])])
                for name in cases}
    rebuilds = {}
    for workers in (1, 2):
        hashes = [weights_hash(teacher_trainer(args.batch, workers, args.unet)(args.steps)) for _ in range(2)]
        rebuilds[f"{workers} worker{'s' if workers > 1 else ''}"] = {"hashes": hashes, "same": hashes[0] == hashes[1]}
    headers = ["teacher update", "s/update (median)", "speedup vs one thread (median of rounds)", "rebuild identical"]
    rows = [[name, per_update[name], speedups[name],
             rebuilds.get(name.replace("one thread", "1 worker"), {}).get("same", "-")] for name in cases]
    print(common.table(headers, rows))
    result = {
        "settings": {"steps": args.steps, "batch": args.batch, "reps": args.reps, "threads": threads, "unet": args.unet,
                     "quick": args.quick},
        "seconds_per_update": per_update, "speedup_vs_one_thread": speedups, "times": times, "rebuilds": rebuilds,
        "table_markdown": common.table(headers, rows),
    }
    common.write_results("demo_workers", result, args.out, args.update_docs)
    return result


if __name__ == "__main__":
    main()

"""Data-parallel scaling of `ddil distill`: 1 process against N processes.

Each run is `ddil distill` under a launcher (torchrun by default, gloo on CPU; or `accelerate launch`), reading
seconds_per_update and samples_per_second from train_log.jsonl (rank 0 writes it; samples count the global batch)
after `--warmup-steps`. `training.batch_size` is the GLOBAL batch (every rank draws the same DDIL batch and trains on
its slice; gradients are averaged), so two scalings are measured:
  strong  the same global batch on 1 and N processes (each rank does 1/N of the network work)
  weak    global batch x N on N processes (each rank keeps the 1-process batch)
On a CPU box, N processes x 1 thread use N cores; the 1-process x N-threads run (same cores) is measured beside them
as the fair reference. Runs are interleaved, order rotated per round.

accelerate 1.15 on a CPU-only machine: `accelerate launch --cpu --num_processes 2` starts ONE process (DistributedType
NO: without MPI it does not spawn CPU workers); `accelerate launch --multi_gpu --num_processes 2` with no GPU present
starts two gloo (MULTI_CPU) processes, and so does torchrun. `--launcher accelerate` uses the working form.

    python benchmarks/scaling.py                       # ~4 minutes on 2 cores
    python benchmarks/scaling.py --quick
    python benchmarks/scaling.py --nprocs 1,2,4 --launcher accelerate   # on a bigger box / a GPU node
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common


def launch_command(launcher: str, nprocs: int, cli_args: list[str]) -> list[str]:
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nprocs),
                "-m", "ddil_core.cli", *cli_args]
    if launcher == "accelerate":
        mode = ["--multi_gpu"] if nprocs > 1 else []  # see the module docstring: --cpu would run one process
        return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(nprocs),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "-m", "ddil_core.cli", *cli_args]
    if launcher == "python":  # one plain process, no launcher
        return [sys.executable, "-m", "ddil_core.cli", *cli_args]
    raise ValueError(f"unknown launcher {launcher}")


def run_once(case: dict, args, latents: Path, rollouts: Path, out: Path) -> dict:
    sets = [*common.data_overrides(**args.data_sizes), f"objective.name={args.objective}",
            f"training.steps={args.steps}",
            f"training.batch_size={case['global_batch']}", "training.log_every=1",
            f"training.checkpoint_every={args.steps}", "training.keep_checkpoints=1", *args.set]
    if args.objective == "dmd2":
        sets.append("objective.student_steps=4")
    cli = ["distill", "--config", "tiny", "--latents", str(latents), "--rollouts", str(rollouts), "--out", str(out)]
    for s in sets:
        cli += ["--set", s]
    cmd = launch_command(args.launcher, case["nprocs"], cli)
    env = {**os.environ, "OMP_NUM_THREADS": str(case["threads"]), "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(common.ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, cwd=common.ROOT)
    records = [r for r in common.read_log(out) if r["step"] > args.warmup_steps]
    return {"rc": proc.returncode, "stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
            "command": " ".join(cmd), "records": records}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--nprocs", default="1,2", help="process counts; the first is the reference")
    parser.add_argument("--launcher", choices=["torchrun", "accelerate"], default="torchrun")
    parser.add_argument("--batch", type=int, default=8, help="global batch of the 1-process run")
    parser.add_argument("--modes", default="strong,weak")
    parser.add_argument("--no-threads-reference", action="store_true",
                        help="skip the 1-process x N-threads reference run")
    parser.add_argument("--objective", choices=["pd", "lcm", "dmd2"], default="pd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per launched run")
    parser.add_argument("--data", help="folder for (or with) the latent cache and rollouts; default: a temp dir")
    parser.add_argument("--set", action="append", default=[], help="extra config override, a.b=c")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup_steps, args.reps, args.modes, args.no_threads_reference = 3, 1, 1, "strong", True
    threads = common.setup(args.threads)
    counts = [int(n) for n in args.nprocs.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    base_n = counts[0]

    cases = {}
    for n in counts:
        for mode in modes:
            if n == base_n and mode != modes[0]:
                continue  # the reference run is the same in both modes
            batch = args.batch if mode == "strong" or n == base_n else args.batch * n // base_n
            name = f"{n}proc" if n == base_n else f"{n}proc_{mode}"
            cases[name] = {"nprocs": n, "threads": 1, "global_batch": batch, "mode": mode}
        if n != base_n and not args.no_threads_reference:
            cases[f"{base_n}proc_{n}threads"] = {"nprocs": base_n, "threads": n, "global_batch": args.batch,
                                                  "mode": "threads"}
    work = Path(tempfile.mkdtemp(prefix="ddil-scaling-"))
    try:
        data = Path(args.data) if args.data else work / "data"
        args.data_sizes = {"limit": 32 if args.quick else 64, "rollouts": 8 if args.quick else 16}
        latents, rollouts = common.build_data(data, **args.data_sizes)
        runs: dict[str, list[dict]] = {name: [] for name in cases}
        for r in range(args.reps):
            for name in common.rotated(list(cases), r):
                out = work / f"r{r}-{name}"
                result = run_once(cases[name], args, latents, rollouts, out)
                runs[name].append(result)
                status = "ok" if result["rc"] == 0 else f"FAILED rc={result['rc']}"
                spu = common.median(x["seconds_per_update"] for x in result["records"])
                print(f"round {r} {name:18s} {status} {common.fmt(spu)} s/update", flush=True)
                if result["rc"]:
                    print(result["stderr_tail"][-800:], flush=True)
                shutil.rmtree(out, ignore_errors=True)

        summary = {}
        for name, case in cases.items():
            recs = [x for run in runs[name] for x in run["records"]]
            ok = all(run["rc"] == 0 for run in runs[name]) and bool(recs)
            summary[name] = {
                **case, "ok": ok,
                "seconds_per_update": common.median(x["seconds_per_update"] for x in recs),
                "samples_per_second": common.median(x["samples_per_second"] for x in recs),
                "per_round_samples_per_second": [common.median(x["samples_per_second"] for x in run["records"])
                                                 for run in runs[name]],
                "seconds_split_median": {k: common.median(x["seconds_split"].get(k) for x in recs)
                                         for k in sorted({k for x in recs for k in x["seconds_split"]})},
                "failures": [{"rc": run["rc"], "stderr_tail": run["stderr_tail"], "command": run["command"]}
                             for run in runs[name] if run["rc"]],
                "command": runs[name][0]["command"] if runs[name] else None,
            }
        ref = f"{base_n}proc"
        rows = []
        for name, s in summary.items():
            per_round = [common.ratio(a, b) for a, b in zip(s["per_round_samples_per_second"],
                                                           summary[ref]["per_round_samples_per_second"])]
            s["speedup_vs_reference"] = common.median(per_round) if s["ok"] and summary[ref]["ok"] else None
            s["parallel_efficiency"] = (None if s["speedup_vs_reference"] is None or s["mode"] == "threads"
                                        else s["speedup_vs_reference"] / (s["nprocs"] / base_n))
            rows.append([name, s["nprocs"], s["threads"], s["global_batch"], s["ok"], s["seconds_per_update"],
                         s["samples_per_second"], s["speedup_vs_reference"], s["parallel_efficiency"]])
        headers = ["run", "processes", "threads/process", "global batch", "ran", "s/update", "samples/s",
                   "samples/s vs 1 process", "parallel efficiency"]
        print(common.table(headers, rows))
        result = {
            "settings": {"launcher": args.launcher, "nprocs": counts, "modes": modes, "objective": args.objective,
                         "steps": args.steps, "warmup_steps": args.warmup_steps, "reps": args.reps,
                         "batch": args.batch, "threads_this_process": threads, "quick": args.quick,
                         "extra_overrides": args.set},
            "runs": summary,
            "all_ran": all(s["ok"] for s in summary.values()),
            "table_markdown": common.table(headers, rows),
        }
        common.write_results("scaling", result, args.out, args.update_docs)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

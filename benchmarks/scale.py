"""Memory and throughput at scale: what each memory feature buys, and what a GPU update costs.

(a) CPU, measured:
  updates  peak host memory of one distill update of each objective (the objectives' own loss code, AdamW steps)
           for full fp32 / bf16 (frozen networks bf16, autocast) / gradient checkpointing / LoRA / all three, on a
           reduced-width UNet (SD 1.5's layout at 1/4 width, 256 px), one subprocess per case: peak RSS (VmHWM, reset
           after the networks are built) minus the RSS of the built networks, and the total.
  cache    peak host RSS of `ddil distill` (a subprocess; ru_maxrss) on a latent cache and teacher rollouts of 1x, 4x
           and 16x the size (the shards of one cache repeated), in memory and with training.streaming.
(b) GPU (--gpu): one real update of each objective at SD 1.5 size and SSD-1B/SDXL size (diffusers
  UNet2DConditionModel from the published configs, random weights, bf16 frozen networks, fp32 trainable ones under
  bf16 autocast), per feature, at the largest batch that fits (doubling): seconds/update, images/s, peak GPU memory,
  MFU against the chip's dense bf16 peak; and the student's images/s at 1, 2, 4 steps against the teacher's 50 steps
  with CFG at 512 px (SD 1.5) and 1024 px (SDXL), VAE decode included (prompt embeddings given: no text encoder).

    python benchmarks/scale.py --update-docs          # (a) on a CPU: ~10 min on 2 cores
    python benchmarks/scale.py --gpu --update-docs    # (b) on one GPU (H100/H200): a few minutes
    python benchmarks/scale.py --quick [--gpu]        # smoke test on a CPU (tests/benchmarks/test_benchmarks_smoke.py)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from benchmarks.gpu_unets import PEAK_BF16_TFLOPS, SD15_TINY, SD15_UNET, SSD1B_TINY, SSD1B_UNET, peak_tflops

SCHED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon",
         "num_train_timesteps": 1000}
# SD 1.5's UNet layout at 1/4 width (groups 16 so every width divides), 32x32 latents: what a CPU can update
SD15_QUARTER = {**SD15_UNET, "sample_size": 32, "block_out_channels": [80, 160, 320, 320], "norm_num_groups": 16}
FEATURES = {  # name -> overrides
    "full_fp32": [],
    "bf16": ["model.dtype=bfloat16", "training.mixed_precision=bf16"],
    "checkpointing": ["training.gradient_checkpointing=true"],
    "lora": ["training.lora.rank=16", "objective.dmd2.fake_lora.rank=16"],  # DMD2: generator and fake score
    "bf16+checkpointing+lora": ["model.dtype=bfloat16", "training.mixed_precision=bf16",
                                "training.gradient_checkpointing=true", "training.lora.rank=16",
                                "objective.dmd2.fake_lora.rank=16"],
}
OBJECTIVES = {"pd": ["objective.pd.teacher_steps=8", "objective.student_steps=4"],
              "lcm": ["objective.name=lcm"],
              "dmd2": ["objective.name=dmd2", "objective.dmd2.gan=true"]}
VAE = {"sd15": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                "norm_num_groups": 32, "scaling_factor": 0.18215},
       "tiny": {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
                "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}}
VAE["sdxl"] = {**VAE["sd15"], "scaling_factor": 0.13025}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# ------------------------------------------------------------------------------------------------ the update


def build(unet_cfg: dict, objective: str, overrides: list, device):
    """The real objective on a random teacher of the given config, its optimisers and a batch of states."""
    import torch
    from diffusers import UNet2DConditionModel

    from ddil_core.config import load_config
    from ddil_core.math.schedule import NoiseSchedule
    from ddil_core.method.batch import StateBatch, TeacherPairs
    from ddil_core.method.objectives import ObjectiveContext, build_objective
    from ddil_core.training.loop import make_optimizer

    config = load_config(None, [*OBJECTIVES[objective], *overrides])
    torch.manual_seed(0)
    with torch.device(device):
        teacher = UNet2DConditionModel(**unet_cfg).eval().requires_grad_(False)
    teacher.to(getattr(torch, config.model.dtype))
    side, dim = unet_cfg["sample_size"], unet_cfg["cross_attention_dim"]

    def cond(n):
        c = {"encoder_hidden_states": torch.randn(n, 77, dim, device=device)}
        if unet_cfg.get("addition_embed_type") == "text_time":
            pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
            c["text_embeds"] = torch.randn(n, pooled, device=device)
            c["time_ids"] = torch.tensor([[side * 8.0, side * 8, 0, 0, side * 8, side * 8]], device=device).repeat(n, 1)
        return c

    schedule = NoiseSchedule.from_config(SCHED, set_alpha_to_one=True)  # tables follow the timesteps' device
    ctx = ObjectiveContext(config, teacher, schedule, SCHED, cond(1), device=torch.device(device), latent_side=side)
    obj = build_objective(config.objective.name, ctx)
    opts = {n: make_optimizer(m, config, obj.lr_for(n)) for n, m in obj.trainable().items()}

    def batch(n):
        x0 = torch.randn(n, 4, side, side, device=device)
        t = obj.grid().timesteps.to(device)[torch.arange(n, device=device) % obj.grid().num_steps]
        noise, c, zeros = torch.randn_like(x0), cond(n), torch.zeros(n, dtype=torch.long, device=device)
        pairs = TeacherPairs(torch.randn_like(x0), t, c, x0)  # DMD2's regression term (on by default) costs its pass
        return StateBatch(schedule.add_noise(x0, noise, t), zeros, t, c, zeros, x0, noise, c, pairs)

    return config, obj, opts, batch


def update(config, obj, opts, batch, step: int, device) -> None:
    """One distill update: the objective's losses, each stepping its own network (as training/loop.py does)."""
    import contextlib

    import torch

    from ddil_core.method.draws import SampleDraws

    cast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) \
        if config.training.mixed_precision == "bf16" else contextlib.nullcontext()
    n = batch.x_t.shape[0]
    with cast:
        out = obj.loss(batch, step, SampleDraws.whole(torch.Generator().manual_seed(step), n))
    for name, loss in out.losses.items():
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    obj.after_update(step)


def worker(spec: dict) -> dict:
    """One CPU case in its own process: RSS of the built networks, then the peak over two updates."""
    common.setup(spec["threads"])

    config, obj, opts, batch = build(spec["unet"], spec["objective"], FEATURES[spec["feature"]], "cpu")
    states = batch(spec["batch"])
    params = {n: (sum(p.numel() for p in m.parameters() if p.requires_grad),
                  sum(p.numel() for p in m.parameters() if not p.requires_grad)) for n, m in obj.trainable().items()}
    rss_models = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current RSS
    t0 = time.perf_counter()
    for step in range(2):  # the first allocates AdamW's states; DMD2's step 0 is a generator update
        update(config, obj, opts, states, 0, "cpu")
    peak = _status("VmHWM")
    return {"rss_models_bytes": rss_models, "peak_rss_bytes": peak, "update_peak_bytes": peak - rss_models,
            "seconds_per_update": (time.perf_counter() - t0) / 2, "trainable_params": params,
            "teacher_dtype": str(next(obj.ctx.teacher_unet.parameters()).dtype)}


def cpu_updates(args) -> tuple[list, str]:
    unet = SD15_TINY if args.quick else SD15_QUARTER
    objectives = ["pd"] if args.quick else list(OBJECTIVES)
    rows, results = [], []
    for objective in objectives:
        for feature in (["full_fp32", "bf16+checkpointing+lora"] if args.quick else FEATURES):
            spec = {"unet": unet, "objective": objective, "feature": feature, "batch": 2, "threads": args.threads}
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                  text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            try:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                res = {"error": proc.stderr[-1500:]}
            results.append({"objective": objective, "feature": feature, **res})
            rows.append([objective, feature, res.get("update_peak_bytes", 0) / 2**20, res.get("peak_rss_bytes", 0) / 2**20,
                         res.get("seconds_per_update"), res.get("error", "")[-80:]])
            print(common.table(["objective", "feature", "update peak MiB", "total peak MiB", "s/update", "error"],
                               rows[-1:]).splitlines()[-1], flush=True)
    return results, common.table(["objective", "feature", "update peak MiB (above the built networks)",
                                  "total peak RSS MiB", "s/update", "error"], rows)


# ------------------------------------------------------------------------------------------------ cache size


def tile(src: Path, dst: Path, times: int, kind: str, cache: Path | None = None) -> None:
    """A shard folder holding `src`'s samples `times` over (hard links to the same shards, a new manifest that
    records what distill checks: the captions repeated, the rollouts' count and the tiled cache's digest)."""
    from ddil_core.stages.common import cache_digest

    manifest = json.loads((src / "manifest.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    for extra in src.iterdir():
        if extra.is_file() and not extra.name.startswith("shard-") and extra.name != "manifest.json":
            shutil.copy(extra, dst / extra.name)
    if (src / "captions.json").exists():
        (dst / "captions.json").write_text(json.dumps(json.loads((src / "captions.json").read_text()) * times))
    shards = []
    for k in range(times):
        for entry in manifest["shards"]:
            name = f"shard-{len(shards):05d}.safetensors"
            os.link(src / entry["file"], dst / name)
            shards.append({**entry, "file": name})
    manifest.update(shards=shards, count=manifest["count"] * times)
    if kind == "rollouts":
        tiled = json.loads((cache / "manifest.json").read_text())
        manifest.update(latents_count=tiled["count"], latents_digest=cache_digest(tiled),
                        num_samples=manifest["num_samples"] * times)
    (dst / "manifest.json").write_text(json.dumps(manifest))


def cpu_cache(args, root: Path) -> tuple[list, str, dict]:
    from ddil_core.config import load_config
    from ddil_core.stages.cache_latents import cache_latents
    from ddil_core.stages.teacher_rollouts import teacher_rollouts

    n, r = (32, 8) if args.quick else (1024, 256)
    sets = ["model.teacher=tiny://sd15", f"model.resolution={16 if args.quick else 64}", f"data.limit={n}",
            f"rollouts.num_samples={r}",
            "rollouts.teacher_steps=4", "training.steps=4", "training.checkpoint_every=4"]
    base = root / "x1"
    if not (base / "rollouts" / "manifest.json").exists():
        cache_latents(load_config("tiny", sets), base / "latents")
        teacher_rollouts(load_config("tiny", sets), base / "latents", base / "rollouts")
    factors = [1, 2] if args.quick else [1, 4, 16]
    results, rows, sizes = [], [], {}
    for f in factors:
        folder = root / f"x{f}"
        if f > 1 and not (folder / "rollouts" / "manifest.json").exists():
            tile(base / "latents", folder / "latents", f, "latents")
            tile(base / "rollouts", folder / "rollouts", f, "rollouts", folder / "latents")
        sizes[f] = sum(p.stat().st_size for p in (base / "latents").glob("shard-*")) * f + \
            sum(p.stat().st_size for p in (base / "rollouts").glob("shard-*")) * f
    for rnd in range(1 if args.quick else 2):  # modes and sizes interleaved, order rotated
        for mode in common.rotated(["in_memory", "streaming"], rnd):
            for f in common.rotated(factors, rnd):
                out = root / f"run-{mode}-x{f}-{rnd}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, "-m", "ddil_core.cli", "distill", "--config", "tiny",
                       "--latents", str(root / f"x{f}" / "latents"), "--rollouts", str(root / f"x{f}" / "rollouts"),
                       "--out", str(out), *[a for s in sets + [f"training.streaming={mode == 'streaming'}",
                                                               f"rollouts.num_samples={r * f}"] for a in ("--set", s)]]
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        cwd=common.ROOT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                err = proc.stderr.read()[-800:] if proc.returncode else ""
                results.append({"mode": mode, "factor": f, "round": rnd, "cache_bytes": sizes[f],
                                "peak_rss_bytes": usage.ru_maxrss * 1024, "exit_code": proc.returncode, "error": err})
    summary = {}
    for mode in ("in_memory", "streaming"):
        peaks = {f: statistics.median([e["peak_rss_bytes"] for e in results if e["mode"] == mode and e["factor"] == f
                                       and e["exit_code"] == 0] or [float("nan")]) for f in factors}
        summary[mode] = {"peak_rss_bytes": peaks, "growth_largest_vs_1x": peaks[factors[-1]] / peaks[1]}
        rows.append([mode, *[peaks[f] / 2**20 for f in factors], summary[mode]["growth_largest_vs_1x"]])
    summary["all_runs_ok"] = all(e["exit_code"] == 0 for e in results)  # a failed run's peak means nothing
    summary["streaming_flat_within_20_percent"] = summary["all_runs_ok"] and \
        summary["streaming"]["growth_largest_vs_1x"] <= 1.2
    headers = ["data", *[f"peak RSS MiB, {f}x cache ({sizes[f] / 2**20:.0f} MiB of shards)" for f in factors],
               f"{factors[-1]}x / 1x"]
    return results, common.table(headers, rows), summary


# ------------------------------------------------------------------------------------------------ GPU


def gpu(args) -> dict:
    import gc

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else None
    peak = peak_tflops(name, args.peak_tflops) or (PEAK_BF16_TFLOPS["H100"] if device == "cpu" else None)
    models = {"sd15": (SD15_TINY if args.quick else SD15_UNET, "sd15"),
              "ssd1b": (SSD1B_TINY if args.quick else SSD1B_UNET, "sdxl")}
    gfeatures = {"bf16": FEATURES["bf16"],
                 "bf16+checkpointing": FEATURES["bf16"] + ["training.gradient_checkpointing=true"],
                 "bf16+checkpointing+lora64": FEATURES["bf16"] + ["training.gradient_checkpointing=true",
                                                                  "training.lora.rank=64",
                                                                  "objective.dmd2.fake_lora.rank=64"]}
    updates, rows = [], []
    for model, (cfg, _) in models.items():
        for objective in OBJECTIVES:
            for feature, overrides in gfeatures.items():
                entry = {"model": model, "objective": objective, "feature": feature}
                try:
                    config, obj, opts, batch = build(cfg, objective, overrides, device)
                    b, best = 1, None
                    while b <= (1 if args.quick else 256):  # the largest batch that fits, by doubling
                        try:
                            states = batch(b)
                            update(config, obj, opts, states, 0, device)
                            best = b
                            b *= 2
                        except torch.OutOfMemoryError:
                            break
                        finally:
                            gc.collect()
                            torch.cuda.empty_cache() if device == "cuda" else None
                    states = batch(best)
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    times = []
                    for i in range(1 if args.quick else 5):
                        t0 = time.perf_counter()
                        update(config, obj, opts, states, 0, device)
                        torch.cuda.synchronize() if device == "cuda" else None
                        times.append(time.perf_counter() - t0)
                    from torch.utils.flop_counter import FlopCounterMode

                    counter = FlopCounterMode(display=False)
                    with counter:
                        update(config, obj, opts, states, 0, device)
                    spu = statistics.median(times)
                    flops = counter.get_total_flops()
                    entry.update(batch=best, seconds_per_update=spu, images_per_second=best / spu,
                                 peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
                                 flops_per_update=flops, mfu=flops / spu / 1e12 / peak if peak else None)
                except Exception as exc:  # recorded, shown; the other cases still run
                    entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                finally:
                    obj = opts = batch = states = None
                    gc.collect()
                    torch.cuda.empty_cache() if device == "cuda" else None
                updates.append(entry)
                mem = entry.get("peak_memory_bytes")
                rows.append([model, objective, feature, entry.get("batch"), entry.get("seconds_per_update"),
                             entry.get("images_per_second"), None if mem is None else mem / 2**30, entry.get("mfu"),
                             entry.get("error", "")[:60]])
                print(common.table(["m"] * 9, rows[-1:]).splitlines()[-1], flush=True)
    sampling = sample_speed(args, device, models)
    return {"device": device, "device_name": name, "peak_bf16_tflops": peak, "updates": updates,
            "update_table": common.table(["model", "objective", "feature", "largest batch", "s/update", "images/s",
                                          "peak GiB", "MFU", "error"], rows), **sampling}


def sample_speed(args, device: str, models: dict) -> dict:
    """Images/s of the student at 1, 2, 4 steps and of the teacher at 50 steps with CFG (batched halves), UNet and
    VAE decode timed, prompt embeddings given; DDIM steps for both (the step arithmetic is negligible)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out, rows = {}, []
    for model, (cfg, family) in models.items():
        with torch.device(device):
            unet = UNet2DConditionModel(**cfg).to(dtype).eval()
            vae = AutoencoderKL(**VAE["tiny" if args.quick else family]).to(dtype).eval()
        side, n = cfg["sample_size"], 1 if args.quick else 4
        scheduler = DDIMScheduler(**{k: v for k, v in SCHED.items() if k != "prediction_type"})
        extra = {}
        if cfg.get("addition_embed_type") == "text_time":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            extra = {"text_embeds": torch.randn(n, pooled, device=device, dtype=dtype),
                     "time_ids": torch.tensor([[side * 8.0] * 2 + [0, 0] + [side * 8.0] * 2], device=device,
                                              dtype=dtype).repeat(n, 1)}
        ehs = torch.randn(n, 77, cfg["cross_attention_dim"], device=device, dtype=dtype)

        @torch.no_grad()
        def generate(steps: int, cfg_scale: float):
            scheduler.set_timesteps(steps)
            x = torch.randn(n, 4, side, side, device=device, dtype=dtype)
            guided = cfg_scale > 1
            h = torch.cat([torch.zeros_like(ehs), ehs]) if guided else ehs
            added = {k: torch.cat([v, v]) for k, v in extra.items()} if guided else extra
            for t in scheduler.timesteps:
                inp = torch.cat([x, x]) if guided else x
                e = unet(inp, t, encoder_hidden_states=h, added_cond_kwargs=added or None).sample
                if guided:
                    u, c = e.chunk(2)
                    e = u + cfg_scale * (c - u)
                x = scheduler.step(e, t, x).prev_sample
            vae.decode(x / vae.config.scaling_factor)
            torch.cuda.synchronize() if device == "cuda" else None

        cases = {"teacher_50_cfg": (50, 7.5), "student_1": (1, 1.0), "student_2": (2, 1.0), "student_4": (4, 1.0)}
        if args.quick:
            cases = {"teacher_50_cfg": (2, 7.5), "student_1": (1, 1.0)}
        times = common.interleaved({k: (lambda s=s, w=w: generate(s, w)) for k, (s, w) in cases.items()},
                                   repeats=1 if args.quick else 3, warmup=1)
        ips = {k: n / statistics.median(v) for k, v in times.items()}
        out[model] = {"resolution_px": side * 8, "batch": n, "images_per_second": ips,
                      "speedup_vs_teacher": {k: v / ips["teacher_50_cfg"] for k, v in ips.items()}}
        rows += [[model, side * 8, k, ips[k], ips[k] / ips["teacher_50_cfg"]] for k in cases]
        unet = vae = None
    return {"sampling": out, "sampling_table": common.table(
        ["model", "px", "sampler", "images/s", "speed-up vs teacher 50 steps + CFG"], rows)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--gpu", action="store_true", help="part (b): real updates and sampling at SD 1.5 / SDXL size")
    parser.add_argument("--work", help="folder for the caches and runs (default: a temporary folder)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the accelerator (MFU denominator)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    common.setup(args.threads)
    import tempfile

    if args.gpu:
        result = {"settings": {"quick": args.quick, "threads": args.threads}, **gpu(args)}
        result["measured_on_gpu"] = result["device"] == "cuda"
        result["table_markdown"] = result["update_table"] + "\n\n" + result["sampling_table"]
        print(result["table_markdown"])
        common.write_results("scale_gpu", result, args.out, args.update_docs)
        return result
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        updates, update_table = cpu_updates(args)
        cache, cache_table, summary = cpu_cache(args, root / "cache")
    result = {"settings": {"quick": args.quick, "threads": args.threads,
                           "unet": "SD15_TINY" if args.quick else "SD15_QUARTER", "batch": 2},
              "unet_config": SD15_TINY if args.quick else SD15_QUARTER,
              "updates": updates, "cache_runs": cache, "cache_summary": summary,
              "table_markdown": update_table + "\n\n" + cache_table}
    print(result["table_markdown"])
    common.write_results("scale", result, args.out, args.update_docs)
    return result


if __name__ == "__main__":
    main()

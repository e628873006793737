"""GPU cost of one training update of each objective on the real architectures.

SD1.5's UNet and SSD-1B's UNet, built from their published configs (inline dicts below: nothing is downloaded),
random weights. A training-step proxy per objective does exactly the UNet work the objective needs per update:
  pd          teacher: 2 guided DDIM steps (2 calls at batch 2B = 4 UNet forwards), no grad;
              student: forward + backward; AdamW step
  lcm         teacher: 1 guided DDIM solver step (1 call at 2B = 2 forwards) + EMA target forward, no grad;
              student (with guidance embedding): forward + backward; AdamW step; EMA update
  dmd2        a generator update: generator forward + backward, real score guided (2 forwards) + fake score
              forward (no grad); then the fake score's own update: forward + backward; 2 AdamW steps
  dmd2_critic a critic-only update (the other dfake_gen_update_ratio - 1 steps): generator forward (no grad),
              fake score forward + backward; AdamW step
Precision as the distill loop runs on GPUs: trainable networks keep fp32 master weights under bf16 autocast, the
frozen teacher (and LCM's EMA target) is held in bf16 (model.dtype=bfloat16). For each (model, objective,
gradient checkpointing on/off): seconds per update (median of --iters after --warmup), samples/s, peak memory,
FLOPs of one update counted with torch.utils.flop_counter.FlopCounterMode, MFU against the dense bf16 peak
(H100 SXM / H200: 989 TFLOP/s; override with --peak-tflops), and the largest batch that fits in 80 GiB (doubling,
then bisection; on a bigger GPU the allocator is capped at 80 GiB so the answer is the H100's).

    python benchmarks/gpu_unets.py                      # on a GPU (H100/H200): all models, objectives, GC on/off
    python benchmarks/gpu_unets.py --models sd15 --objectives pd --no-search
    python benchmarks/gpu_unets.py --quick              # tiny configs, runs on a CPU: the CI smoke test

The SSD-1B config is written from what is known of segmind/SSD-1B's unet/config.json, not copied from it (no
network here): SDXL's layout with the transformer depth cut to 1/2/4 per down block (the first, DownBlock2D, has
none), up blocks [[4, 4, 10], [2, 1, 1], [1, 1, 1]] and a resnet-only mid block. It has 1.331 B parameters, which
matches the 4.47 GB fp16 single-file checkpoint minus the two text encoders and the VAE; pass --ssd1b-config
PATH/config.json to use the published file instead.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

SD15_UNET = {  # runwayml/stable-diffusion-v1-5 unet/config.json (859.5 M parameters)
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "act_fn": "silu",
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "norm_eps": 1e-5, "center_input_sample": False,
}
SSD1B_UNET = {  # segmind/SSD-1B unet/config.json as known (see the module docstring; 1.331 B parameters)
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "transformer_layers_per_block": [[1, 1], [2, 2], [4, 4]],
    "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], [1, 1, 1]],
    "attention_head_dim": [5, 10, 20], "use_linear_projection": True, "cross_attention_dim": 2048,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "act_fn": "silu",
    "flip_sin_to_cos": True, "freq_shift": 0,
}
# --quick: the same families at toy size (what tiny://sd15 and tiny://sdxl use), so CPU CI exercises every path.
SD15_TINY = {**SD15_UNET, "sample_size": 8, "layers_per_block": 1, "block_out_channels": [32, 64],
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32, "norm_num_groups": 8}
SSD1B_TINY = {**SSD1B_UNET, "sample_size": 8, "layers_per_block": 1, "block_out_channels": [32, 64],
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 2],
              "reverse_transformer_layers_per_block": None, "attention_head_dim": [4, 8],
              "cross_attention_dim": 64, "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 6 * 8 + 32, "norm_num_groups": 8}
MODELS = {"sd15": {"unet": SD15_UNET, "tiny": SD15_TINY, "seq": 77, "pooled": None, "gen_update_ratio": 10,
                   "default_batch": 8},
          "ssd1b": {"unet": SSD1B_UNET, "tiny": SSD1B_TINY, "seq": 77, "pooled": 1280, "gen_update_ratio": 5,
                    "default_batch": 4}}
OBJECTIVES = ("pd", "lcm", "dmd2", "dmd2_critic")
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}
MEMORY_CAP_BYTES = 80 * 2**30
LCM_W_DIM = 256


def peak_tflops(device_name: str | None, override: float | None) -> float | None:
    if override:
        return override
    if not device_name:
        return None
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if all(part in device_name for part in key.split()):
            return PEAK_BF16_TFLOPS[key]
    return None


class Proxy:
    """The networks and one training update of an objective, on random inputs."""

    def __init__(self, model: str, objective: str, config: dict, device, checkpointing: bool):
        import torch
        from diffusers import UNet2DConditionModel

        self.torch, self.model, self.objective, self.device = torch, model, objective, device
        self.spec = MODELS[model]
        self.config = config
        self.cuda = device.type == "cuda"
        with torch.device(device):
            student_cfg = {**config, "time_cond_proj_dim": LCM_W_DIM} if objective == "lcm" else config
            self.student = UNet2DConditionModel(**student_cfg).float().train()
            teacher_cfg = config
            self.teacher = UNet2DConditionModel(**teacher_cfg).to(torch.bfloat16).eval().requires_grad_(False)
        self.trainable = {"student": self.student}
        self.target = self.fake = None
        if objective == "lcm":
            self.target = copy.deepcopy(self.student).to(torch.bfloat16).eval().requires_grad_(False)
        if objective in ("dmd2", "dmd2_critic"):
            self.fake = copy.deepcopy(self.teacher).float().train().requires_grad_(True)
            self.trainable["fake"] = self.fake
        if checkpointing:
            for net in self.trainable.values():
                net.enable_gradient_checkpointing()
        kw = {"fused": True} if self.cuda else {}
        self.optim = {name: torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=0.01, **kw)
                      for name, net in self.trainable.items()}
        self.params = {name: sum(p.numel() for p in net.parameters()) for name, net in
                       {"teacher": self.teacher, **self.trainable}.items()}

    def inputs(self, batch: int) -> dict:
        torch, c = self.torch, self.config
        side, dim = c["sample_size"], c["cross_attention_dim"]
        d = {"x": torch.randn(batch, c["in_channels"], side, side, device=self.device),
             "t": torch.randint(20, 980, (batch,), device=self.device),
             "ehs": torch.randn(batch, self.spec["seq"], dim, device=self.device),
             "uncond": torch.randn(1, self.spec["seq"], dim, device=self.device)}
        if c.get("addition_embed_type") == "text_time":
            pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
            d["added"] = {"text_embeds": torch.randn(batch, pooled, device=self.device),
                          "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], device=self.device).repeat(batch, 1)}
        return d

    def _call(self, net, x, t, ehs, added, **kw):
        extra = {"added_cond_kwargs": added} if added is not None else {}
        return net(x, t, encoder_hidden_states=ehs, **extra, **kw).sample

    def _guided(self, net, d, x, t):
        """One guided pass: uncond and cond halves in one call at batch 2B (as ddil_core's Denoiser does)."""
        torch = self.torch
        b = x.shape[0]
        ehs = torch.cat([d["uncond"].expand(b, -1, -1), d["ehs"]])
        added = None
        if "added" in d:
            added = {k: torch.cat([torch.zeros_like(v) if k == "text_embeds" else v, v]) for k, v in d["added"].items()}
        out = self._call(net, torch.cat([x, x]).to(torch.bfloat16), torch.cat([t, t]), ehs.to(torch.bfloat16),
                         {k: v.to(torch.bfloat16) for k, v in added.items()} if added else None)
        u, c = out.float().chunk(2)
        return u + 3.0 * (c - u)

    def _autocast(self):
        if self.device.type == "meta":  # FLOP counting only: shapes, no arithmetic (FLOPs do not depend on dtype)
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)

    def step(self, d: dict) -> None:
        torch, x, t = self.torch, d["x"], d["t"]
        added = d.get("added")
        for opt in self.optim.values():
            opt.zero_grad(set_to_none=True)
        if self.objective == "pd":
            with torch.no_grad(), self._autocast():
                y = x
                for _ in range(2):  # t -> t' -> t'': 2 guided teacher passes
                    y = 0.9 * y + 0.1 * self._guided(self.teacher, d, y, t)
            with self._autocast():
                pred = self._call(self.student, x, t, d["ehs"], added)
            loss = (pred.float() - y).pow(2).mean()
            loss.backward()
            self._clip_step("student")
        elif self.objective == "lcm":
            w_emb = torch.randn(x.shape[0], LCM_W_DIM, device=self.device)
            with torch.no_grad(), self._autocast():
                y = 0.9 * x + 0.1 * self._guided(self.teacher, d, x, t)  # one guided solver step
                target = self._call(self.target, y.to(torch.bfloat16), t, d["ehs"].to(torch.bfloat16),
                                    {k: v.to(torch.bfloat16) for k, v in added.items()} if added else None,
                                    timestep_cond=w_emb.to(torch.bfloat16))
            with self._autocast():
                pred = self._call(self.student, x, t, d["ehs"], added, timestep_cond=w_emb)
            loss = (torch.sqrt((pred.float() - target.float()) ** 2 + 1e-6) - 1e-3).mean()
            loss.backward()
            self._clip_step("student")
            with torch.no_grad():
                for p_t, p_s in zip(self.target.parameters(), self.student.parameters()):
                    p_t.lerp_(p_s.detach().to(p_t.dtype), 0.05)
        else:  # dmd2 / dmd2_critic
            gen_step = self.objective == "dmd2"
            with torch.set_grad_enabled(gen_step), self._autocast():
                x0 = self._call(self.student, x, t, d["ehs"], added)
            if gen_step:
                noisy = (0.7 * x0 + 0.7 * torch.randn_like(x0)).detach()
                with torch.no_grad(), self._autocast():
                    real = self._guided(self.teacher, d, noisy, t)
                    fake = self._call(self.fake, noisy, t, d["ehs"], added)
                grad = (real.float() - fake.float()) / real.float().abs().mean().clamp(min=1e-8)
                loss = 0.5 * (x0.float() - (x0.float() - grad).detach()).pow(2).mean()
                loss.backward()
                self._clip_step("student")
            with self._autocast():
                out = self._call(self.fake, (0.7 * x0.detach() + 0.7 * torch.randn_like(x0)), t, d["ehs"], added)
            fake_loss = (out.float() - torch.randn_like(out, dtype=torch.float32)).pow(2).mean()
            self.optim["fake"].zero_grad(set_to_none=True)
            fake_loss.backward()
            self._clip_step("fake")

    def _clip_step(self, name: str) -> None:
        self.torch.nn.utils.clip_grad_norm_(self.trainable[name].parameters(), 10.0)
        self.optim[name].step()

    def free(self) -> None:
        for name in ("student", "teacher", "target", "fake", "trainable", "optim"):
            setattr(self, name, None)


def sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(proxy: Proxy, batch: int, warmup: int, iters: int) -> dict:
    torch, device = proxy.torch, proxy.device
    d = proxy.inputs(batch)
    for _ in range(warmup):
        proxy.step(d)
    sync(torch, device)
    if proxy.cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        sync(torch, device)
        t0 = time.perf_counter()
        proxy.step(d)
        sync(torch, device)
        times.append(time.perf_counter() - t0)
    return {"seconds": times, "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if proxy.cuda else None}


def count_flops(proxy: Proxy, batch: int) -> int:
    """FLOPs of one update. FlopCounterMode has formulas for the CUDA flash / memory-efficient attention kernels
    but counts nothing for the CPU flash kernel, so on a CPU attention runs on the math backend (bmm, counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    backends = ([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if proxy.cuda else [SDPBackend.MATH])
    d = proxy.inputs(batch)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(backends), counter:
        proxy.step(d)
    sync(proxy.torch, proxy.device)
    return int(counter.get_total_flops())


def fits(proxy: Proxy, batch: int) -> bool:
    torch = proxy.torch
    try:
        proxy.step(proxy.inputs(batch))
        sync(torch, proxy.device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        for opt in proxy.optim.values():
            opt.zero_grad(set_to_none=True)
        gc.collect()
        if proxy.cuda:
            torch.cuda.empty_cache()


def largest_batch(proxy: Proxy, cap: int) -> dict:
    """Doubling until a batch does not fit (or `cap`), then bisection. On a CPU nothing runs out: reports the cap."""
    good, bad, b = 0, None, 1
    probes = []
    while b <= cap:
        ok = fits(proxy, b)
        probes.append((b, ok))
        if not ok:
            bad = b
            break
        good, b = b, b * 2
    if bad is None:
        return {"max_batch": good, "cap_reached": True, "probes": probes}
    while bad - good > 1:
        mid = (good + bad) // 2
        ok = fits(proxy, mid)
        probes.append((mid, ok))
        good, bad = (mid, bad) if ok else (good, mid)
    return {"max_batch": good, "cap_reached": False, "probes": probes}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--models", default="sd15,ssd1b")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to measure")
    parser.add_argument("--batch", type=int, help="batch for timing (default: 8 for sd15, 4 for ssd1b)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-search", action="store_true", help="skip the largest-batch search")
    parser.add_argument("--max-batch", type=int, default=512, help="stop the batch search here")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the accelerator (MFU denominator)")
    parser.add_argument("--ssd1b-config", help="the published segmind/SSD-1B unet/config.json, if at hand")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--flops-only", action="store_true",
                        help="count FLOPs per update on the meta device (no GPU, no memory, nothing timed), with the "
                             "seconds per update a GPU at 100%% MFU would need (a lower bound, not a measurement)")
    args = parser.parse_args(argv)
    if args.flops_only:
        args.device, args.no_search = "meta", True
    threads = common.setup(args.threads)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        args.warmup, args.iters, args.max_batch = 0, 1, 1
    if args.ssd1b_config:
        published = json.loads(Path(args.ssd1b_config).read_text())
        MODELS["ssd1b"]["unet"] = {k: v for k, v in published.items() if not k.startswith("_")}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_tflops(name, args.peak_tflops)
    if device.type == "meta" and peak is None:
        peak = PEAK_BF16_TFLOPS["H100"]  # the bound is stated for an H100 SXM unless --peak-tflops says otherwise
    cap_fraction = None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        total = torch.cuda.get_device_properties(device).total_memory
        cap_fraction = min(1.0, MEMORY_CAP_BYTES / total)
        torch.cuda.set_per_process_memory_fraction(cap_fraction, device)
    models = [m for m in args.models.split(",") if m]
    objectives = [o for o in args.objectives.split(",") if o]
    settings = [s == "on" for s in args.checkpointing.split(",") if s]

    plan = [(m, o, c) for m in models for o in objectives for c in settings]
    if args.quick:  # one run per objective, models and checkpointing alternating: every code path, a quarter of the runs
        plan = [(models[k % len(models)], o, settings[(k // len(models)) % len(settings)])
                for k, o in enumerate(objectives)]
    results, rows = [], []
    spu_header = "s/update at 100% MFU (lower bound)" if device.type == "meta" else "s/update"
    headers = ["model", "objective", "grad ckpt", "batch", spu_header, "samples/s", "peak GiB", "TFLOP/update",
               "MFU", "max batch (80 GiB)", "error"]
    print("\n".join(common.table(headers, []).splitlines()[:2]), flush=True)
    for model, objective, ckpt in plan:
        spec = MODELS[model]
        config = spec["tiny"] if args.quick else spec["unet"]
        batch = 2 if args.quick else (args.batch or spec["default_batch"])
        entry = {"model": model, "objective": objective, "gradient_checkpointing": ckpt, "batch": batch,
                 "resolution_px": config["sample_size"] * 8}
        proxy = None
        try:
            proxy = Proxy(model, objective, config, device, ckpt)
            entry["parameters"] = proxy.params
            if device.type == "meta":  # --flops-only: shapes only, nothing is timed
                flops = count_flops(proxy, batch)
                entry.update(flops_per_update=flops, seconds_per_update_at_peak_lower_bound=(
                    flops / (peak * 1e12) if peak else None))
            else:
                timing = time_steps(proxy, batch, args.warmup, args.iters)
                spu = statistics.median(timing["seconds"])
                flops = count_flops(proxy, batch)
                entry.update(seconds_per_update=spu, seconds=timing["seconds"], samples_per_second=batch / spu,
                             peak_memory_bytes=timing["peak_memory_bytes"], flops_per_update=flops,
                             achieved_tflops=flops / spu / 1e12,
                             mfu=(flops / spu / 1e12 / peak) if peak else None)
            if not args.no_search:
                entry["batch_search"] = largest_batch(proxy, args.max_batch)
                entry["max_batch_in_80GiB"] = entry["batch_search"]["max_batch"]
        except torch.OutOfMemoryError as exc:
            entry["error"] = f"out of memory at batch {batch}: {str(exc)[:200]}"
        except Exception as exc:  # one broken configuration must not lose the others' GPU time: recorded, shown
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            if proxy is not None:
                proxy.free()
            del proxy
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if objective == "dmd2":
            entry["gen_update_ratio"] = spec["gen_update_ratio"]
        results.append(entry)
        mem = entry.get("peak_memory_bytes")
        rows.append([model, objective, "on" if ckpt else "off", batch,
                     entry.get("seconds_per_update", entry.get("seconds_per_update_at_peak_lower_bound")),
                     entry.get("samples_per_second"), None if mem is None else mem / 2**30,
                     None if entry.get("flops_per_update") is None else entry["flops_per_update"] / 1e12,
                     entry.get("mfu"), entry.get("max_batch_in_80GiB"), entry.get("error", "")])
        print(common.table(headers, rows[-1:]).splitlines()[-1], flush=True)
    # DMD2 amortised over its two time-scale cycle: 1 generator update per `ratio` updates
    amortised = []
    for e in results:
        if e["objective"] == "dmd2" and e.get("seconds_per_update"):
            critic = next((c for c in results if c["objective"] == "dmd2_critic" and c["model"] == e["model"]
                           and c["gradient_checkpointing"] == e["gradient_checkpointing"]
                           and c.get("seconds_per_update")), None)
            if critic:
                r = e["gen_update_ratio"]
                amortised.append({"model": e["model"], "gradient_checkpointing": e["gradient_checkpointing"],
                                  "gen_update_ratio": r,
                                  "seconds_per_update": (e["seconds_per_update"] + (r - 1) * critic["seconds_per_update"]) / r})
    print(common.table(headers, rows))
    result = {
        "settings": {"device": str(device), "device_name": name, "peak_bf16_tflops": peak, "quick": args.quick,
                     "warmup": args.warmup, "iters": args.iters, "threads": threads, "memory_cap_bytes":
                     MEMORY_CAP_BYTES if device.type == "cuda" else None, "memory_cap_fraction": cap_fraction,
                     "precision": "trainable: fp32 master weights + bf16 autocast; frozen teacher/EMA target: bf16",
                     "ssd1b_config_source": args.ssd1b_config or "inline (as known; see docstring)"},
        "configs": {"sd15": SD15_UNET, "ssd1b": MODELS["ssd1b"]["unet"]},
        "results": results,
        "dmd2_amortised": amortised,
        "measured_on_gpu": device.type == "cuda",
        "flops_only": device.type == "meta",
        "table_markdown": common.table(headers, rows),
    }
    common.write_results("gpu_unets_flops" if device.type == "meta" else "gpu_unets", result, args.out,
                         args.update_docs)
    return result


if __name__ == "__main__":
    main()

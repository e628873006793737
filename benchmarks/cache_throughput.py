"""Throughput of the two offline stages against their bare model passes (must-show target:
cache-latents >= 85% of the bare VAE encode).

cache-latents: images/s of the stage on demo://digits (tiny VAE; generated in memory), on the same images as PNG
files in an image folder (files opened and decoded by the stage's data workers, `data.num_workers` 2, and in-process
with 0 workers), and on PNG files whose captions are all distinct (each one made unique by its index, as in COCO:
the stage cannot share text-encoder passes between samples), against the bare VAE encode of the same batches (the
same images, already decoded to tensors in memory), and against the bare VAE + text-encoder passes (the model work
the stage has to do; one text-encoder pass per distinct caption of a batch). The stage is run at two sizes (N/2 and N images) so its fixed start-up cost
(building the teacher, loading the dataset, finishing the manifest) can be separated from its per-image cost:
  end-to-end ratio = (N / stage seconds) / bare images/s
  marginal ratio   = (N/2 / (stage(N) - stage(N/2)) seconds) / bare images/s   (steady state: does the data path
                                                                                 hide its I/O?)
teacher-rollouts: samples/s of the stage against bare guided teacher UNet forward passes, the same number of UNet
evaluations (rollouts x teacher steps, batched with the uncond half as the stage does), same two-size split.
All cases are interleaved and rotated each round.

    python benchmarks/cache_throughput.py                  # ~3 minutes on 2 cores
    python benchmarks/cache_throughput.py --quick
    python benchmarks/cache_throughput.py --profile        # also print where one cache-latents run spends time
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

TARGET = 0.85  # cache-latents >= 85% of the bare VAE encode


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--images", type=int, default=1024, help="images cached by the large stage run")
    parser.add_argument("--batch", type=int, default=32, help="data.batch_size (VAE encode batch)")
    parser.add_argument("--rollouts", type=int, default=128, help="rollouts made by the large stage run")
    parser.add_argument("--rollout-batch", type=int, default=16)
    parser.add_argument("--teacher-steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one cache-latents run and print the top")
    parser.add_argument("--resolution", type=int, help="image side (model.resolution; default: the teacher's 16 px); "
                        "with it, only cache-latents is measured and the result is named cache_throughput_<N>px")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.rollouts, args.rollout_batch, args.teacher_steps, args.reps = 64, 16, 16, 8, 4, 1
    threads = common.setup(args.threads)
    import torch

    from ddil_core.data.datasets import image_to_tensor, iter_samples
    from ddil_core.models.conditioning import encode_prompts
    from ddil_core.models.latents import encode_images
    from ddil_core.models.pipeline_io import load_pipeline
    from ddil_core.stages.cache_latents import cache_latents
    from ddil_core.stages.teacher_rollouts import teacher_rollouts

    n_big, n_small = args.images, args.images // 2
    r_big, r_small = args.rollouts, args.rollouts // 2
    work = Path(tempfile.mkdtemp(prefix="ddil-cache-bench-"))
    try:
        def config(limit, rollouts=r_big, extra=()):
            sizes = [f"model.resolution={args.resolution}"] if args.resolution else []
            return common.tiny_config(*sizes, f"data.limit={limit}", f"data.batch_size={args.batch}", "data.shard_size=256",
                                      f"rollouts.num_samples={rollouts}", f"rollouts.batch_size={args.rollout_batch}",
                                      f"rollouts.teacher_steps={args.teacher_steps}", "rollouts.shard_size=256",
                                      *extra)

        counter = iter(range(10**6))

        def stage_cache(limit, dataset=None, workers=2):
            sets = ([f"data.dataset={dataset}"] if dataset else []) + [f"data.num_workers={workers}"]
            return lambda: cache_latents(config(limit, extra=sets), work / f"lat-{next(counter)}")

        # The bare passes: the same images decoded once, up front, as the stage's batches.
        pipe = load_pipeline("tiny://sd15")
        pipe.vae.eval().requires_grad_(False)
        pipe.text_encoder.eval().requires_grad_(False)
        res = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        samples = list(iter_samples("demo://digits", limit=n_big, resolution=res))
        images = torch.stack([image_to_tensor(s.image, res) for s in samples])
        captions = [s.caption for s in samples]
        batches = [(images[i:i + args.batch], captions[i:i + args.batch]) for i in range(0, n_big, args.batch)]

        # The same images as PNG files in an image folder with captions.jsonl: the stage then opens and decodes
        # files (demo://digits is generated in memory, so it has no I/O to hide).
        folder, unique_folder = work / "png", work / "png-unique"
        for root, unique in ((folder, False), (unique_folder, True)):
            root.mkdir()
            with open(root / "captions.jsonl", "w") as f:
                for i, s in enumerate(samples):
                    s.image.save(root / f"{i:05d}.png")
                    caption = f"{s.caption} number {i}" if unique else s.caption
                    f.write(json.dumps({"file": f"{i:05d}.png", "caption": caption}) + "\n")
        unique_captions = [f"{s.caption} number {i}" for i, s in enumerate(samples)]

        def bare_vae():
            for imgs, _ in batches:
                encode_images(pipe.vae, imgs)

        def bare_vae_text(unique=False):
            for i, (imgs, caps) in enumerate(batches):
                encode_images(pipe.vae, imgs)
                encode_prompts(pipe, unique_captions[i * args.batch:(i + 1) * args.batch] if unique else caps, res)

        # teacher-rollouts reads its prompts from a latent cache: one, made once
        with_rollouts = not args.resolution
        if with_rollouts:
            cache_latents(config(n_big), work / "cache")
        rcounter = iter(range(10**6))

        def stage_rollouts(count):
            return lambda: teacher_rollouts(config(n_big, count), work / "cache", work / f"roll-{next(rcounter)}")

        unet = pipe.unet.eval().requires_grad_(False)
        side = unet.config.sample_size
        cond = encode_prompts(pipe, captions[:args.rollout_batch] * 2, res)["encoder_hidden_states"]

        def bare_unet():  # rollouts x teacher steps guided evaluations: batch 2b (uncond + cond), as the stage does
            for start in range(0, r_big, args.rollout_batch):
                b = min(args.rollout_batch, r_big - start)
                x = torch.randn(2 * b, unet.config.in_channels, side, side)
                for t in range(args.teacher_steps):
                    unet(x, torch.full((2 * b,), 999 - t * (1000 // args.teacher_steps)),
                         encoder_hidden_states=cond[:2 * b]).sample

        cases = {
            "cache_latents_N": stage_cache(n_big), "cache_latents_N/2": stage_cache(n_small),
            "cache_latents_png_N": stage_cache(n_big, str(folder)),
            "cache_latents_png_N/2": stage_cache(n_small, str(folder)),
            "cache_latents_png_0_workers_N": stage_cache(n_big, str(folder), 0),
            "cache_latents_png_0_workers_N/2": stage_cache(n_small, str(folder), 0),
            "cache_latents_png_unique_N": stage_cache(n_big, str(unique_folder)),
            "cache_latents_png_unique_N/2": stage_cache(n_small, str(unique_folder)),
            "bare_vae_encode": bare_vae, "bare_vae_and_text_encode": bare_vae_text,
            "bare_vae_and_text_encode_unique": lambda: bare_vae_text(unique=True),
        }
        if with_rollouts:
            cases.update({"teacher_rollouts_R": stage_rollouts(r_big), "teacher_rollouts_R/2": stage_rollouts(r_small),
                          "bare_teacher_unet": bare_unet})
        with torch.no_grad():
            times = common.interleaved(cases, args.reps, warmup=0 if args.quick else 1)
            for p in work.glob("lat-*"):
                shutil.rmtree(p, ignore_errors=True)
        med = {k: common.median(v) for k, v in times.items()}

        def split(big_s, small_s, n_big_, n_small_):
            per_item = (big_s - small_s) / (n_big_ - n_small_)
            return {"marginal_items_per_second": 1 / per_item if per_item > 0 else None,
                    "fixed_seconds": big_s - per_item * n_big_, "end_to_end_items_per_second": n_big_ / big_s}

        cache = split(med["cache_latents_N"], med["cache_latents_N/2"], n_big, n_small)
        bare_vae_ips = n_big / med["bare_vae_encode"]
        bare_all_ips = n_big / med["bare_vae_and_text_encode"]
        cache.update(
            bare_vae_images_per_second=bare_vae_ips, bare_vae_and_text_images_per_second=bare_all_ips,
            ratio_end_to_end_vs_bare_vae=common.ratio(cache["end_to_end_items_per_second"], bare_vae_ips),
            ratio_marginal_vs_bare_vae=common.ratio(cache["marginal_items_per_second"], bare_vae_ips),
            ratio_marginal_vs_bare_vae_and_text=common.ratio(cache["marginal_items_per_second"], bare_all_ips),
        )
        cache["meets_target_marginal"] = (None if cache["ratio_marginal_vs_bare_vae"] is None
                                          else cache["ratio_marginal_vs_bare_vae"] >= TARGET)
        cache["meets_target_end_to_end"] = cache["ratio_end_to_end_vs_bare_vae"] >= TARGET
        bare_unique_ips = n_big / med["bare_vae_and_text_encode_unique"]

        def folder_case(name, bare_text_ips):
            case = split(med[f"{name}_N"], med[f"{name}_N/2"], n_big, n_small)
            case.update(
                ratio_end_to_end_vs_bare_vae=common.ratio(case["end_to_end_items_per_second"], bare_vae_ips),
                ratio_marginal_vs_bare_vae=common.ratio(case["marginal_items_per_second"], bare_vae_ips),
                ratio_marginal_vs_bare_vae_and_text=common.ratio(case["marginal_items_per_second"], bare_text_ips))
            return case

        png = folder_case("cache_latents_png", bare_all_ips)
        png_in_process = folder_case("cache_latents_png_0_workers", bare_all_ips)
        unique = folder_case("cache_latents_png_unique", bare_unique_ips)
        unique["bare_vae_and_text_images_per_second"] = bare_unique_ips
        roll = None
        if with_rollouts:
            roll = split(med["teacher_rollouts_R"], med["teacher_rollouts_R/2"], r_big, r_small)
            bare_unet_sps = r_big / med["bare_teacher_unet"]
            roll.update(bare_unet_samples_per_second=bare_unet_sps,
                        unet_evaluations_per_sample=2 * args.teacher_steps,
                        ratio_end_to_end_vs_bare_unet=common.ratio(roll["end_to_end_items_per_second"], bare_unet_sps),
                        ratio_marginal_vs_bare_unet=common.ratio(roll["marginal_items_per_second"], bare_unet_sps))

        rows = [
            ["cache-latents (end to end)", cache["end_to_end_items_per_second"], bare_vae_ips,
             cache["ratio_end_to_end_vs_bare_vae"]],
            ["cache-latents (marginal, fixed cost removed)", cache["marginal_items_per_second"], bare_vae_ips,
             cache["ratio_marginal_vs_bare_vae"]],
            ["cache-latents (marginal) vs bare VAE + text encoder", cache["marginal_items_per_second"], bare_all_ips,
             cache["ratio_marginal_vs_bare_vae_and_text"]],
            ["cache-latents, PNG folder (end to end)", png["end_to_end_items_per_second"], bare_vae_ips,
             png["ratio_end_to_end_vs_bare_vae"]],
            ["cache-latents, PNG folder (marginal)", png["marginal_items_per_second"], bare_vae_ips,
             png["ratio_marginal_vs_bare_vae"]],
            ["cache-latents, PNG folder, no workers (end to end)", png_in_process["end_to_end_items_per_second"],
             bare_vae_ips, png_in_process["ratio_end_to_end_vs_bare_vae"]],
            ["cache-latents, PNG folder, no workers (marginal)", png_in_process["marginal_items_per_second"],
             bare_vae_ips, png_in_process["ratio_marginal_vs_bare_vae"]],
            ["cache-latents, PNG folder, distinct captions (end to end)", unique["end_to_end_items_per_second"],
             bare_vae_ips, unique["ratio_end_to_end_vs_bare_vae"]],
            ["cache-latents, PNG folder, distinct captions (marginal)", unique["marginal_items_per_second"],
             bare_vae_ips, unique["ratio_marginal_vs_bare_vae"]],
            ["cache-latents, distinct captions (marginal) vs bare VAE + text encoder",
             unique["marginal_items_per_second"], bare_unique_ips, unique["ratio_marginal_vs_bare_vae_and_text"]],
        ]
        if roll is not None:
            rows += [["teacher-rollouts (end to end)", roll["end_to_end_items_per_second"], bare_unet_sps,
                      roll["ratio_end_to_end_vs_bare_unet"]],
                     ["teacher-rollouts (marginal)", roll["marginal_items_per_second"], bare_unet_sps,
                      roll["ratio_marginal_vs_bare_unet"]]]
        headers = ["stage", "stage items/s", "bare passes items/s", "ratio"]
        print(common.table(headers, rows))
        print(f"fixed start-up cost: cache-latents {cache['fixed_seconds']:.2f} s"
              + (f", teacher-rollouts {roll['fixed_seconds']:.2f} s" if roll else ""))

        profile = None
        if args.profile:
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            cache_latents(config(n_big), work / "profiled")
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
            profile = buf.getvalue()
            print(profile)

        result = {
            "settings": {"images": n_big, "batch": args.batch, "rollouts": r_big, "rollout_batch": args.rollout_batch,
                         "teacher_steps": args.teacher_steps, "reps": args.reps, "threads": threads,
                         "dataset": "demo://digits", "teacher": "tiny://sd15", "quick": args.quick,
                         "data_num_workers": 2, "resolution": res},
            "cache_latents": cache, "cache_latents_png_folder": png, "cache_latents_png_folder_no_workers": png_in_process,
            "cache_latents_png_distinct_captions": unique, "teacher_rollouts": roll, "times": times, "target": TARGET,
            "table_markdown": common.table(headers, rows),
        }
        if profile:
            result["profile_top"] = profile
        name = f"cache_throughput_{args.resolution}px" if args.resolution else "cache_throughput"
        common.write_results(name, result, args.out, args.update_docs)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

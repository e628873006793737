"""Every benchmark runs in --quick mode (tiny sizes, one repetition) and writes the JSON its documentation reads.

Only the shape of the results is checked, never timing values: the point is that the scripts do not rot as the
pipeline changes. gpu_unets runs its tiny configs on the CPU here. About 35 s of CPU time in all (2 cores; the
scaling test launches 2 processes with torchrun), plus about 25 s for serve_load (a tiny LCM student and one
`ddil serve` process).
"""
import json
import logging
import os
import warnings

import pytest

from benchmarks import (cache_throughput, ddil_overhead, demo_workers, gpu_unets, scale, scaling, serve_load,
                        student_speedup)
from benchmarks.common import build_data

COMMON_KEYS = {"benchmark", "command", "machine", "settings", "table_markdown"}
MACHINE_KEYS = {"date_utc", "cpu_model", "cpu_cores", "torch_threads", "torch", "gpu", "git_commit"}


@pytest.fixture(autouse=True)
def _restore_process_state():
    """The scripts quieten loggers and warnings for their own process; run in-process here, undo that afterwards so
    later tests in the session see the usual log levels and warning filters."""
    import torch
    from diffusers.utils import logging as dlog

    loggers = {name: logging.getLogger(name).level
               for name in ("diffusers", "transformers", "accelerate", "ddil_core", "huggingface_hub")}
    filters, env, threads = list(warnings.filters), dict(os.environ), torch.get_num_threads()
    verbosity, bar = dlog.get_verbosity(), dlog.is_progress_bar_enabled()
    yield
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)
    warnings.filters[:] = filters
    getattr(warnings, "_filters_mutated", lambda: None)()
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)
    dlog.set_verbosity(verbosity)
    (dlog.enable_progress_bar if bar else dlog.disable_progress_bar)()


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-data")
    build_data(root, limit=32, rollouts=8)
    return root


def _written(path, name):
    data = json.loads(path.read_text())
    assert COMMON_KEYS <= set(data), set(data)
    assert data["benchmark"] == name
    assert MACHINE_KEYS <= set(data["machine"])
    assert data["settings"]["quick"] is True
    return data


def test_ddil_overhead(tmp_path, bench_data):
    ddil_overhead.main(["--quick", "--data", str(bench_data), "--out", str(tmp_path / "o.json")])
    data = _written(tmp_path / "o.json", "ddil_overhead")
    assert set(data["objectives"]) == {"pd", "lcm", "dmd2"}
    for objective, res in data["objectives"].items():
        assert set(res["variants"]) == {"baseline", "ddil", "ddil_nobuffer"}
        for variant in res["variants"].values():
            assert {"seconds_per_update", "seconds_split_mean", "per_round", "source_share"} <= set(variant)
            assert {"median", "headline"} <= set(variant["seconds_per_update"])
        for name in ("ddil", "ddil_nobuffer"):
            assert {"ratio_to_baseline", "ratio_pooled", "extra_seconds_by_part"} <= set(res["variants"][name])
        assert "meets_target" in res
    assert "amortised" in data["objectives"]["dmd2"]["variants"]["baseline"]["seconds_per_update"] or \
        "critic_median" in data["objectives"]["dmd2"]["variants"]["baseline"]["seconds_per_update"]


def test_student_speedup(tmp_path):
    student_speedup.main(["--quick", "--out", str(tmp_path / "s.json")])
    data = _written(tmp_path / "s.json", "student_speedup")
    assert {"student_1", "student_2", "student_4", "student_8", "student_4_consistency"} == set(data["students"])
    for s in data["students"].values():
        assert {"steps", "seconds_per_image", "speedup", "nfe_ratio"} <= set(s)
    assert {"seconds_per_image", "nfe"} <= set(data["teacher"])
    assert {"student_4_min_speedup", "student_4_speedup", "met"} <= set(data["target"])


def test_demo_workers(tmp_path):
    demo_workers.main(["--quick", "--out", str(tmp_path / "w.json")])
    data = _written(tmp_path / "w.json", "demo_workers")
    assert set(data["seconds_per_update"]) == {"one thread", "intra-op threads on all cores", "2 workers",
                                               "one thread, demo.unet light", "one thread, demo.unet tiny-sd15"}
    assert data["rebuilds"]["2 workers"]["same"] and data["rebuilds"]["1 worker"]["same"]


def test_cache_throughput(tmp_path):
    cache_throughput.main(["--quick", "--out", str(tmp_path / "c.json")])
    data = _written(tmp_path / "c.json", "cache_throughput")
    assert {"end_to_end_items_per_second", "bare_vae_images_per_second", "ratio_end_to_end_vs_bare_vae",
            "ratio_marginal_vs_bare_vae", "ratio_marginal_vs_bare_vae_and_text"} <= set(data["cache_latents"])
    assert {"ratio_end_to_end_vs_bare_vae", "ratio_marginal_vs_bare_vae"} <= set(data["cache_latents_png_folder"])
    assert {"end_to_end_items_per_second", "bare_unet_samples_per_second",
            "ratio_marginal_vs_bare_unet"} <= set(data["teacher_rollouts"])


def test_gpu_unets_quick_runs_on_a_cpu(tmp_path):
    gpu_unets.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "g.json")])
    data = _written(tmp_path / "g.json", "gpu_unets")
    assert data["measured_on_gpu"] is False
    assert {e["objective"] for e in data["results"]} == set(gpu_unets.OBJECTIVES)
    assert {e["model"] for e in data["results"]} == {"sd15", "ssd1b"}
    assert {e["gradient_checkpointing"] for e in data["results"]} == {True, False}
    for e in data["results"]:
        assert "error" not in e, e["error"]
        assert {"seconds_per_update", "samples_per_second", "peak_memory_bytes", "flops_per_update", "mfu",
                "max_batch_in_80GiB", "parameters"} <= set(e)
        assert e["flops_per_update"] > 0
    assert set(data["configs"]) == {"sd15", "ssd1b"}


def test_published_unet_configs_have_the_published_sizes():
    import torch
    from diffusers import UNet2DConditionModel

    sizes = {}
    for name, config in (("sd15", gpu_unets.SD15_UNET), ("ssd1b", gpu_unets.SSD1B_UNET)):
        with torch.device("meta"):  # no memory, no weights: only the shapes
            unet = UNet2DConditionModel(**config)
        sizes[name] = sum(p.numel() for p in unet.parameters())
    assert sizes["sd15"] == 859_520_964  # runwayml/stable-diffusion-v1-5
    assert 1.30e9 < sizes["ssd1b"] < 1.36e9  # SSD-1B: "1.3B", half of SDXL's 2.57 B


def test_scaling_launches_two_processes(tmp_path, bench_data):
    scaling.main(["--quick", "--nprocs", "2", "--data", str(bench_data), "--out", str(tmp_path / "x.json")])
    data = _written(tmp_path / "x.json", "scaling")
    run = data["runs"]["2proc"]
    assert run["ok"], run["failures"]
    assert {"nprocs", "global_batch", "seconds_per_update", "samples_per_second", "speedup_vs_reference",
            "command"} <= set(run)
    assert "torch.distributed.run" in run["command"]


def test_serve_load_runs_the_real_server(tmp_path, bench_data):
    serve_load.main(["--quick", "--batch-sizes", "2", "--data", str(bench_data), "--out", str(tmp_path / "l.json")])
    data = _written(tmp_path / "l.json", "serve_load")
    assert set(data["cases"]) == {"batch_2_v1", "batch_2_openai"}  # both protocols, side by side
    assert {case["protocol"] for case in data["cases"].values()} == {"v1", "openai"}
    for case in data["cases"].values():
        assert case["failed_requests"] == 0 and case["requests"] == 4 and case["server_exit_code"] == 0
        assert {"p50", "p95", "p99"} == set(case["latency_seconds"])
        assert case["images_per_second"]["median"] > 0 and case["mean_batch_formed"] >= 1


def test_scale_cpu_part(tmp_path):
    scale.main(["--quick", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "s.json")])
    data = _written(tmp_path / "s.json", "scale")
    assert {(e["objective"], e["feature"]) for e in data["updates"]} == {("pd", "full_fp32"),
                                                                        ("pd", "bf16+checkpointing+lora")}
    for e in data["updates"]:
        assert "error" not in e, e["error"]
        assert e["update_peak_bytes"] > 0 and e["peak_rss_bytes"] > e["rss_models_bytes"] > 0
    assert {e["exit_code"] for e in data["cache_runs"]} == {0}
    assert set(data["cache_summary"]["streaming"]["peak_rss_bytes"]) == {"1", "2"}
    assert "streaming_flat_within_20_percent" in data["cache_summary"]


def test_scale_gpu_part_runs_on_a_cpu(tmp_path):
    scale.main(["--quick", "--gpu", "--out", str(tmp_path / "g.json")])
    data = _written(tmp_path / "g.json", "scale_gpu")
    assert data["measured_on_gpu"] is False
    assert {(e["model"], e["objective"]) for e in data["updates"]} == {(m, o) for m in ("sd15", "ssd1b")
                                                                      for o in ("pd", "lcm", "dmd2")}
    for e in data["updates"]:
        assert "error" not in e, e["error"]
        assert {"batch", "seconds_per_update", "images_per_second", "peak_memory_bytes", "mfu"} <= set(e)
    for model in ("sd15", "ssd1b"):
        assert {"teacher_50_cfg", "student_1"} <= set(data["sampling"][model]["speedup_vs_teacher"])

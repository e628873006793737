"""The stages end to end on tiny models: cache-latents -> teacher-rollouts -> distill -> sample."""
import hashlib
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddil_core.cli import main
from ddil_core.registry.model_card import git_commit
from ddil_core.stages.distill import distill
from tests.conftest import tiny_config


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_distill_writes_a_student_that_plain_diffusers_runs(tiny_data, tmp_path, family):
    from diffusers import DiffusionPipeline

    latents, rollouts = tiny_data[family]
    student_dir = distill(tiny_config(family), latents, [rollouts], tmp_path / "run")
    for name in ("checkpoints", "buffer", "train_log.jsonl", "resolved_config.yaml"):
        assert (tmp_path / "run" / name).exists(), name
    assert (student_dir / "model_index.json").exists()
    info = json.loads((student_dir / "ddil_student.json").read_text())
    assert info["num_inference_steps"] == 2
    lineage = info["lineage"]  # what register records: the code, data and caches that made this student
    cache_manifest = json.loads((latents / "manifest.json").read_text())
    assert lineage["dataset_sha256"] == cache_manifest["dataset_sha256"] and len(lineage["dataset_sha256"]) == 64
    assert lineage["latent_cache_sha256"] == hashlib.sha256((latents / "manifest.json").read_bytes()).hexdigest()
    assert len(lineage["rollouts_sha256"]) == 64 and lineage["dataset"] == tiny_config(family).data.dataset
    assert lineage["git_sha"] == git_commit()  # this checkout's HEAD ("-dirty" when edited)
    pipe = DiffusionPipeline.from_pretrained(str(student_dir))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    out = pipe("a handwritten digit three", num_inference_steps=info["num_inference_steps"],
               guidance_scale=info["guidance_scale"], height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert {"rollout", "teacher", "student", "optimizer"} <= set(log[-1]["seconds_split"])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_sample_with_ddim_reproduces_the_diffusers_pipeline(tmp_path, family):
    from diffusers import DDIMScheduler, DiffusionPipeline

    from ddil_core.models.tiny import build_tiny_pipeline

    build_tiny_pipeline(family).save_pretrained(tmp_path / "teacher")
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "teacher"))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompt, seed, steps, w = "a handwritten digit four", 11, 6, 4.0
    theirs = pipe(prompt, num_inference_steps=steps, guidance_scale=w, height=16, width=16, output_type="np",
                  generator=torch.Generator().manual_seed(seed)).images[0]
    code = main(["sample", "--model", str(tmp_path / "teacher"), "--prompt", prompt, "--steps", str(steps),
                 "--seed", str(seed), "--guidance", str(w), "--scheduler", "ddim", "--out", str(tmp_path / "x.png")])
    assert code == 0
    ours = np.asarray(Image.open(tmp_path / "x.png"), dtype=np.float64)
    assert np.abs(ours - np.round(theirs * 255)).max() <= 2


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_sample_non_square_with_negative_prompt_and_eta_reproduces_the_diffusers_pipeline(tmp_path, family):
    """Height and width apart (SDXL's size conditioning is (height, width)), a negative prompt in the guidance's
    unconditional pass and DDIM's eta (its noise drawn from the seed's generator), as the pipelines run them."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    from ddil_core.models.tiny import build_tiny_pipeline

    build_tiny_pipeline(family).save_pretrained(tmp_path / "teacher")
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "teacher"))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompt, negative, seed, steps, w, eta = "a handwritten digit four", "a blurry digit", 5, 4, 3.0, 0.5
    theirs = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=w, height=16, width=24,
                  eta=eta, output_type="np", generator=torch.Generator().manual_seed(seed)).images[0]
    assert theirs.shape == (16, 24, 3)
    code = main(["sample", "--model", str(tmp_path / "teacher"), "--prompt", prompt, "--negative-prompt", negative,
                 "--steps", str(steps), "--seed", str(seed), "--guidance", str(w), "--width", "24", "--height", "16",
                 "--eta", str(eta), "--scheduler", "ddim", "--out", str(tmp_path / "x.png")])
    assert code == 0
    ours = np.asarray(Image.open(tmp_path / "x.png"), dtype=np.float64)
    assert ours.shape == (16, 24, 3)
    assert np.abs(ours - np.round(theirs * 255)).max() <= 2
    if family == "sdxl":  # the tiny UNet barely feels its size conditioning: compare it with diffusers' directly
        from ddil_core.models.conditioning import encode_prompts

        expected = pipe._get_add_time_ids((16, 24), (0, 0), (16, 24), dtype=torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        assert torch.equal(encode_prompts(pipe, [prompt], (16, 24))["time_ids"], expected)


def _weights(run_dir):
    return load_file(str(run_dir / "student" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_sigterm_then_resume_reaches_the_uninterrupted_weights(tiny_data, tmp_path):
    from ddil_core.training.loop import Preempted

    latents, rollouts = tiny_data["sd15"]
    config = tiny_config("sd15", "training.checkpoint_every=4")
    reference = _weights(distill(config, latents, [rollouts], tmp_path / "ref").parent)

    def preempt_at_step_3(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as Kubernetes does to a preempted pod

    with pytest.raises(Preempted, match="signal 15 at step 3"):
        distill(config, latents, [rollouts], tmp_path / "run", on_log=preempt_at_step_3)
    assert not (tmp_path / "run" / "student").exists()
    assert (tmp_path / "run" / "checkpoints" / "step-0000003").exists()  # written on SIGTERM, off the interval
    resumed = _weights(distill(config, latents, [rollouts], tmp_path / "run").parent)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6, rtol=0), key
    log = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 7))


def test_nonfinite_losses_are_skipped_then_stop_the_run(tiny_data, tmp_path, monkeypatch):
    from ddil_core.method.objectives.pd import ProgressiveDistillation
    from ddil_core.training.loop import NonFiniteLoss

    latents, rollouts = tiny_data["sd15"]
    real_loss = ProgressiveDistillation.loss
    bad_steps = {2}

    def flaky_loss(self, batch, step, generator):
        out = real_loss(self, batch, step, generator)
        if step in bad_steps:
            out.losses["student"] = out.losses["student"] * float("nan")
        return out

    monkeypatch.setattr(ProgressiveDistillation, "loss", flaky_loss)
    config = tiny_config("sd15", "training.max_nonfinite_in_a_row=2")
    distill(config, latents, [rollouts], tmp_path / "one")
    log = [json.loads(line) for line in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skips"] for r in log] == [0, 0, 1, 1, 1, 1]
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "one").values())

    bad_steps.update({3, 4})
    with pytest.raises(NonFiniteLoss, match="2 non-finite losses in a row at step 3"):
        distill(config, latents, [rollouts], tmp_path / "two")
    assert not (tmp_path / "two" / "student").exists()


def test_ema_weights_are_what_the_student_gets(tiny_data, tmp_path):
    from ddil_core.training.checkpoint import load_checkpoint

    latents, rollouts = tiny_data["sd15"]
    student = distill(tiny_config("sd15", "training.ema.enabled=true", "training.ema.decay=0.5"), latents,
                      [rollouts], tmp_path / "ema")
    tensors, _, _ = load_checkpoint(tmp_path / "ema" / "checkpoints" / "step-0000006")
    written = _weights(student.parent)
    assert all(torch.allclose(written[k], tensors["ema"][k]) for k in written)
    assert not all(torch.equal(written[k], tensors["model_student"][k]) for k in written)

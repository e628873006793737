"""LCM and DMD2 next to PD: formulas on hand-checkable cases, and every objective end to end on both families."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddil_core.math.schedule import NoiseSchedule
from ddil_core.method.objectives.base import ObjectiveContext
from ddil_core.method.objectives.dmd2 import distribution_matching_grad, distribution_matching_loss
from ddil_core.method.objectives.lcm import LatentConsistencyDistillation, add_guidance_conditioning, pseudo_huber
from ddil_core.models.tiny import tiny_unet
from ddil_core.stages.distill import distill
from ddil_core.models.sampling import generate
from tests.conftest import tiny_config

SCHED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}
BASELINE = ["ddil.priors.forward=1", "ddil.priors.teacher=0", "ddil.priors.student=0"]
OBJECTIVES = {
    "pd": [],
    "lcm": ["objective.name=lcm", "objective.lcm.w_min=2", "objective.lcm.w_max=4"],
    "dmd2": ["objective.name=dmd2", "objective.student_steps=4", "objective.dmd2.dfake_gen_update_ratio=2",
             "objective.dmd2.gan=true", "objective.dmd2.min_step=20", "objective.dmd2.max_step=980"],
    "tdd": ["objective.name=tdd", "objective.student_steps=2"],  # [999, 499]: on the tiny rollouts' 4-step grid
}


def test_lcm_target_matches_a_hand_computed_case():
    torch.manual_seed(0)
    config = tiny_config("sd15", *OBJECTIVES["lcm"])
    schedule = NoiseSchedule.from_config(SCHED, set_alpha_to_one=True)
    teacher = tiny_unet("sd15").eval().requires_grad_(False)
    uncond = {"encoder_hidden_states": torch.randn(1, 16, 32)}
    lcm = LatentConsistencyDistillation(ObjectiveContext(config, teacher, schedule, SCHED, uncond))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 519])
    cond = {"encoder_hidden_states": torch.randn(2, 16, 32)}
    w = torch.tensor([2.5, 3.5])
    ours = lcm.targets(x, t, cond, w, lcm.w_embedding(w))

    # by hand: guided teacher eps, one DDIM step to t - 20, then the EMA target's boundary-scaled x0 there
    abar = schedule.alphas_cumprod
    with torch.no_grad():
        e_u = teacher(x, t, encoder_hidden_states=uncond["encoder_hidden_states"].expand(2, -1, -1)).sample
        e_c = teacher(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        eps = e_u + w.reshape(-1, 1, 1, 1) * (e_c - e_u)
        a, s = abar[t].sqrt().reshape(-1, 1, 1, 1), (1 - abar[t]).sqrt().reshape(-1, 1, 1, 1)
        x0 = (x - s * eps) / a
        t_prev = t - 20
        a_p, s_p = abar[t_prev].sqrt().reshape(-1, 1, 1, 1), (1 - abar[t_prev]).sqrt().reshape(-1, 1, 1, 1)
        x_prev = a_p * x0 + s_p * eps
        emb = lcm.w_embedding(w)
        e_target = lcm.target(x_prev, t_prev, encoder_hidden_states=cond["encoder_hidden_states"],
                              timestep_cond=emb).sample
        x0_target = (x_prev - s_p * e_target) / a_p
        scaled = (t_prev.float() * 10).reshape(-1, 1, 1, 1)
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
        expected = c_skip * x_prev + c_out * x0_target
    assert torch.allclose(ours, expected, atol=1e-5)


def test_lcm_targets_equal_the_diffusers_script_at_its_lcm_form_guidance():
    """Parity with diffusers examples/consistency_distillation/train_lcm_distill_sd_wds.py (steps 5-8 of its
    training loop): the script draws w' ~ U[5, 15] in the LCM form, embeds w' and guides the teacher as
    cond + w' (cond - uncond); ours at the Imagen w = w' + 1 (our default range U[6, 16]) gives the same targets."""
    torch.manual_seed(0)
    config = tiny_config("sd15", "objective.name=lcm")
    assert (config.objective.lcm.w_min, config.objective.lcm.w_max) == (6.0, 16.0)
    schedule = NoiseSchedule.from_config(SCHED, set_alpha_to_one=True)
    teacher = tiny_unet("sd15").eval().requires_grad_(False)
    uncond = {"encoder_hidden_states": torch.randn(1, 16, 32)}
    lcm = LatentConsistencyDistillation(ObjectiveContext(config, teacher, schedule, SCHED, uncond))
    with torch.no_grad():  # a target network that differs from the teacher, so the embedding matters
        for p in lcm.target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([999, 519, 19])
    cond = {"encoder_hidden_states": torch.randn(3, 16, 32)}
    w_lcm = torch.tensor([5.0, 9.5, 15.0])

    # --- the script, re-implemented from its file
    def guidance_scale_embedding(w, embedding_dim=512):  # the script's helper
        w = w * 1000.0
        half_dim = embedding_dim // 2
        emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, dtype=torch.float32) * -emb)
        emb = w.to(torch.float32)[:, None] * emb[None, :]
        return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)

    alphas = schedule.alphas_cumprod
    ddim_timesteps = (torch.arange(1, 51) * 20).round().long() - 1
    ddim_alpha_prev = torch.cat([alphas[:1], alphas[ddim_timesteps[:-1]]])
    index = (t + 1) // 20 - 1
    w_embedding = guidance_scale_embedding(w_lcm, embedding_dim=config.objective.lcm.time_cond_proj_dim)
    w = w_lcm.reshape(-1, 1, 1, 1)
    a_t, s_t = alphas[t].sqrt().reshape(-1, 1, 1, 1), (1 - alphas[t]).sqrt().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        cond_out = teacher(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        uncond_out = teacher(x, t, encoder_hidden_states=uncond["encoder_hidden_states"].expand(3, -1, -1)).sample
        cond_x0, uncond_x0 = (x - s_t * cond_out) / a_t, (x - s_t * uncond_out) / a_t
        pred_x0 = cond_x0 + w * (cond_x0 - uncond_x0)
        pred_noise = cond_out + w * (cond_out - uncond_out)
        a_prev = ddim_alpha_prev[index].reshape(-1, 1, 1, 1)
        x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_noise
        timesteps = (t - 20).clamp(min=0)
        target_out = lcm.target(x_prev, timesteps, timestep_cond=w_embedding,
                                encoder_hidden_states=cond["encoder_hidden_states"]).sample
        a_p = alphas[timesteps].sqrt().reshape(-1, 1, 1, 1)
        target_x0 = (x_prev - (1 - alphas[timesteps]).sqrt().reshape(-1, 1, 1, 1) * target_out) / a_p
        scaled = (timesteps.float() / 0.1).reshape(-1, 1, 1, 1)  # scalings_for_boundary_conditions, factor 10
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
        script = c_skip * x_prev + c_out * target_x0

    w_ours = w_lcm + 1.0  # Imagen form
    ours = lcm.targets(x, t, cond, w_ours, lcm.w_embedding(w_ours))
    assert torch.allclose(ours, script, atol=1e-5, rtol=1e-5)


def test_added_guidance_conditioning_starts_as_the_original():
    torch.manual_seed(0)
    unet = tiny_unet("sd15").eval()
    student = add_guidance_conditioning(unet, 256).eval()
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 16, 32)
    with torch.no_grad():
        same = student(x, t, encoder_hidden_states=h, timestep_cond=torch.randn(1, 256)).sample
        assert torch.allclose(same, unet(x, t, encoder_hidden_states=h).sample, atol=1e-6)


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far():
    d = torch.tensor([[1e-5], [10.0]])
    loss = pseudo_huber(d, torch.zeros_like(d), c=0.001)
    assert loss[0] < 1e-7 and abs(float(loss[1]) - (10 - 0.001)) < 1e-4


def test_dmd2_gradient_points_from_the_fake_x0_toward_the_real_x0():
    x = torch.zeros(1, 2, 2, 2, requires_grad=True)
    x0_real, x0_fake = torch.full((1, 2, 2, 2), 1.0), torch.full((1, 2, 2, 2), -1.0)
    grad = distribution_matching_grad(x.detach(), x0_real, x0_fake)
    distribution_matching_loss(x, grad).sum().backward()
    step = -x.grad  # gradient descent direction
    assert (step * (x0_real - x0_fake) > 0).all()
    # p_real = x - x0_real = -1, p_fake = 1, mean|p_real| = 1: grad = -2 everywhere; dL/dx = grad / numel
    assert torch.allclose(grad, torch.full_like(grad, -2.0))
    assert torch.allclose(x.grad, grad / 8)


def _run(family, objective, tmp, *extra, on_log=None):
    latents, rollouts = pytest.tiny_data[family]
    config = tiny_config(family, *OBJECTIVES[objective], *extra)
    return distill(config, latents, [rollouts], tmp, on_log=on_log)


def _unet(student_dir):
    return load_file(str(student_dir / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(autouse=True)
def _share_data(tiny_data):
    pytest.tiny_data = tiny_data


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("objective", ["pd", "lcm", "dmd2", "tdd"])
def test_objective_end_to_end_baseline_ddil_and_resume(tmp_path, family, objective):
    from diffusers import DiffusionPipeline

    from ddil_core.training.loop import Preempted

    baseline = _run(family, objective, tmp_path / "baseline", *BASELINE)
    ddil = _run(family, objective, tmp_path / "ddil")
    for student in (baseline, ddil):
        info = json.loads((student / "ddil_student.json").read_text())
        pipe = DiffusionPipeline.from_pretrained(str(student))
        image = pipe("a handwritten digit two", num_inference_steps=info["num_inference_steps"],
                     guidance_scale=info["guidance_scale"], height=16, width=16, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
        assert type(pipe.scheduler).__name__ == {"pd": "DDIMScheduler", "tdd": "TCDScheduler"}.get(objective,
                                                                                                   "LCMScheduler")
        # our sampler (ddil sample / evaluate) reproduces the diffusers pipeline with the student's scheduler
        ours = generate(pipe, ["a handwritten digit two"], [0], info["num_inference_steps"], info["guidance_scale"],
                        resolution=16)
        assert np.abs(ours[0].permute(1, 2, 0).numpy() - image[0]).max() < 1e-5

    def preempt(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        _run(family, objective, tmp_path / "resumed", on_log=preempt)
    resumed = _run(family, objective, tmp_path / "resumed")
    reference, got = _unet(ddil), _unet(resumed)
    for key in reference:
        assert torch.allclose(got[key], reference[key], atol=1e-6, rtol=0), key


@pytest.mark.parametrize("objective", ["pd", "lcm", "dmd2", "tdd"])
def test_switched_off_ddil_is_bit_identical_to_the_baseline(tmp_path, objective):
    baseline = _unet(_run("sd15", objective, tmp_path / "a", *BASELINE))
    off = _unet(_run("sd15", objective, tmp_path / "b", *BASELINE, "ddil.buffer.enabled=false",
                     "ddil.reflection.mode=off", "ddil.teacher_mode=mixed", "ddil.prior_schedule=linear",
                     "ddil.warmup_steps=3"))
    for key in baseline:
        assert torch.equal(baseline[key], off[key]), key


def test_dmd2_two_time_scale_update_counts(tmp_path):
    out = tmp_path / "run"
    _run("sd15", "dmd2", out, "objective.dmd2.dfake_gen_update_ratio=3", "training.steps=7",
         "training.checkpoint_every=7")
    opt = torch.load(out / "checkpoints" / "step-0000007" / "optimizers.pt", weights_only=True)
    steps = {name: int(next(iter(state["state"].values()))["step"]) for name, state in opt.items()}
    assert steps == {"student": 3, "fake": 7}  # generator at steps 0, 3, 6; the fake score every step
    state = json.loads((out / "checkpoints" / "step-0000007" / "state.json").read_text())
    assert state["objective"] == {"generator_updates": 3, "fake_updates": 7}


def test_train_log_shows_sources_in_proportion_and_the_cost_split(tmp_path):
    out = tmp_path / "run"
    _run("sd15", "pd", out, "training.steps=40", "training.log_every=40", "training.checkpoint_every=40",
         "ddil.priors.forward=0.4", "ddil.priors.teacher=0.3", "ddil.priors.student=0.3")
    record = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    n = sum(record["source_count"].values())
    assert n == 40 * 8
    for src, p in {"forward": 0.4, "teacher": 0.3, "student": 0.3}.items():
        assert abs(record["source_share"][src] - p) < 4 * (p * (1 - p) / n) ** 0.5, src
        assert src in record["loss"]["pd"]
    assert set(record["seconds_split"]) >= {"rollout", "teacher", "student", "optimizer"}
    assert record["buffer"]["size"] > 0 and record["fresh_student_rollouts"] < record["source_count"]["student"]


def test_train_log_counts_what_reflection_clips(tmp_path):
    """The share of x0 elements each active reflection changed, per log interval: a static bound of 1 clips some of
    the tiny teacher's targets and of the student's own x0 (every state here made by a student step); no reflection
    logs none."""
    out = tmp_path / "clipped"
    _run("sd15", "pd", out, "training.steps=2", "ddil.reflection.mode=static", "ddil.reflection.bound=1",
         "ddil.reflection.apply_to=[teacher_targets,student_rollouts]", "ddil.priors.forward=0",
         "ddil.priors.teacher=0", "ddil.priors.student=1", "ddil.student_min_steps=1", "ddil.buffer.enabled=false")
    fractions = [json.loads(line)["clip_fraction"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(fractions) == 2 and all(set(f) == {"teacher_targets", "student_rollouts"} for f in fractions)
    assert all(0 < f[where] < 1 for f in fractions for where in f)
    _run("sd15", "pd", tmp_path / "off", "training.steps=2", "ddil.reflection.mode=off")
    assert all(json.loads(line)["clip_fraction"] is None
               for line in (tmp_path / "off" / "train_log.jsonl").read_text().splitlines())


def test_counted_reflection_counts_without_changing_the_result():
    from ddil_core.method.objectives.base import CountedReflection
    from ddil_core.method.rollouts import Reflection

    x0 = torch.tensor([[[[0.5, -2.0], [1.5, 0.1]]], [[[0.2, 0.3], [-0.4, 0.9]]]])  # 2 of 8 beyond 1
    x_t, eps = torch.randn_like(x0), torch.randn_like(x0)
    counted = CountedReflection("static", 1.0, where="teacher_targets")
    for a, b in zip(counted(x_t, x0, eps, 0.8, 0.6), Reflection("static", 1.0)(x_t, x0, eps, 0.8, 0.6)):
        assert torch.equal(a, b)
    assert torch.equal(counted.threshold(x0), Reflection("static", 1.0).threshold(x0))
    assert counted.take_fraction() == 4 / 16 and counted.take_fraction() is None  # read once, then reset
    dynamic = CountedReflection("dynamic", None, 0.75, 4.0)  # rescales the first sample (s = 1.625), not the second
    dynamic.threshold(x0)
    assert dynamic.take_fraction() == 4 / 8


def test_interval_loss_means_per_source():
    """The loop accumulates per-source sums on the device and logs sample-weighted means per interval."""
    from ddil_core.method.objectives.base import interval_means, per_source_sums

    v1, s1 = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 2, 2])
    v2, s2 = torch.tensor([5.0, 7.0]), torch.tensor([0, 1])
    a, b = per_source_sums(v1, s1), per_source_sums(v2, s2)
    means = interval_means(a[0] + b[0], a[1] + b[1])
    assert means == {"all": 22 / 6, "forward": 8 / 3, "teacher": 7.0, "student": 3.5}
    bad = per_source_sums(torch.tensor([float("nan"), 1.0]), torch.tensor([1, 0]))
    assert interval_means(*bad) == {"forward": 1.0}  # a non-finite mean is left out, the others stay

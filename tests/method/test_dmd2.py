"""DMD2 against its reference (tianweiy/DMD2 main/sd_guidance.py, main/sd_unified_model.py): the GAN head and its
draws, real samples with their own captions, the generator's grid from student_steps alone."""
import json

import pytest
import torch

from ddil_core.config import ConfigError
from ddil_core.method.draws import SampleDraws
from ddil_core.method.batch import StateBatch, TeacherPairs
from ddil_core.method.objectives.base import ObjectiveContext
from ddil_core.method.objectives.dmd2 import (BottleneckClassifier, DistributionMatchingDistillation, FakeScore,
                                              dmd2_grid)
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.tiny import tiny_unet
from tests.conftest import tiny_config

SCHED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}


def _objective(*overrides):
    torch.manual_seed(0)
    config = tiny_config("sd15", "objective.name=dmd2", "objective.student_steps=4", "objective.dmd2.gan=true",
                         *overrides)
    schedule = NoiseSchedule.from_config(SCHED, set_alpha_to_one=True)
    ctx = ObjectiveContext(config, tiny_unet("sd15").eval().requires_grad_(False), schedule, SCHED,
                           {"encoder_hidden_states": torch.zeros(1, 16, 32)}, latent_side=8)
    return DistributionMatchingDistillation(ctx)


def test_gan_head_is_dmd2s_strided_convolutions_down_to_one_logit():
    """sd_guidance.py cls_pred_branch: k4 s2 p1 (+GN, SiLU) until 4x4, then k4 s4 (+GN, SiLU), then a 1x1 conv."""
    sd15 = BottleneckClassifier(1280, 8)  # SD 1.5 at 512 px: an 8x8x1280 bottleneck
    convs = [m for m in sd15.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [((4, 4), (2, 2), (1, 1)), ((4, 4), (4, 4), (0, 0)),
                                                                      ((1, 1), (1, 1), (0, 0))]
    assert [m.num_groups for m in sd15.net if isinstance(m, torch.nn.GroupNorm)] == [32, 32]
    sdxl = BottleneckClassifier(64, 32)  # SDXL: 32 -> 16 -> 8 -> 4 -> 1
    assert sum(isinstance(m, torch.nn.Conv2d) for m in sdxl.net) == 5
    assert sdxl(torch.randn(3, 64, 32, 32)).shape == (3,)


def test_gan_logits_stop_at_the_bottleneck_with_the_gradient_of_a_full_forward():
    """D runs the fake UNet up to its mid block only (DMD2 classify_forward), and gradients reach exactly the
    parameters they would through a full forward with a hook."""
    torch.manual_seed(0)
    unet = tiny_unet("sd15")
    fake = FakeScore(unet, gan=True, latent_side=8)
    denoiser = Denoiser(unet, NoiseSchedule.from_config(SCHED))
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), {"encoder_hidden_states": torch.randn(2, 16, 32)}
    called = []
    unet.up_blocks[0].register_forward_hook(lambda *a: called.append(1))
    fake.logits(denoiser, x, t, cond).sum().backward()
    assert not called  # the up blocks never ran
    ours = {n: p.grad.clone() for n, p in fake.named_parameters() if p.grad is not None}
    fake.zero_grad()
    store = {}
    hook = unet.mid_block.register_forward_hook(lambda m, i, o: store.setdefault("f", o))
    denoiser.output(x, t, cond)
    fake.head(store["f"]).sum().backward()
    hook.remove()
    full = {n: p.grad for n, p in fake.named_parameters() if p.grad is not None}
    assert ours.keys() == full.keys() and not any(n.startswith("unet.up_blocks") for n in ours)
    for n in ours:
        assert torch.allclose(ours[n], full[n], atol=1e-6), n


def _batch(obj, n=4):
    g = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(n, 16, 32, generator=g)}
    cond_real = {"encoder_hidden_states": torch.randn(n, 16, 32, generator=g)}
    x0_real = torch.randn(n, 4, 8, 8, generator=g)
    pairs = TeacherPairs(torch.randn(n, 4, 8, 8, generator=g), torch.full((n,), 499), cond,
                         torch.randn(n, 4, 8, 8, generator=g))  # the regression term (on by default) needs them
    return StateBatch(torch.randn(n, 4, 8, 8, generator=g), torch.zeros(n, dtype=torch.long),
                      torch.full((n,), 749), cond, torch.tensor([0, 1, 2, 1]), x0_real,
                      torch.randn(n, 4, 8, 8, generator=g), cond_real, pairs)


def test_discriminator_sees_real_latents_with_their_own_captions_and_draws_of_its_own(monkeypatch):
    obj = _objective()
    batch = _batch(obj)
    seen = []
    original = obj.fake.logits

    def spy(denoiser, x_t, t, cond):
        seen.append((x_t, t, cond))
        return original(denoiser, x_t, t, cond)

    monkeypatch.setattr(obj.fake, "logits", spy)
    obj.loss(batch, step=0, draws=SampleDraws.whole(torch.Generator().manual_seed(0), 4))  # a generator step
    assert len(seen) == 3  # the generator's term, D(fake), D(real): three calls
    gen, fake, real = seen
    assert real[2] is batch.cond_real and fake[2] is batch.cond and gen[2] is batch.cond
    # each call diffuses its input to its own timesteps (DMD2 compute_cls_logits: t ~ U{0..999} per call)
    assert not torch.equal(gen[1], fake[1]) and not torch.equal(fake[1], real[1])
    a = obj.ctx.schedule.alpha_sigma(real[1], like=real[0])[0]
    assert (real[0] / a - batch.x0_real).abs().mean() < (real[0] / a).abs().mean()  # the real latents, noised


@pytest.mark.parametrize("steps, grid", [(1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249])])
def test_dmd2_grid_follows_student_steps(steps, grid):
    original, derived = dmd2_grid(None, steps, 1000)
    assert list(derived.steps) == grid == list(range(999, 0, -(1000 // steps)))
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(original_inference_steps=original)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == grid


def test_dmd2_on_a_two_step_recipe_needs_no_timesteps(tmp_path, tiny_data):
    """`--set objective.name=dmd2` on a recipe with student_steps 2 trains on [999, 499] and ships a scheduler that
    samples it from num_inference_steps = 2 alone."""
    from diffusers import LCMScheduler

    from ddil_core.stages.distill import distill

    latents, rollouts = tiny_data["sd15"]
    config = tiny_config("sd15", "objective.name=dmd2", "training.steps=2", "training.checkpoint_every=2")
    assert config.objective.student_steps == 2
    student = distill(config, latents, [rollouts], tmp_path / "run")
    assert json.loads((student / "ddil_student.json").read_text())["timesteps"] == [999, 499]
    scheduler = LCMScheduler.from_pretrained(str(student / "scheduler"))
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [999, 499]


def test_timesteps_no_scheduler_can_reproduce_are_refused():
    with pytest.raises(ConfigError, match="objective.dmd2.timesteps"):
        _objective("objective.dmd2.timesteps=[999,700,400,100]")
    assert _objective("objective.dmd2.timesteps=[999,759,499,259]").original_steps == 50


def _grads(module):
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_each_loss_reaches_only_its_own_network():
    """The generator's losses (DM, GAN, regression) train G alone; the fake score's (denoising, discriminator)
    train the fake UNet and the head alone (DMD2 freezes the guidance model during the generator's turn)."""
    obj = _objective("objective.dmd2.regression_weight=0.25")
    batch = _batch(obj)
    out = obj.loss(batch, step=0, draws=SampleDraws.whole(torch.Generator().manual_seed(0), 4))
    assert {"dm", "gan_g", "regression", "fake", "gan_d"} <= set(out.per_sample)
    out.losses["student"].backward(retain_graph=True)
    assert _grads(obj.student) and not _grads(obj.fake)
    obj.student.zero_grad(set_to_none=True)
    out.losses["fake"].backward()
    assert not _grads(obj.student)
    fake = _grads(obj.fake)
    assert any(n.startswith("head.") for n in fake) and any(n.startswith("unet.") for n in fake)


def test_regression_term_alone_pulls_g_toward_the_teachers_image():
    """Only the regression term: its gradient is that of ||G(x_t) - x0_teacher||^2 at the pair's state."""
    from ddil_core.method.batch import TeacherPairs

    obj = _objective("objective.dmd2.regression_weight=1", "objective.dmd2.gan=false")
    x_t, x0 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(2, 16, 32)}
    reg = obj.regression(TeacherPairs(x_t, torch.tensor([999, 249]), cond, x0))
    g_x0, _ = obj.x0(obj.generator_denoiser, x_t, torch.tensor([999, 249]), cond)
    assert torch.allclose(reg, (g_x0 - x0).pow(2).flatten(1).mean(1), atol=1e-6)


def test_regression_pairs_are_the_teachers_own_noise_image_pairs(tmp_path, tiny_data):
    """A pair's state is a point of a precomputed teacher rollout (at t = 999 the rollout's own starting noise,
    seed rollouts.seed + i) and its target is the image that same rollout ended at, with the rollout's prompt."""
    from safetensors.torch import load_file

    from ddil_core.method.grid import StudentGrid
    from ddil_core.method.batch import TrainingData
    from ddil_core.method.mixture import DDILMixture
    from ddil_core.models.teacher import load_teacher
    from ddil_core.stages.common import read_latent_cache
    from ddil_core.stages.distill.inputs import read_rollouts

    latents, rollouts = tiny_data["sd15"]
    config = tiny_config("sd15", "objective.name=dmd2")
    teacher = load_teacher(config)
    cache = read_latent_cache(latents, teacher)
    data = TrainingData(cache.latents, cache.cond)
    data.rollout_states, data.rollout_timesteps, data.rollout_ref, data.rollout_x0 = read_rollouts(
        [rollouts], cache, latents, teacher, config)
    grid = StudentGrid.from_timesteps([999, 499])
    mixture = DDILMixture(config.ddil, data, NoiseSchedule.from_config(SCHED, set_alpha_to_one=True), grid,
                          lambda x, k, c, g: x, teacher_pairs=True)
    pairs = mixture.sample(0, 32, torch.Generator().manual_seed(0)).pairs
    shard = load_file(str(next(rollouts.glob("*.safetensors"))))
    seeds = torch.cat([load_file(str(f))["seed"] for f in sorted(rollouts.glob("*.safetensors"))])
    for i in range(32):
        r = int((data.rollout_x0.float() - pairs.x0[i]).flatten(1).abs().sum(1).argmin())
        assert torch.equal(pairs.x0[i], data.rollout_x0[r].float())
        assert torch.equal(pairs.cond["encoder_hidden_states"][i],
                           data.cond["encoder_hidden_states"][data.rollout_ref[r]].float())
        k = list(data.rollout_timesteps.tolist()).index(int(pairs.t[i]))
        assert torch.equal(pairs.x_t[i], data.rollout_states[r, k].float())
        if int(pairs.t[i]) == 999:  # the rollout's starting noise
            noise = torch.randn(pairs.x_t.shape[1:], generator=torch.Generator().manual_seed(int(seeds[r])))
            assert torch.equal(pairs.x_t[i], noise.half().float())
    assert set(pairs.t.tolist()) == {999, 499} and "states" in shard

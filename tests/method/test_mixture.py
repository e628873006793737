"""The DDIL state mixture and the replay buffer."""
import math

import pytest
import torch

from ddil_core.config import load_config
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.method.buffer import ReplayBuffer
from ddil_core.method.grid import StudentGrid
from ddil_core.method.batch import TrainingData
from ddil_core.method.mixture import DDILMixture, draw_sources, scheduled_priors

SCHED = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                                  set_alpha_to_one=True)


def _data(seed, with_rollouts=True):
    g = torch.Generator().manual_seed(seed)
    data = TrainingData(torch.randn(20, 4, 8, 8, generator=g), {"encoder_hidden_states": torch.randn(20, 5, 8, generator=g)})
    if with_rollouts:
        data.rollout_states = torch.randn(6, 4, 4, 8, 8, generator=g)
        data.rollout_timesteps = StudentGrid.ddim_trailing(1000, 4).timesteps
        data.rollout_ref = torch.arange(6)
    return data


def _student_step(x, k, cond, generator=None):
    # a deterministic stand-in student: depends on the state, the step and the prompt only
    return 0.9 * x + 0.01 * (k + 1) + cond["encoder_hidden_states"].mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def _mixture(data, priors=(0.5, 0.25, 0.25), buffer=None):
    config = load_config(None, [f"ddil.priors.forward={priors[0]}", f"ddil.priors.teacher={priors[1]}",
                                f"ddil.priors.student={priors[2]}"]).ddil
    return DDILMixture(config, data, SCHED, StudentGrid.ddim_trailing(1000, 2), _student_step, buffer)


def test_sources_appear_in_the_proportions_of_the_priors():
    priors = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    n = 40_000
    counts = torch.bincount(draw_sources(priors, n, torch.Generator().manual_seed(0)), minlength=3).double()
    for p, c in zip(priors, counts):
        assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    # and through the mixture itself, batch after batch
    mixture, g, total = _mixture(_data(0)), torch.Generator().manual_seed(1), torch.zeros(3)
    for step in range(300):
        total += mixture.sample(step, 16, g).counts
    share = total / total.sum()
    for p, s in zip((0.5, 0.25, 0.25), share):
        assert abs(float(s) - p) < 4 * math.sqrt(p * (1 - p) / float(total.sum()))


def test_baseline_priors_give_only_forward_states():
    batch = _mixture(_data(0, with_rollouts=False), (1, 0, 0)).sample(0, 32, torch.Generator().manual_seed(0))
    assert (batch.source == 0).all()
    a, s = SCHED.alpha_sigma(batch.t, like=batch.x_t)
    assert torch.allclose(batch.x_t, a * batch.x0_real + s * batch.noise, atol=1e-6)


@pytest.mark.parametrize("use_buffer", [False, True])
def test_student_states_do_not_depend_on_the_batch_real_images(use_buffer):
    a, b = _data(0), _data(0)
    b.latents = torch.randn_like(b.latents) * 5  # other real images, same prompts
    batches = []
    for data in (a, b):
        buffer = ReplayBuffer(16) if use_buffer else None
        mixture, g = _mixture(data, (0.2, 0.0, 0.8), buffer), torch.Generator().manual_seed(7)
        batches.append([mixture.sample(step, 8, g) for step in range(4)])
    for x, y in zip(*batches):
        student = x.source == 2
        assert student.any()
        assert torch.equal(x.x_t[student], y.x_t[student])
        forward = x.source == 0
        if forward.any():  # forward states do use the images
            assert not torch.equal(x.x_t[forward], y.x_t[forward])


def test_linear_prior_schedule_starts_forward_only():
    config = load_config(None, ["ddil.prior_schedule=linear", "ddil.warmup_steps=10"]).ddil
    assert scheduled_priors(config, 0).tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(scheduled_priors(config, 5), torch.tensor([0.75, 0.125, 0.125], dtype=torch.float64))
    assert torch.allclose(scheduled_priors(config, 50), torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))


def test_fifo_buffer_keeps_the_newest_and_round_trips(tmp_path):
    buf, g = ReplayBuffer(4, "fifo"), torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.full((3, 1, 2, 2), float(step))
        buf.insert(x, torch.full((3,), step), torch.arange(3), step, g)
    assert len(buf) == 4 and sorted(buf.made_step[:4].tolist()) == [1, 2, 2, 2]
    assert buf.mean_age(3) == pytest.approx((2 + 1 + 1 + 1) / 4)
    buf.save(tmp_path / "b")
    other = ReplayBuffer(4, "fifo")
    other.load(tmp_path / "b")
    assert torch.equal(other.x, buf.x) and other.next_slot == buf.next_slot and other.seen == 9


def test_reservoir_buffer_keeps_a_uniform_sample():
    kept = torch.zeros(100)
    for seed in range(300):
        buf, g = ReplayBuffer(10, "reservoir"), torch.Generator().manual_seed(seed)
        for start in range(0, 100, 5):
            ids = torch.arange(start, start + 5)
            buf.insert(torch.zeros(5, 1), ids, ids, 0, g)
        assert len(buf) == 10 and len(set(buf.k.tolist())) == 10
        kept[buf.k] += 1
    # each of the 100 items is kept with probability 10/100: 30 times in 300 runs on average
    assert kept.min() > 10 and kept.max() < 55 and abs(kept.mean() - 30) < 1e-9


def test_real_latents_keep_their_own_captions_whatever_the_source():
    """A teacher or student state carries its rollout's prompt; the batch's real latents (DMD2's GAN "real"
    samples) keep the captions they were cached with (tianweiy/DMD2 sd_guidance.py, the real-image branch)."""
    data = _data(0)
    batch = _mixture(data, (0.2, 0.4, 0.4)).sample(0, 32, torch.Generator().manual_seed(3))
    rows = torch.cdist(batch.x0_real.flatten(1), data.latents.flatten(1)).argmin(1)  # each real latent's cache row
    assert torch.equal(batch.x0_real, data.latents[rows])
    assert torch.equal(batch.cond_real["encoder_hidden_states"], data.cond["encoder_hidden_states"][rows])
    other = batch.source != 0
    assert other.any() and not torch.equal(batch.cond["encoder_hidden_states"][other],
                                           batch.cond_real["encoder_hidden_states"][other])


def test_pure_noise_at_the_first_grid_step_when_the_objective_asks():
    """DMD2 feeds its generator pure noise at t = 999 (sd_unified_model.py): a forward state there holds none of the
    image (a_999 x0 would be 6.8% of it); the other timesteps stay noised images."""
    data = _data(0, with_rollouts=False)
    config = load_config(None, ["ddil.priors.forward=1", "ddil.priors.teacher=0", "ddil.priors.student=0"]).ddil
    grid = StudentGrid.ddim_trailing(1000, 4)
    mixture = DDILMixture(config, data, SCHED, grid, _student_step, pure_noise_first_step=True)
    batch = mixture.sample(0, 64, torch.Generator().manual_seed(0))
    first = batch.t == 999
    assert first.any() and (~first).any()
    assert torch.equal(batch.x_t[first], batch.noise[first])
    a, s = SCHED.alpha_sigma(batch.t, like=batch.x_t)
    assert torch.allclose(batch.x_t[~first], (a * batch.x0_real + s * batch.noise)[~first], atol=1e-6)


def test_dmd2_asks_for_pure_noise_and_distill_passes_it_on(monkeypatch, tmp_path, tiny_data):
    from ddil_core.method import mixture as mixture_module
    from ddil_core.method.objectives.dmd2 import DistributionMatchingDistillation
    from ddil_core.stages import distill as distill_module
    from tests.conftest import tiny_config

    assert DistributionMatchingDistillation.pure_noise_first_step
    seen = {}
    original = mixture_module.DDILMixture.__init__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(mixture_module.DDILMixture, "__init__", spy)
    latents, rollouts = tiny_data["sd15"]
    config = tiny_config("sd15", "objective.name=dmd2", "training.steps=1", "training.checkpoint_every=1")
    distill_module.distill(config, latents, [rollouts], tmp_path / "run")
    assert seen["pure_noise_first_step"] is True


def test_online_teacher_follows_the_current_grid_after_a_pd_hand_off(monkeypatch):
    """teacher_mode mixed/bernoulli: after PD halves the grid (8 -> 4 steps here), the teacher's rollout must end at
    the new grid's timestep that labels the state, not at the first stage's."""
    from ddil_core.method import rollouts
    from ddil_core.models.denoiser import Denoiser
    from ddil_core.models.tiny import tiny_unet

    calls = []
    real_sample = rollouts.ddim_sample

    def recording(denoiser, x, ts, prev, *args, **kwargs):
        calls.append((ts.tolist(), prev.tolist()))
        return real_sample(denoiser, x, ts, prev, *args, **kwargs)

    monkeypatch.setattr(rollouts, "ddim_sample", recording)
    torch.manual_seed(0)
    unet = tiny_unet("sd15").eval().requires_grad_(False)
    uncond = {"encoder_hidden_states": torch.zeros(1, 5, 32)}
    data = TrainingData(torch.randn(8, 4, 8, 8), {"encoder_hidden_states": torch.randn(8, 5, 32)})
    teacher_step = rollouts.teacher_interval_step(Denoiser(unet, SCHED), 16, uncond, 2.0)
    config = load_config(None, ["ddil.priors.forward=0", "ddil.priors.teacher=1", "ddil.priors.student=0",
                                "ddil.teacher_mode=mixed", "ddil.mixed_teacher_steps=8"]).ddil
    mixture = DDILMixture(config, data, SCHED, StudentGrid.ddim_trailing(1000, 8), _student_step,
                          teacher_step=teacher_step)
    mixture.set_grid(StudentGrid.ddim_trailing(1000, 4))  # the PD hand-off
    g = torch.Generator().manual_seed(5)
    for _ in range(6):
        calls.clear()
        batch = mixture.sample(0, 4, g)
        label = int(batch.t[0])
        if label == 999:  # j = 0: pure noise, no teacher step
            assert not calls
            continue
        assert calls[-1][1][-1] == label  # the last teacher DDIM step lands on the state's label
        assert len(calls[0][0]) == 16 // 4  # the teacher's resolution: rollouts.teacher_steps / student steps

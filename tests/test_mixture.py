"""The DDIL state mixture and the replay buffer."""
import math

import pytest
import torch

from ddil_core.config import load_config
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.method.buffer import ReplayBuffer
from ddil_core.method.grid import StudentGrid
from ddil_core.method.mixture import DDILMixture, TrainingData, draw_sources, scheduled_priors

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
        mixture.sample(step, 16, g)
        total += mixture.last_counts
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

"""Progressive distillation: the target, the loss and the stage hand-off."""
import torch

from ddil_core.math.ddim import ddim_step
from ddil_core.method.draws import SampleDraws
from ddil_core.method.batch import StateBatch
from ddil_core.method.objectives.base import ObjectiveContext
from ddil_core.method.objectives.pd import ProgressiveDistillation, stage_steps
from ddil_core.models.tiny import tiny_unet
from ddil_core.math.schedule import NoiseSchedule
from tests.conftest import tiny_config

SCHED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}


def _objective(*overrides):
    torch.manual_seed(0)
    config = tiny_config("sd15", *overrides)
    ctx = ObjectiveContext(config, tiny_unet("sd15").eval().requires_grad_(False),
                           NoiseSchedule.from_config(SCHED, set_alpha_to_one=True), SCHED,
                           {"encoder_hidden_states": torch.randn(1, 16, 32)})
    return ProgressiveDistillation(ctx)


def _batch(pd, k):
    grid = pd.grid()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = grid.timesteps[torch.full((3,), k)]
    cond = {"encoder_hidden_states": torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(3))}
    return StateBatch(x, torch.full((3,), k), t, cond, torch.zeros(3, dtype=torch.long), x, x, cond)


def test_target_is_two_teacher_steps_collapsed_into_one():
    pd = _objective()
    for k in range(pd.grid().num_steps):
        batch = _batch(pd, k)
        x_tgt = pd.targets(batch)
        x_t2 = pd.teacher_two_steps(batch.x_t, batch.t, batch.cond)
        sched = pd.ctx.schedule
        a, s = sched.alpha_sigma(batch.t, like=batch.x_t)
        t_next = batch.t - 1000 // pd.grid().num_steps
        a2, s2 = sched.alpha_sigma(t_next, like=batch.x_t)
        eps = (batch.x_t - a * x_tgt) / s
        one_student_step = ddim_step(x_tgt, eps, a2, s2)
        assert torch.allclose(one_student_step, x_t2, atol=1e-4), k
        if int(t_next[0]) < 0:  # the last step: the target is the teacher's own clean estimate
            assert torch.allclose(x_tgt, x_t2, atol=1e-6)


def test_loss_is_zero_when_the_student_predicts_the_target():
    pd = _objective("objective.pd.weighting=constant")
    batch = _batch(pd, 0)
    x_tgt = pd.targets(batch)
    a, s = pd.ctx.schedule.alpha_sigma(batch.t, like=batch.x_t)
    eps_for_target = (batch.x_t - a * x_tgt) / s
    pd.student_denoiser.output = lambda x, t, c: eps_for_target
    out = pd.loss(batch, 0, SampleDraws.whole(torch.Generator(), batch.x_t.shape[0]))
    assert float(out.losses["student"]) < 1e-8


def test_stage_hand_off_halves_steps_and_makes_the_student_the_teacher():
    assert stage_steps(8, 2) == [4, 2]
    pd = _objective("objective.pd.teacher_steps=8", "objective.student_steps=2", "objective.pd.steps_per_stage=3",
                    "rollouts.teacher_steps=8")
    assert pd.grid().num_steps == 4 and pd.total_steps() == 6
    assert not pd.advance(2)
    with torch.no_grad():
        for p in pd.student.parameters():
            p.add_(0.01)
    assert pd.advance(3)
    assert pd.grid().num_steps == 2 and pd.teacher_guidance == 1.0
    for a, b in zip(pd.teacher.unet.parameters(), pd.student.parameters()):
        assert torch.equal(a, b) and not a.requires_grad
    state, tensors = pd.extra_state()
    fresh = _objective("objective.pd.teacher_steps=8", "objective.student_steps=2", "objective.pd.steps_per_stage=3",
                       "rollouts.teacher_steps=8")
    fresh.load_extra_state(state, tensors)
    assert fresh.stage == 1
    for a, b in zip(fresh.teacher.unet.parameters(), pd.teacher.unet.parameters()):
        assert torch.equal(a, b)

"""What makes two training arms comparable (docs/results.md, the design): common random numbers (separate streams
for batch data, sources, rollouts and loss draws), the timestep-matched control, student states that mean what
the prior says (ddil.student_min_steps), rollouts by the EMA weights, and the per-step loss in the training log."""
import json

import pytest
import torch

from ddil_core.config import ConfigError, load_config
from ddil_core.method.grid import StudentGrid
from ddil_core.method.batch import FORWARD
from ddil_core.method.mixture import DDILMixture
from ddil_core.method.streams import RandomStreams
from tests.conftest import tiny_config
from tests.method.test_mixture import SCHED, _data, _student_step


def _arm(priors, *extra, forward_timesteps=None, grid_steps=4):
    config = load_config(None, [f"ddil.priors.forward={priors[0]}", f"ddil.priors.teacher={priors[1]}",
                                f"ddil.priors.student={priors[2]}", *extra]).ddil
    grid = StudentGrid.ddim_trailing(1000, grid_steps)
    data = _data(0)
    return DDILMixture(config, data, SCHED, grid, _student_step, forward_timesteps=forward_timesteps)


def test_separate_streams_give_two_arms_the_same_data_noise_and_forward_states():
    base, ddil = _arm((1, 0, 0)), _arm((0.5, 0.25, 0.25))
    sa, sb = RandomStreams.separate(7), RandomStreams.separate(7)
    for step in range(3):  # batch after batch, although the DDIL arm draws rollouts the baseline does not
        a, b = base.sample(step, 64, sa), ddil.sample(step, 64, sb)
        assert torch.equal(a.x0_real, b.x0_real) and torch.equal(a.noise, b.noise) and torch.equal(a.k, b.k)
        both_forward = b.source == FORWARD
        assert 0 < int(both_forward.sum()) < 64
        assert torch.equal(a.x_t[both_forward], b.x_t[both_forward])
    # one stream: the DDIL arm's extra draws shift everything after them (from the second batch on)
    ga, gb = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    base.sample(0, 64, ga), ddil.sample(0, 64, gb)
    assert not torch.equal(base.sample(1, 64, ga).noise, ddil.sample(1, 64, gb).noise)


def test_separate_streams_checkpoint_each_generator():
    s = RandomStreams.separate(3)
    state = {"data": s.data.get_state(), **s.get_state()}
    first = [float(torch.rand(1, generator=getattr(s, kind))) for kind in ("data", "source", "rollout", "loss")]
    assert len(set(first)) == 4  # four different streams
    s.set_state(state)
    assert [float(torch.rand(1, generator=getattr(s, kind))) for kind in ("data", "source", "rollout", "loss")] == first


def test_the_timestep_matched_control_has_ddils_timesteps_but_only_forward_states():
    solver = torch.arange(999, -1, -20)  # forward states of LCM are drawn over its whole solver grid
    ddil = _arm((0.5, 0.25, 0.25), forward_timesteps=solver)
    control = _arm((0.5, 0.25, 0.25), "ddil.control=timestep_matched", forward_timesteps=solver)
    base = _arm((1, 0, 0), forward_timesteps=solver)
    grid = set(StudentGrid.ddim_trailing(1000, 4).timesteps.tolist())

    def on_grid_share(mixture):
        ts = torch.cat([mixture.sample(i, 64, RandomStreams.separate(i)).t for i in range(40)])
        return sum(int(t) in grid for t in ts) / len(ts)

    share_ddil, share_control, share_base = on_grid_share(ddil), on_grid_share(control), on_grid_share(base)
    assert share_base < 0.15 and share_ddil > 0.5  # the confound: DDIL puts most states on the inference grid
    assert abs(share_control - share_ddil) < 0.06
    batch = control.sample(0, 64, RandomStreams.separate(0))
    assert batch.counts.tolist() == [64, 0, 0] and (batch.source == FORWARD).all()
    expected = SCHED.add_noise(batch.x0_real, batch.noise, batch.t)
    assert torch.allclose(batch.x_t, expected)  # every state is the real latent noised to its timestep


def test_student_min_steps_makes_every_student_state_the_students_own():
    loose, strict = _arm((0, 0, 1)), _arm((0, 0, 1), "ddil.student_min_steps=1")
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    noise_states = sum(loose.sample(i, 8, g1).student_induced < 8 for i in range(30))
    assert noise_states > 0  # j = 0: pure noise, counted as a student state
    batches = [strict.sample(i, 8, g2) for i in range(30)]
    assert all(b.student_induced == 8 for b in batches)
    assert all(int(t) != 999 for b in batches for t in b.t)  # never the first (pure-noise) timestep


def test_config_rules_of_the_arms():
    with pytest.raises(ConfigError, match="ddil.student_min_steps = 2 must be below objective.student_steps = 2"):
        load_config("tiny", ["ddil.student_min_steps=2"])
    with pytest.raises(ConfigError, match="ddil.rollout_policy = ema needs training.ema.enabled"):
        load_config("tiny", ["ddil.rollout_policy=ema"])


def test_training_with_separate_streams_and_ema_rollouts_logs_the_loss_by_step_and_resumes(tiny_data, tmp_path):
    from safetensors.torch import load_file

    from ddil_core.stages.distill import distill

    latents, rollouts = tiny_data["sd15"]
    arm = ["training.random_streams=separate", "training.ema.enabled=true", "training.ema.decay=0.5",
           "ddil.rollout_policy=ema", "ddil.student_min_steps=1", "ddil.priors.forward=0.2",
           "ddil.priors.teacher=0.3", "ddil.priors.student=0.5", "training.checkpoint_every=2", "training.log_every=2"]
    whole = distill(tiny_config("sd15", *arm, "training.steps=4"), latents, [rollouts], tmp_path / "whole")
    distill(tiny_config("sd15", *arm, "training.steps=2"), latents, [rollouts], tmp_path / "resumed")
    resumed = distill(tiny_config("sd15", *arm, "training.steps=4"), latents, [rollouts], tmp_path / "resumed")
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(whole / weights)), load_file(str(resumed / weights))
    assert all(torch.equal(a[k], b[k]) for k in a)  # every stream was checkpointed
    records = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["student_induced_share"] == pytest.approx(last["source_share"]["student"])
    by_step = last["loss_by_step"]["pd"]
    assert set(by_step) <= {"forward", "teacher", "student"} and by_step
    assert all(set(bins) <= {"0", "1", "off-grid"} for bins in by_step.values())
    assert "0" not in by_step.get("student", {})  # student states start at step 1

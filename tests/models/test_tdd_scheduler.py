"""TDDScheduler (models/tdd_scheduler.py), the reference sampler of RedAIGC/Target-Driven-Distillation tdd_scheduler.py,
against diffusers' TCDScheduler that a TDD student ships with: the same states but for the last step, which returns
x0; and, at eta 0, against the reference's own base (first-order DPM-Solver++ with final sigma zero)."""
import pytest
import torch
from diffusers import DPMSolverSinglestepScheduler, TCDScheduler

from ddil_core.models.tdd_scheduler import TDDScheduler

SCHED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def model(x, t):
    """A smooth synthetic eps-model."""
    return torch.tanh(0.7 * x + 0.001 * float(t)) * 0.9 + 0.1 * x.roll(1, dims=-1)


def run(scheduler, steps, eta, seed=0, timesteps=None):
    if timesteps is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    states, outs = [], []
    for t in scheduler.timesteps:
        out = model(x, t)
        kwargs = {"generator": g} if eta is None else {"eta": eta, "generator": g}
        x = scheduler.step(out, t, x, **kwargs, return_dict=False)[0]
        states.append(x)
        outs.append((out, int(t)))
    return states, outs


@pytest.mark.parametrize("steps", [2, 4, 6, 8])
@pytest.mark.parametrize("eta", [0.0, 0.2, 0.3])
def test_tdd_equals_tcd_but_for_the_last_step_which_is_x0(steps, eta):
    tcd = TCDScheduler(**SCHED, original_inference_steps=250)
    tdd = TDDScheduler.from_config(tcd.config)
    ours, _ = run(tdd, steps, eta)
    theirs, outs = run(tcd, steps, eta)
    assert tdd.timesteps.tolist() == tcd.timesteps.tolist()
    for a, b in zip(ours[:-1], theirs[:-1]):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    eps, t = outs[-1]
    abar = tcd.alphas_cumprod
    x_last_in = theirs[-2] if steps > 1 else None
    x0 = (x_last_in - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
    assert (ours[-1] - x0).abs().max() <= 1e-5 * x0.abs().max()
    # TCD ends at t = 0: sqrt(abar_0) x0 + sqrt(1 - abar_0) eps, a visible difference
    assert (theirs[-1] - (abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * eps)).abs().max() <= 1e-5
    assert (ours[-1] - theirs[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("timesteps", [[999, 751, 499, 251], [999, 875, 751, 499, 251], [999, 499]])
def test_tdd_at_eta_0_equals_the_references_dpm_solver_base(timesteps):
    """tdd_scheduler.py subclasses DPMSolverSinglestepScheduler(solver_order=1, dpmsolver++, final sigma zero)."""
    ref = DPMSolverSinglestepScheduler(**SCHED, solver_order=1, algorithm_type="dpmsolver++",
                                       final_sigmas_type="zero", lower_order_final=True)
    ours, _ = run(TDDScheduler(**SCHED), None, 0.0, timesteps=timesteps)
    theirs, _ = run(ref, None, None, timesteps=timesteps)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_non_equidistant_tables_and_clipping_of_the_first_steps():
    s = TDDScheduler(**SCHED, non_equidistant=True)
    for n, table in {5: [999, 875, 751, 499, 251], 6: [999, 875, 751, 627, 499, 251],
                     7: [999, 875, 751, 627, 499, 375, 251], 4: [999, 751, 499, 251]}.items():
        s.set_timesteps(n)
        assert s.timesteps.tolist() == table
    # clip_steps = 1: the first step's x0 is clamped to [-1, 1] (eps from the clamped x0), later steps are not
    plain, clipped = TDDScheduler(**SCHED), TDDScheduler(**SCHED, clip_steps=1)
    x = 3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for sch in (plain, clipped):
        sch.set_timesteps(4)
    out = model(x, 999)
    a, b = (sch.step(out, 999, x, eta=0.0, return_dict=False)[0] for sch in (plain, clipped))
    abar = plain.alphas_cumprod
    x0 = ((x - (1 - abar[999]).sqrt() * out) / abar[999].sqrt()).clamp(-1, 1)
    eps = (x - abar[999].sqrt() * x0) / (1 - abar[999]).sqrt()
    assert torch.allclose(b, abar[751].sqrt() * x0 + (1 - abar[751]).sqrt() * eps, atol=1e-5)
    assert (a - b).abs().max() > 1e-3
    y = 3 * torch.randn(1, 4, 8, 8)
    c, d = (sch.step(model(y, 751), 751, y, eta=0.0, return_dict=False)[0] for sch in (plain, clipped))
    assert torch.equal(c, d)


def test_a_tdd_student_folder_loads_with_tdd_scheduler_without_remote_code(tmp_path):
    from diffusers import DiffusionPipeline

    from ddil_core.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15")
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config, original_inference_steps=250)
    pipe.save_pretrained(str(tmp_path))
    scheduler = TDDScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
    assert scheduler.config.original_inference_steps == 250
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path), scheduler=scheduler)
    assert isinstance(loaded.scheduler, TDDScheduler)
    loaded.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=1.7, eta=0.2, output_type="latent")
    ours = loaded("two", generator=torch.Generator().manual_seed(0), **kw).images
    tcd = DiffusionPipeline.from_pretrained(str(tmp_path))
    tcd.set_progress_bar_config(disable=True)
    theirs = tcd("two", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.isfinite(ours).all() and (ours - theirs).abs().max() > 0  # only the last step differs

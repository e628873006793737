"""The math layer against diffusers' schedulers and against hand-checkable identities."""
import pytest
import torch

from ddil_core.math import (NoiseSchedule, consistency_scalings, ddim_prev_timestep, ddim_timesteps, reflect,
                            threshold_x0, to_model_output, to_x0_eps)
from ddil_core.method.rollouts import ddim_sample
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.tiny import tiny_unet


def _scheduler(prediction_type, spacing, set_alpha_to_one):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=set_alpha_to_one, steps_offset=1, timestep_spacing=spacing,
                         prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,steps,one", [("trailing", 4, False), ("leading", 10, False), ("linspace", 7, True)])
def test_ddim_sampling_equals_diffusers(prediction_type, spacing, steps, one):
    torch.manual_seed(0)
    unet = tiny_unet("sd15").eval()
    scheduler = _scheduler(prediction_type, spacing, one)
    cond = {"encoder_hidden_states": torch.randn(2, 16, 32)}
    uncond = {"encoder_hidden_states": torch.randn(1, 16, 32)}
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    w = 3.0

    scheduler.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            both = torch.cat([uncond["encoder_hidden_states"].expand(2, -1, -1), cond["encoder_hidden_states"]])
            out_u, out_c = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
            x = scheduler.step(out_u + w * (out_c - out_u), t, x).prev_sample

    schedule = NoiseSchedule.from_config(dict(scheduler.config))
    ts = ddim_timesteps(1000, steps, spacing, steps_offset=1)
    assert torch.equal(ts, scheduler.timesteps)
    ours = ddim_sample(Denoiser(unet, schedule), noise.clone(), ts, ddim_prev_timestep(ts, 1000, steps), cond,
                       uncond, w)
    assert (ours - x).abs().max() <= 1e-5


def test_parameterisations_round_trip():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    schedule = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    t = torch.tensor([10, 500, 990])
    a, s = schedule.alpha_sigma(t, like=x0)
    x_t = a * x0 + s * eps
    for kind in ("epsilon", "v_prediction", "sample"):
        x0_hat, eps_hat = to_x0_eps(to_model_output(x0, eps, a, s, kind), x_t, a, s, kind)
        assert torch.allclose(x0_hat, x0, atol=1e-4) and torch.allclose(eps_hat, eps, atol=1e-4)


def test_thresholding_leaves_in_bound_values_and_recomputes_eps():
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8) * 2
    bound = torch.tensor([1.0, 2.0, 3.0, 4.0])
    clamped = threshold_x0(x0, "static", bound)
    inside = x0.abs() <= bound.reshape(1, -1, 1, 1)
    assert torch.equal(clamped[inside], x0[inside])
    assert (clamped.abs() <= bound.reshape(1, -1, 1, 1)).all()
    a, s = torch.tensor(0.6), torch.tensor(0.8)
    x_t = a * x0 + s * torch.randn_like(x0)
    x0_r, eps_r = reflect(x_t, x0, a, s, "static", bound)
    assert torch.allclose(a * x0_r + s * eps_r, x_t, atol=1e-6)  # the reflected pair explains the same state
    assert torch.equal(threshold_x0(x0, "off"), x0)


@pytest.mark.parametrize("percentile, max_value", [(0.9, 2.5), (0.995, 1.0), (0.5, 10.0)])
def test_dynamic_thresholding_is_diffusers_threshold_sample(percentile, max_value):
    """Ours against the reference formula re-implemented from diffusers schedulers/scheduling_ddpm.py
    (_threshold_sample: quantile of |x| per sample, s floored at 1 and capped at sample_max_value, clamp to [-s, s],
    divide by s) and against the scheduler's own method."""
    import numpy as np
    from diffusers import DDIMScheduler, LCMScheduler

    torch.manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8) * torch.tensor([0.5, 2.0, 4.0]).reshape(-1, 1, 1, 1)
    ours = threshold_x0(x0, "dynamic", percentile=percentile, max_value=max_value)

    b, c, *rest = x0.shape
    flat = x0.reshape(b, c * int(np.prod(rest)))
    ref_s = torch.clamp(torch.quantile(flat.abs(), percentile, dim=1), min=1, max=max_value).unsqueeze(1)
    reference = (torch.clamp(flat, -ref_s, ref_s) / ref_s).reshape(x0.shape)
    assert torch.allclose(ours, reference, atol=1e-6)
    for cls in (DDIMScheduler, LCMScheduler):
        scheduler = cls(thresholding=True, dynamic_thresholding_ratio=percentile, sample_max_value=max_value)
        assert torch.allclose(ours, scheduler._threshold_sample(x0.clone()), atol=1e-6)


def test_consistency_boundary_values():
    c_skip, c_out = consistency_scalings(torch.tensor([0.0, 999.0]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] < 1e-6 and abs(float(c_out[1]) - 1) < 1e-6

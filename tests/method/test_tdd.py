"""Target-Driven Distillation against its reference code: the formulas of RedAIGC/Target-Driven-Distillation
train/SDXL/train_tdd.py (DDIMSolver.set_timesteps_s, select_s, ddim_step, tdd_step, the training step's loss) and
train/SD15/train_tdd.py (encode_prompt's caption dropout), re-implemented here from those files, fed the same
tensors as ours."""
import random

import numpy as np
import pytest
import torch

from ddil_core.config import ConfigError
from ddil_core.math.target_timesteps import (anchors, candidate_targets, default_window, solver_timesteps,
                                             target_timesteps, window_mask)
from ddil_core.method.draws import SampleDraws
from ddil_core.method.objectives import build_objective
from ddil_core.method.objectives.tdd import drop_captions
from ddil_core.models.conditioning import encode_prompts
from ddil_core.models.teacher import load_teacher
from ddil_core.stages.common import read_latent_cache
from ddil_core.stages.distill import objective_context
from tests.conftest import tiny_config

M22 = [0, 127, 143, 167, 199, 251, 287, 335, 375, 399, 431, 499, 571, 599, 627, 667, 715, 751, 799, 835, 859, 875]


class ReferenceSolver:
    """train/SDXL/train_tdd.py DDIMSolver (L295-381), as written there, with select_s's two random draws passed in."""

    def __init__(self, alpha_cumprods, timesteps=1000, ddim_timesteps=250, k_min=4, k_max=8):
        self.step_ratio = timesteps // ddim_timesteps
        self.ddim_timesteps = (np.arange(1, ddim_timesteps + 1) * self.step_ratio).round().astype(np.int64) - 1
        self.ddim_alpha_cumprods_prev = np.asarray([alpha_cumprods[0]] + alpha_cumprods[self.ddim_timesteps[:-1]].tolist())
        self.tdd_alpha_cumprods = torch.from_numpy(alpha_cumprods)
        merged = []
        origin = self.ddim_timesteps[::-1].copy()
        for i in range(k_min, k_max + 1):
            idx = np.floor(np.linspace(0, len(origin), num=i, endpoint=False)).astype(np.int64)
            merged.append(origin[idx])
        merged = np.sort(np.unique(np.concatenate(merged)))
        self.merged_timesteps = torch.from_numpy(np.insert(merged, 0, 0)[:-1])
        self.ddim_timesteps = torch.from_numpy(self.ddim_timesteps).long()
        self.ddim_alpha_cumprods_prev = torch.from_numpy(self.ddim_alpha_cumprods_prev)

    def windows(self, timestep_index):
        m = self.merged_timesteps
        valid_mask = timestep_index.unsqueeze(1).expand(-1, m.size(0)) >= m
        last = m.size(0) - 1 - valid_mask.flip(dims=[1]).long().argmax(dim=1)
        lower, upper = torch.clamp(m[last] - 260, min=0), m[last]
        return [torch.where((m >= lb) & (m <= ub))[0] for lb, ub in zip(lower, upper)], m[last]

    def select_s(self, timestep_index, s_ratio, random_indices, rand):
        valid, _ = self.windows(timestep_index)
        c = torch.tensor([self.merged_timesteps[valid[i][ri]] for i, ri in enumerate(random_indices)])
        return torch.floor((1 - rand * s_ratio) * c).to(dtype=torch.long)

    def ddim_step(self, pred_x0, pred_noise, index):
        a_prev = self.ddim_alpha_cumprods_prev[index].reshape(-1, 1, 1, 1)
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * pred_noise

    def tdd_step(self, pred_x0, pred_noise, s):
        a_s = self.tdd_alpha_cumprods[s].reshape(-1, 1, 1, 1)
        return a_s.sqrt() * pred_x0 + (1.0 - a_s).sqrt() * pred_noise


def _alphas():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).numpy()


def test_candidate_set_is_the_references_22_values():
    ref = ReferenceSolver(_alphas())
    ours = candidate_targets(solver_timesteps(1000, 250), 4, 8)
    assert ours.tolist() == ref.merged_timesteps.tolist() == M22
    assert default_window(1000, 4) == 260


@pytest.mark.parametrize("t_n, tau, window", [
    (995, 875, [627, 667, 715, 751, 799, 835, 859, 875]),
    (751, 751, [499, 571, 599, 627, 667, 715, 751]),
    (300, 287, [127, 143, 167, 199, 251, 287]),
    (126, 0, [0]),
    (0, 0, [0]),
])
def test_anchor_and_candidate_window_table(t_n, tau, window):
    m = torch.tensor(M22)
    t = torch.tensor([t_n])
    ref_windows, ref_tau = ReferenceSolver(_alphas()).windows(t)
    assert anchors(t, m).item() == ref_tau.item() == tau
    assert m[window_mask(anchors(t, m), m, 260)[0]].tolist() == m[ref_windows[0]].tolist() == window


def test_target_timesteps_equal_reference_select_s_on_the_same_draws():
    ref = ReferenceSolver(_alphas())
    grid = solver_timesteps(1000, 250)
    g = torch.Generator().manual_seed(0)
    t_n = torch.cat([(grid - 4).clamp(min=0), torch.randint(0, 1000, (500,), generator=g)])
    u_pick, u_off = torch.rand(len(t_n), generator=g), torch.rand(len(t_n), generator=g)
    u_off[:3] = torch.tensor([0.0, 0.999999, 0.5])
    ours = target_timesteps(t_n, ref.merged_timesteps, 260, 0.3, u_pick, u_off)
    valid, _ = ref.windows(t_n)
    picks = [int(np.floor(u * len(v))) for u, v in zip(u_pick.tolist(), valid)]  # uniform index, as randint is
    assert torch.equal(ours, ref.select_s(t_n, 0.3, picks, u_off))
    c = torch.tensor([ref.merged_timesteps[v[p]] for v, p in zip(valid, picks)])
    assert ((torch.floor(0.7 * c) <= ours) & (ours <= c) & (ours <= t_n)).all()
    assert not (ours == 999).any()
    # every candidate of a window is reachable: u_pick spans them all
    t = torch.full((8,), 995)
    got = target_timesteps(t, ref.merged_timesteps, 260, 0.0, (torch.arange(8) + 0.5) / 8, torch.zeros(8))
    assert got.tolist() == [627, 667, 715, 751, 799, 835, 859, 875]


@pytest.fixture(scope="module")
def sd15(tiny_data):
    def build(*overrides):
        config = tiny_config("sd15", "objective.name=tdd", *overrides)
        teacher = load_teacher(config)
        cache = read_latent_cache(tiny_data["sd15"][0], teacher)
        return config, teacher, build_objective("tdd", objective_context(config, teacher, cache))
    return build


def test_loss_equals_the_reference_training_step(sd15):
    """Student DDIM jump, teacher guided DDIM step (LCM-form w = 3.5), target jump with the online student under
    no_grad, pseudo-Huber c = 0.001: train_tdd.py L1266-1383 on the same x, t, s and embeddings."""
    config, teacher, tdd = sd15("objective.tdd.caption_dropout=0")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tdd.student.parameters():  # a student that differs from the teacher
            p.add_(0.01 * torch.randn_like(p))
    ref = ReferenceSolver(tdd.ctx.schedule.alphas_cumprod.numpy())
    index = torch.tensor([249, 187, 124, 3, 0])
    start = ref.ddim_timesteps[index]
    x = torch.randn(5, *teacher.latent_shape)
    cond = encode_prompts(teacher.pipe, ["two", "three", "a digit", "seven", "one"], teacher.resolution)
    uncond = {k: v.expand(5, *v.shape[1:]) for k, v in tdd.uncond.items()}
    s = torch.tensor([700, 500, 300, 0, 0])

    abar = tdd.ctx.schedule.alphas_cumprod
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()

    def origin(out, t, sample):
        return (sample - sigma[t].reshape(-1, 1, 1, 1) * out) / alpha[t].reshape(-1, 1, 1, 1)

    unet, teacher_unet, w = tdd.student, teacher.unet, 3.5
    timesteps = torch.where(start - 4 < 0, torch.zeros_like(start), start - 4)
    noise_pred = unet(x, start, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    model_pred = ref.tdd_step(origin(noise_pred, start, x), noise_pred, s)
    with torch.no_grad():
        c_out = teacher_unet(x, start, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        u_out = teacher_unet(x, start, encoder_hidden_states=uncond["encoder_hidden_states"]).sample
        pred_x0 = origin(c_out, start, x) + w * (origin(c_out, start, x) - origin(u_out, start, x))
        x_prev = ref.ddim_step(pred_x0, c_out + w * (c_out - u_out), index)
        target_pred = unet(x_prev.float(), timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        target = ref.tdd_step(origin(target_pred, timesteps, x_prev), target_pred, s)
    ref_loss = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + 0.001**2) - 0.001)

    tdd.select_targets = lambda t, draws: s
    from ddil_core.method.batch import StateBatch
    batch = StateBatch(x, torch.zeros(5, dtype=torch.long), start, cond, torch.zeros(5, dtype=torch.long), x, x, cond)
    ours = tdd.loss(batch, 0, SampleDraws.whole(torch.Generator().manual_seed(0), 5)).losses["student"]
    assert ref_loss > 1e-4
    assert torch.allclose(ours, ref_loss, rtol=1e-4, atol=0), (ours, ref_loss)
    ours.backward()  # the gradient reaches the student
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tdd.student.parameters())


def test_caption_dropout_equals_the_reference_encode_prompt(sd15):
    """train/SD15/train_tdd.py encode_prompt: `random.random() < proportion_empty_prompts` -> "" before encoding; ours
    swaps in the encoded "" per sample on the same draws."""
    config, teacher, tdd = sd15()
    captions = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    rng = random.Random(3)
    draws = [rng.random() for _ in captions]
    ref = [("" if u < 0.2 else c) for u, c in zip(draws, captions)]
    assert "" in ref and ref != [""] * len(ref)
    ref_cond = encode_prompts(teacher.pipe, ref, teacher.resolution)
    ours = drop_captions(encode_prompts(teacher.pipe, captions, teacher.resolution), tdd.empty,
                         torch.tensor(draws) < 0.2)
    assert torch.allclose(ours["encoder_hidden_states"], ref_cond["encoder_hidden_states"], atol=1e-6)


def test_dropped_captions_teach_the_unguided_teacher_on_sd15(sd15):
    """SD 1.5's unconditional branch is the encoded "", so on a dropped caption the CFG term cancels and the target is
    the unguided teacher's (decoupled guidance); on a kept caption guidance changes the target."""
    config, teacher, tdd = sd15()
    x = torch.randn(2, *teacher.latent_shape)
    t, s = torch.tensor([751, 751]), torch.tensor([499, 499])
    kept = encode_prompts(teacher.pipe, ["two", "two"], teacher.resolution)
    dropped = drop_captions(kept, tdd.empty, torch.tensor([True, True]))
    guided = tdd.targets(x, t, s, dropped)
    tdd.cfg.guidance_scale = 1.0
    assert torch.allclose(tdd.targets(x, t, s, dropped), guided, atol=1e-5)
    unguided_kept = tdd.targets(x, t, s, kept)
    tdd.cfg.guidance_scale = 4.5
    assert (tdd.targets(x, t, s, kept) - unguided_kept).abs().max() > 1e-3


@pytest.mark.parametrize("overrides, key", [
    (["objective.tdd.s_ratio=1.5"], "objective.tdd.s_ratio"),
    (["objective.tdd.caption_dropout=-0.1"], "objective.tdd.caption_dropout"),
    (["objective.tdd.min_inference_steps=9"], "objective.tdd.min_inference_steps"),
    (["objective.tdd.eta=2"], "objective.tdd.eta"),
    (["ddil.reflection.mode=dynamic"], "ddil.reflection.apply_to"),
])
def test_bad_tdd_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config("sd15", "objective.name=tdd", *overrides)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("ddil", [False, True])
def test_lora_tdd_distills_and_reloads_in_plain_diffusers(tmp_path, tiny_data, family, ddil):
    """LoRA TDD students (alpha/rank 1/2, as the reference's 8/64 is not 1) on both families, baseline and DDIL: the
    folder plus load_lora_weights samples in plain diffusers (TCD, the card's eta) as ddil_core's generate does."""
    from diffusers import DiffusionPipeline

    from ddil_core.stages.distill import distill
    from ddil_core.models.sampling import generate

    latents, rollouts = tiny_data[family]
    baseline = [] if ddil else ["ddil.priors.forward=1", "ddil.priors.teacher=0", "ddil.priors.student=0"]
    config = tiny_config(family, "objective.name=tdd", "training.steps=3", "training.lora.rank=4",
                         "training.lora.alpha=2", "training.lr=1e-2", *baseline)
    student = distill(config, latents, [rollouts], tmp_path / "run")
    import json
    info = json.loads((student / "ddil_student.json").read_text())
    assert info["lora"]["rank"] == 4
    pipe = DiffusionPipeline.from_pretrained(str(student))
    pipe.load_lora_weights(str(student))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("two", num_inference_steps=info["num_inference_steps"], guidance_scale=info["guidance_scale"],
                 eta=info["eta"], height=16, width=16, output_type="np",
                 generator=[torch.Generator().manual_seed(0)]).images
    ours = generate(pipe, ["two"], [0], info["num_inference_steps"], info["guidance_scale"], resolution=16,
                    eta=info["eta"])
    assert np.isfinite(image).all()
    assert np.abs(ours[0].permute(1, 2, 0).numpy() - image[0]).max() < 1e-5

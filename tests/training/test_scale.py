"""Memory at scale on tiny models: gradient checkpointing gives the gradients of a plain backward,
gradient accumulation the update of one big batch, streamed shards the batches of in-memory data, bf16 runs on a
CPU, and a run stopped and resumed with each feature on reaches the uninterrupted run's weights."""
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from ddil_core.config import ConfigError
from ddil_core.method.draws import SampleDraws
from ddil_core.method.grid import StudentGrid
from ddil_core.method.batch import StateBatch, TeacherPairs, TrainingData
from ddil_core.method.mixture import DDILMixture
from ddil_core.method.objectives import build_objective
from ddil_core.models.teacher import load_teacher
from ddil_core.stages.common import read_latent_cache
from ddil_core.stages.distill import distill, objective_context
from ddil_core.stages.distill.inputs import read_rollouts
from tests.conftest import tiny_config

OBJECTIVES = {
    "pd": [],
    "lcm": ["objective.name=lcm", "objective.lcm.w_min=2", "objective.lcm.w_max=4"],
    "dmd2": ["objective.name=dmd2", "objective.student_steps=4", "objective.dmd2.dfake_gen_update_ratio=2",
             "objective.dmd2.gan=true"],
}
LORA = ["training.lora.rank=4", "objective.dmd2.fake_lora.rank=4"]


def _objective(config, latents):
    teacher = load_teacher(config)
    if config.model.dtype != "float32":  # as distill holds the frozen teacher
        teacher.unet.to(getattr(torch, config.model.dtype))
    cache = read_latent_cache(latents, teacher)
    torch.manual_seed(0)  # the GAN head's initialisation: the same in both builds
    return build_objective(config.objective.name, objective_context(config, teacher, cache)), cache


def _batch(objective, cache, n=4) -> StateBatch:
    g = torch.Generator().manual_seed(1)
    x0 = cache.latents[:n].float()
    noise = torch.randn(x0.shape, generator=g)
    grid = objective.grid().timesteps
    t = grid[torch.randint(len(grid), (n,), generator=g)]
    cond = {k: v[:n].float() for k, v in cache.cond.items()}
    zeros = torch.zeros(n, dtype=torch.long)
    pairs = TeacherPairs(torch.randn(x0.shape, generator=g), t, cond, x0)  # DMD2's regression (on by default)
    return StateBatch(objective.ctx.schedule.add_noise(x0, noise, t), zeros, t, cond, zeros, x0, noise, cond, pairs)


def _gradients(objective, batch) -> dict:
    out = objective.loss(batch, 0, SampleDraws.whole(torch.Generator().manual_seed(2), batch.x_t.shape[0]))
    grads = {}
    for name, loss in out.losses.items():
        for module in objective.trainable().values():
            module.zero_grad(set_to_none=True)
        loss.backward()
        grads[name] = {k: p.grad.clone() for k, p in objective.trainable()[name].named_parameters()
                       if p.grad is not None}
    return grads


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_gradient_checkpointing_gives_the_same_gradients(tiny_data, objective, monkeypatch):
    import torch.utils.checkpoint as ckpt

    latents, _ = tiny_data["sd15"]
    plain, cache = _objective(tiny_config("sd15", *OBJECTIVES[objective]), latents)
    reference = _gradients(plain, _batch(plain, cache))

    calls = []
    original = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    checkpointed, _ = _objective(tiny_config("sd15", *OBJECTIVES[objective], "training.gradient_checkpointing=true"),
                                 latents)
    batch = _batch(checkpointed, cache)
    checkpointed.student_step(batch.x_t, 0, batch.cond, torch.Generator().manual_seed(3))
    assert not calls, "a no-grad student rollout recomputed nothing, so it must not checkpoint"
    got = _gradients(checkpointed, batch)
    assert calls, "gradient checkpointing never ran"
    assert got.keys() == reference.keys()
    for name in reference:
        assert got[name].keys() == reference[name].keys()
        norm = sum(float(g.double().pow(2).sum()) for g in reference[name].values()) ** 0.5
        apart = sum(float((got[name][k] - g).double().pow(2).sum()) for k, g in reference[name].items()) ** 0.5
        assert norm > 0 and apart <= 1e-5 * norm, f"{objective}/{name}: {apart / norm:.2e} of the gradient"


def _unet(student):
    return load_file(str(student / "unet" / "diffusion_pytorch_model.safetensors"))


def _weights(student):
    lora = student / "pytorch_lora_weights.safetensors"
    return load_file(str(lora)) if lora.exists() else _unet(student)


def _run(tiny_data, out, objective, *overrides, on_log=None):
    latents, rollouts = tiny_data["sd15"]
    return distill(tiny_config("sd15", *OBJECTIVES[objective], *overrides), latents, [rollouts], out, on_log=on_log)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_gradient_accumulation_equals_one_big_batch(tiny_data, tmp_path, objective, monkeypatch):
    """Batch 8 in one pass against 4 micro-batches of 2 (the losses' draws are the big batch's): the first update's
    gradients, as the optimiser gets them, agree within 1e-4 relative (measured: PD 4e-6, LCM 2e-5, DMD2 9e-6 and
    3e-5 for the fake score: float32 summation order, amplified by the pseudo-Huber loss's slope 1/c = 1000 near zero
    and by DMD2's difference of two nearly equal scores). A wrong accumulation is far off: unscaled micro-batch losses
    give 300%, a lost micro-batch 50% or more, micro-batches drawing their own noise tens of percent. Later updates are
    not compared: Adam's first step is lr * sign(g), and where g is rounding noise its sign differs."""
    from ddil_core.training.loop import Trainer

    seen = {}
    average = Trainer._average_gradients

    def record(self, module):
        average(self, module)
        if self.step == 0:
            name = next(n for n, m in self.modules.items() if m is module)
            seen.setdefault(self.accum, {})[name] = [p.grad.clone() for p in module.parameters() if p.grad is not None]

    monkeypatch.setattr(Trainer, "_average_gradients", record)
    _run(tiny_data, tmp_path / "one", objective, "training.steps=1")
    _run(tiny_data, tmp_path / "four", objective, "training.steps=1", "training.grad_accum_steps=4")
    assert seen[1].keys() == seen[4].keys() == ({"student", "fake"} if objective == "dmd2" else {"student"})
    for name, big in seen[1].items():
        norm = sum(float(g.double().pow(2).sum()) for g in big) ** 0.5
        apart = sum(float((a - g).double().pow(2).sum()) for a, g in zip(seen[4][name], big)) ** 0.5
        assert norm > 0 and apart <= 1e-4 * norm, f"{name}: {apart / norm:.2e} of the gradient"


def test_streamed_shards_give_the_batches_of_in_memory_data(tiny_data):
    latents, rollouts = tiny_data["sd15"]
    config = tiny_config("sd15", "ddil.priors.forward=0.4", "ddil.priors.teacher=0.4", "ddil.priors.student=0.2")
    datasets = {}
    for streaming in (False, True):
        config = tiny_config("sd15", "ddil.priors.forward=0.4", "ddil.priors.teacher=0.4", "ddil.priors.student=0.2",
                             f"training.streaming={streaming}")
        teacher = load_teacher(config)
        cache = read_latent_cache(latents, teacher, config, streaming=streaming)
        states, ts, ref, x0 = read_rollouts([rollouts], cache, latents, teacher, config)
        datasets[streaming] = TrainingData(cache.latents, cache.cond, states, ts, ref, x0)
    assert type(datasets[True].latents).__name__ == "ShardRows"
    assert datasets[True].latents.shape == datasets[False].latents.shape
    batches = {}
    for streaming, data in datasets.items():
        from ddil_core.math.schedule import NoiseSchedule

        mixture = DDILMixture(config.ddil, data, NoiseSchedule.from_config({}), StudentGrid.ddim_trailing(1000, 2),
                              lambda x, k, cond, g: 0.9 * x, teacher_pairs=True)
        g = torch.Generator().manual_seed(5)
        batches[streaming] = [mixture.sample(step, 8, g) for step in range(6)]
    seen = set()
    for a, b in zip(batches[False], batches[True]):
        seen |= set(a.source.tolist())
        for field in ("x_t", "t", "source", "x0_real", "noise"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        for key in a.cond:
            assert torch.equal(a.cond[key], b.cond[key]) and torch.equal(a.cond_real[key], b.cond_real[key])
        assert torch.equal(a.pairs.x_t, b.pairs.x_t) and torch.equal(a.pairs.x0, b.pairs.x0)
    assert seen == {0, 1, 2}  # forward, teacher and student states all came through


FEATURES = {  # feature -> (objective, overrides)
    "checkpointing": ("dmd2", ["training.gradient_checkpointing=true"]),
    "accumulation": ("lcm", ["training.grad_accum_steps=2"]),
    "lora_dmd2": ("dmd2", LORA),
    "lora_lcm": ("lcm", LORA),
    "streaming": ("pd", ["training.streaming=true"]),
    "bf16": ("pd", ["model.dtype=bfloat16", "training.mixed_precision=bf16"]),
}


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision: a bf16 run here follows
    fp32 runs of the same pytest process (one `ddil distill` process never does both)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_resume_is_exact_with_each_feature(tiny_data, tmp_path, feature, fresh_accelerate_state):
    from ddil_core.training.loop import Preempted

    objective, overrides = FEATURES[feature]
    reference = _weights(_run(tiny_data, tmp_path / "ref", objective, *overrides))

    def preempt(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        _run(tiny_data, tmp_path / "run", objective, *overrides, on_log=preempt)
    resumed = _weights(_run(tiny_data, tmp_path / "run", objective, *overrides))
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6, rtol=0), key
    if feature.startswith("lora"):  # checkpoints hold the adapters, not a second copy of the frozen teacher
        ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
        for name in ("model_student", "model_fake") if objective == "dmd2" else ("model_student",):
            keys = load_file(str(ckpt / f"{name}.safetensors")).keys()
            assert keys and all("lora_" in k or k.startswith("head.") for k in keys), name
    if feature == "streaming":  # streaming changes where rows come from, nothing else
        plain = _weights(_run(tiny_data, tmp_path / "plain", objective))
        assert all(torch.equal(plain[k], reference[k]) for k in reference)


def test_mixed_precision_holds_the_frozen_networks_in_bf16_and_trains_fp32(tiny_data):
    latents, _ = tiny_data["sd15"]
    config = tiny_config("sd15", *OBJECTIVES["dmd2"], "model.dtype=bfloat16", "training.mixed_precision=bf16", *LORA[:1])
    dmd2, _ = _objective(config, latents)
    assert next(dmd2.real.unet.parameters()).dtype == torch.bfloat16  # the real score (frozen teacher)
    assert {p.dtype for p in dmd2.fake.parameters()} == {torch.float32}  # fake score: fp32 master weights
    lora = {p.dtype for p in dmd2.student.parameters() if p.requires_grad}
    base = {p.dtype for p in dmd2.student.parameters() if not p.requires_grad}
    assert lora == {torch.float32} and base == {torch.bfloat16}  # LoRA: fp32 adapters on the bf16 frozen teacher


def test_bad_scale_settings_are_refused(tiny_data, tmp_path):
    from ddil_core.config import load_config

    with pytest.raises(ConfigError, match="grad_accum_steps = 3"):
        load_config("tiny", ["training.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match="training.lora.rank = -1"):
        load_config("tiny", ["training.lora.rank=-1"])
    with pytest.raises(ConfigError, match="needs training.mixed_precision"):
        _run(tiny_data, tmp_path / "x", "pd", "model.dtype=bfloat16")


def test_lcm_adds_its_guidance_embedding_to_a_teacher_loaded_from_a_published_config(tmp_path):
    """SD 1.5's and SDXL's config.json have no time_cond_proj_dim: diffusers then lists it in the loaded config's
    _use_default_values, and from_config on that dict silently reset it (no projection, a crash at SD 1.5 scale)."""
    import json as _json

    from diffusers import UNet2DConditionModel

    from ddil_core.method.objectives.lcm import add_guidance_conditioning
    from ddil_core.models.tiny import tiny_unet

    tiny_unet("sd15").save_pretrained(tmp_path / "unet")
    path = tmp_path / "unet" / "config.json"
    config = _json.loads(path.read_text())
    del config["time_cond_proj_dim"]
    path.write_text(_json.dumps(config))
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert "time_cond_proj_dim" in loaded.config.get("_use_default_values", [])
    student = add_guidance_conditioning(loaded, 256)
    assert student.time_embedding.cond_proj is not None and student.config.time_cond_proj_dim == 256

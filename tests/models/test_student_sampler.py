"""The student you train is the student you ship: the objective's own training-time student sampler (the one DDIL's
student rollouts run, reflection included) and plain diffusers loading the saved folder with only the recommended
steps and guidance of ddil_student.json give the same final latents from the same noise and generator.
"""
import json

import pytest
import torch

from ddil_core.config import ConfigError
from ddil_core.method.objectives import build_objective
from ddil_core.method.rollouts import NO_REFLECTION
from ddil_core.models.conditioning import encode_prompts
from ddil_core.models.teacher import load_teacher
from ddil_core.stages.common import read_latent_cache
from ddil_core.stages.distill import distill, objective_context
from tests.conftest import tiny_config

PROMPT = "a handwritten digit two"
OBJECTIVES = {
    "pd": ["objective.pd.teacher_steps=8", "objective.student_steps=2"],  # two PD stages: 8 -> 4 -> 2
    "lcm": ["objective.name=lcm", "objective.lcm.w_min=2", "objective.lcm.w_max=4", "objective.student_steps=4"],
    "dmd2": ["objective.name=dmd2", "objective.student_steps=4", "objective.dmd2.dfake_gen_update_ratio=2"],
    # 2 steps ([999, 499]: on the 100-step rollouts' grid); the default eta 0.2 and CFG 1.7 on the student
    "tdd": ["objective.name=tdd", "objective.student_steps=2"],
}
# On the student's rollouts and the teacher's targets (the shared teacher rollouts below are made without reflection)
STUDENT_SIDE = "ddil.reflection.apply_to=[teacher_targets,student_rollouts]"
REFLECTION = {
    "off": ["ddil.reflection.mode=off"],
    # SD 1.5 pipelines reset clip_sample on load, so a static bound there must be 1 (written as thresholding)
    "static": ["ddil.reflection.mode=static", "ddil.reflection.bound=1", STUDENT_SIDE],
    "dynamic": ["ddil.reflection.mode=dynamic", "ddil.reflection.percentile=0.9", "ddil.reflection.max_value=2.5",
                STUDENT_SIDE],
}
TRAIN = ["training.steps=4", "training.checkpoint_every=4", "rollouts.teacher_steps=100", "rollouts.num_samples=8"]


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    """A latent cache and 100-step teacher rollouts (their grid passes through every student grid used here)."""
    from ddil_core.stages.cache_latents import cache_latents
    from ddil_core.stages.teacher_rollouts import teacher_rollouts

    root = tmp_path_factory.mktemp("sampler-data")
    out = {}
    for family in ("sd15", "sdxl"):
        config = tiny_config(family, *TRAIN)
        cache_latents(config, root / family / "latents")
        teacher_rollouts(config, root / family / "latents", root / family / "rollouts")
        out[family] = (root / family / "latents", root / family / "rollouts")
    return out


def training_sampler_latents(config, latents_dir, student_dir, seed: int, reflection: bool = True) -> torch.Tensor:
    """The objective's own student sampler (objective.student_step, as the DDIL mixture runs it for student
    rollouts) with the trained student's weights, from noise drawn like a diffusers pipeline draws it."""
    from safetensors.torch import load_file

    teacher = load_teacher(config)
    cache = read_latent_cache(latents_dir, teacher)
    objective = build_objective(config.objective.name, objective_context(config, teacher, cache))
    objective.advance(objective.total_steps())  # PD: the last stage's grid, the one the shipped student samples
    student = objective.trainable()["student"]
    if config.training.lora.rank:  # the trained adapters, from the run's last checkpoint (not the shipped files)
        from ddil_core.models.trainable import load_trainable_state
        from ddil_core.training.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(student_dir.parent / "checkpoints")
        load_trainable_state(student, load_file(str(ckpt / "model_student.safetensors")))
    else:
        student.load_state_dict(load_file(str(student_dir / "unet" / "diffusion_pytorch_model.safetensors")))
    student.eval()
    if not reflection:
        objective.refl_rollouts = NO_REFLECTION
    cond = encode_prompts(teacher.pipe, [PROMPT], teacher.resolution)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, *teacher.latent_shape), generator=generator)
    for k in range(objective.grid().num_steps):
        x = objective.student_step(x, k, cond, generator)
    return x


def diffusers_latents(student_dir, seed: int, lora: bool = False) -> torch.Tensor:
    """Plain diffusers, no project code: the folder and the numbers of ddil_student.json (steps, guidance, and a TDD
    student's eta, which pipelines otherwise pass as 0.0), and for a LoRA student its adapters, loaded with
    load_lora_weights from the same folder."""
    from diffusers import DiffusionPipeline

    info = json.loads((student_dir / "ddil_student.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(student_dir))
    if lora:
        pipe.load_lora_weights(str(student_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=info["num_inference_steps"], guidance_scale=info["guidance_scale"],
                eta=info.get("eta", 0.0), generator=torch.Generator().manual_seed(seed), output_type="latent").images


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("reflection", ["off", "static", "dynamic"])
@pytest.mark.parametrize("objective", ["pd", "lcm", "dmd2", "tdd"])
def test_training_time_sampler_equals_plain_diffusers(tmp_path, data8, objective, reflection):
    latents, rollouts = data8["sd15"]
    reflect = REFLECTION[reflection]
    if objective == "tdd" and reflection != "off":  # TCDScheduler never thresholds: TDD reflects the teacher only
        with pytest.raises(ConfigError, match="student_rollouts"):
            tiny_config("sd15", *TRAIN, *OBJECTIVES[objective], *reflect)
        reflect = [*reflect, "ddil.reflection.apply_to=[teacher_targets]"]
    config = tiny_config("sd15", *TRAIN, *OBJECTIVES[objective], *reflect)
    student = distill(config, latents, [rollouts], tmp_path / "run")
    ours = training_sampler_latents(config, latents, student, seed=3)
    theirs = diffusers_latents(student, seed=3)
    assert relative(ours, theirs) <= 1e-5
    if reflection != "off" and objective != "tdd":  # the test sees reflection: a sampler without it lands elsewhere
        assert relative(training_sampler_latents(config, latents, student, 3, reflection=False), theirs) > 1e-3


def test_sdxl_student_clips_to_the_largest_cache_bound(tmp_path, data8):
    """SDXL pipelines keep clip_sample: a static reflection of student rollouts without ddil.reflection.bound clips
    to the largest of the cache's per-channel bounds, in training and in the saved scheduler."""
    latents, rollouts = data8["sdxl"]
    config = tiny_config("sdxl", *TRAIN, *OBJECTIVES["pd"], "ddil.reflection.mode=static", STUDENT_SIDE)
    student = distill(config, latents, [rollouts], tmp_path / "run")
    scheduler = json.loads((student / "scheduler" / "scheduler_config.json").read_text())
    bounds = json.loads((latents / "manifest.json").read_text())["latent_bounds"]
    assert scheduler["clip_sample"] is True and scheduler["clip_sample_range"] == pytest.approx(max(bounds))
    assert relative(training_sampler_latents(config, latents, student, 5), diffusers_latents(student, 5)) <= 1e-5


def test_a_reflection_the_sd15_scheduler_cannot_hold_is_refused(tmp_path, data8):
    latents, rollouts = data8["sd15"]
    config = tiny_config("sd15", *TRAIN, "ddil.reflection.mode=static", STUDENT_SIDE)  # cache bounds are not 1
    with pytest.raises(ConfigError, match="student_rollouts"):
        distill(config, latents, [rollouts], tmp_path / "run")
    # the same bounds on the teacher's side only are fine
    ok = tiny_config("sd15", *TRAIN, "ddil.reflection.mode=static", "ddil.reflection.apply_to=[teacher_targets]")
    assert (distill(ok, latents, [rollouts], tmp_path / "ok") / "model_index.json").exists()


@pytest.mark.parametrize("objective", ["pd", "lcm", "dmd2", "tdd"])
def test_ddil_sample_default_is_plain_diffusers(tmp_path, data8, objective):
    """`ddil sample` with no scheduler flag equals plain diffusers with the recommended steps and guidance."""
    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

    from ddil_core.cli import main

    latents, rollouts = data8["sd15"]
    side = ["ddil.reflection.apply_to=[teacher_targets]"] if objective == "tdd" else []
    config = tiny_config("sd15", *TRAIN, *OBJECTIVES[objective], *REFLECTION["dynamic"], *side)
    student = distill(config, latents, [rollouts], tmp_path / "run")
    assert main(["sample", "--model", str(student), "--prompt", PROMPT, "--seed", "4",
                 "--out", str(tmp_path / "x.png")]) == 0
    ours = np.asarray(Image.open(tmp_path / "x.png"), dtype=np.float64)
    info = json.loads((student / "ddil_student.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(student))
    image = pipe(PROMPT, num_inference_steps=info["num_inference_steps"], guidance_scale=info["guidance_scale"],
                 eta=info.get("eta", 0.0), generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    assert np.abs(ours - (image * 255).round()).max() <= 1  # one PNG quantisation level


def _card_snippet_gives_ddil_samples_image(code: str, student, tmp_path, monkeypatch) -> str:
    """Run the card's snippet as written (our prompt and a seeded generator swapped in) in tmp_path: its sample.png
    must be `ddil sample`'s image for the same prompt and seed. Returns the snippet as run."""
    import numpy as np
    from PIL import Image

    from ddil_core.cli import main

    code = code.replace('"a photo of a cat"', f'"{PROMPT}", generator=__import__("torch").Generator().manual_seed(2)')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "model-card", "exec"), {})
    assert main(["sample", "--model", str(student), "--prompt", PROMPT, "--seed", "2", "--out", "ours.png"]) == 0
    theirs = np.asarray(Image.open("sample.png"), dtype=np.int32)
    assert np.abs(np.asarray(Image.open("ours.png"), dtype=np.int32) - theirs).max() <= 1
    return code


def test_the_model_card_snippet_runs_the_trained_sampler(tmp_path, data8, monkeypatch):
    """The card's two lines (from_pretrained, then the call with the recommended steps and guidance) run in plain
    diffusers give the image `ddil sample` gives: a DMD2 student, whose diffusers defaults (7.5 CFG, 50-step LCM
    grid) would be wrong."""
    import re

    from ddil_core.registry import render_model_card

    latents, rollouts = data8["sd15"]
    config = tiny_config("sd15", *TRAIN, *OBJECTIVES["dmd2"])
    student = distill(config, latents, [rollouts], tmp_path / "run")
    info = json.loads((student / "ddil_student.json").read_text())
    metrics = {"models": {"student": {"steps": info["num_inference_steps"], "guidance_scale": info["guidance_scale"]}}}
    card = render_model_card("s", 1, metrics, None, None, "ddil test", model_path=str(student))
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f"num_inference_steps={info['num_inference_steps']}, guidance_scale={info['guidance_scale']:g}" in code
    _card_snippet_gives_ddil_samples_image(code, student, tmp_path, monkeypatch)


def test_tdd_card_snippet_passes_eta_and_guidance_changes_the_image(tmp_path, data8, monkeypatch):
    """A TDD student's card gives steps, guidance and eta (pipelines pass eta 0.0 unless told) and runs as `ddil
    sample`; its guidance is ordinary CFG on the student (decoupled guidance): another scale gives another image."""
    import re

    from ddil_core.registry import render_model_card
    from ddil_core.models.sampling import generate

    latents, rollouts = data8["sd15"]
    config = tiny_config("sd15", *TRAIN, *OBJECTIVES["tdd"])
    student = distill(config, latents, [rollouts], tmp_path / "run")
    info = json.loads((student / "ddil_student.json").read_text())
    assert info["scheduler"] == "TCDScheduler" and info["eta"] == 0.2 and info["guidance_scale"] == 1.7
    metrics = {"models": {"student": {"steps": info["num_inference_steps"], "guidance_scale": info["guidance_scale"]}}}
    card = render_model_card("s", 1, metrics, {"objective": {"name": "tdd", "tdd": {"eta": 0.2}}}, None, "t",
                             model_path=str(student))
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "num_inference_steps=2, guidance_scale=1.7, eta=0.2" in code
    _card_snippet_gives_ddil_samples_image(code, student, tmp_path, monkeypatch)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(student))
    one, two = (generate(pipe, [PROMPT], [0], 2, g, eta=0.2) for g in (1.0, 2.0))
    assert (one - two).abs().max() > 1e-3


LORA = ["training.lora.rank=4", "training.lora.save_fused=true", "training.lr=1e-2"]  # lr: adapters that matter
# dynamic reflection of the student's rollouts only: data8's rollouts were made without reflection
LORA_REFLECTION = [*REFLECTION["dynamic"], "ddil.reflection.apply_to=[student_rollouts]"]


@pytest.mark.parametrize("objective", ["pd", "lcm", "dmd2", "tdd"])
def test_lora_student_loads_in_plain_diffusers_and_samples_as_trained(tmp_path, data8, objective):
    """The LoRA student folder is the teacher's pipeline with the student's scheduler; plain diffusers plus
    load_lora_weights(folder) samples as the training-time sampler does, and so does the fused full student. TDD's
    student is trained at alpha / rank = 1/2 (the reference's is 8/64): the saved alpha makes the reload equal."""
    latents, rollouts = data8["sd15"]
    extra = ["training.lora.alpha=2"] if objective == "tdd" else LORA_REFLECTION  # TDD: no student-side reflection
    config = tiny_config("sd15", *TRAIN, *OBJECTIVES[objective], *extra, *LORA)
    student = distill(config, latents, [rollouts], tmp_path / "run")
    info = json.loads((student / "ddil_student.json").read_text())
    assert info["lora"]["rank"] == 4 and (student / info["lora"]["weights"]).exists()
    ours = training_sampler_latents(config, latents, student, seed=3)
    theirs = diffusers_latents(student, seed=3, lora=True)
    assert relative(ours, theirs) <= 1e-5
    assert relative(diffusers_latents(tmp_path / "run" / "student-fused", seed=3), theirs) <= 1e-5
    # the adapters matter: the same folder without them (the teacher's UNet) lands elsewhere
    assert relative(diffusers_latents(student, seed=3), theirs) > 1e-3
    if objective == "lcm":  # LCM-LoRA: the teacher's own UNet, no guidance embedding, no CFG at sampling
        assert info["guidance_scale"] == 1.0
        assert json.loads((student / "unet" / "config.json").read_text())["time_cond_proj_dim"] is None


def test_lora_model_card_and_ddil_sample_load_the_adapters(tmp_path, data8, monkeypatch):
    """`ddil sample` (load_pipeline) applies a LoRA student's adapters, and the model card's snippet says how:
    run as written, it gives the image `ddil sample` gives."""
    import re

    import numpy as np
    from PIL import Image

    from ddil_core.registry import render_model_card

    latents, rollouts = data8["sd15"]
    config = tiny_config("sd15", *TRAIN, *OBJECTIVES["lcm"], *LORA)
    student = distill(config, latents, [rollouts], tmp_path / "run")
    info = json.loads((student / "ddil_student.json").read_text())
    metrics = {"models": {"student": {"steps": info["num_inference_steps"], "guidance_scale": info["guidance_scale"]}}}
    card = render_model_card("s", 1, metrics, {"training": {"lora": {"rank": 4}}}, None, "ddil test",
                             model_path=str(student))
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'pipe.load_lora_weights("{student}")' in code
    code = _card_snippet_gives_ddil_samples_image(code, student, tmp_path, monkeypatch)
    exec(compile(code.replace("pipe.load_lora_weights", "# "), "no-lora", "exec"), {})  # without the adapters
    ours = np.asarray(Image.open("ours.png"), dtype=np.int32)  # `ddil sample`'s, with the adapters
    assert np.abs(np.asarray(Image.open("sample.png"), dtype=np.int32) - ours).max() > 1

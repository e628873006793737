"""Issue 13, rules 3 and 4 through the CLI: a broken student is never published, and inputs that do not belong
together (rollouts of another teacher, grid, CFG, cache or fan-out; a student and another teacher; metrics of another
student; a config that did not make the student) are refused naming both sides, before anything is written."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.fakes.cli_checks import assert_fails, assert_untouched, run, snapshot


def _save_teacher(folder, change=None):
    """The tiny SD 1.5 teacher as a diffusers folder; `change(unet)` edits its UNet first."""
    from ddil_core.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15")
    if change is not None:
        with torch.no_grad():
            change(pipe.unet)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """Same family, VAE and text encoders as tiny://sd15 (so its latent caches fit), another UNet."""
    return _save_teacher(tmp_path_factory.mktemp("other") / "teacher",
                         lambda unet: [p.add_(0.01) for p in unet.parameters()])


def _distill(capsys, tiny_data, tmp_path, *sets, latents=None, rollouts=None, teacher=None):
    out = tmp_path / "run"
    default_latents, default_rollouts = tiny_data["sd15"]
    args = ["distill", "--config", "tiny", "--latents", latents or default_latents, "--out", out]
    for r in (rollouts if isinstance(rollouts, list) else [rollouts or default_rollouts]):
        args += ["--rollouts", r]
    if teacher is not None:
        args += ["--teacher", teacher]
    for item in sets:
        args += ["--set", item]
    code, err = run(capsys, *args)
    return code, err, out


# ------------------------------------------------------------------------- rule 3: no broken student

def test_a_teacher_with_non_finite_weights_is_refused(tiny_data, tmp_path, capsys):
    def poison(unet):
        unet.conv_in.weight[0, 0, 0, 0] = float("nan")

    teacher = _save_teacher(tmp_path / "nan-teacher", poison)
    code, err, out = _distill(capsys, tiny_data, tmp_path, teacher=teacher)
    assert_fails(code, err, f"{teacher}: unet weight 'conv_in.weight' has 1 non-finite values")
    assert_untouched(out)


def test_every_update_skipped_publishes_no_student(tiny_data, tmp_path, capsys, monkeypatch):
    """Every loss non-finite (as NaN guidance made them): distill fails, exit 1, and writes no student."""
    from ddil_core.method.objectives.pd import ProgressiveDistillation

    real = ProgressiveDistillation.loss

    def nan_loss(self, batch, step, draws):
        out = real(self, batch, step, draws)
        out.losses = {k: v * float("nan") for k, v in out.losses.items()}
        return out

    monkeypatch.setattr(ProgressiveDistillation, "loss", nan_loss)
    code, err, out = _distill(capsys, tiny_data, tmp_path, "training.max_nonfinite_in_a_row=100")
    assert_fails(code, err, f"{out}: no update was applied to the student in 6 steps (6 skipped as non-finite)",
                 "no student written", exit_code=1)
    assert not (out / "student").exists()


def test_non_finite_final_weights_publish_no_student(tiny_data, tmp_path, capsys, monkeypatch):
    from ddil_core.training.loop import Trainer

    real = Trainer.train

    def train_then_break(self):
        real(self)
        with torch.no_grad():
            next(self.modules["student"].parameters()).view(-1)[:3] = float("inf")

    monkeypatch.setattr(Trainer, "train", train_then_break)
    code, err, out = _distill(capsys, tiny_data, tmp_path)
    assert_fails(code, err, f"{out}: the trained student has 3 non-finite weights of", "no student written",
                 exit_code=1)
    assert not (out / "student").exists()


def test_a_diverged_student_is_not_published(tiny_data, tmp_path, capsys):
    """lr 1 without clipping: the losses explode, the weights stay finite but the student's own sampler does not."""
    code, err, out = _distill(capsys, tiny_data, tmp_path, "training.lr=1", "training.grad_clip=0")
    assert_fails(code, err, f"{out}: the trained student's own 2-step sampler gives non-finite latents",
                 exit_code=1)
    assert not (out / "student").exists()


# ------------------------------------------------------------ rule 4: rollouts that belong to the run

@pytest.mark.parametrize("sets,named", [
    (("rollouts.teacher_steps=8",), "they hold 4 teacher steps ([999, 749, 499, 249]), the config says "
                                    "rollouts.teacher_steps = 8"),
    (("objective.guidance_scale=3",), "made with CFG scale 2.0, the config says objective.guidance_scale = 3.0"),
    (("rollouts.guidance_scale=1.5",), "made with CFG scale 2.0, the config says rollouts.guidance_scale = 1.5"),
    (("ddil.reflection.mode=dynamic",), "made with reflection {'mode': 'off'}, the config's ddil.reflection gives "
                                        "{'mode': 'dynamic', 'percentile': 0.995}"),
    (("rollouts.num_samples=8",), "made with rollouts.num_samples = 16, the config says 8"),
    (("rollouts.seed=7",), "made with rollouts.seed = 1234, the config says 7"),
])
def test_rollouts_made_with_another_config(tiny_data, tmp_path, capsys, sets, named):
    code, err, out = _distill(capsys, tiny_data, tmp_path, *sets)
    rollouts = tiny_data["sd15"][1]
    assert_fails(code, err, f"{rollouts}: these teacher rollouts do not belong to this run", named)
    assert_untouched(out)


def test_reflection_that_does_not_touch_teacher_rollouts_accepts_them(tiny_data, tmp_path, capsys):
    code, err, out = _distill(capsys, tiny_data, tmp_path, "ddil.reflection.mode=dynamic",
                              "ddil.reflection.apply_to=[teacher_targets]", "training.steps=2")
    assert code == 0, err
    assert (out / "student" / "ddil_student.json").exists()


def test_rollouts_made_by_a_teacher_of_another_family(tiny_data, tmp_path, capsys):
    sdxl_rollouts = tiny_data["sdxl"][1]
    code, err, out = _distill(capsys, tiny_data, tmp_path, rollouts=sdxl_rollouts)
    assert_fails(code, err, f"{sdxl_rollouts}: these teacher rollouts do not belong",
                 "made by an sdxl teacher, this run's teacher tiny://sd15 is sd15", "another latent cache")
    assert_untouched(out)


def test_rollouts_made_by_another_teacher_of_the_same_family(tiny_data, other_teacher, tmp_path, capsys):
    from ddil_core.models.tiny import build_tiny_pipeline
    from ddil_core.models.teacher import module_fingerprint

    code, err, out = _distill(capsys, tiny_data, tmp_path, teacher=other_teacher)
    mine = module_fingerprint(build_tiny_pipeline("sd15").unet)
    assert_fails(code, err, f"made by teacher tiny://sd15 (UNet {mine}), this run's teacher {other_teacher} has UNet")
    assert_untouched(out)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """Another latent cache of the same teacher: the first 32 digits."""
    from ddil_core.stages.cache_latents import cache_latents
    from tests.conftest import tiny_config

    out = tmp_path_factory.mktemp("small") / "latents"
    cache_latents(tiny_config("sd15", "data.limit=32"), out)
    return out


def test_rollouts_made_from_another_latent_cache(tiny_data, small_cache, tmp_path, capsys):
    code, err, out = _distill(capsys, tiny_data, tmp_path, "data.limit=32", latents=small_cache)
    assert_fails(code, err, "made from another latent cache (64 samples, digest",
                 f"--latents {small_cache} is digest", "(32 samples)")
    assert_untouched(out)


def test_rollouts_of_an_older_ddil_without_provenance(tiny_data, tmp_path, capsys):
    old = tmp_path / "old-rollouts"
    shutil.copytree(tiny_data["sd15"][1], old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("unet", "latents_digest"):
        manifest.pop(key)
    (old / "manifest.json").write_text(json.dumps(manifest))
    code, err, out = _distill(capsys, tiny_data, tmp_path, rollouts=old)
    assert_fails(code, err, f"{old}: the rollouts manifest records no unet, latents_digest", "rerun teacher-rollouts")
    assert_untouched(out)


@pytest.fixture(scope="module")
def fan_out(tiny_data, tmp_path_factory):
    """teacher-rollouts in two shards, as the Kubeflow pipeline fans them out."""
    from ddil_core.stages.teacher_rollouts import teacher_rollouts
    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("fan-out")
    for shard in (0, 1):
        teacher_rollouts(tiny_config("sd15"), tiny_data["sd15"][0], root / f"shard-{shard}", shard, 2)
    return root


def test_a_fan_out_with_a_missing_shard(tiny_data, fan_out, tmp_path, capsys):
    code, err, out = _distill(capsys, tiny_data, tmp_path, rollouts=[fan_out / "shard-0"])
    assert_fails(code, err, "rollout shards [1] of 2 are missing")
    assert_untouched(out)


def test_a_fan_out_with_a_shard_given_twice(tiny_data, fan_out, tmp_path, capsys):
    code, err, out = _distill(capsys, tiny_data, tmp_path, rollouts=[fan_out / "shard-0", fan_out / "shard-0"])
    assert_fails(code, err, "rollout shard 0 of 2 is also given as")
    assert_untouched(out)


def test_a_fan_out_mixed_with_an_unsharded_run(tiny_data, fan_out, tmp_path, capsys):
    code, err, out = _distill(capsys, tiny_data, tmp_path, rollouts=[fan_out / "shard-0", tiny_data["sd15"][1]])
    assert_fails(code, err, "come from different fan-outs (--num-shards [1, 2])")
    assert_untouched(out)


def test_a_complete_fan_out_is_accepted(tiny_data, fan_out, tmp_path, capsys):
    code, err, out = _distill(capsys, tiny_data, tmp_path, "training.steps=2", rollouts=[fan_out])
    assert code == 0, err


# ----------------------------------------------------------------- rule 4: a latent cache and its manifest

def _tampered_cache(tiny_data, tmp_path, edit):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_data["sd15"][0], cache)
    edit(cache)
    return cache


def test_a_cache_manifest_whose_count_disagrees_with_its_shards(tiny_data, tmp_path, capsys):
    def edit(cache):
        manifest = json.loads((cache / "manifest.json").read_text())
        manifest["count"] += 1
        (cache / "manifest.json").write_text(json.dumps(manifest))

    cache = _tampered_cache(tiny_data, tmp_path, edit)
    code, err, out = _distill(capsys, tiny_data, tmp_path, latents=cache)
    assert_fails(code, err, f"{cache / 'manifest.json'}: unreadable manifest (the shards hold 64 samples, 'count' "
                 "says 65)")
    assert_untouched(out)


def test_a_cache_whose_captions_do_not_match_its_latents(tiny_data, tmp_path, capsys):
    cache = _tampered_cache(tiny_data, tmp_path, lambda c: (c / "captions.json").write_text(json.dumps(["one"])))
    code, err, out = _distill(capsys, tiny_data, tmp_path, latents=cache)
    assert_fails(code, err, f"{cache / 'captions.json'}: expected a list of 64 captions")
    assert_untouched(out)


def test_a_cache_holding_non_finite_latents(tiny_data, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from ddil_core.data.shards import sha256_file

    def edit(cache):
        shard = cache / "shard-00000.safetensors"
        tensors = load_file(str(shard))
        tensors["latents"][0, 0, 0, 0] = float("inf")
        save_file(tensors, str(shard))
        manifest = json.loads((cache / "manifest.json").read_text())
        manifest["shards"][0]["sha256"] = sha256_file(shard)  # a writer that produced them, not a corruption
        (cache / "manifest.json").write_text(json.dumps(manifest))

    cache = _tampered_cache(tiny_data, tmp_path, edit)
    code, err, out = _distill(capsys, tiny_data, tmp_path, latents=cache)
    assert_fails(code, err, f"{cache}: the cached latents hold non-finite values")
    assert_untouched(out)


# --------------------------------------------- rule 4: evaluate and register check what belongs together

@pytest.fixture(scope="module")
def evaluated(tiny_data, tmp_path_factory):
    """A distilled student and its evaluation (pixels extractor)."""
    from ddil_core.cli import main

    root = tmp_path_factory.mktemp("evaluated")
    latents, rollouts = tiny_data["sd15"]
    assert main(["distill", "--config", "tiny", "--latents", str(latents), "--rollouts", str(rollouts),
                 "--out", str(root / "run")]) == 0
    assert main(["evaluate", "--config", "tiny", "--student", str(root / "run" / "student"), "--out",
                 str(root / "eval"), "--set", "evaluation.extractor=pixels"]) == 0
    return root / "run" / "student", root / "eval" / "metrics.json"


def test_evaluate_refuses_a_teacher_the_student_was_not_distilled_from(evaluated, other_teacher, tmp_path, capsys):
    student, _ = evaluated
    out = tmp_path / "eval"
    code, err = run(capsys, "evaluate", "--config", "tiny", "--student", student, "--teacher", other_teacher,
                    "--out", out, "--set", "evaluation.extractor=pixels")
    assert_fails(code, err, f"{student}: this student was distilled from teacher tiny://sd15 (UNet",
                 f"not from --teacher {other_teacher} (UNet")
    assert_untouched(out)


def test_register_refuses_metrics_of_another_student(evaluated, tmp_path, capsys):
    student, metrics = evaluated
    other = tmp_path / "other-student"
    shutil.copytree(student, other)
    info = json.loads((other / "ddil_student.json").read_text())
    (other / "ddil_student.json").write_text(json.dumps({**info, "guidance_scale": 3.0}))
    registry = tmp_path / "registry"
    code, err = run(capsys, "register", "--config", "tiny", "--student", other, "--metrics", metrics,
                    "--registry", registry)
    assert_fails(code, err, f"{metrics}: these metrics were made for student {student}", f"not for --student {other}")
    assert not registry.exists()


def test_register_refuses_a_config_that_did_not_make_the_student(evaluated, tmp_path, capsys):
    student, metrics = evaluated
    registry = tmp_path / "registry"
    code, err = run(capsys, "register", "--config", "tiny", "--student", student, "--metrics", metrics,
                    "--registry", registry, "--set", "training.lr=0.001")
    assert_fails(code, err, f"{student}: was distilled with another config than this one",
                 "training.lr: 0.0001 (student) vs 0.001 (this config)")
    assert not registry.exists()


def test_register_accepts_what_belongs_together(evaluated, tmp_path, capsys):
    student, metrics = evaluated
    registry = tmp_path / "registry"
    before = snapshot(student)
    code, err = run(capsys, "register", "--config", "tiny", "--student", student, "--metrics", metrics,
                    "--registry", registry, "--set", "telemetry.run_id=another-run")
    assert code == 0, err
    assert (registry / "index.json").exists() and snapshot(student) == before


def test_register_refuses_a_registry_inside_the_student(evaluated, tmp_path, capsys):
    student, metrics = evaluated
    before = snapshot(student)
    code, err = run(capsys, "register", "--config", "tiny", "--student", student, "--metrics", metrics,
                    "--registry", student / "registry")
    assert_fails(code, err, f"--registry {student / 'registry'} lies inside the student folder {student}")
    assert snapshot(student) == before


@pytest.mark.parametrize("name", ["bad name", "-leading-dash", ""])
def test_register_refuses_a_model_name_the_registry_cannot_hold(evaluated, tmp_path, capsys, name):
    student, metrics = evaluated
    registry = tmp_path / "registry"
    code, err = run(capsys, "register", "--config", "tiny", "--student", student, "--metrics", metrics,
                    "--registry", registry, "--set", f"registry.model_name='{name}'")
    assert_fails(code, err, f"registry.model_name = {name!r} must be 1-128 letters")
    assert not registry.exists()


@pytest.mark.parametrize("info,named", [
    ("{not json", "ddil_student.json: unreadable (JSONDecodeError"),
    ('{"num_inference_steps": 0, "guidance_scale": 1.0}', "'num_inference_steps' = 0 must be at least 1"),
    ('{"num_inference_steps": 2, "guidance_scale": NaN}', "'guidance_scale' = nan must be in [0, 30]"),
    ('{"num_inference_steps": 2, "guidance_scale": 1.0, "timesteps": ["999", 499]}', "'timesteps' must be a list"),
])
def test_a_student_record_that_is_not_what_distill_writes(evaluated, tmp_path, capsys, info, named):
    student, _ = evaluated
    broken = tmp_path / "student"
    shutil.copytree(student, broken)
    (broken / "ddil_student.json").write_text(info)
    for args in (["sample", "--model", broken, "--prompt", "a digit", "--out", tmp_path / "x.png"],
                 ["evaluate", "--config", "tiny", "--student", broken, "--out", tmp_path / "eval",
                  "--set", "evaluation.extractor=pixels"]):
        code, err = run(capsys, *args)
        assert_fails(code, err, f"{broken / 'ddil_student.json'}", named)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("edit,named", [
    (lambda m: m["models"].__setitem__("student", [1, 2]), "models.student must be a mapping"),
    (lambda m: m["models"].pop("student"), "models.student must be a mapping"),
    (lambda m: m.__setitem__("protocol", ["x"]), "'protocol' must be a mapping"),
])
def test_register_refuses_metrics_of_the_wrong_layout(evaluated, tmp_path, capsys, edit, named):
    student, metrics = evaluated
    data = json.loads(metrics.read_text())
    edit(data)
    broken = tmp_path / "metrics.json"
    broken.write_text(json.dumps(data))
    registry = tmp_path / "registry"
    code, err = run(capsys, "register", "--config", "tiny", "--student", student, "--metrics", broken,
                    "--registry", registry)
    assert_fails(code, err, f"{broken}: not an evaluate metrics file", named)
    assert not registry.exists()

"""Issue 13, rules 1, 2 and 8 through the CLI: bad input never ends in a traceback, every number is validated (finite,
in range, and compatible with the grids and caches it meets) before any work, and every message is one line; each
case asserts the exit code, what the message names and that the output folder was not created."""
from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from tests.fakes.cli_checks import assert_fails, assert_untouched, run
from tests.fakes.s3_server import free_port


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _cache(capsys, tmp_path, dataset, *sets):
    out = tmp_path / "latents"
    args = ["cache-latents", "--config", "tiny", "--dataset", dataset, "--out", out, "--set", "data.limit=null"]
    for item in sets:
        args += ["--set", item]
    code, err = run(capsys, *args)
    return code, err, out


def _distill(capsys, tiny_data, tmp_path, *sets, family="sd15", rollouts=None, extra=()):
    latents, default_rollouts = tiny_data[family]
    out = tmp_path / "run"
    args = ["distill", "--config", "tiny", "--latents", latents, "--rollouts", rollouts or default_rollouts,
            "--out", out, *extra]
    for item in sets:
        args += ["--set", item]
    code, err = run(capsys, *args)
    return code, err, out


# ------------------------------------------------------------------------------ rule 1: no traceback, ever

@pytest.mark.parametrize("annotations,named", [
    ({"x": 1}, "'annotations' must be a list, got dict"),
    (["a caption", "another"], "annotations[0] must be an object with an integer or text 'image_id', got 'a caption'"),
    ([{"image_id": [1], "caption": "x"}], "annotations[0] must be an object"),  # an unhashable id
])
def test_coco_annotations_of_the_wrong_shape(tmp_path, capsys, annotations, named):
    (tmp_path / "a.png").write_bytes(_png())
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": annotations}))
    code, err, out = _cache(capsys, tmp_path, coco)
    assert_fails(code, err, f"{coco}: not a COCO captions JSON", named)
    assert_untouched(out)


def test_coco_image_file_outside_its_folder(tmp_path, capsys):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "../../etc/passwd"}],
                                "annotations": [{"image_id": 1, "caption": "x"}]}))
    code, err, out = _cache(capsys, tmp_path, coco)
    assert_fails(code, err, f"{coco}", "images[0].file_name must be a path inside the image folder")
    assert_untouched(out)


@pytest.mark.parametrize("name,file_value", [("list", ["a.png"]), ("parent", "../a.png"), ("absolute", "/a.png")])
def test_captions_jsonl_file_that_is_not_a_path_inside(tmp_path, capsys, name, file_value):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    (root / "captions.jsonl").write_text(json.dumps({"file": file_value, "caption": "a digit"}) + "\n")
    code, err, out = _cache(capsys, tmp_path, root)
    assert_fails(code, err, f"{root / 'captions.jsonl'}:1: 'file' must be a path inside the dataset folder")
    assert_untouched(out)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("payload,named", [
    (b"{not json", "s1.json: not valid JSON"),
    (b"[1, 2]", "s1.json: expected an object with a 'caption', got [1, 2]"),
    (b'{"text": "no caption key"}', "s1.json: expected an object with a 'caption'"),
    (b"\xff\xfe", "s1.json: not valid JSON (UnicodeDecodeError"),
])
def test_webdataset_json_that_is_not_a_caption_object(tmp_path, capsys, payload, named):
    shard = _tar(tmp_path / "shard-0.tar", [("s1.png", _png()), ("s1.json", payload)])
    code, err, out = _cache(capsys, tmp_path, shard)
    assert_fails(code, err, f"{shard}:{named}")
    assert_untouched(out)


def test_webdataset_bad_json_is_skipped_and_counted_under_the_skip_policy(tmp_path, capsys):
    shard = _tar(tmp_path / "shard-0.tar", [("s0.png", _png()), ("s0.txt", b"a digit"), ("s1.png", _png()),
                                              ("s1.json", b"[1]")])
    code, err, out = _cache(capsys, tmp_path, shard, "data.bad_sample_policy=skip")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 1 and manifest["skipped"] == 1
    assert "s1.json: expected an object with a 'caption'" in manifest["skip_reasons"][0]


@pytest.mark.parametrize("override", ["data.batch_size=0", "data.shard_size=0", "data.limit=0"])
def test_zero_sizes_of_cache_latents(tmp_path, capsys, override):
    code, err, out = _cache(capsys, tmp_path, "demo://digits", override)
    key, value = override.split("=")
    assert_fails(code, err, f"{key} = {value} must be at least 1")
    assert_untouched(out)


@pytest.mark.parametrize("override", ["rollouts.batch_size=0", "rollouts.shard_size=0", "rollouts.num_samples=0"])
def test_zero_sizes_of_teacher_rollouts(tiny_data, tmp_path, capsys, override):
    out = tmp_path / "rollouts"
    code, err = run(capsys, "teacher-rollouts", "--config", "tiny", "--latents", tiny_data["sd15"][0], "--out", out,
                    "--set", override)
    assert_fails(code, err, override.replace("=", " = "), "must be at least 1")
    assert_untouched(out)


@pytest.mark.parametrize("shard,num_shards,named", [
    ("3", "2", "--shard 3 must be below --num-shards 2"),
    ("2", "2", "--shard 2 must be below --num-shards 2"),
    ("-1", "2", "argument --shard: -1 must be at least 0"),
    ("0", "0", "argument --num-shards: 0 must be at least 1"),
    ("x", "2", "argument --shard: 'x' is not an integer"),
])
def test_teacher_rollouts_shard_out_of_range(tiny_data, tmp_path, capsys, shard, num_shards, named):
    out = tmp_path / "rollouts"
    code, err = run(capsys, "teacher-rollouts", "--config", "tiny", "--latents", tiny_data["sd15"][0], "--out", out,
                    "--shard", shard, "--num-shards", num_shards)
    assert_fails(code, err, named)
    assert_untouched(out)


@pytest.mark.parametrize("flag,value,named", [
    ("--steps", "0", "argument --steps: 0 must be at least 1"),
    ("--steps", "-3", "argument --steps: -3 must be at least 1"),
    ("--steps", "5000", "cannot sample 5000 steps"),
    ("--guidance", "nan", "argument --guidance: 'nan' is not a finite number"),
    ("--guidance", "inf", "argument --guidance: 'inf' is not a finite number"),
    ("--guidance", "-2", "argument --guidance: -2 must be at least 0"),
    ("--seed", "-1", "argument --seed: -1 must be in [0,"),
    ("--seed", str(2**70), "argument --seed:"),
])
def test_sample_numbers(tmp_path, capsys, flag, value, named):
    from ddil_core.models.tiny import build_tiny_pipeline

    model = tmp_path / "model"
    build_tiny_pipeline("sd15").save_pretrained(str(model), safe_serialization=True)
    out = tmp_path / "images" / "x.png"
    code, err = run(capsys, "sample", "--model", model, "--prompt", "a digit", "--out", out, f"{flag}={value}")
    assert_fails(code, err, named)
    assert not out.parent.exists()


def test_lcm_student_grid_that_the_rollouts_do_not_hold(tiny_data, tmp_path, capsys):
    """LCM with 8 student steps over 4-step rollouts: refused before OUT exists, naming both grids."""
    code, err, out = _distill(capsys, tiny_data, tmp_path, "objective.name=lcm", "objective.student_steps=8")
    assert_fails(code, err, "objective.student_steps = 8 (lcm)",
                 "not in the teacher rollouts' grid [999, 749, 499, 249]", "rollouts.teacher_steps = 4")
    assert_untouched(out)


def test_a_pd_stage_grid_that_the_rollouts_do_not_hold(tiny_data, tmp_path, capsys):
    """PD from 16 teacher steps trains stages of 8, 4 and 2 steps: the 8-step stage's grid is not in 4-step rollouts,
    which would only have failed at the hand-off in the middle of training."""
    code, err, out = _distill(capsys, tiny_data, tmp_path, "objective.pd.teacher_steps=16")
    assert_fails(code, err, "the student grid [999, 874, 749, 624, 499, 374, 249, 124]",
                 "not in the teacher rollouts' grid")
    assert_untouched(out)


def test_s3_dataset_whose_endpoint_refuses_connections(tmp_path, capsys, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", endpoint),
                       ("AWS_ENDPOINT_URL_S3", endpoint), ("AWS_MAX_ATTEMPTS", "1")):
        monkeypatch.setenv(key, value)
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pytest.skip("s3fs not installed")
    code, err, out = _cache(capsys, tmp_path, "s3://ddil-data/set", "data.num_workers=0")
    assert_fails(code, err, "s3://ddil-data/set: cannot reach the storage endpoint", "AWS_ENDPOINT_URL")
    assert_untouched(out)


def test_a_dataset_location_of_an_unknown_protocol(tmp_path, capsys):
    code, err, out = _cache(capsys, tmp_path, "nosuch://bucket/set")
    assert_fails(code, err, "nosuch://bucket/set: not a dataset location this installation can read")
    assert_untouched(out)


# --------------------------------------------------------------- rule 2: every number, before any work

@pytest.mark.parametrize("override", ["training.lr=.nan", "training.lr=.inf", "objective.guidance_scale=.nan",
                                      "ddil.priors.forward=.nan", "rollouts.guidance_scale=-.inf",
                                      "ddil.reflection.bound=.inf", "objective.lcm.huber_c=.nan"])
def test_non_finite_numbers_are_refused_before_distill_starts(tiny_data, tmp_path, capsys, override):
    code, err, out = _distill(capsys, tiny_data, tmp_path, override)
    key, value = override.split("=")
    assert_fails(code, err, f"{key} = {value.replace('.', '')} is not a finite number")
    assert_untouched(out)


@pytest.mark.parametrize("override,named", [
    ("training.lr=2", "training.lr = 2.0 must be in (0, 1]"),
    ("training.adam_beta1=1", "training.adam_beta1 = 1.0 must be in [0, 1)"),
    ("ddil.priors.teacher=1.5", "ddil.priors.teacher = 1.5 must be in [0, 1]"),
    ("training.seed=-1", "training.seed = -1 must be in [0,"),
    ("objective.guidance_scale=-1", "objective.guidance_scale = -1.0 must be at least 0"),
])
def test_numbers_out_of_range_are_refused(tiny_data, tmp_path, capsys, override, named):
    code, err, out = _distill(capsys, tiny_data, tmp_path, override)
    assert_fails(code, err, named)
    assert_untouched(out)


@pytest.mark.parametrize("sets,named", [
    (("objective.name=dmd2", "objective.student_steps=2", "objective.dmd2.timesteps=[1500,500]",
      "ddil.priors.forward=1", "ddil.priors.teacher=0", "ddil.priors.student=0"),
     "objective.dmd2.timesteps = [1500, 500]: [1500] not in [0, 1000)"),
    (("objective.name=dmd2", "objective.student_steps=4", "objective.dmd2.max_step=1000",
      "ddil.priors.forward=1", "ddil.priors.teacher=0", "ddil.priors.student=0"),
     "objective.dmd2.max_step = 1000 must be below the teacher's 1000 training timesteps"),
    (("rollouts.teacher_steps=2000",), "rollouts.teacher_steps = 2000 must be at most the teacher's 1000"),
    (("model.resolution=17",), "model.resolution = 17 must be a multiple of the teacher's VAE scale factor 2"),
])
def test_numbers_that_do_not_fit_the_teachers_schedule(tiny_data, tmp_path, capsys, sets, named):
    code, err, out = _distill(capsys, tiny_data, tmp_path, *sets)
    assert_fails(code, err, named)
    assert_untouched(out)


def test_a_float16_teacher_without_a_gpu(tiny_data, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: float16 is allowed")
    code, err, out = _distill(capsys, tiny_data, tmp_path, "model.dtype=float16", "training.mixed_precision=fp16")
    assert_fails(code, err, "model.dtype = float16 needs a GPU")
    assert_untouched(out)


def test_evaluation_steps_beyond_the_teachers_schedule(tmp_path, capsys):
    from ddil_core.models.tiny import build_tiny_pipeline

    student = tmp_path / "student"
    build_tiny_pipeline("sd15").save_pretrained(str(student), safe_serialization=True)
    out = tmp_path / "eval"
    code, err = run(capsys, "evaluate", "--config", "tiny", "--student", student, "--out", out,
                    "--set", "evaluation.teacher_steps=1001", "--set", "evaluation.extractor=pixels")
    assert_fails(code, err, "evaluation.teacher_steps = 1001 must be at most the teacher's 1000 training timesteps")
    assert_untouched(out)


def test_nan_in_a_recipe_file(tiny_data, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("training:\n  lr: .nan\n")
    latents, rollouts = tiny_data["sd15"]
    out = tmp_path / "run"
    code, err = run(capsys, "distill", "--config", recipe, "--latents", latents, "--rollouts", rollouts, "--out", out)
    assert_fails(code, err, f"{recipe}: training.lr = nan is not a finite number")
    assert_untouched(out)


# ----------------------------------------------------------------------------- rule 8: one line, always

def test_a_garbage_tar_is_one_line(tmp_path, capsys):
    shard = tmp_path / "shard-0.tar"
    shard.write_bytes(b"\x00garbage\x17" * 400)
    code, err, out = _cache(capsys, tmp_path, shard)
    assert_fails(code, err, f"{shard}: unreadable tar")
    assert_untouched(out)


@pytest.mark.parametrize("text", ["training:\n  steps: 3\n lr: [\n", "a: b: c\n", "- [unclosed\n"])
def test_a_bad_yaml_recipe_is_one_line_naming_the_place(tmp_path, capsys, text):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "latents"
    code, err = run(capsys, "cache-latents", "--config", recipe, "--out", out)
    assert_fails(code, err, f"{recipe}: not valid YAML (line")
    assert_untouched(out)


@pytest.mark.parametrize("override,named", [("training.lr=[", "override 'training.lr=[': the value is not valid YAML"),
                                            ("nosuchkey", "override 'nosuchkey' must look like key.path=value")])
def test_a_bad_override_is_one_line(tmp_path, capsys, override, named):
    out = tmp_path / "latents"
    code, err = run(capsys, "cache-latents", "--config", "tiny", "--out", out, "--set", override)
    assert_fails(code, err, named)
    assert_untouched(out)


@pytest.mark.parametrize("args,named", [
    (["distill", "--config", "tiny"], "the following arguments are required: --latents, --out"),
    (["nosuchstage"], "argument command: invalid choice: 'nosuchstage'"),
    (["sample", "--model", "tiny://sd15", "--prompt", "x", "--out", "x.png", "--scheduler", "euler"],
     "argument --scheduler: invalid choice: 'euler'"),
])
def test_argument_errors_are_one_line_with_exit_2(capsys, args, named):
    code, err = run(capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and named in err and "usage:" not in err, err


@pytest.mark.parametrize("content,named", [(b"\xff\xfe\x00binary", "not a YAML recipe (not valid UTF-8 text)"),
                                           (None, "unreadable recipe (Is a directory)")])
def test_a_recipe_that_is_not_text(tmp_path, capsys, content, named):
    recipe = tmp_path / "recipe.yaml"
    if content is None:
        recipe.mkdir()
    else:
        recipe.write_bytes(content)
    out = tmp_path / "latents"
    code, err = run(capsys, "cache-latents", "--config", recipe, "--out", out)
    assert_fails(code, err, f"{recipe}: {named}")
    assert_untouched(out)

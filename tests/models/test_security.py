"""Security: only safetensors are loaded unless model.allow_pickle; no remote code ever runs; credentials given
through the environment never end up in anything a run writes (files, logs, pushed metrics)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from ddil_core.cli import main
from ddil_core.models.pipeline_io import ModelError, load_pipeline
from tests.fakes.pushgateway import pushgateway, read_metrics  # noqa: F401

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "SECRETVALUE123",
    "AWS_ACCESS_KEY_ID": "AKIAFAKE",
    "DDIL_PUSHGATEWAY_PASSWORD": "pw-987",
    "HF_TOKEN": "hf_fake_456",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny SD 1.5 pipeline saved twice: with safetensors, and with pickle (.bin) weights where the library
    still allows it (diffusers models; transformers 5 writes safetensors only)."""
    from ddil_core.models.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    pipe = build_tiny_pipeline("sd15")
    pipe.save_pretrained(str(root / "safe"), safe_serialization=True)
    pipe.save_pretrained(str(root / "pickle"), safe_serialization=False)
    return root


def test_a_pickle_only_model_folder_is_refused(saved):
    folder = saved / "pickle"
    assert not list((folder / "unet").glob("*.safetensors")) and list((folder / "unet").glob("*.bin"))
    with pytest.raises(ModelError) as info:
        load_pipeline(str(folder))
    message = str(info.value)
    assert str(folder / "unet") in message and "only pickle weights" in message and "model.allow_pickle" in message


def test_the_cli_refuses_a_pickle_only_teacher_naming_it(saved, tmp_path, capsys):
    out = tmp_path / "latents"
    code = main(["cache-latents", "--config", "tiny", "--teacher", str(saved / "pickle"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"{saved / 'pickle' / 'unet'}: only pickle weights" in err and "model.allow_pickle" in err
    assert not out.exists()


def test_with_allow_pickle_the_pickle_folder_loads_the_same_weights(saved):
    import torch

    pickled = load_pipeline(str(saved / "pickle"), allow_pickle=True)
    safe = load_pipeline(str(saved / "safe"))
    for (name, a), (_, b) in zip(pickled.unet.state_dict().items(), safe.unet.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_pipeline_never_asks_for_remote_code(saved, monkeypatch):
    from diffusers import DiffusionPipeline

    calls = []
    real = DiffusionPipeline.from_pretrained.__func__

    def spy(cls, source, **kwargs):
        calls.append(kwargs)
        return real(cls, source, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(spy))
    load_pipeline(str(saved / "safe"))
    load_pipeline(str(saved / "pickle"), allow_pickle=True)
    assert len(calls) == 2
    for kwargs in calls:
        for key in ("trust_remote_code", "custom_pipeline", "custom_revision"):
            assert not kwargs.get(key), (key, kwargs)
    assert calls[0]["use_safetensors"] is True  # safetensors only, unless allow_pickle


@pytest.mark.parametrize("where", ["pipeline", "component"])
def test_custom_code_in_a_model_folder_is_never_executed(saved, tmp_path, where):
    """A folder whose model_index.json points at its own Python (a custom pipeline class, or a custom UNet class)
    is refused with a ModelError, and that Python never runs."""
    folder = tmp_path / "evil"
    shutil.copytree(saved / "safe", folder)
    sentinel = tmp_path / "code-ran"
    index = json.loads((folder / "model_index.json").read_text())
    body = f"open({str(sentinel)!r}, 'w').write('ran')\nimport diffusers\n"
    if where == "pipeline":
        (folder / "pipeline.py").write_text(body + "class EvilPipeline(diffusers.StableDiffusionPipeline):\n    pass\n")
        index["_class_name"] = ["pipeline", "EvilPipeline"]
    else:
        (folder / "unet" / "evil_unet.py").write_text(body + "class EvilUNet(diffusers.UNet2DConditionModel):\n    pass\n")
        index["unet"] = ["evil_unet", "EvilUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=str(folder)):
        load_pipeline(str(folder))
    assert not sentinel.exists()


def _files_under(*roots: Path):
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file():
                yield path


def test_credentials_from_the_environment_never_reach_written_files(tmp_path, monkeypatch, caplog, capsys,
                                                                    pushgateway):  # noqa: F811
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DDIL_PUSHGATEWAY_USERNAME", "ddil-user")  # the password above is then used for basic auth
    monkeypatch.setenv("DDIL_RUN_ID", "security-run")
    run = tmp_path / "runs"
    sets = ["--set", f"telemetry.pushgateway={pushgateway}"]

    def stage(*args):
        assert main([*args, "--config", "tiny", *sets]) == 0, capsys.readouterr().err

    with caplog.at_level(logging.DEBUG):
        stage("cache-latents", "--out", str(run / "latents"))
        stage("teacher-rollouts", "--latents", str(run / "latents"), "--out", str(run / "rollouts"))
        stage("distill", "--latents", str(run / "latents"), "--rollouts", str(run / "rollouts"),
              "--out", str(run / "distill"))
        stage("evaluate", "--student", str(run / "distill" / "student"), "--out", str(run / "eval"),
              "--set", "evaluation.extractor=pixels", "--set", "evaluation.num_reference=32",
              "--set", "evaluation.teacher_steps=4", "--set", "evaluation.num_prompts=2")
        stage("register", "--student", str(run / "distill" / "student"), "--metrics", str(run / "eval"),
              "--registry", str(tmp_path / "registry"))

    files = list(_files_under(tmp_path))
    assert len(files) > 30 and any(p.suffix == ".safetensors" for p in files)
    assert (tmp_path / "registry").is_dir()
    for path in files:
        data = path.read_bytes()
        for key, value in SECRETS.items():
            assert value.encode() not in data, f"{key} leaked into {path}"
            assert value.encode("utf-16-le") not in data, f"{key} leaked into {path} (utf-16)"
    written = capsys.readouterr()
    pushed = read_metrics(pushgateway)
    assert 'run_id="security-run"' in pushed  # pushed with basic auth from the environment
    for value in SECRETS.values():
        assert value not in caplog.text and value not in written.out and value not in written.err
        assert value not in pushed

"""Runs under real DVC on tiny models: a distill pushed to an S3 remote (the moto server of tests/mlops/test_dvc.py),
pulled into a fresh clone in another folder and resumed there to exactly the weights of the uninterrupted run; and
a queued sweep of two experiments (`dvc exp run --queue -S ...`, `dvc exp show`). The distill stage is dvc.yaml's
own (its cmd, outs, metrics and plots), with the tiny recipe's paths."""
import json

import torch
import yaml
from safetensors.torch import load_file

from ddil_core.config import load_config, resolved_dict
from ddil_core.stages.distill import distill
from tests import ROOT
from tests.mlops.test_dvc import _dvc, _dvc_env, _run, s3_server  # noqa: F401

TINY = ["model.teacher=tiny://sd15", "data.limit=32", "training.steps=4", "training.eval_every=2",
        "training.eval_num_noises=4", "training.keep_checkpoints=1", "rollouts.num_samples=8"]


def _project(repo, env, *overrides):
    """A git + DVC project: params.yaml (the tiny recipe), a data stage and dvc.yaml's distill stage."""
    repo.mkdir()
    config = load_config("tiny", [*TINY, *overrides])
    (repo / "params.yaml").write_text(yaml.safe_dump(resolved_dict(config), sort_keys=False))
    real = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["distill"]
    text = json.dumps(real).replace("runs/demo/latents", "latents").replace("runs/demo/rollouts", "rollouts")
    stage = json.loads(text.replace("runs/demo/distill", "run").replace(" --teacher demo/teacher", ""))
    stage["deps"] = ["latents", "rollouts"]
    data = {"cmd": "ddil cache-latents --config params.yaml --out latents && ddil teacher-rollouts --config "
                   "params.yaml --latents latents --out rollouts", "params": ["model", "data", "rollouts"],
            "outs": ["latents", "rollouts"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"data": data, "distill": stage}}, sort_keys=False))
    _run(["git", "init", "-q"], repo, env)
    _dvc("init", "-q", cwd=repo, env=env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "project"], repo, env)
    return config


def _unet(run):
    return load_file(str(run / "student" / "unet" / "diffusion_pytorch_model.safetensors"))


def _set_steps(repo, steps):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["training"]["steps"] = steps
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_push_pull_in_a_fresh_clone_resumes_to_the_uninterrupted_weights(tmp_path, s3_server):  # noqa: F811
    endpoint, client = s3_server
    env = _dvc_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                   PYTHONPATH=str(ROOT))
    here = tmp_path / "machine-a"
    config = _project(here, env)
    _dvc("remote", "add", "-d", "storage", "s3://ddil-dvc/cache", cwd=here, env=env)
    _dvc("remote", "modify", "storage", "endpointurl", endpoint, cwd=here, env=env)
    _dvc("repro", cwd=here, env=env, timeout=600)  # 4 steps, checkpoint at 4, replay buffer and best kept
    assert (here / "run" / "checkpoints" / "step-0000004").is_dir() and any((here / "run" / "buffer").iterdir())
    assert (here / "run" / "checkpoints" / "best").is_dir()
    _run(["git", "add", "-A"], here, env)
    _run(["git", "commit", "-qm", "a 4-step run"], here, env)
    _dvc("push", cwd=here, env=env)

    there = tmp_path / "machine-b"  # another folder, nothing but git and the remote
    _run(["git", "clone", "-q", str(here), str(there)], tmp_path, env)
    _dvc("pull", cwd=there, env=env)
    assert (there / "run" / "checkpoints" / "step-0000004" / "manifest.json").is_file()
    _set_steps(there, 6)  # train on: distill resumes from the pulled checkpoint
    _dvc("repro", cwd=there, env=env, timeout=600)
    log = [json.loads(line) for line in (there / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 7))  # 1-4 from machine A, 5-6 here

    config.training.steps = 6  # the uninterrupted 6-step run, in one go
    reference = _unet(distill(config, here / "latents", [here / "rollouts"], tmp_path / "straight").parent)
    resumed = _unet(there / "run")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)  # bit for bit


def test_a_queued_sweep_of_two_prior_settings_ranks_by_the_watched_metric(tmp_path):
    env = _dvc_env(PYTHONPATH=str(ROOT))
    repo = tmp_path / "project"
    _project(repo, env)
    grid = {"forward-only": (1.0, 0.0, 0.0), "ddil": (0.5, 0.25, 0.25)}
    for name, (f, t, s) in grid.items():
        _dvc("exp", "run", "--queue", "-n", name, "-S", f"ddil.priors.forward={f}", "-S", f"ddil.priors.teacher={t}",
             "-S", f"ddil.priors.student={s}", cwd=repo, env=env)
    _dvc("exp", "run", "--run-all", "-j", "1", cwd=repo, env=env, timeout=900)
    shown = json.loads(_dvc("exp", "show", "--json", cwd=repo, env=env))
    runs = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for revision in exp.get("revs") or []:
                if revision.get("name") in grid:
                    runs[revision["name"]] = revision["data"]
    assert set(runs) == set(grid)
    for name, (f, t, s) in grid.items():
        params = runs[name]["params"]["params.yaml"]["data"]["ddil"]["priors"]
        assert (params["forward"], params["teacher"], params["student"]) == (f, t, s)
        watch = runs[name]["metrics"]["metrics/watch.json"]["data"]
        assert watch["best_drift"] >= 0 and "best_kid" in watch, watch
    assert runs["forward-only"]["metrics"] != runs["ddil"]["metrics"]  # different priors, different students

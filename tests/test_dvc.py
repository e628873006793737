"""The DVC side: dvc.yaml and params.yaml agree with the Config schema, and a DVC project round-trips its outputs
through an S3 remote (a real moto server on 127.0.0.1): push, wipe cache and outputs, pull, byte-identical."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddil_core.config import Config, load_config, resolved_dict

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["prepare-demo", "cache-latents", "teacher-rollouts", "distill", "evaluate", "register"]


def _dvc_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_"))}
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


def _run(args, cwd, env, timeout=120):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _dvc(*args, cwd, env, timeout=120):
    return _run([sys.executable, "-m", "dvc", *args], cwd, env, timeout)


def _tree_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- the pipeline
def _key_exists(key: str) -> bool:
    node = resolved_dict(Config())
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_params_yaml_is_the_demo_recipe():
    params = load_config(str(ROOT / "params.yaml"))
    assert resolved_dict(params) == resolved_dict(load_config(str(ROOT / "configs" / "demo.yaml")))
    assert params.objective.name == "pd" and params.objective.student_steps == 4
    assert params.objective.pd.teacher_steps == 8 and params.rollouts.teacher_steps == 8
    assert params.ddil.priors.teacher > 0 and params.ddil.priors.student > 0  # DDIL, not the PD baseline
    assert params.objective.guidance_scale == params.demo.guidance_scale  # the measured teacher guidance
    assert any(g is not None for g in vars(params.registry.gates).values()), "registry.gates: no gate is set"
    load_config(str(ROOT / "params.yaml"), ["objective.student_steps=2"])  # what `dvc exp run -S` would try


def test_dvc_yaml_stages_call_the_cli_with_params_yaml():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = spec["stages"]
    assert list(stages) == STAGES
    for name, stage in stages.items():
        cmd = " ".join(stage["cmd"]) if isinstance(stage["cmd"], list) else stage["cmd"]
        assert cmd.startswith(f"ddil {name} --config params.yaml"), name
        for key in stage.get("params", []):
            assert isinstance(key, str) and _key_exists(key), f"{name}: params key '{key}' is not in the schema"
    assert "objective" in stages["distill"]["params"]  # so `dvc exp run -S objective.student_steps=2` reruns it
    metrics = [next(iter(m)) if isinstance(m, dict) else m for m in stages["evaluate"]["metrics"]]
    assert metrics and all(m.endswith(".json") for m in metrics)
    assert stages["distill"]["plots"]


def test_metrics_and_plots_are_tracked_by_git():
    """`dvc metrics diff` and `dvc exp show` compare only files git tracks: none may sit in demo/ or runs/."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    files = [next(iter(m)) if isinstance(m, dict) else m
             for stage in spec["stages"].values() for m in stage.get("metrics", []) + stage.get("plots", [])]
    assert len(files) == 3
    for path in files:
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0
        assert not ignored, f"{path} is git-ignored"


def test_dvc_sees_a_valid_pipeline():
    out = _dvc("stage", "list", cwd=ROOT, env=_dvc_env())
    assert [line.split()[0] for line in out.splitlines() if line.strip()] == STAGES


# ---------------------------------------------------------------------------------------------------- S3 remote
@pytest.fixture
def s3_server():
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket="ddil-dvc")
    yield endpoint, client
    server.stop()


def test_push_and_pull_through_an_s3_remote(tmp_path, s3_server):
    endpoint, client = s3_server
    env = _dvc_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copytree(ROOT / "configs", repo / "configs")
    _run(["git", "init", "-q"], repo, env)
    _dvc("init", "-q", cwd=repo, env=env)
    # A small real stage: the tiny recipe's latent shards (safetensors + manifest), made by the ddil CLI.
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"cache-latents": {
        "cmd": "ddil cache-latents --config configs/tiny.yaml --set data.limit=48 --out latents",
        "deps": ["configs/tiny.yaml"], "outs": ["latents"]}}}))
    _dvc("repro", cwd=repo, env=env, timeout=180)
    before = _tree_hashes(repo / "latents")
    assert any(name.endswith(".safetensors") for name in before) and "manifest.json" in before

    _dvc("remote", "add", "-d", "storage", "s3://ddil-dvc/cache", cwd=repo, env=env)
    _dvc("remote", "modify", "storage", "endpointurl", endpoint, cwd=repo, env=env)
    assert "testing" not in (repo / ".dvc" / "config").read_text()  # credentials stay in the environment
    _dvc("push", cwd=repo, env=env)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="ddil-dvc").get("Contents", [])]
    assert len(keys) >= len(before)  # every file plus the .dir listing

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "latents")
    _dvc("pull", cwd=repo, env=env)
    assert _tree_hashes(repo / "latents") == before
    assert "up to date" in _dvc("status", cwd=repo, env=env).lower()

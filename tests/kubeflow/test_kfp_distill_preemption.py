"""A preempted KFP distill task loses nothing: the component (components/stages.py distill, run as its own process
like a pod) is killed mid-run, its retry with the same run id resumes from the durable checkpoint and ends with the
weights of an uninterrupted run.

Durable storage both ways the pipeline offers: a folder (the ddil-data PVC in the cluster; a temporary folder here,
which outlives the killed process as the volume outlives the pod) with SIGKILL (OOM kill, node loss: no chance to
write a last checkpoint), and an s3:// prefix on a real S3 server (moto, tests/fakes/s3_server.py) with SIGTERM
(preemption: Kubernetes' signal, then the grace period; a last checkpoint is written and mirrored).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import ROOT
from tests.fakes.s3_server import s3_server  # noqa: F401

OVERRIDES = ["model.teacher=tiny://sd15", "training.steps=40", "training.checkpoint_every=4"]
RUN = "2f8e6d4c-1b3a-4c5d-9e7f-0a1b2c3d4e5f"  # a KFP run id (dsl.PIPELINE_JOB_ID_PLACEHOLDER)

SCRIPT = """
import json, sys
from types import SimpleNamespace as A
from components import distill
a = json.loads(sys.argv[1])
distill.python_func(recipe="tiny", overrides=a["overrides"], run_id=a["run_id"], latents=A(path=a["latents"]),
                    rollouts=[A(path=a["rollouts"])], student=A(path=a["student"], metadata={}),
                    training_log=A(path=a["log"], metadata={}), watch=A(log_metric=lambda *_: None),
                    checkpoint_root=a["root"])
"""


def _start(tmp_path: Path, name: str, run_id: str, root: str, data) -> tuple[subprocess.Popen, Path]:
    """The distill component in its own process, as KFP runs it in a pod."""
    latents, rollouts = data
    out = tmp_path / name
    args = {"overrides": OVERRIDES, "run_id": run_id, "latents": str(latents), "rollouts": str(rollouts),
            "student": str(out / "student"), "log": str(out / "training_log"), "root": root}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(args)], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    return proc, out


def _finish(proc: subprocess.Popen, tmp_path: Path, name: str, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    text = (tmp_path / f"{name}.log").read_text()
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{text[-4000:]}"
    return text


def _weights(out: Path) -> dict:
    return load_file(str(out / "student" / "unet" / "diffusion_pytorch_model.safetensors"))


def _kill_after_a_checkpoint(proc: subprocess.Popen, checkpoints, sig: int, timeout: float = 600) -> list[str]:
    """Send `sig` once the durable store holds a checkpoint (before training ends); returns what it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = checkpoints()
        if found:
            proc.send_signal(sig)
            proc.wait(timeout=120)
            return found
        assert proc.poll() is None, "distill ended before any checkpoint reached durable storage"
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint reached durable storage in time")


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """An uninterrupted run (another run id): the weights a resumed run must reach."""
    tmp = tmp_path_factory.mktemp("reference")
    proc, out = _start(tmp, "reference", "reference-run", str(tmp / "durable"), tiny_data["sd15"])
    _finish(proc, tmp, "reference")
    assert not (tmp / "durable" / "reference-run").exists(), "the run's checkpoints are removed after success"
    return _weights(out)


def _assert_same_weights(resumed: dict, reference: dict) -> None:
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6, rtol=0), key


def _steps_logged(out: Path) -> list[int]:
    lines = (out / "training_log" / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.mark.slow
def test_sigkilled_distill_resumes_from_the_volume_to_the_uninterrupted_weights(tiny_data, tmp_path, reference):
    root = tmp_path / "ddil-data" / "ddil-runs"  # checkpoint_root: a path on the ddil-data volume
    work = root / RUN / "distill"

    def checkpoints():
        return sorted(p.name for p in (work / "checkpoints").glob("step-*") if (p / "manifest.json").exists())

    proc, _ = _start(tmp_path, "attempt-1", RUN, str(root), tiny_data["sd15"])
    held = _kill_after_a_checkpoint(proc, checkpoints, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert held and not (work / "student").exists(), "killed mid-run"
    assert (root / RUN / ".distill.lock").exists(), "a SIGKILL leaves the attempt's lock behind"

    proc, out = _start(tmp_path, "attempt-2", RUN, str(root), tiny_data["sd15"])  # KFP's retry: same run id
    text = _finish(proc, tmp_path, "attempt-2")
    resumed_at = int(text.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed_at >= int(held[-1].split("-")[1]) > 0, text[-2000:]
    _assert_same_weights(_weights(out), reference)
    assert _steps_logged(out) == list(range(1, 41))  # one log, no step twice
    assert not (root / RUN).exists(), "the checkpoints are removed once the student is out"


@pytest.mark.slow
def test_sigtermed_distill_resumes_from_s3_to_the_uninterrupted_weights(tiny_data, tmp_path, reference,
                                                                         s3_server):  # noqa: F811
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="ddil-checkpoints")
    prefix = f"ddil-runs/{RUN}/distill/checkpoints/"

    def checkpoints():
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ddil-checkpoints", Prefix=prefix).get("Contents", [])]
        return sorted({k[len(prefix):].split("/")[0] for k in keys if k.endswith("/manifest.json")
                       and k.count("/") == prefix.count("/") + 1})

    root = "s3://ddil-checkpoints/ddil-runs"
    proc, _ = _start(tmp_path, "attempt-1", RUN, root, tiny_data["sd15"])
    _kill_after_a_checkpoint(proc, checkpoints, signal.SIGTERM)
    assert proc.returncode != 0
    text = (tmp_path / "attempt-1.log").read_text()
    assert "checkpoint written, rerun to resume" in text, text[-2000:]
    stopped_at = int(text.split("stopped by signal 15 at step ")[1].split(";")[0])
    mirrored = checkpoints()
    assert f"step-{stopped_at:07d}" in mirrored, (stopped_at, mirrored)  # the SIGTERM checkpoint reached S3
    assert len(mirrored) <= 2  # training.keep_checkpoints: retired ones are deleted from the mirror too

    proc, out = _start(tmp_path, "attempt-2", RUN, root, tiny_data["sd15"])  # a new pod: nothing on its disk
    text = _finish(proc, tmp_path, "attempt-2")
    assert f"at step {stopped_at}" in text.split("resumed from ")[1], text[-2000:]
    _assert_same_weights(_weights(out), reference)
    assert _steps_logged(out) == list(range(1, 41))
    assert s3.list_objects_v2(Bucket="ddil-checkpoints", Prefix=f"ddil-runs/{RUN}/").get("KeyCount") == 0


def test_the_s3_mirror_holds_complete_checkpoints_only(tmp_path, s3_server):  # noqa: F811
    """push uploads a checkpoint's manifest last and deletes retired ones; pull takes only checkpoints whose
    manifest is on the mirror (a push cut short by a kill leaves none) and verifies nothing half-downloaded stays."""
    import boto3

    from ddil_core.training import durable
    from ddil_core.training.checkpoint import latest_checkpoint, save_checkpoint, verify_checkpoint

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="mirror")
    prefix = "s3://mirror/runs/r1/distill"
    out = tmp_path / "pod-1"
    weights = {"model_student": {"w": torch.arange(6.0)}}
    for step in (2, 4, 6):  # keep=2: step 2 is retired locally when 6 is written
        save_checkpoint(out / "checkpoints", step, weights, {"step": step}, {}, keep=2)
        (out / "train_log.jsonl").write_text("".join(f'{{"step": {i}}}\n' for i in range(1, step + 1)))
        durable.push(out, prefix)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="mirror")["Contents"])
    assert not any("/step-0000002/" in k for k in keys), "a retired checkpoint is deleted from the mirror"
    assert "runs/r1/distill/checkpoints/step-0000006/manifest.json" in keys

    # a kill while pushing step 8: its files but no manifest reached S3
    s3.put_object(Bucket="mirror", Key="runs/r1/distill/checkpoints/step-0000008/state.json", Body=b"{}")
    fresh = tmp_path / "pod-2"  # the retry, on a node with an empty disk
    assert durable.pull(prefix, fresh) == ["step-0000004", "step-0000006"]
    assert latest_checkpoint(fresh / "checkpoints").name == "step-0000006"
    verify_checkpoint(fresh / "checkpoints" / "step-0000006")  # every file's sha256 as written
    assert (fresh / "train_log.jsonl").read_text().count("\n") == 6
    assert not [p for p in (fresh / "checkpoints").iterdir() if p.name.startswith(".")], "no staging left"
    assert durable.pull(prefix, fresh) == []  # nothing new
    durable.remove(prefix)
    assert s3.list_objects_v2(Bucket="mirror").get("KeyCount") == 0

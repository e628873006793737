"""Fault injection: preemption (SIGTERM) and hard kills (SIGKILL) at random points, and flipped bytes in every kind of
artifact. A real signal to a real `ddil` process is the point of the subprocess tests; everything else runs in-process.

What must hold (docs/architecture.md, "Failure and bad input"):
- SIGTERM during distill: exit 143 with a checkpoint; the rerun reaches the uninterrupted run's weights.
- SIGKILL during distill: no checkpoint is ever corrupt, the rerun loses at most one checkpoint interval and reaches
  the uninterrupted run's weights (resume is deterministic).
- SIGTERM during cache-latents / teacher-rollouts: no visible partial output (the complete folder or none, no staging
  folder of a dead process), and the rerun resumes from the verified shards, to the same output.
- A flipped byte in a latent shard, a rollout shard or a checkpoint file is detected and the error names the file.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddil_core.cli import EXIT_BAD_INPUT, EXIT_PREEMPTED, main
from ddil_core.data.shards import ShardError, load_shards, partial_dir, sha256_file
from ddil_core.stages.distill import distill
from ddil_core.training.checkpoint import CheckpointError, checkpoint_dirs, verify_checkpoint
from tests import ROOT
from tests.conftest import tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
STEPS, EVERY = 8, 2
SEEDS = [int(x) for x in os.environ.get("DDIL_FAULT_SEEDS", "0,1").split(",")]  # more: DDIL_FAULT_SEEDS=0,1,2,3
DISTILL_SETS = (f"training.steps={STEPS}", f"training.checkpoint_every={EVERY}")


def _unet(run: Path) -> dict:
    return load_file(str(run / "student" / "unet" / "diffusion_pytorch_model.safetensors"))


def _assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6, rtol=0), key


def _log_steps(run: Path) -> list[int]:
    path = run / "train_log.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written right now
            pass
    return steps


def _leftovers(folder: Path) -> list[str]:
    """Staging folders of dead writers, half-retired checkpoints: nothing of the sort may stay after a rerun."""
    return [str(p) for p in Path(folder).rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "ddil_core.cli", *args], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)


def _distill_args(latents, rollouts, out) -> list[str]:
    args = ["distill", "--config", "tiny", "--latents", str(latents), "--rollouts", str(rollouts), "--out", str(out)]
    for item in DISTILL_SETS:
        args += ["--set", item]
    return args


CACHE_SETS = ("data.limit=null", "data.shard_size=32", "data.batch_size=16")


def _cache_config():
    return tiny_config("sd15", *CACHE_SETS)


class Job:
    """A `ddil` process that gets `sig` `delay` seconds after `trigger()` first holds."""

    def __init__(self, name, args, folder: Path, trigger, sig, delay=0.0, **info):
        folder.mkdir(parents=True)
        self.name, self.folder, self.trigger, self.sig, self.delay, self.info = name, folder, trigger, sig, delay, info
        self.log = folder / "stderr.txt"
        self.proc = _spawn(args, self.log)
        self.fire_at = None
        self.signalled = False
        self.rc = None

    def poll(self, now: float) -> bool:
        """One look; True once the process has ended."""
        if self.proc.poll() is not None:
            self.rc = self.proc.returncode
            return True
        if self.fire_at is None and self.trigger():
            self.fire_at = now + self.delay
        if self.fire_at is not None and now >= self.fire_at and not self.signalled:
            self.proc.send_signal(self.sig)
            self.signalled = True
        return False

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def _watch(jobs: list[Job], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(jobs)
    while pending and time.monotonic() < deadline:
        now = time.monotonic()
        pending = [job for job in pending if not job.poll(now)]
        time.sleep(0.01)
    for job in pending:
        job.proc.kill()
        job.proc.wait()


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Every subprocess of this module at once (two cores; each child runs one thread), watched by a thread that sends
    the signals, while this process computes the uninterrupted references:

    - distill, SIGTERM once the train log shows step >= k (random k per seed);
    - distill, SIGKILL a random delay after step >= k (it may land inside a checkpoint write);
    - cache-latents, SIGTERM a random delay after its first complete shard.
    """
    import threading

    from ddil_core.stages.cache_latents import cache_latents

    latents, rollouts = tiny_data["sd15"]
    root = tmp_path_factory.mktemp("faults")
    jobs = {}

    def past_step(run, k):
        return lambda: max(_log_steps(run), default=0) >= k

    for seed in SEEDS:
        rng = random.Random(seed)
        k = rng.randint(1, STEPS - 3)  # leave room: the signal must land while training
        run = root / f"term-{seed}" / "run"
        jobs[f"term-{seed}"] = Job(f"term-{seed}", _distill_args(latents, rollouts, run), run.parent,
                                   past_step(run, k), signal.SIGTERM, run=run, k=k)
        k, delay = rng.randint(1, STEPS - 2), rng.uniform(0.0, 0.3)
        run = root / f"kill-{seed}" / "run"
        jobs[f"kill-{seed}"] = Job(f"kill-{seed}", _distill_args(latents, rollouts, run), run.parent,
                                   past_step(run, k), signal.SIGKILL, delay, run=run, k=k)
    out = root / "cache" / "latents"
    args = ["cache-latents", "--config", "tiny", "--out", str(out)]
    for item in CACHE_SETS:
        args += ["--set", item]
    jobs["cache"] = Job("cache", args, out.parent, lambda: (partial_dir(out) / "partial.json").exists(),
                        signal.SIGTERM, random.Random(7).uniform(0.0, 0.3), run=out)
    watcher = threading.Thread(target=_watch, args=(list(jobs.values()),), daemon=True)
    watcher.start()

    reference = root / "reference"
    distill(tiny_config("sd15", *DISTILL_SETS), latents, [rollouts], reference)
    cache_reference = root / "cache-reference" / "latents"
    cache_latents(_cache_config(), cache_reference)
    watcher.join()
    return {"jobs": jobs, "reference": (reference, _unet(reference)), "cache_reference": cache_reference}


# ------------------------------------------------------------------------------------------------ distill


@pytest.mark.parametrize("seed", SEEDS)
def test_sigterm_at_a_random_step_then_rerun_reaches_the_uninterrupted_weights(tiny_data, runs, seed):
    latents, rollouts = tiny_data["sd15"]
    job = runs["jobs"][f"term-{seed}"]
    run, k = job.info["run"], job.info["k"]
    assert job.signalled and job.rc == EXIT_PREEMPTED, job.stderr[-3000:]
    err = job.stderr
    assert "stopped by signal 15 at step" in err
    stopped = int(err.split("stopped by signal 15 at step ")[1].split(";")[0])
    assert stopped >= k
    assert not (run / "student").exists()
    ckpts = checkpoint_dirs(run / "checkpoints")
    assert ckpts[-1].name == f"step-{stopped:07d}"  # written on SIGTERM, off the interval too
    for ckpt in ckpts:
        verify_checkpoint(ckpt)
    assert not (run.parent / f".{run.name}.lock").exists()  # the writer lock was released
    assert not _leftovers(run)

    assert main(_distill_args(latents, rollouts, run)) == 0
    _assert_same_weights(_unet(run), runs["reference"][1])
    assert _log_steps(run) == list(range(1, STEPS + 1))
    assert not _leftovers(run)


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_at_a_random_time_loses_at_most_one_checkpoint_interval(tiny_data, runs, caplog, seed):
    latents, rollouts = tiny_data["sd15"]
    job = runs["jobs"][f"kill-{seed}"]
    run = job.info["run"]
    assert job.rc in (-signal.SIGKILL, 0), job.stderr[-3000:]  # 0: it finished before the kill landed
    killed_at = max(_log_steps(run), default=0)  # steps that surely completed before the kill
    for ckpt in checkpoint_dirs(run / "checkpoints"):  # every checkpoint that looks complete is complete
        verify_checkpoint(ckpt)

    with caplog.at_level(logging.INFO, logger="ddil_core.training.loop"):
        assert main(_distill_args(latents, rollouts, run)) == 0
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed from")]
    resume_step = int(resumed[0].rsplit("at step ", 1)[1]) if resumed else 0
    assert resume_step >= killed_at - EVERY, (resume_step, killed_at)
    _assert_same_weights(_unet(run), runs["reference"][1])
    assert _log_steps(run) == list(range(1, STEPS + 1))
    for ckpt in checkpoint_dirs(run / "checkpoints"):
        verify_checkpoint(ckpt)
    assert not _leftovers(run)


def test_a_run_killed_before_its_first_checkpoint_restarts_with_a_clean_log(tiny_data, tmp_path):
    latents, rollouts = tiny_data["sd15"]
    config = tiny_config("sd15", *DISTILL_SETS)

    def die_at_step_1(record):  # what a SIGKILL after step 1's log line and before the step-2 checkpoint leaves
        if record["step"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(config, latents, [rollouts], tmp_path / "run", on_log=die_at_step_1)
    assert _log_steps(tmp_path / "run") == [1] and not checkpoint_dirs(tmp_path / "run" / "checkpoints")
    distill(config, latents, [rollouts], tmp_path / "run")
    assert _log_steps(tmp_path / "run") == list(range(1, STEPS + 1))


def test_flipped_byte_in_a_checkpoint_file_is_named(tiny_data, runs, tmp_path, capsys):
    latents, rollouts = tiny_data["sd15"]
    run = tmp_path / "run"
    shutil.copytree(runs["reference"][0], run)
    shutil.rmtree(run / "student")  # so the rerun resumes from the newest checkpoint
    newest = checkpoint_dirs(run / "checkpoints")[-1]
    target = newest / "model_student.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model_student.safetensors: sha256 does not match"):
        verify_checkpoint(newest)
    assert main(_distill_args(latents, rollouts, run)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{target}: sha256 does not match the checkpoint manifest" in err
    assert not (run / "student").exists()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_latent_shard_is_named(tiny_data, tmp_path, capsys):
    latents, rollouts = tiny_data["sd15"]
    broken = tmp_path / "latents"
    shutil.copytree(latents, broken)
    _flip(broken / "shard-00000.safetensors")
    with pytest.raises(ShardError, match="shard-00000.safetensors: sha256 does not match"):
        load_shards(broken, "latents")
    args = ["distill", "--config", "tiny", "--latents", str(broken), "--rollouts", str(rollouts),
            "--out", str(tmp_path / "run")]
    assert main(args) == EXIT_BAD_INPUT
    assert f"{broken / 'shard-00000.safetensors'}: sha256 does not match the manifest" in capsys.readouterr().err


def test_flipped_byte_in_a_rollout_shard_is_named(tiny_data, tmp_path, capsys):
    latents, rollouts = tiny_data["sd15"]
    broken = tmp_path / "rollouts"
    shutil.copytree(rollouts, broken)
    _flip(broken / "shard-00001.safetensors")
    args = ["distill", "--config", "tiny", "--latents", str(latents), "--rollouts", str(broken),
            "--out", str(tmp_path / "run")]
    assert main(args) == EXIT_BAD_INPUT
    assert f"{broken / 'shard-00001.safetensors'}: sha256 does not match the manifest" in capsys.readouterr().err
    assert not (tmp_path / "run" / "student").exists()


# ------------------------------------------------------------------------------------ cache-latents, rollouts

def _same_cache(got: Path, want: Path) -> None:
    a, b = json.loads((got / "manifest.json").read_text()), json.loads((want / "manifest.json").read_text())
    assert a["shards"] == b["shards"] and a["count"] == b["count"]  # file names, counts, sha256
    assert a["latent_bounds"] == b["latent_bounds"]
    for name in ("captions.json", "keys.json", "uncond.safetensors"):
        assert sha256_file(got / name) == sha256_file(want / name), name
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())


def test_sigterm_during_cache_latents_leaves_nothing_visible_and_the_rerun_resumes(runs, caplog):
    from ddil_core.stages.cache_latents import cache_latents

    job = runs["jobs"]["cache"]
    out, err = job.info["run"], job.stderr
    staging = partial_dir(out)
    assert job.rc in (EXIT_PREEMPTED, 0), err[-3000:]
    assert not [p for p in out.parent.rglob("*") if ".tmp-" in p.name]  # no staging folder of a dead process
    assert not (out.parent / ".latents.lock").exists()
    if job.rc == 0:  # it finished before the signal landed: the complete folder, nothing else
        _same_cache(out, runs["cache_reference"])
        assert not staging.exists()
        return
    assert job.signalled and "stopped by signal 15" in err and "rerun to resume" in err
    assert not out.exists()  # no half-written output under the final name; only the hidden staging folder
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == ["stderr.txt"]
    recorded = json.loads((staging / "partial.json").read_text())["shards"]
    assert recorded

    with caplog.at_level(logging.INFO, logger="ddil_core.stages.cache_latents"):
        cache_latents(_cache_config(), out)
    assert f"resuming: {len(recorded)} shards of an interrupted run" in caplog.text
    assert f"reused {len(recorded)} shards" in caplog.text
    _same_cache(out, runs["cache_reference"])
    assert not staging.exists()


def _interrupt_after_records(monkeypatch, n: int, signum: int = signal.SIGTERM):
    """Send `signum` (SIGTERM: as a preempted pod receives it) to this process right after the n-th shard is
    recorded."""
    from ddil_core.data import shards

    real = shards.ResumableStaging.record
    calls = {"n": 0}

    def record(self, *args, **kwargs):
        real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(shards.ResumableStaging, "record", record)


def _count_encodes(monkeypatch, module, name):
    real = getattr(module, name)
    counter = {"n": 0}

    def counted(*args, **kwargs):
        counter["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return counter


def test_teacher_rollouts_resume_from_verified_shards(tiny_data, tmp_path, monkeypatch, capsys):
    from ddil_core.stages import teacher_rollouts as stage

    latents, reference = tiny_data["sd15"]
    out = tmp_path / "rollouts"
    with monkeypatch.context() as m:
        _interrupt_after_records(m, 1)
        code = main(["teacher-rollouts", "--config", "tiny", "--latents", str(latents), "--out", str(out)])
    assert code == EXIT_PREEMPTED
    assert "stopped by signal 15" in capsys.readouterr().err
    assert not out.exists() and partial_dir(out).is_dir()
    samples = _count_encodes(monkeypatch, stage, "ddim_sample")
    stage.teacher_rollouts(tiny_config("sd15"), latents, out)
    assert samples["n"] == 1  # shard 0 (one batch) was reused, shard 1 computed
    assert json.loads((out / "manifest.json").read_text()) == json.loads((reference / "manifest.json").read_text())
    assert not partial_dir(out).exists()


def test_a_damaged_recorded_shard_is_rebuilt_on_resume(tiny_data, tmp_path, monkeypatch):
    from ddil_core.stages import teacher_rollouts as stage
    from ddil_core.training.loop import Preempted

    latents, reference = tiny_data["sd15"]
    out = tmp_path / "rollouts"
    with monkeypatch.context() as m:
        _interrupt_after_records(m, 1)
        with pytest.raises(Preempted):
            stage.teacher_rollouts(tiny_config("sd15"), latents, out)
    _flip(partial_dir(out) / "shard-00000.safetensors")
    samples = _count_encodes(monkeypatch, stage, "ddim_sample")
    stage.teacher_rollouts(tiny_config("sd15"), latents, out)
    assert samples["n"] == 2  # the damaged shard was not trusted
    assert json.loads((out / "manifest.json").read_text()) == json.loads((reference / "manifest.json").read_text())


def _image_folder(root: Path, n: int) -> Path:
    from PIL import Image

    root.mkdir()
    lines = []
    for i in range(n):
        Image.new("RGB", (16, 16), (10 * i, 200 - 10 * i, 7 * i)).save(root / f"img{i:02d}.png")
        lines.append(json.dumps({"file": f"img{i:02d}.png", "caption": f"a handwritten digit {i % 10}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_cache_latents_resume_reuses_only_shards_whose_samples_are_unchanged(tmp_path, monkeypatch, caplog):
    from ddil_core.stages import cache_latents as stage

    data = _image_folder(tmp_path / "data", 12)
    config = tiny_config("sd15", f"data.dataset={data}", "data.limit=null", "data.shard_size=4",
                         "data.batch_size=2")
    out = tmp_path / "latents"
    with monkeypatch.context() as m:
        _interrupt_after_records(m, 2)
        assert main(["cache-latents", "--config", "tiny", "--dataset", str(data), "--out", str(out),
                     "--set", "data.limit=null", "--set", "data.shard_size=4", "--set", "data.batch_size=2"]) == 143
    staging = partial_dir(out)
    assert not out.exists() and len(json.loads((staging / "partial.json").read_text())["shards"]) == 2
    # what a SIGKILL in the middle of the next shard would leave: a torn unrecorded shard, a torn record
    (staging / "shard-00002.safetensors").write_bytes(b"torn")
    (staging / ".partial.json.tmp-99999").write_text("{")

    # a caption of the second recorded shard changes before the rerun: shard 0 is kept, shard 1 on are rebuilt
    lines = (data / "captions.jsonl").read_text().splitlines()
    lines[5] = json.dumps({"file": "img05.png", "caption": "a handwritten digit nine, edited"})
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    encodes = _count_encodes(monkeypatch, stage, "encode_images")
    with caplog.at_level(logging.INFO, logger="ddil_core.stages.cache_latents"):
        stage.cache_latents(config, out)
    assert "samples of recorded shard 1 changed" in caplog.text and "reused 1 shards" in caplog.text
    assert encodes["n"] == 4  # shards 1 and 2, two batches each
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    stage.cache_latents(config, fresh)
    _same_cache(out, fresh)  # same shards, same files: nothing of the interrupted run is left over
    assert json.loads((out / "captions.json").read_text())[5] == "a handwritten digit nine, edited"
    assert not staging.exists()

"""A signal is a signal in every stage: SIGTERM at a point of evaluate, register or diagnose ends in exit 143 and
SIGINT in 130 (cache-latents, distill, diagnose), with one line (never bad input, never a silently missing metric),
nothing half-written visible, and a rerun completes to the uninterrupted result. The signal is sent by the process to
itself from inside the stage (deterministic points), through the stage's own stop flag or the CLI's handler."""
from __future__ import annotations

import json
import os
import signal

import pytest

from ddil_core.cli import EXIT_PREEMPTED
from tests.fakes.cli_checks import assert_fails, leftovers, run


def _sigterm_once(monkeypatch, module, name):
    """Wrap module.name so that its first call sends SIGTERM to this process, then runs as usual."""
    original = getattr(module, name)
    sent = []

    def wrapped(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return sent


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from ddil_core.models.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("sig") / "student"
    build_tiny_pipeline("sd15").save_pretrained(str(folder), safe_serialization=True)
    (folder / "ddil_student.json").write_text(json.dumps({"num_inference_steps": 2, "guidance_scale": 1.0}))
    return folder


EVAL_SETS = ["--set", "evaluation.extractor=pixels", "--set", "evaluation.num_reference=16",
             "--set", "evaluation.teacher_steps=2", "--set", "evaluation.num_prompts=2",
             "--set", "evaluation.student_steps=[]"]


def test_sigterm_while_evaluate_reads_its_reference_is_143_and_the_rerun_completes(student, tmp_path, capsys,
                                                                                    monkeypatch):
    import ddil_core.stages.evaluate.inputs as inputs

    out = tmp_path / "eval"
    args = ["evaluate", "--config", "tiny", "--student", student, "--teacher", "tiny://sd15", "--out", out,
            *EVAL_SETS]
    with monkeypatch.context() as patch:  # inside the dataset reader's except-Exception: once bad input (exit 2)
        _sigterm_once(patch, inputs, "image_to_tensor")
        code, err = run(capsys, *args)
    assert_fails(code, err, "signal 15", exit_code=EXIT_PREEMPTED)
    assert not (out / "metrics.json").exists() and not leftovers(out)
    code, err = run(capsys, *args)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["models"]["student"]["fid"] is not None


def test_sigterm_while_register_copies_the_student_is_143_and_the_rerun_registers_v1(student, tmp_path, capsys,
                                                                                     monkeypatch):
    from ddil_core.data.shards import folder_digest
    from ddil_core.registry import local

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"protocol": {"model_digests": {"student": folder_digest(student)}},
                                   "models": {"student": {"fid": 1.0, "coverage": 1.0, "adherence": 1.0},
                                              "teacher": {"fid": 1.0}}}))
    registry = tmp_path / "registry"
    args = ["register", "--config", "tiny", "--student", student, "--metrics", metrics, "--registry", registry,
            "--set", "registry.gates.fid_factor=null", "--set", "registry.gates.min_coverage=null",
            "--set", "registry.gates.min_adherence=null"]
    with monkeypatch.context() as patch:
        _sigterm_once(patch, local.shutil, "copytree")
        code, err = run(capsys, *args)
    assert_fails(code, err, "signal 15", exit_code=EXIT_PREEMPTED)
    assert not (registry / "index.json").exists() or not json.loads((registry / "index.json").read_text())["models"]
    assert not [p for p in registry.rglob("*") if ".tmp-" in p.name]
    code, err = run(capsys, *args)
    assert code == 0, err
    index = json.loads((registry / "index.json").read_text())
    assert [e["version"] for e in index["models"][next(iter(index["models"]))]] == [1]


def test_a_metric_that_is_not_a_number_is_bad_input_not_a_gate(student, tmp_path, capsys):
    from ddil_core.data.shards import folder_digest

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"protocol": {"model_digests": {"student": folder_digest(student)}},
                                   "models": {"student": {"fid": "abc", "coverage": 1.0, "adherence": 1.0},
                                              "teacher": {"fid": 1.0}}}))
    code, err = run(capsys, "register", "--config", "tiny", "--student", student, "--metrics", metrics,
                    "--registry", tmp_path / "registry")
    assert_fails(code, err, str(metrics), "models.student.fid", "'abc'")
    assert not (tmp_path / "registry" / "index.json").exists()


def test_a_full_disk_while_register_copies_is_one_line_naming_the_version_folder(student, tmp_path, capsys,
                                                                                  monkeypatch):
    import errno
    import shutil

    from ddil_core.data.shards import folder_digest
    from ddil_core.registry import local

    def full_copytree(src, dst, **kwargs):
        os.makedirs(dst)
        raise shutil.Error([(f"{src}/unet/w{i}", f"{dst}/unet/w{i}",
                             str(OSError(errno.ENOSPC, "No space left on device", f"{dst}/unet/w{i}")))
                            for i in range(30)])

    monkeypatch.setattr(local.shutil, "copytree", full_copytree)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"protocol": {"model_digests": {"student": folder_digest(student)}},
                                   "models": {"student": {"fid": 1.0, "coverage": 1.0, "adherence": 1.0},
                                              "teacher": {"fid": 1.0}}}))
    registry = tmp_path / "registry"
    code, err = run(capsys, "register", "--config", "tiny", "--student", student, "--metrics", metrics,
                    "--registry", registry, "--set", "registry.gates.fid_factor=null",
                    "--set", "registry.gates.min_coverage=null", "--set", "registry.gates.min_adherence=null")
    line = assert_fails(code, err, "No space left on device", "30 files not copied")
    assert ".tmp-" not in line and len(line) < 400, line
    assert not [p for p in registry.rglob("*") if ".tmp-" in p.name]


# -------------------------------------------------------------- SIGINT is 130, SIGTERM 143, in the loops and outside
# cache-latents and teacher-rollouts (their own stop flag) and distill (its training loop) under SIGTERM:
# tests/stages/test_faults.py. Here SIGINT in a loop stage and both signals in a stage that only the CLI's handler
# stops.

def test_sigint_during_cache_latents_is_130_and_the_rerun_equals_an_uninterrupted_cache(tmp_path, capsys,
                                                                                       monkeypatch):
    from ddil_core.cli import EXIT_INTERRUPTED
    from ddil_core.data.shards import partial_dir
    from tests.stages.test_faults import _image_folder, _interrupt_after_records, _same_cache

    data = _image_folder(tmp_path / "data", 8)
    args = ["cache-latents", "--config", "tiny", "--dataset", data, "--set", "data.limit=null",
            "--set", "data.shard_size=4", "--set", "data.batch_size=2"]
    out = tmp_path / "latents"
    with monkeypatch.context() as patch:
        _interrupt_after_records(patch, 1, signal.SIGINT)
        code, err = run(capsys, *args, "--out", out)
    assert_fails(code, err, "stopped by signal 2", "rerun to resume", exit_code=EXIT_INTERRUPTED)
    assert not out.exists() and partial_dir(out).is_dir()  # only the hidden staging folder, to resume from
    assert run(capsys, *args, "--out", out)[0] == 0
    assert run(capsys, *args, "--out", tmp_path / "uninterrupted")[0] == 0
    _same_cache(out, tmp_path / "uninterrupted")
    assert not partial_dir(out).exists() and not leftovers(out)


def test_sigint_during_distill_is_130_with_a_checkpoint_and_the_rerun_reaches_the_uninterrupted_weights(
        tiny_data, tmp_path, capsys, monkeypatch):
    from ddil_core.cli import EXIT_INTERRUPTED
    from ddil_core.training.loop import Trainer
    from tests.stages.test_faults import _assert_same_weights, _unet

    latents, rollouts = tiny_data["sd15"]
    args = ["distill", "--config", "tiny", "--latents", latents, "--rollouts", rollouts,
            "--set", "training.steps=4", "--set", "training.checkpoint_every=2"]
    out = tmp_path / "run"
    real, steps = Trainer.train_step, []

    def interrupted(self):
        real(self)
        steps.append(self.step)
        if len(steps) == 3:  # during the third update, off the checkpoint interval
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", interrupted)
        code, err = run(capsys, *args, "--out", out)
    assert_fails(code, err, "stopped by signal 2 at step 3", "checkpoint written", exit_code=EXIT_INTERRUPTED)
    assert not (out / "student").exists() and (out / "checkpoints" / "step-0000003").is_dir()
    assert run(capsys, *args, "--out", out)[0] == 0
    assert run(capsys, *args, "--out", tmp_path / "uninterrupted")[0] == 0
    _assert_same_weights(_unet(out), _unet(tmp_path / "uninterrupted"))


@pytest.mark.parametrize("signum,exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_diagnose_writes_its_plots_ends_in_128_plus_it_and_the_rerun_completes(
        student, tmp_path, capsys, monkeypatch, signum, exit_code):
    import ddil_core.stages.diagnose as stage

    args = ["diagnose", "--config", "tiny", "--student", student]
    out = tmp_path / "diagnose"
    with monkeypatch.context() as patch:
        original = stage.write_plots

        def signalled(*a, **k):  # inside the staging folder, with diagnose.json about to be written
            os.kill(os.getpid(), signum)
            return original(*a, **k)

        patch.setattr(stage, "write_plots", signalled)
        code, err = run(capsys, *args, "--out", out)
    assert_fails(code, err, f"stopped by signal {int(signum)}", exit_code=exit_code)
    assert not out.exists() and not leftovers(out)
    assert run(capsys, *args, "--out", out)[0] == 0
    assert run(capsys, *args, "--out", tmp_path / "uninterrupted")[0] == 0
    assert (out / "diagnose_flat.json").read_bytes() == (tmp_path / "uninterrupted" / "diagnose_flat.json").read_bytes()

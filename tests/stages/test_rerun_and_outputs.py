"""Issue 13, rules 5, 6 and 7 through the CLI: a rerun into an output folder with another resolved config is refused
naming the keys (nothing in the folder changes) unless --restart starts over; the output location is checked before
any work (a file in the way, a read-only place, a full disk) with one line naming the path; and a failed run leaves
no output folder, no staging folder and no folder it created on the way."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.fakes.cli_checks import assert_fails, assert_untouched, leftovers, run, snapshot


def _distill_args(tiny_data, out, *sets, family="sd15"):
    latents, rollouts = tiny_data[family]
    args = ["distill", "--config", "tiny", "--latents", latents, "--rollouts", rollouts, "--out", out]
    for item in sets:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    """A completed tiny distill run: OUT with checkpoints, student, log and resolved config."""
    from ddil_core.cli import main

    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([str(a) for a in _distill_args(tiny_data, out, "training.steps=4")]) == 0
    return out


def _copy(folder, tmp_path):
    import shutil

    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


# ------------------------------------------------------------------------------------- rule 5: reruns

@pytest.mark.parametrize("sets,named", [
    (("model.teacher=tiny://sdxl",), "model.teacher: 'tiny://sd15' -> 'tiny://sdxl'"),
    (("training.lr=0.001",), "training.lr: 0.0001 -> 0.001"),
    (("objective.student_steps=1", "objective.pd.teacher_steps=2"), "objective.student_steps: 2 -> 1"),
    (("data.dataset=demo://digits/eval",), "data.dataset: 'demo://digits' -> 'demo://digits/eval'"),
])
def test_distill_rerun_with_another_config_is_refused_and_changes_nothing(tiny_data, finished, tmp_path, capsys,
                                                                          sets, named):
    out = _copy(finished, tmp_path)
    before = snapshot(out)
    code, err = run(capsys, *_distill_args(tiny_data, out, "training.steps=4", *sets))
    assert_fails(code, err, f"{out}: was made with another config", named, "--restart")
    assert_untouched(out, before)  # resolved_config.yaml included: not overwritten before the check


def test_distill_rerun_with_the_same_config_resumes(tiny_data, finished, tmp_path, capsys):
    """The same config (telemetry may differ: RERUN_MAY_DIFFER) resumes: the finished run's weights, unchanged."""
    out = _copy(finished, tmp_path)
    before = snapshot(out / "checkpoints")
    unet = (out / "student" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    code, err = run(capsys, *_distill_args(tiny_data, out, "training.steps=4", "telemetry.run_id=another-run"))
    assert code == 0, err
    assert snapshot(out / "checkpoints") == before
    assert (out / "student" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet


def test_distill_restart_starts_over_with_the_new_config(tiny_data, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    code, err = run(capsys, *_distill_args(tiny_data, out, "training.steps=2", "training.lr=0.001"), "--restart")
    assert code == 0, err
    assert "lr: 0.001" in (out / "resolved_config.yaml").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]  # step 4 of the old run: gone
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert json.loads((out / "student" / "ddil_student.json").read_text())["steps_trained"] == 2


def test_distill_resume_may_train_longer_but_not_shorter(tiny_data, finished, tmp_path, capsys):
    """training.steps may grow on a resume (train longer): the run continues from its checkpoint. A total below the
    newest checkpoint would publish a student of more steps than its config says: refused."""
    out = _copy(finished, tmp_path)
    before = snapshot(out)
    code, err = run(capsys, *_distill_args(tiny_data, out, "training.steps=2"))
    assert_fails(code, err, f"{out}: its newest checkpoint (step-0000004) is beyond the 2 steps this config trains")
    assert_untouched(out, before)
    code, err = run(capsys, *_distill_args(tiny_data, out, "training.steps=6"))
    assert code == 0, err
    assert snapshot(out / "checkpoints" / "step-0000004") == {k[len("checkpoints/step-0000004/"):]: v
                                                             for k, v in before.items()
                                                             if k.startswith("checkpoints/step-0000004/")}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 4: the first four lines are the finished run's
    assert json.loads((out / "student" / "ddil_student.json").read_text())["steps_trained"] == 6


def test_a_resume_that_changes_the_pd_stage_split_is_refused(tiny_data, tmp_path, capsys):
    """PD over two stages splits training.steps between them: changing it on a resume would move the hand-off of
    the checkpointed run, so it is named (as the effective objective.pd.steps_per_stage)."""
    out = tmp_path / "run"
    sets = ("objective.pd.teacher_steps=8", "objective.student_steps=2", "rollouts.teacher_steps=4")
    code, err = run(capsys, *_distill_args(tiny_data, out, "training.steps=4", *sets))
    assert code == 0, err
    before = snapshot(out)
    code, err = run(capsys, *_distill_args(tiny_data, out, "training.steps=8", *sets))
    assert_fails(code, err, "objective.pd.steps_per_stage: 2 -> 4")
    assert_untouched(out, before)


def test_restart_with_bad_input_keeps_the_old_run(tiny_data, finished, tmp_path, capsys):
    """--restart discards the old run only once the new run's inputs are validated."""
    out = _copy(finished, tmp_path)
    before = snapshot(out)
    code, err = run(capsys, *_distill_args(tiny_data, out, "training.steps=4", "rollouts.teacher_steps=8"),
                    "--restart")
    assert_fails(code, err, "the config says rollouts.teacher_steps = 8")
    assert_untouched(out, before)


def test_cache_latents_rerun_with_another_config_then_restart(tiny_data, tmp_path, capsys):
    out = _copy(tiny_data["sd15"][0], tmp_path)
    before = snapshot(out)
    args = ["cache-latents", "--config", "tiny", "--out", out, "--set", "data.limit=16", "--set", "data.shard_size=8"]
    code, err = run(capsys, *args)
    assert_fails(code, err, f"{out}: was made with another config", "data.limit: 64 -> 16",
                 "data.shard_size: 32 -> 8")
    assert_untouched(out, before)
    code, err = run(capsys, *args, "--restart")
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["count"] == 16
    assert not leftovers(out)


def test_teacher_rollouts_rerun_with_another_guidance_is_refused(tiny_data, tmp_path, capsys):
    out = _copy(tiny_data["sd15"][1], tmp_path)
    before = snapshot(out)
    code, err = run(capsys, "teacher-rollouts", "--config", "tiny", "--latents", tiny_data["sd15"][0], "--out", out,
                    "--set", "objective.guidance_scale=4")
    assert_fails(code, err, "objective.guidance_scale: 2.0 -> 4.0")
    assert_untouched(out, before)


def test_evaluate_rerun_with_another_config_is_refused(tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", "--config", "tiny", "--student", "tiny://sd15", "--out", out,
            "--set", "evaluation.extractor=pixels", "--set", "evaluation.num_prompts=2"]
    code, err = run(capsys, *args)
    assert code == 0, err
    before = snapshot(out)
    code, err = run(capsys, *args, "--set", "evaluation.seed=5")
    assert_fails(code, err, "evaluation.seed: 0 -> 5")
    assert_untouched(out, before)


def test_prepare_demo_rerun_with_another_config_is_refused(tmp_path, capsys):
    from ddil_core.stages.outputs import write_resolved_config
    from tests.conftest import tiny_config

    out = tmp_path / "demo"
    (out / "teacher").mkdir(parents=True)
    write_resolved_config(out, tiny_config("sd15"), "prepare-demo")
    before = snapshot(out)
    code, err = run(capsys, "prepare-demo", "--config", "tiny", "--out", out, "--set", "demo.vae_steps=3")
    assert_fails(code, err, f"{out}: was made with another config", "demo.vae_steps: 300 -> 3")
    assert_untouched(out, before)


def test_an_output_of_another_stage_is_never_replaced(tiny_data, tmp_path, capsys):
    out = _copy(tiny_data["sd15"][0], tmp_path)  # a latent cache
    before = snapshot(out)
    for restart in ((), ("--restart",)):
        code, err = run(capsys, *_distill_args(tiny_data, out), *restart)
        assert_fails(code, err, f"{out}: holds a ddil cache-latents output, not a distill output")
        assert_untouched(out, before)


def test_a_folder_that_is_no_ddil_output_is_never_replaced(tiny_data, tmp_path, capsys):
    out = tmp_path / "my-files"
    out.mkdir()
    (out / "thesis.tex").write_text("months of work")
    for args in (_distill_args(tiny_data, out), ["cache-latents", "--config", "tiny", "--out", out, "--restart"]):
        code, err = run(capsys, *args)
        assert_fails(code, err, f"{out}: exists and is not a ddil", "no resolved_config.yaml")
        assert (out / "thesis.tex").read_text() == "months of work" and sorted(os.listdir(out)) == ["thesis.tex"]


# ---------------------------------------------------------------------- rule 6: the output location

@pytest.mark.parametrize("stage", ["distill", "cache-latents"])
def test_out_that_is_an_existing_file(tiny_data, tmp_path, capsys, stage):
    out = tmp_path / "file.txt"
    out.write_text("keep me")
    args = _distill_args(tiny_data, out) if stage == "distill" else ["cache-latents", "--config", "tiny", "--out", out]
    code, err = run(capsys, *args)
    assert_fails(code, err, f"{out}: exists and is a file; --out names a folder")
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("stage", ["distill", "teacher-rollouts", "sample"])
def test_out_under_a_file(tiny_data, tmp_path, capsys, stage):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    out = blocker / "sub" / ("x.png" if stage == "sample" else "out")
    args = {"distill": _distill_args(tiny_data, out),
            "teacher-rollouts": ["teacher-rollouts", "--config", "tiny", "--latents", tiny_data["sd15"][0],
                                 "--out", out],
            "sample": ["sample", "--model", "tiny://sd15", "--prompt", "x", "--steps", "2", "--out", out]}[stage]
    code, err = run(capsys, *args)
    assert_fails(code, err, f"{out}: cannot be created: {blocker} is a file, not a folder")
    assert blocker.read_text() == "keep me"


def test_sample_out_that_is_an_existing_folder(tmp_path, capsys):
    out = tmp_path / "images"
    out.mkdir()
    code, err = run(capsys, "sample", "--model", "tiny://sd15", "--prompt", "x", "--steps", "2", "--out", out)
    assert_fails(code, err, f"{out}: is a folder; --out names the image file to write")
    assert os.listdir(out) == [] and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def _read_only_place(tmp_path):
    """A folder this process cannot write in: a chmod 555 folder, or for root (who ignores modes) /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and _writable("/sys"):
        pytest.skip("no read-only location on this machine")
    return __import__("pathlib").Path("/sys")


def _writable(folder) -> bool:
    try:
        with open(os.path.join(folder, ".ddil-write-test"), "w"):
            pass
    except OSError:
        return False
    os.unlink(os.path.join(folder, ".ddil-write-test"))
    return True


@pytest.mark.parametrize("stage", ["distill", "cache-latents", "sample"])
def test_a_read_only_location_is_named_before_any_work(tiny_data, tmp_path, capsys, stage):
    place = _read_only_place(tmp_path)
    out = place / ("ddil-x.png" if stage == "sample" else "ddil-out")
    args = {"distill": _distill_args(tiny_data, out),
            "cache-latents": ["cache-latents", "--config", "tiny", "--out", out],
            "sample": ["sample", "--model", "tiny://sd15", "--prompt", "x", "--steps", "2", "--out", out]}[stage]
    code, err = run(capsys, *args)
    assert_fails(code, err, f"{out}: cannot write here", "choose a writable --out")
    assert not out.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real, nearly full file system: a tmpfs of 512 KiB (needs root and CAP_SYS_ADMIN; skipped elsewhere).
    `fill(free)` leaves about `free` bytes."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")

    def fill(free: int):
        with open(mount / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:  # full
                pass
        size = (mount / "filler").stat().st_size
        os.truncate(mount / "filler", max(0, size - free))

    try:
        yield mount, fill
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_during_cache_latents(small_disk, capsys):
    mount, fill = small_disk
    fill(96 * 1024)  # the first shard (about 165 KB of latents and embeddings) does not fit
    out = mount / "latents"
    code, err = run(capsys, "cache-latents", "--config", "tiny", "--out", out)
    assert_fails(code, err, f"{out}: no space left on device while writing")
    assert_untouched(out)
    assert sorted(os.listdir(mount)) == ["filler"]


def test_full_disk_during_the_first_checkpoint_leaves_no_run(tiny_data, small_disk, capsys):
    mount, fill = small_disk
    fill(64 * 1024)  # the resolved config fits, the first checkpoint (the UNet weights) does not
    out = mount / "run"
    code, err = run(capsys, *_distill_args(tiny_data, out))
    assert_fails(code, err, f"{mount / 'run' / 'checkpoints'}: no space left on device while writing checkpoint")
    assert_untouched(out)
    assert sorted(os.listdir(mount)) == ["filler"]


def test_full_disk_during_sample(small_disk, capsys):
    mount, fill = small_disk
    fill(0)
    out = mount / "x.png"
    code, err = run(capsys, "sample", "--model", "tiny://sd15", "--prompt", "x", "--steps", "2", "--out", out)
    assert code == 2, err
    assert_fails(code, err, str(out))
    assert sorted(os.listdir(mount)) == ["filler"]  # no .x.png.tmp left behind


@pytest.mark.parametrize("writer,error", [
    ("save_file", "safetensors"), ("torch_save", "torch"),
])
def test_full_disk_as_the_writers_report_it_while_checkpointing(tiny_data, tmp_path, capsys, monkeypatch, writer,
                                                                error):
    """Without a small disk to fill: the checkpoint writers raise exactly what they raise on a full disk (measured on
    a full tmpfs: safetensors' SafetensorError, torch.save's RuntimeError), from the second checkpoint on."""
    from safetensors import SafetensorError

    from ddil_core.training import checkpoint

    real = {"save_file": checkpoint.save_file, "torch_save": checkpoint.torch.save}[writer]
    calls = {"n": 0}

    def full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > (5 if writer == "save_file" else 1):
            if error == "safetensors":
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(*args, **kwargs)

    if writer == "save_file":
        monkeypatch.setattr(checkpoint, "save_file", full)
    else:
        monkeypatch.setattr(checkpoint.torch, "save", full)
    out = tmp_path / "run"
    code, err = run(capsys, *_distill_args(tiny_data, out))
    assert_fails(code, err, f"{out / 'checkpoints'}: no space left on device while writing checkpoint step 4")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    assert not (out / "student").exists() and not leftovers(out)


# ------------------------------------------------------------------ rule 7: nothing half-written, at all

BAD_DISTILL = [
    ("config", ("training.lr=.nan",), "training.lr = nan is not a finite number"),
    ("grid", ("rollouts.teacher_steps=8",), "the config says rollouts.teacher_steps = 8"),
    ("teacher", ("model.teacher=tiny://sdxl",), "latent cache does not match the teacher tiny://sdxl"),
    ("family", ("model.family=sdxl",), "tiny://sd15: is an sd15 pipeline but the recipe says model.family = sdxl"),
    ("priors", ("ddil.priors.forward=0.75", "ddil.priors.student=0"), "needs teacher rollouts"),
]


@pytest.mark.parametrize("name,sets,named", BAD_DISTILL, ids=[b[0] for b in BAD_DISTILL])
def test_a_distill_exit_2_leaves_no_folder_it_made(tiny_data, tmp_path, capsys, name, sets, named):
    out = tmp_path / "new" / "nested" / "run"
    latents, rollouts = tiny_data["sd15"]
    args = ["distill", "--config", "tiny", "--latents", latents, "--out", out]
    if name != "priors":
        args += ["--rollouts", rollouts]
    for item in sets:
        args += ["--set", item]
    code, err = run(capsys, *args)
    assert_fails(code, err, named)
    assert not (tmp_path / "new").exists()  # not OUT, nor the folders made on the way to it (for the lock)


def test_a_cache_latents_exit_2_leaves_no_folder_it_made(tmp_path, capsys):
    out = tmp_path / "new" / "latents"
    code, err = run(capsys, "cache-latents", "--config", "tiny", "--dataset", tmp_path / "nowhere", "--out", out)
    assert_fails(code, err, "dataset not found")
    assert sorted(os.listdir(tmp_path)) == []


def test_out_of_memory_is_one_line_and_leaves_nothing(tiny_data, tmp_path, capsys):
    """A replay buffer of 2**51 states (2**54 bytes: beyond any address space, so it fails at once everywhere)."""
    out = tmp_path / "new" / "run"
    code, err = run(capsys, *_distill_args(tiny_data, out, "ddil.buffer.capacity=2251799813685248"))
    assert_fails(code, err, "out of memory", "ddil.buffer.capacity")
    assert not (tmp_path / "new").exists()

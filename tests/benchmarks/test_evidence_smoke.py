"""The evidence benchmark in its quick mode (a low-budget demo, 2 seeds, 3 updates): a smoke test only, so the command
does not rot. It asserts the structure of what it writes (two runs at once) and that a rerun resumes, not its
numbers."""
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import benchmarks.ddil_evidence as evidence
from tests import ROOT


def test_ddil_evidence_quick(tmp_path, monkeypatch):
    args = ["--quick", "--demo", str(tmp_path / "demo"), "--work", str(tmp_path / "work"), "--objectives", "lcm",
            "--workers", "2"]
    evidence.main(args)
    runs_of = tmp_path / "work" / "steps4-updates3"  # the protocol's folder: its students, ledger and report
    result = json.loads((runs_of / "evidence.json").read_text())
    assert {key: len(v) for key, v in result["runs"].items()} == {"teacher/ddim": 1, "lcm/baseline": 2,
                                                                  "lcm/control": 2, "lcm/ddil": 2}
    ddil_vs_control = result["comparisons"]["lcm/ddil-control"]["kid_teacher"]
    assert ddil_vs_control["n"] == 2 and len(ddil_vs_control["ci95"]) == 2
    assert set(result["primary_holm"]) == {"lcm@4/kid_teacher", "lcm@4/fd_teacher"}
    assert len(result["go_no_go"]["lcm"]["shift_factor"]) == 2
    # the teacher's reference samples come from noises no evaluated image uses (an imitating student would
    # otherwise be scored image by image)
    assert all(m["reference"] == evidence.REFERENCE for arm in result["runs"].values() for m in arm)
    assert list((tmp_path / "work").glob(f"teacher-*-seed{evidence.REFERENCE_SEED}-g2.pt"))
    assert "| lcm/ddil-control | kid_teacher |" in (runs_of / "evidence.md").read_text()
    assert result["teacher_reference"]["images"] == 40 and result["teacher_reference"]["fd_data"] > 0
    # the secondary target: the teacher's samples from the same seeds without guidance, another distribution
    assert list((tmp_path / "work").glob(f"teacher-*-seed{evidence.REFERENCE_SEED}-g1.pt"))
    students = [m for key, arm in result["runs"].items() if key != "teacher/ddim" for m in arm]
    assert all(m["fd_teacher_unguided"] != m["fd_teacher"] for m in students)
    assert "fd_teacher_unguided" in result["comparisons"]["lcm/ddil-control"]
    # resumable: nothing measured is trained again, and the runs keep the recipe the work began with; a run
    # measured before a metric existed gets it from its saved features
    frozen = tmp_path / "work" / "recipe.yaml"
    assert frozen.read_text() == (ROOT / "configs" / "demo.yaml").read_text()
    frozen.write_text(frozen.read_text() + "# the recipe as this work began\n")
    saved = json.loads((runs_of / "runs.json").read_text())
    before = saved["lcm/ddil"][0].pop("kid_teacher_unguided")
    (runs_of / "runs.json").write_text(json.dumps(saved))
    monkeypatch.setattr(evidence, "distill", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    evidence.main(args)
    assert frozen.read_text().endswith("# the recipe as this work began\n")
    rescored = json.loads((runs_of / "runs.json").read_text())["lcm/ddil"][0]
    assert rescored["kid_teacher_unguided"] == before
    # another protocol on the same work trains its own runs (none of the 4-step students counts as a 2-step one),
    # and a protocol's runs are not mixed with runs measured with another guidance (or number of images)
    with pytest.raises(AssertionError, match="retrained"):
        evidence.main([*args, "--student-steps", "2"])
    with pytest.raises(SystemExit, match=r"protocol.json: .* guidance 2(\.0)? \(now 3(\.0)?\)"):
        evidence.main([*args, "--guidance", "3"])


def test_backward_sim_trains_the_first_step_from_pure_noise(tmp_path):
    """DMD2's backward simulation draws its step from 0 (pure noise) to N-1 and simulates afresh every batch
    (tianweiy/DMD2 main/sd_unified_model.py, sample_backward); an arm of student states only that left out j = 0
    would never train the first step. The DDIL arm counts only states the student made (j >= 1): its forward states
    cover the first step."""
    from ddil_core.config import load_config

    ctx = {"demo": tmp_path, "guidance": 2.0}
    args = evidence.parse_args(["--demo", str(tmp_path), "--work", str(tmp_path / "work")])
    config = {arm: load_config("demo", evidence.run_overrides(args, "dmd2", arm, 0, ctx)).ddil
              for arm in evidence.arms_of("dmd2")}
    assert config["backward_sim"].student_min_steps == 0 and config["backward_sim"].priors.student == 1
    assert not config["backward_sim"].buffer.enabled and config["ddil"].buffer.enabled
    assert config["ddil"].student_min_steps == 1 and config["baseline"].priors.forward == 1


def test_the_online_rollout_arm_runs_only_when_asked_and_differs_from_ddil_in_the_policy_alone(tmp_path):
    """`--arms ... ddil_online`: the DDIL arm with rollouts by the online student instead of its EMA (the policy that
    ships); not part of a default run, and the same as `ddil` in every other setting."""
    from ddil_core.config import load_config, resolved_dict

    ctx = {"demo": tmp_path, "guidance": 2.0}
    args = evidence.parse_args(["--demo", str(tmp_path), "--work", str(tmp_path / "work")])
    assert "ddil_online" not in args.arms and "ddil_online" not in evidence.arms_of("lcm")
    assert "ddil_online" in evidence.arms_of("lcm", ("ddil_online",))
    ddil, online = (resolved_dict(load_config("demo", evidence.run_overrides(args, "lcm", arm, 0, ctx)))
                    for arm in ("ddil", "ddil_online"))
    assert (ddil["ddil"].pop("rollout_policy"), online["ddil"].pop("rollout_policy")) == ("ema", "online")
    assert ddil == online


def test_the_light_arms_run_only_when_asked_and_differ_from_their_pair_in_priors_and_states_alone(tmp_path):
    """`ddil_light` / `control_light`: a fifth of the batch from the rollout sources, and its timestep-matched
    control; the pair differs only where ddil and control do, and each is compared with the baseline too."""
    from ddil_core.config import load_config, resolved_dict

    ctx = {"demo": tmp_path, "guidance": 2.0}
    args = evidence.parse_args(["--demo", str(tmp_path), "--work", str(tmp_path / "work")])
    assert not {"ddil_light", "control_light"} & (set(args.arms) | set(evidence.arms_of("tdd")))
    assert {"ddil_light", "control_light"} <= set(evidence.arms_of("tdd", ("ddil_light", "control_light")))
    resolved = {arm: resolved_dict(load_config("demo", evidence.run_overrides(args, "tdd", arm, 0, ctx)))["ddil"]
                for arm in ("ddil", "control", "ddil_light", "control_light")}
    assert resolved["ddil_light"]["priors"] == {"forward": 0.8, "teacher": 0.1, "student": 0.1}
    assert resolved["control_light"]["priors"] == resolved["ddil_light"]["priors"]
    for light, full in (("ddil_light", "ddil"), ("control_light", "control")):
        assert {**resolved[light], "priors": None} == {**resolved[full], "priors": None}
    assert {("ddil_light", "control_light"), ("ddil_light", "baseline"), ("control_light", "baseline")} <= set(
        evidence.COMPARISONS)


def test_a_work_folder_of_the_earlier_layout_is_refused(tmp_path):
    """Its ledger at the top (not in a protocol's folder) would not be found: every run would be trained again."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "runs.json").write_text("{}")
    for name in ("teacher-5000-seed200000.pt", "teacher-5000-seed200000-unguided.pt", "teacher-40-seed200000-g2.pt"):
        (work / name).write_bytes(b"")
    with pytest.raises(SystemExit, match=r"work: .*earlier layout \(runs.json, teacher-5000-seed200000-unguided.pt, "
                                         r"teacher-5000-seed200000.pt\)"):
        evidence.main(["--quick", "--demo", str(tmp_path / "no-demo"), "--work", str(work)])
    assert not (tmp_path / "no-demo").exists()  # refused before anything was made
    (work / "runs.json").unlink()  # the ledger alone, or the old samples alone, is the earlier layout too
    with pytest.raises(SystemExit, match=r"earlier layout \(teacher-5000-seed200000-unguided.pt"):
        evidence.refuse_old_layout(work)
    for name in ("teacher-5000-seed200000.pt", "teacher-5000-seed200000-unguided.pt"):
        (work / name).unlink()
    evidence.refuse_old_layout(work)  # the current layout's samples pass


WORKER = """
import os, time
import benchmarks.ddil_evidence as evidence

def sleep_long():
    time.sleep(600)

pool = evidence._fork_pool(1, {})
pool.submit(sleep_long)
print(list(pool._processes)[0], flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper (a container's PID 1 may never reap an orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_stop_when_their_parent_is_killed(tmp_path):
    """A killed parent must not leave its workers training into run folders that a resumed call writes into too."""
    script = tmp_path / "parent.py"
    script.write_text(WORKER)
    parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    worker = None
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 120)
        assert ready, "the parent never started its worker"
        worker = int(parent.stdout.readline())
        time.sleep(1)  # the worker is running its job
        assert _alive(worker)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), f"worker {worker} outlived its parent"
    finally:
        parent.kill()
        parent.stdout.close()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)

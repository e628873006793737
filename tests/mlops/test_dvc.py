"""The DVC side: dvc.yaml and params.yaml agree with the Config schema, and a DVC project round-trips its outputs
through an S3 remote (a real moto server on 127.0.0.1): push, wipe cache and outputs, pull, byte-identical."""
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddil_core.config import Config, load_config, resolved_dict
from tests import ROOT

STAGES = ["prepare-demo", "cache-latents", "teacher-rollouts", "distill", "diagnose", "evaluate", "register"]


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
    tdd = load_config(str(ROOT / "params.yaml"), ["objective.name=tdd", "rollouts.teacher_steps=250"])
    assert tdd.objective.tdd.guidance_scale == params.demo.guidance_scale


def test_dvc_yaml_stages_call_the_cli_with_params_yaml():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = spec["stages"]
    assert list(stages) == STAGES
    # the covariate-shift curve is measured once, by diagnose; evaluate takes it (and depends on it)
    assert "--covariate-shift runs/demo/diagnose" in stages["evaluate"]["cmd"]
    assert "runs/demo/diagnose" in stages["evaluate"]["deps"]
    for name in ("diagnose", "evaluate"):  # the same prompts, in the same order, for both
        assert "--reference demo/dataset-eval" in stages[name]["cmd"] and "demo/dataset-eval" in stages[name]["deps"]
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
    assert len(files) == 9
    for path in files:
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0
        assert not ignored, f"{path} is git-ignored"


def _train_log(path: Path, steps: int = 40) -> None:
    """A train log as the Trainer writes it (loop.py flush_log): the loss per term and per source."""
    import json
    import math

    with open(path, "w") as f:
        for step in range(2, steps + 1, 2):
            loss = 0.5 * math.exp(-step / 15) + 0.05
            f.write(json.dumps({"step": step, "stage": 0, "student_steps": 4, "source_count": {"forward": 16,
                                "teacher": 8, "student": 8}, "loss": {"pd": {"all": loss, "forward": loss * 0.9,
                                "teacher": loss * 1.1, "student": loss * 1.2}}}) + "\n")


def test_dvc_plots_show_embeds_the_loss_and_fid_pngs(tmp_path):
    """The loss curve and the FID-vs-steps curve are PNG plots of dvc.yaml (so `dvc plots show` shows them offline,
    where its vega charts load from a CDN), made by the commands dvc.yaml runs; `dvc plots show` on a project with
    those plots writes an HTML page that embeds both images."""
    from PIL import Image

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    plots = {stage: {next(iter(p)): p[next(iter(p))] for p in spec.get("plots", [])} for stage, spec in stages.items()}
    assert plots["distill"]["metrics/train_loss.png"] == {"cache": False}
    assert plots["evaluate"]["metrics/fid_vs_steps.png"] == {"cache": False}
    assert "export loss-png runs/demo/distill/train_log.jsonl metrics/train_loss.png" in stages["distill"]["cmd"]
    assert ("export copy runs/demo/evaluate/quality_vs_steps.png metrics/fid_vs_steps.png"
            in stages["evaluate"]["cmd"])

    repo = tmp_path / "project"
    (repo / "metrics").mkdir(parents=True)
    _train_log(tmp_path / "train_log.jsonl")
    env = _dvc_env()
    _run([sys.executable, "-m", "ddil_core.demo.export", "loss-png", str(tmp_path / "train_log.jsonl"),
          "metrics/train_loss.png"], repo, {**env, "PYTHONPATH": str(ROOT)})
    from ddil_core.metrics.plots import plot_quality_vs_steps  # what evaluate writes as quality_vs_steps.png

    plot_quality_vs_steps([{"model": "student", "steps": s, "fid": f} for s, f in ((1, 90.0), (2, 60.0), (4, 40.0))]
                          + [{"model": "teacher", "steps": 50, "fid": 30.0}], tmp_path / "quality_vs_steps.png")
    _run([sys.executable, "-m", "ddil_core.demo.export", "copy", str(tmp_path / "quality_vs_steps.png"),
          "metrics/fid_vs_steps.png"], repo, {**env, "PYTHONPATH": str(ROOT)})
    for name in ("train_loss.png", "fid_vs_steps.png"):
        with Image.open(repo / "metrics" / name) as im:
            assert im.format == "PNG" and im.size == (720, 450) and len(im.convert("RGB").getcolors(1 << 16)) > 3, name
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"plots": {
        "cmd": "true", "plots": [{"metrics/train_loss.png": {"cache": False}},
                                 {"metrics/fid_vs_steps.png": {"cache": False}}]}}}))
    _dvc("init", "--no-scm", "-q", cwd=repo, env=env)
    _dvc("plots", "show", "-o", "plots_out", cwd=repo, env=env)
    page = (repo / "plots_out" / "index.html").read_text()
    images = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(images) == 2, images
    for src in images:
        assert (repo / "plots_out" / src).is_file() or src.startswith("data:image/png"), src


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


# ---------------------------------------------------------------------------------------------------- code deps
def _module_file(name: str):
    path = ROOT / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imports(path: Path, top_level_only: bool = False) -> list:
    """ddil_core modules a file imports (function-level imports too: stages import lazily)."""
    import ast

    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = package[: -len(".__init__")] if path.name == "__init__.py" else package.rsplit(".", 1)[0]
    found = []
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module`
    return [m for m in found if m == "ddil_core" or m.startswith("ddil_core.")]


def code_closure(stage: str, command: str) -> set:
    """Every ddil_core file `ddil <stage>` (and `python -m ddil_core.demo.export` when the command runs it) imports,
    package __init__ files included."""
    todo = [f"ddil_core.stages.{stage.replace('-', '_')}"] + _imports(ROOT / "ddil_core" / "cli.py", True)
    if "ddil_core.demo.export" in command:
        todo.append("ddil_core.demo.export")
    seen = {ROOT / "ddil_core" / "cli.py"}
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo += _imports(path)
    return {str(p.relative_to(ROOT)) for p in seen}


def test_dvc_deps_cover_all_the_code_each_stage_runs():
    """Editing any ddil_core file a stage imports makes `dvc status` report that stage (not only its own file)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        deps = [d for d in stage["deps"] if d.startswith("ddil_core")]
        for dep in deps:
            assert (ROOT / dep).exists(), f"{name}: dep {dep} does not exist"
        cmd = " ".join(stage["cmd"]) if isinstance(stage["cmd"], list) else stage["cmd"]
        missing = sorted(f for f in code_closure(name, cmd) if not any(f == d or f.startswith(d + "/") for d in deps))
        assert not missing, f"dvc.yaml stage {name} runs code it does not list as deps: {missing}"
    # the example: the DDIM step is used by distill and evaluate
    for name in ("distill", "evaluate"):
        assert "ddil_core/math/ddim.py" in code_closure(name, ""), name


def test_registry_persists_and_distill_caches_and_persists_what_a_resume_needs():
    """Every distill out is cached (so `dvc push` carries it; tests/mlops/test_dvc_runs.py moves a run), and all but the
    student persist between runs; `--restart` makes a run of another config start over instead of resuming."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def outs(stage):
        return {next(iter(o)) if isinstance(o, dict) else o: (o[next(iter(o))] if isinstance(o, dict) else {})
                for o in stages[stage]["outs"]}

    assert outs("register")["runs/demo/registry"].get("persist") is True
    distill = outs("distill")
    assert "runs/demo/distill" not in distill
    for kept in ("checkpoints", "buffer", "train_log.jsonl", "resolved_config.yaml"):
        entry = distill[f"runs/demo/distill/{kept}"]
        assert entry.get("cache", True) is True and entry.get("persist") is True, kept
    assert distill["runs/demo/distill/student"].get("cache", True) and not distill["runs/demo/distill/student"].get(
        "persist")
    assert "--restart" in stages["distill"]["cmd"].split()


def _project_copy(tmp_path: Path) -> Path:
    """The DVC project without its data: dvc.yaml, params.yaml, .dvcignore and ddil_core (the stages' code deps)."""
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copytree(ROOT / "ddil_core", repo / "ddil_core", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(ROOT / name, repo / name)
    return repo


def _changed_stages(repo: Path, env: dict) -> dict:
    import json

    status = json.loads(_dvc("status", "--json", cwd=repo, env=env) or "{}")
    return {name.split(":")[-1]: entries for name, entries in status.items()}


def test_dvc_status_reports_distill_and_evaluate_after_a_ddim_edit(tmp_path):
    """A temporary copy of the project with placeholder data, committed (`dvc commit -f`: dvc.lock of the current
    code), then an edit to ddil_core/math/ddim.py: `dvc status` names distill and evaluate, not register (whose
    checks of the student folder and metrics import no math)."""
    env = _dvc_env()
    repo = _project_copy(tmp_path)
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for stage in spec.values():
        for item in stage.get("deps", []) + stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = repo / (next(iter(item)) if isinstance(item, dict) else item)
            if path.exists():
                continue
            if path.suffix in (".json", ".jsonl", ".yaml"):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")
            else:
                path.mkdir(parents=True)
                (path / "placeholder").write_text(path.name)
    _dvc("init", "--no-scm", "-q", cwd=repo, env=env)
    _dvc("commit", "-f", "-q", cwd=repo, env=env)
    assert _changed_stages(repo, env) == {}, "freshly committed project is not up to date"

    ddim = repo / "ddil_core" / "math" / "ddim.py"
    ddim.write_text(ddim.read_text() + "\n# an edit to the DDIM step\n")
    changed = _changed_stages(repo, env)
    assert {"distill", "evaluate"} <= set(changed), changed
    assert "register" not in changed, changed
    for name in ("distill", "evaluate"):
        deps = [d for entry in changed[name] for d in (entry.get("changed deps") or {})]
        assert any(d.startswith("ddil_core/math") for d in deps), (name, changed[name])


def test_two_forced_repros_leave_registry_versions_1_and_2(tmp_path):
    """The real register stage of dvc.yaml (its cmd, deps and outs as written) on a tiny project in a temporary
    folder: a student folder and an evaluation that passes the gates. `dvc repro -f` twice: versions 1 and 2."""
    import json

    from ddil_core.data.shards import folder_digest
    from ddil_core.models.tiny import build_tiny_pipeline
    from tests.mlops.test_registry import make_metrics

    env = _dvc_env()
    repo = _project_copy(tmp_path)
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"register": spec["stages"]["register"]}}))
    student = repo / "runs" / "demo" / "distill" / "student"  # a plain pipeline folder: register checks it loads
    build_tiny_pipeline("sd15").save_pretrained(str(student), safe_serialization=True)
    metrics = make_metrics(student_fid=30.0, teacher_fid=20.0, coverage=0.8, adherence=0.95)
    metrics["protocol"]["model_digests"] = {"student": folder_digest(student)}  # made for this student, as evaluate
    (repo / "runs" / "demo" / "evaluate").mkdir(parents=True)
    (repo / "runs" / "demo" / "evaluate" / "metrics.json").write_text(json.dumps(metrics))
    env["PYTHONPATH"] = str(repo)  # `ddil` runs this copy's ddil_core
    _dvc("init", "--no-scm", "-q", cwd=repo, env=env)
    for expected in ([1], [1, 2]):
        _dvc("repro", "-f", cwd=repo, env=env, timeout=300)
        index = json.loads((repo / "runs" / "demo" / "registry" / "index.json").read_text())
        assert [e["version"] for e in index["models"]["ddil-digits-student"]] == expected
    assert (repo / "runs" / "demo" / "registry" / "ddil-digits-student" / "v1" / "README.md").is_file()
    assert "up to date" in _dvc("status", cwd=repo, env=env).lower()

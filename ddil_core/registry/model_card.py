"""The model card (README.md) written beside every registered student: a Hugging Face Hub model card
(huggingface_hub's ModelCard, its metadata a ModelCardData: library_name diffusers, pipeline_tag text-to-image, tags,
and base_model when the teacher is a Hub model), so the folder can be pushed to the Hub as it is.

Its text holds the evaluation table (student, teacher, baseline), the quality gates, the evaluation protocol, the
recipe (YAML of the resolved config), the data and code versions, the lineage and a usage snippet; the sections are
ours (no Hub template has them). Nothing that looks like a credential is ever rendered: mapping keys containing
"secret", "password", "token" or "key" are dropped with their values, user information in URLs
(`s3://id:secret@bucket`) is masked and signed-URL query strings are removed.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Optional

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ddil_core.config.redaction import SENSITIVE_WORDS, is_sensitive, redact, redact_string  # noqa: F401

_MODEL_ORDER = ("student", "teacher", "baseline")
_METRIC_ORDER = (
    "fid",
    "precision",
    "recall",
    "density",
    "coverage",
    "adherence",
    "diversity",
    "nfe_per_image",
    "seconds_per_image",
    "steps",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
TAGS = ["ddil", "distillation", "text-to-image", "diffusers"]


# ----------------------------------------------------------------------------------------------------------------
# Redaction


# is_sensitive, redact_string and redact: ddil_core/config/redaction.py, the one redaction of every writer


# ----------------------------------------------------------------------------------------------------------------
# Code version


def package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ddil")
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    except OSError:
        pass
    return "unknown"


def git_commit(cwd: Optional[str] = None) -> str:
    """`git rev-parse HEAD` of the source tree (with '-dirty' when tracked files changed), else
    $DDIL_GIT_SHA (the image's build arg: images have no .git; $DDIL_GIT_COMMIT is read too), else 'unknown'."""
    where = cwd or str(Path(__file__).resolve().parent)
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=False
        )
        commit = out.stdout.strip()
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{7,64}", commit):
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=where,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if status.returncode == 0 and status.stdout.strip():
                commit += "-dirty"
            return commit
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("DDIL_GIT_SHA") or os.environ.get("DDIL_GIT_COMMIT") or "unknown"


def current_code_version(cwd: Optional[str] = None) -> str:
    """'ddil <package version> (git <commit>)'; the commit is 'unknown' when it cannot be read."""
    return f"ddil {package_version()} (git {git_commit(cwd)})"


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def metrics_table(metrics: dict) -> str:
    models = metrics.get("models") if isinstance(metrics, dict) else None
    if not isinstance(models, dict) or not models:
        return "_No evaluation metrics were recorded._\n"
    models = {k: v for k, v in redact(models).items() if isinstance(v, dict)}
    names = [m for m in _MODEL_ORDER if m in models] + sorted(m for m in models if m not in _MODEL_ORDER)
    keys: list[str] = [k for k in _METRIC_ORDER if any(k in models[m] for m in names)]
    for m in names:
        for k in models[m]:
            if k not in keys and not isinstance(models[m][k], (dict, list)):
                keys.append(k)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_cell(models[m].get(k)) for m in names) + " |")
    return "\n".join(lines) + "\n"


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        out: list[tuple[str, Any]] = []
        for k, v in obj.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [(prefix, obj)]


def _usage(model_path: str, steps: Optional[int], guidance: Optional[float], lora: bool = False,
           eta: Optional[float] = None) -> str:
    """The two lines that sample the student exactly as it was trained and evaluated: its saved scheduler, its
    recommended steps and its guidance (diffusers' default 7.5 would add CFG on top of distilled guidance), and a TDD
    student's eta (TCDScheduler's gamma, which pipelines pass as 0.0 unless told). A LoRA student's folder is the
    teacher's pipeline with the student's scheduler: one more line loads its adapters."""
    step_arg = f", num_inference_steps={steps}" if steps else ""
    guidance_arg = f", guidance_scale={guidance:g}" if guidance is not None else ""
    guidance_arg += f", eta={eta:g}" if eta else ""
    lines = ["```python", "from diffusers import DiffusionPipeline", ""]
    if model_path.startswith("file://"):
        model_path = model_path[len("file://") :]
    if model_path.startswith(("s3://", "gs://", "oci://")):
        lines.append(f"# first copy the folder locally, e.g. `aws s3 cp --recursive {model_path} ./student`")
        model_path = "./student"
    lines += [
        f'pipe = DiffusionPipeline.from_pretrained("{model_path}")',
        *([f'pipe.load_lora_weights("{model_path}")  # a LoRA student: the adapters beside the teacher\'s weights']
          if lora else []),
        f'image = pipe("a photo of a cat"{step_arg}{guidance_arg}).images[0]',
        'image.save("sample.png")',
        "```",
    ]
    return "\n".join(lines) + "\n"


def _gates_section(gates: list) -> str:
    lines = ["| gate | passed | actual | threshold | detail |", "|---|---|---|---|---|"]
    for g in gates:
        d = g if isinstance(g, dict) else g.to_dict()
        lines.append(
            f"| {d.get('name')} | {'yes' if d.get('passed') else 'no'} | {_cell(d.get('actual'))} | "
            f"{_cell(d.get('threshold'))} | {_cell(d.get('message'))} |"
        )
    return "\n".join(lines) + "\n"


def render_model_card(
    name: str,
    version: Any,
    metrics: dict,
    config_dict: Optional[dict],
    data_uri: Optional[str],
    code_version: Optional[str],
    *,
    model_path: Optional[str] = None,
    gates: Optional[list] = None,
    lineage: Optional[dict] = None,
) -> str:
    """Markdown README for a registered student. `code_version` None: computed with `current_code_version()`.

    `model_path` is where the student can be loaded from (used in the usage snippet); `gates` are the gate
    results (GateResult or dicts) shown in their own section; `lineage` (registry/lineage.py) the code, data and run
    that made the student.
    """
    metrics = metrics if isinstance(metrics, dict) else {}
    config = redact(config_dict) if isinstance(config_dict, dict) else None
    code = redact_string(code_version) if code_version else current_code_version()
    data = redact_string(str(data_uri)) if data_uri else "not recorded"

    student = (metrics.get("models") or {}).get("student") or {}
    steps = student.get("steps") if isinstance(student.get("steps"), int) else None
    guidance = student.get("guidance_scale") if isinstance(student.get("guidance_scale"), (int, float)) else None
    objective = teacher = None
    lora = bool(((config or {}).get("training") or {}).get("lora", {}).get("rank")) if config else False
    eta = student.get("eta") if isinstance(student.get("eta"), (int, float)) else None
    if config:
        steps = steps or (config.get("objective") or {}).get("student_steps")
        objective = (config.get("objective") or {}).get("name")
        teacher = (config.get("model") or {}).get("teacher")
        if objective == "tdd" and eta is None:
            eta = ((config.get("objective") or {}).get("tdd") or {}).get("eta")
    path = redact_string(model_path) if model_path else f"path/to/{name}/v{version}"

    out = [f"# {name} (version {version})", ""]
    summary = "A few-step text-to-image student distilled with DDIL"
    if objective:
        summary += f" ({str(objective).upper()} objective)"
    if teacher:
        summary += f" from the teacher `{redact_string(str(teacher))}`"
    summary += "."
    if steps:
        summary += f" It samples in {steps} steps"
        summary += f" at guidance scale {guidance:g}" if guidance is not None else ""
        summary += f" with eta {eta:g} (TCDScheduler's gamma)." if eta else "."
    out += [summary, "", "## Evaluation", "", metrics_table(metrics)]
    if gates:
        out += ["## Quality gates", "", _gates_section(gates)]
    protocol = metrics.get("protocol")
    out += ["## Evaluation protocol", ""]
    if isinstance(protocol, dict) and protocol:
        out += [f"- {k}: `{_cell(v)}`" for k, v in _flatten(redact(protocol))]
    else:
        out.append("_Not recorded._")
    out += ["", "## Recipe", ""]
    if config:
        out += ["The resolved configuration that produced this student:", "", "```yaml"]
        out.append(yaml.safe_dump(config, sort_keys=False, default_flow_style=False).rstrip())
        out.append("```")
    else:
        out.append("_Not recorded._")
    out += [
        "",
        "## Data",
        "",
        f"Training data: `{data}`",
        "",
        "## Code",
        "",
        f"Code version: `{code}`",
        "",
        "## Lineage",
        "",
        *([f"- {k}: `{_cell(redact_string(str(v)))}`" for k, v in lineage.items()] if lineage else ["_Not recorded._"]),
        "",
        "## Usage",
        "",
        _usage(path, steps, guidance, lora, eta),
    ]
    return str(ModelCard(f"---\n{card_data(objective, teacher).to_yaml()}\n---\n\n" + "\n".join(out)))


def hub_id(teacher: Optional[str]) -> Optional[str]:
    """The teacher as a Hub model id (owner/name that is not a folder here), else None: base_model must name a Hub
    model, not a local folder, an s3:// path or tiny://."""
    if not teacher or "://" in teacher or not _HUB_ID.fullmatch(teacher) or Path(teacher).exists():
        return None
    return teacher


def card_data(objective: Optional[str], teacher: Optional[str]) -> ModelCardData:
    """The card's metadata (its YAML front matter), as the Hub reads it."""
    tags = TAGS + ([str(objective).lower()] if objective else [])
    return ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", tags=tags,
                         base_model=hub_id(redact_string(str(teacher)) if teacher else None))

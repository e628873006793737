"""What every ddil KFP component shares: the image, the decorator, and helpers copied into component sources.

A lightweight Python component carries only its own function source to the pod (where the ddil image has
ddil_core installed, not this `components` package). Helpers that several components need are therefore plain,
self-contained functions (every import inside the body) handed to kfp's `additional_funcs`, which pastes their
source next to the component's. They are ordinary functions here too, so the tests call them directly.
"""
from __future__ import annotations

import os

from kfp import dsl

# The component image (images/Dockerfile). Overridable at compile time: DDIL_IMAGE=REGISTRY/ddil:TAG make compile.
# The checked-in pipelines/ddil.yaml is compiled with the default, the tag of k8s/overlays/gpu-cluster.
DEFAULT_IMAGE = "registry.example.com/ddil/ddil:0.1.0"
DDIL_IMAGE = os.environ.get("DDIL_IMAGE") or DEFAULT_IMAGE


def ddil_component(*helpers):
    """@dsl.component on the ddil image: nothing pip-installed at run time (ddil_core and kfp are in the image)."""
    return dsl.component(
        base_image=DDIL_IMAGE,
        packages_to_install=[],
        install_kfp_package=False,
        additional_funcs=list(helpers) or None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Helpers pasted into component sources (self-contained: imports inside)


def stage_config(recipe: str, overrides: list, run_id: str = ""):
    """The typed config of a stage: `recipe` is a recipe name ("tiny"), a YAML path, or YAML text; `overrides` are
    `a.b=c` strings. Validation errors (unknown key, bad value) name the key, as on the command line.

    `run_id` (the KFP run's id, dsl.PIPELINE_JOB_ID_PLACEHOLDER) becomes $DDIL_RUN_ID, the Pushgateway grouping key
    of every stage of the run (unless the config sets telemetry.run_id), and $DDIL_KFP_RUN_ID, the lineage's run."""
    import logging
    import os
    import tempfile

    from ddil_core.config import load_config

    if run_id and "{{" not in run_id:  # an unresolved placeholder is no run id
        os.environ["DDIL_RUN_ID"] = os.environ["DDIL_KFP_RUN_ID"] = str(run_id)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "urllib3", "botocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ddil_core.console import quiet_libraries

    quiet_libraries(with_diffusers=False)  # the torchvision and safety-checker notices, as the CLI drops them
    text = recipe or ""
    if "\n" in text or (":" in text and not os.path.exists(text)):  # YAML text, not a name or a path
        folder = tempfile.mkdtemp(prefix="ddil-recipe-")
        path = os.path.join(folder, "recipe.yaml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return load_config(path, [str(o) for o in overrides or []])
    return load_config(text or None, [str(o) for o in overrides or []])


def copy_folder(src: str, dst: str) -> None:
    """Copy a folder's contents into dst (created; an existing dst is replaced)."""
    import os
    import shutil

    if os.path.isdir(dst):
        shutil.rmtree(dst)
    elif os.path.exists(dst):
        os.remove(dst)
    shutil.copytree(src, dst)


def inline_images(text: str, folder: str) -> str:
    """Replace relative image references (HTML `src="x.png"`, Markdown `](x.png)`) with base64 data URIs, so that
    one file renders on its own (the Kubeflow UI shows the single file of a Markdown or HTML artifact)."""
    import base64
    import html
    import os
    import re
    from urllib.parse import unquote

    types = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
             ".svg": "image/svg+xml", ".webp": "image/webp"}
    root = os.path.realpath(folder)

    def data_uri(ref: str):
        if ":" in ref or ref.startswith(("/", "#")):
            return None  # absolute, remote or data: references stay as they are
        path = os.path.realpath(os.path.join(root, unquote(ref)))
        mime = types.get(os.path.splitext(path)[1].lower())
        if mime is None or not path.startswith(root + os.sep) or not os.path.isfile(path):
            return None
        with open(path, "rb") as handle:
            return f"data:{mime};base64," + base64.b64encode(handle.read()).decode("ascii")

    def html_src(match):
        uri = data_uri(html.unescape(match.group(2)))
        return match.group(0) if uri is None else f"{match.group(1)}{uri}{match.group(3)}"

    def md_link(match):
        uri = data_uri(match.group(2))
        return match.group(0) if uri is None else f"{match.group(1)}{uri}{match.group(3)}"

    text = re.sub(r"""(\bsrc=["'])([^"']+)(["'])""", html_src, text)
    return re.sub(r"(!\[[^\]]*\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))", md_link, text)


def watch_scalars(log_path: str) -> dict:
    """The in-training measures of a watched run (train_log.jsonl lines with "eval", training/watch.py) for a KFP
    Metrics artifact: the last measure's finite numbers as watch_<name>, its step as watch_step, and the best value
    of each as watch_best_<name> (lowest; adherence highest). Empty for an unwatched run."""
    import json
    import math
    import os

    if not os.path.exists(log_path):
        return {}
    measures = []
    with open(log_path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("eval"), dict):
                measures.append(record)
    out = {}
    if measures:
        out["watch_step"] = float(measures[-1].get("step", 0))
    for i, record in enumerate(measures):
        for key, value in record["eval"].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                continue
            if i == len(measures) - 1:
                out[f"watch_{key}"] = float(value)
            best, higher = out.get(f"watch_best_{key}"), key == "adherence"
            if best is None or (value > best if higher else value < best):
                out[f"watch_best_{key}"] = float(value)
    return out


def student_scalars(metrics: dict) -> dict:
    """Finite numeric metrics of evaluate's metrics.json for a KFP Metrics artifact: the student's under their own
    names (fid, precision, recall, density, coverage, adherence, diversity, nfe_per_image, seconds_per_image, ...),
    the teacher's prefixed with `teacher_`."""
    import math

    out = {}
    models = metrics.get("models") if isinstance(metrics, dict) else None
    for model, prefix in (("student", ""), ("teacher", "teacher_")):
        values = models.get(model) if isinstance(models, dict) else None
        for key, value in (values or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(float(value)):
                out[prefix + key] = float(value)
    return out

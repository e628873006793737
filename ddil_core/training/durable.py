"""A distill output folder mirrored to object storage (s3://...), so that a preempted pod's retry, started on
another node with an empty disk, resumes from the last checkpoint instead of from step 0.

What is mirrored is what a resume reads: every checkpoint folder (checkpoints/step-NNNNNNN/, see checkpoint.py), the
train log and the resolved config (the rerun rule resumes a folder only under the config that made it). `push` runs after each checkpoint (Trainer's on_checkpoint); `pull` runs before training.

A checkpoint on the mirror is complete when its manifest.json is there: `push` uploads a folder's other files
first and its manifest last, so a push cut short by a kill leaves a folder without manifest, which `pull` ignores
(and the next push completes); `pull` downloads only folders with a manifest, and the resume verifies every file's
sha256 against it (checkpoint.verify_checkpoint). Checkpoints retired locally (training.keep_checkpoints) are deleted
from the mirror after the new one is complete. Storage access goes through fsspec (s3fs for s3://: credentials and
endpoint from the environment, as for s3:// teachers and datasets).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ddil_core.data.shards import staging_dir
from ddil_core.training.checkpoint import MANIFEST, checkpoint_dirs

log = logging.getLogger(__name__)
LOG = "train_log.jsonl"
RESOLVED = "resolved_config.yaml"  # as ddil_core/stages/outputs.py names it (this module stays below the stages)


def _fs(prefix: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(prefix)
    return fs, root.rstrip("/")


def _remote_checkpoints(fs, root: str) -> dict[str, bool]:
    """name -> complete (has a manifest) of the step-* folders under root/checkpoints."""
    base = f"{root}/checkpoints"
    try:
        entries = fs.ls(base, detail=False, refresh=True)
    except FileNotFoundError:
        return {}
    found = {}
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step-"):
            found[name] = fs.exists(f"{base}/{name}/{MANIFEST}")
    return found


def push(out: str | Path, prefix: str) -> None:
    """Mirror out's checkpoints and train log to prefix (e.g. s3://bucket/ddil-runs/<run id>/distill)."""
    out = Path(out)
    fs, root = _fs(prefix)
    remote = _remote_checkpoints(fs, root)
    local = checkpoint_dirs(out / "checkpoints")
    for folder in local:
        if remote.get(folder.name):
            continue  # already complete there (checkpoints are never rewritten under the same step)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST)
        for path in files + [folder / MANIFEST]:  # the manifest last: it marks the folder complete
            fs.put_file(str(path), f"{root}/checkpoints/{folder.name}/{path.relative_to(folder).as_posix()}")
    keep = {folder.name for folder in local}
    for name in remote:
        if name not in keep:
            fs.rm(f"{root}/checkpoints/{name}", recursive=True)
    for name in (RESOLVED, LOG):
        if (out / name).is_file():
            fs.put_file(str(out / name), f"{root}/{name}")
    log.info("checkpoints of %s mirrored to %s (%s)", out, prefix, ", ".join(sorted(keep)) or "none")


def pull(prefix: str, out: str | Path) -> list[str]:
    """Download the complete mirrored checkpoints that out lacks (and the train log); returns their names."""
    out = Path(out)
    fs, root = _fs(prefix)
    have = {folder.name for folder in checkpoint_dirs(out / "checkpoints")}
    fetched = []
    for name, complete in sorted(_remote_checkpoints(fs, root).items()):
        if not complete or name in have:
            continue
        target = out / "checkpoints" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(target)  # renamed when complete: a kill mid-download leaves no step-* folder
        fs.get(f"{root}/checkpoints/{name}/", str(tmp), recursive=True)
        os.replace(tmp, target)
        fetched.append(name)
    for name in (RESOLVED, LOG) if fetched else ():
        if fs.exists(f"{root}/{name}"):
            fs.get_file(f"{root}/{name}", str(out / name))
    if fetched:
        log.info("resuming from %s: fetched checkpoints %s", prefix, ", ".join(fetched))
    return fetched


def remove(prefix: str) -> None:
    """Delete the mirror (after the run finished: its checkpoints are no longer needed)."""
    fs, root = _fs(prefix)
    if fs.exists(root):
        fs.rm(root, recursive=True)

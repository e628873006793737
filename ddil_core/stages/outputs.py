"""What a stage checks about its output location before any work, and the rerun rule.

- The path: `--out` must be creatable as a folder (or, for `ddil sample`, a file): not an existing file (folder),
  not under a file, not one of the stage's inputs nor inside or around one, and writable (the output lock beside it
  is the probe: a read-only location fails there, before any work, naming the path).
- Nothing left behind: folders this run had to create for its output are removed again when it fails while they are
  still empty (stage_run), so a bad-input exit leaves the file system as it was.
- The rerun rule: a stage records its resolved config in OUT/resolved_config.yaml, headed by a
  comment naming the stage. A rerun into an existing output folder must resolve to the same config, except the keys
  of RERUN_MAY_DIFFER, which change no output; otherwise it is refused, naming the keys that differ, before anything
  is written. `--restart` starts over instead: the old output (and a resumable stage's partial folder, or distill's
  checkpoints) is discarded, once the new run's inputs are validated. A non-empty folder without a resolved config,
  or made by another stage, is never replaced, with or without --restart.
"""
from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Callable, Iterable, Optional

import yaml

from ddil_core.config import Config, resolved_dict
from ddil_core.config.redaction import redact_values

log = logging.getLogger(__name__)
RESOLVED = "resolved_config.yaml"
HEADER = "# ddil {stage}: the resolved config of this output (a rerun into this folder must match it, or --restart)"
# Keys a rerun (a distill resume, a rebuild of a cache) may change: they do not change what the stage writes.
# distill also lets training.steps change (resume to train longer), comparing the derived PD split instead.
RERUN_MAY_DIFFER = ("telemetry.", "data.num_workers", "training.wall_clock_limit_s")
# Files the DVC pipeline or an editor may leave in an output folder: not outputs of another tool.
HARMLESS = {".gitignore", ".DS_Store"}


class OutputError(ValueError):
    """The output location cannot be used as asked (bad input, exit code 2); the message names the path."""


def _is_local(uri) -> bool:
    return "://" not in str(uri)


def check_out_path(out: Path, kind: str = "folder", inputs: Iterable = ()) -> None:
    """Refuse an output path that cannot be created as `kind` ("folder" or "file") or that overlaps an input."""
    out = Path(out)
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{out}: cannot be created: {parent} is a file, not a folder")
    if out.exists():
        if kind == "folder" and not out.is_dir():
            raise OutputError(f"{out}: exists and is a file; --out names a folder")
        if kind == "file" and out.is_dir():
            raise OutputError(f"{out}: is a folder; --out names the image file to write")
    mine = out.resolve()
    for uri in inputs:
        if not uri or not _is_local(uri):
            continue
        other = Path(uri).resolve()
        if mine == other or other in mine.parents or mine in other.parents:
            raise OutputError(f"{out}: overlaps the input {uri}; write the output to its own folder")


def probe_writable(out: Path) -> None:
    """Prove that a file can be created beside `out` (in its nearest existing folder) before any work; for a stage
    with no lock file to be the probe (`ddil sample`)."""
    import os
    import tempfile

    folder = next(p for p in (Path(out).absolute().parent, *Path(out).absolute().parents) if p.exists())
    try:
        fd, name = tempfile.mkstemp(prefix=".ddil-probe-", dir=folder)
    except OSError as exc:
        raise location_error(Path(out), exc) from None
    os.close(fd)
    os.unlink(name)


def missing_folders(out: Path) -> list[Path]:
    """The folders on the way to `out` (itself included) that do not exist yet, deepest first."""
    missing = []
    for path in (Path(out).absolute(), *Path(out).absolute().parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone): a later folder holds it, so stop there
            if folder.exists():
                return


def location_error(out: Path, exc: OSError) -> OutputError:
    """An OS refusal to create the output's folder or lock, as one line naming the place."""
    where = exc.filename or out
    reason = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted"}.get(exc.errno, exc.strerror or str(exc))
    return OutputError(f"{out}: cannot write here ({where}: {reason}); choose a writable --out")


def write_resolved_config(folder: Path, config: Config, stage: Optional[str] = None) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    header = HEADER.format(stage=stage) + "\n" if stage else ""
    resolved = redact_values(resolved_dict(config))  # no secret is ever written (config/redaction.py)
    (Path(folder) / RESOLVED).write_text(header + yaml.safe_dump(resolved, sort_keys=False))


def flatten_config(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(recorded: dict, config: Config, sections: Optional[tuple] = None, may_differ: tuple = (),
                       effective: Optional[Callable[[dict], dict]] = None) -> list[str]:
    """'key: recorded -> now' for every key that differs (RERUN_MAY_DIFFER and `may_differ` left out; only
    `sections` if given); `effective` maps a config dict to the values the stage will really use (a default
    derived from other keys) before the comparison."""
    effective = effective or (lambda d: d)
    old, new = flatten_config(effective(recorded)), flatten_config(effective(redact_values(resolved_dict(config))))
    skip = RERUN_MAY_DIFFER + tuple(may_differ)
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(skip) or old.get(key, "(absent)") == new.get(key, "(absent)"):
            continue
        if sections is not None and key.split(".", 1)[0] not in sections:
            continue
        diffs.append(f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}")
    return diffs


def recorded_config(folder: Path) -> Optional[dict]:
    """The resolved config an output folder records, or None when it has none (or it is unreadable)."""
    path = Path(folder) / RESOLVED
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def recorded_stage(path: Path) -> Optional[str]:
    first = path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
    prefix = "# ddil "
    return first[len(prefix):].split(":", 1)[0] if first.startswith(prefix) else None


def check_rerun(out: Path, config: Config, stage: str, restart: bool = False, may_differ: tuple = (),
                effective: Optional[Callable[[dict], dict]] = None) -> bool:
    """The rerun rule. Returns True when `out` holds an earlier output of this stage to discard before writing
    (--restart and a different config); False when there is nothing there, or it may be resumed or replaced.
    `may_differ` and `effective`: as config_differences (distill lets training.steps grow: train longer)."""
    out = Path(out)
    if not out.is_dir():
        return False
    entries = {p.name for p in out.iterdir()} - HARMLESS
    if not entries:
        return False
    path = out / RESOLVED
    if not path.is_file():
        raise OutputError(f"{out}: exists and is not a ddil {stage} output (no {RESOLVED}); choose an empty or new "
                          "--out folder")
    made_by = recorded_stage(path)
    if made_by is not None and made_by != stage:
        raise OutputError(f"{out}: holds a ddil {made_by} output, not a {stage} output; choose another --out folder")
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        recorded = None
    if not isinstance(recorded, dict):
        if restart:
            return True
        raise OutputError(f"{path}: unreadable, so this rerun cannot be checked against it; pass --restart to "
                          "start over")
    diffs = config_differences(recorded, config, may_differ=may_differ, effective=effective)
    if not diffs:
        return False
    if restart:
        log.warning("%s: --restart: discarding the output of another config (%s)", out, "; ".join(diffs[:5]))
        return True
    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    raise OutputError(f"{out}: was made with another config ({shown}); rerun with the same config to resume or "
                      "rebuild it, pass --restart to start over, or choose another --out")

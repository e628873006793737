"""Sharded safetensors datasets with a manifest: what cache-latents, teacher-rollouts and the replay buffer write.

A folder holds shard-00000.safetensors, ... and manifest.json with counts, shapes and per-shard sha256.
Writers build the folder under a temporary name and rename it when complete (docs/architecture.md: the artifact rule), so a
reader never sees a half-written folder; readers verify every shard's sha256 against the manifest.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

from ddil_core.config.redaction import redacted_json

MANIFEST = "manifest.json"


class ShardError(RuntimeError):
    """A shard folder is missing, unreadable or does not match its manifest; the message names the file."""


class DiskFullError(ShardError):
    """The disk (or quota) filled while writing an output; the message names the folder. Nothing is left behind."""


DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# How a full disk reaches us from writers that do not raise OSError: safetensors (Rust) raises SafetensorError
# "Error while serializing: I/O error: No space left on device (os error 28)"; torch.save's zip writer raises
# RuntimeError "[enforce fail at inline_container.cc:...] . unexpected pos N vs M" or "... file write failed"
# (measured on a full 64 KiB tmpfs). The torch one cannot tell a full disk from another write error: both are named.
DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc` is a writer's report of a full disk or quota (OSError, SafetensorError, torch.save's error)."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    text = str(exc)
    if any(t in text for t in DISK_FULL_TEXT):
        return True
    return isinstance(exc, RuntimeError) and "inline_container" in text and any(t in text for t in TORCH_WRITE_FAILED)


@contextlib.contextmanager
def disk_full_is_clear(folder: Path) -> Iterator[None]:
    """Turn 'No space left on device' (or a full quota) while writing into `folder` into a DiskFullError naming it."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFullError(disk_full_message(folder, exc)) from None


def disk_full_message(folder: Path, exc: BaseException) -> str:
    where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
    return (f"{folder}: no space left on device while writing{where}; free space or choose another output folder, "
            "then rerun")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """The identity of a folder's contents (e.g. a student pipeline): a sha256 over every file's relative path and
    sha256, independent of where the folder lies or when it was copied."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(redacted_json(data, indent=2, sort_keys=False))  # no secret is ever written
    os.replace(tmp, path)


def staging_dir(final: Path) -> Path:
    """A fresh temporary sibling of `final` to build an output in."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_staging(final: Path) -> None:
    """Remove `.NAME.tmp-PID` siblings of `final` left by a process of this host that was killed (SIGKILL, power
    loss) while building it. Call only under the output's writer lock; folders of live processes are kept."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for path in final.parent.glob(f".{final.name}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def partial_dir(final: Path) -> Path:
    """The persistent hidden staging folder `.NAME.partial` of a resumable writer (cache-latents, teacher-rollouts):
    a rerun after an interruption finds it and keeps its verified shards."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def publish_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by the completed `tmp` folder (rename; the old one is removed first)."""
    final = Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


class ShardWriter:
    """Accumulates batches of tensors (first dimension = sample) and writes fixed-size shards."""

    def __init__(self, folder: Path, kind: str, shard_size: int):
        self.folder, self.kind, self.shard_size = Path(folder), kind, shard_size
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._pending_count = 0
        self.shards: list[dict] = []
        self.count = 0
        self.shapes: dict[str, list[int]] = {}

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        n = {v.shape[0] for v in batch.values()}
        if len(n) != 1:
            raise ValueError(f"batch tensors disagree on the number of samples: {n}")
        for key, value in batch.items():
            self._pending.setdefault(key, []).append(value.detach().cpu().contiguous())
            self.shapes[key] = list(value.shape[1:])
        self._pending_count += n.pop()
        while self._pending_count >= self.shard_size:
            self._flush(self.shard_size)

    def adopt(self, entry: dict) -> None:
        """Take over a shard already in the folder (a verified shard of an interrupted run), as the next one."""
        from safetensors import safe_open

        if self._pending_count:
            raise ValueError("adopt() needs a shard boundary (samples are pending)")
        expected = f"shard-{len(self.shards):05d}.safetensors"
        if entry["file"] != expected:
            raise ValueError(f"adopt(): shard {entry['file']} is not the next one ({expected})")
        with safe_open(str(self.folder / entry["file"]), framework="pt") as f:
            for key in f.keys():
                self.shapes[key] = list(f.get_slice(key).get_shape()[1:])
        self.shards.append({"file": entry["file"], "count": int(entry["count"]), "sha256": entry["sha256"]})
        self.count += int(entry["count"])

    def _flush(self, n: int) -> None:
        joined = {k: torch.cat(v) for k, v in self._pending.items()}
        shard = {k: v[:n].contiguous() for k, v in joined.items()}
        self._pending = {k: [v[n:]] for k, v in joined.items()}
        self._pending_count -= n
        name = f"shard-{len(self.shards):05d}.safetensors"
        path = self.folder / name
        save_file(shard, str(path))
        self.shards.append({"file": name, "count": n, "sha256": sha256_file(path)})
        self.count += n

    def finish(self, **extra: Any) -> dict:
        if self._pending_count:
            self._flush(self._pending_count)
        manifest = {"kind": self.kind, "count": self.count, "shapes": self.shapes, "shards": self.shards, **extra}
        write_json_atomic(self.folder / MANIFEST, manifest)
        return manifest


class ResumableStaging:
    """The staging folder of a resumable shard writer (cache-latents, teacher-rollouts): `.NAME.partial`, hidden.

    After each complete shard the stage calls `record`, which writes partial.json: a fingerprint of everything the
    shards depend on (teacher, config, inputs) and, per shard, its file, count, sha256 and a digest of the inputs it
    covers. A rerun with the same fingerprint reuses a shard when its file still has that sha256 and the rerun's
    inputs for it have the same digest (`reusable`); anything else is rebuilt. `publish` renames the folder to its
    final name once complete; `discard` removes it (on errors: only an interruption keeps it for the rerun).
    """

    RECORD = "partial.json"

    def __init__(self, final: Path, fingerprint: dict, fresh: bool = False):
        """`fresh`: reuse nothing of an interrupted run (--restart)."""
        self.final = Path(final)
        self.folder = partial_dir(self.final)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.previous: list[dict] = []
        remove_stale_staging(self.final)  # `.NAME.tmp-PID` of a writer killed before resumable staging existed
        if self.folder.exists() and fresh:
            shutil.rmtree(self.folder)
        if self.folder.exists():
            try:
                data = json.loads((self.folder / self.RECORD).read_text())
            except (OSError, ValueError):
                data = None
            if (isinstance(data, dict) and data.get("fingerprint") == self.fingerprint
                    and isinstance(data.get("shards"), list)):
                self.previous = data["shards"]
            else:  # another teacher, config or dataset, or no record: nothing to reuse
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def reusable(self, index: int, inputs: str) -> Optional[dict]:
        """The interrupted run's entry of shard `index` when its inputs digest and file sha256 still match."""
        if index >= len(self.previous):
            return None
        entry = self.previous[index]
        path = self.folder / str(entry.get("file"))
        if entry.get("inputs") == inputs and path.is_file() and sha256_file(path) == entry.get("sha256"):
            return entry
        self.previous = self.previous[:index]  # this shard and the ones after it are rebuilt
        return None

    def record(self, shards: list[dict], inputs: list[str]) -> None:
        entries = [{**shard, "inputs": digest} for shard, digest in zip(shards, inputs)]
        write_json_atomic(self.folder / self.RECORD, {"fingerprint": self.fingerprint, "shards": entries})

    def publish(self, manifest: dict) -> None:
        """Drop the resume record, stray temporary files and shards not in `manifest`; rename to the final name."""
        listed = {entry["file"] for entry in manifest["shards"]}
        for path in self.folder.iterdir():
            stray = path.name.startswith("shard-") and path.name not in listed
            if path.name == self.RECORD or ".tmp-" in path.name or stray:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        publish_dir(self.folder, self.final)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def read_manifest(folder: Path, kind: Optional[str] = None) -> dict:
    """A shard folder's manifest.json, its layout checked: a mapping with kind, count and a list of shard entries
    (file: a plain file name in the folder, count: a non-negative int, sha256: 64 hex digits) whose counts add up."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path}: no manifest (is '{folder}' an output of the right stage?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise ShardError(f"{path}: unreadable manifest ({exc.strerror or exc})") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise ShardError(f"{path}: unreadable manifest ({problem})")
    if kind and manifest["kind"] != kind:
        raise ShardError(f"{path}: holds '{manifest['kind']}' shards, expected '{kind}'")
    return manifest


def _manifest_problem(manifest: Any) -> Optional[str]:
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    for key in ("kind", "count", "shards"):
        if key not in manifest:
            return f"KeyError: '{key}'"
    if not isinstance(manifest["kind"], str):
        return f"'kind' is {manifest['kind']!r}, not a name"
    count, shards = manifest["count"], manifest["shards"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return f"'count' is {count!r}, not a number of samples"
    if not isinstance(shards, list):
        return f"'shards' is {type(shards).__name__}, not a list"
    seen = set()
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            return f"shards[{i}] is {entry!r}, not an entry"
        name, n, digest = entry.get("file"), entry.get("count"), entry.get("sha256")
        if not isinstance(name, str) or not name or name != Path(name).name or name in (".", "..") or name in seen:
            return f"shards[{i}].file is {name!r}, not a distinct file name inside the folder"
        seen.add(name)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return f"shards[{i}].count is {n!r}, not a number of samples"
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            return f"shards[{i}].sha256 is {digest!r}, not a sha256 digest"
    if sum(e["count"] for e in shards) != count:
        return f"the shards hold {sum(e['count'] for e in shards)} samples, 'count' says {count}"
    return None


def verified_shards(folder: Path, kind: Optional[str], verify: bool = True) -> tuple[list[tuple[Path, int]], dict]:
    """[(shard file, sample count)] of a shard folder after checking each file exists and its sha256 against the
    manifest (what loading in memory and streaming both start from)."""
    folder = Path(folder)
    manifest = read_manifest(folder, kind)
    files = []
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise ShardError(f"{path}: listed in the manifest but missing")
        if verify and sha256_file(path) != entry["sha256"]:
            raise ShardError(f"{path}: sha256 does not match the manifest (corrupt or modified shard)")
        files.append((path, int(entry["count"])))
    return files, manifest


def load_shards(folder: Path, kind: Optional[str] = None, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """All shards of a folder concatenated, after checking each file's sha256 against the manifest, and each shard's
    tensors against the manifest's entry (count) and the other shards (the same tensor names and sample shapes)."""
    files, manifest = verified_shards(folder, kind, verify)
    parts: dict[str, list[torch.Tensor]] = {}
    shapes: Optional[dict[str, tuple]] = None
    for path, count in files:
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ShardError(f"{path}: unreadable shard ({exc})") from None
        counts = {k: (v.shape[0] if v.dim() else None) for k, v in tensors.items()}
        if not tensors or any(n != count for n in counts.values()):
            raise ShardError(f"{path}: holds {sorted(set(counts.values()), key=str) or 'no'} samples per tensor, the "
                             f"manifest says {count}")
        mine = {k: tuple(v.shape[1:]) for k, v in tensors.items()}
        recorded = manifest.get("shapes")
        if shapes is None and isinstance(recorded, dict) and {k: tuple(v) for k, v in recorded.items()
                                                              if isinstance(v, list)} != mine:
            raise ShardError(f"{path}: its tensors {mine} are not the shapes the manifest records {recorded}")
        if shapes is not None and mine != shapes:
            raise ShardError(f"{path}: its tensors {mine} do not match the folder's other shards {shapes}")
        shapes = mine
        for key, value in tensors.items():
            parts.setdefault(key, []).append(value)
    data = {k: torch.cat(v) for k, v in parts.items()}
    return data, manifest

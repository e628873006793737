"""A registry in a local folder: one folder per model version and an index.

Layout:
```
root/
  .lock                 fcntl lock file: version allocation and index updates are serialised across processes
  index.json            {"models": {name: [{"version": 1, "path": ..., "metrics": ..., "created": ..., ...}]}}
  <name>/v1/            the student (a diffusers pipeline folder) + README.md (model card) + metrics.json
  <name>/v2/
```
A registration holds the exclusive lock from version allocation to the index update: the student is copied to
`<name>/vN.tmp-<pid>`, the card and metrics are written, the folder is renamed to `<name>/vN`, then index.json
is replaced atomically (temporary file + os.replace). On any failure the new folder is removed and the index is
left as it was. A folder `vN.tmp-*` found while holding the lock belongs to a crashed registration and is
removed; a `vN` folder the index does not know (a crash between rename and index update) keeps its number
reserved, so versions are never reused.

A student given as a remote URI (s3://...) is not copied: its URI is recorded and the version folder holds only
the card and the metrics.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from ddil_core.config.redaction import redacted_json

from .model_card import redact, redact_string

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_DIR = re.compile(r"^v(\d+)$")
_TMP_DIR = re.compile(r"^v(\d+)\.tmp-\d+$")

CardSource = Union[str, Callable[[int, str], str]]


class RegistryError(RuntimeError):
    """The registry folder or its index is unusable; the message names the file."""


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _local_path(uri: Union[str, os.PathLike]) -> Path:
    s = os.fspath(uri)
    return Path(s[len("file://") :] if s.startswith("file://") else s)


def json_safe(obj: Any) -> Any:
    """Non-finite floats become null so the files stay strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _write_file(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_student_folder(student_dir: str) -> None:
    """A local student must be a diffusers pipeline folder (model_index.json at its root)."""
    if is_remote(student_dir):
        return
    path = _local_path(student_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"student folder not found: {student_dir}")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{student_dir} is not a diffusers pipeline folder: {path / 'model_index.json'} is missing"
        )


def copy_folder(source: Path, tmp: Path, final: Path) -> None:
    """shutil.copytree into `tmp`; a failure is one OSError naming `final` (the folder the user asked for), not
    shutil.Error's list of every file of a temporary folder that is removed at once."""
    try:
        shutil.copytree(source, tmp)
    except shutil.Error as exc:
        raise folder_copy_error(exc, source, final) from None


def folder_copy_error(exc: shutil.Error, source: Path, final: Path) -> OSError:
    failures = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    why = str(failures[0][2]) if failures and len(failures[0]) == 3 else str(exc)
    found = re.match(r"\[Errno (\d+)\] ([^:]+)", why)
    code, text = (int(found.group(1)), found.group(2)) if found else (errno.EIO, why.split(":")[0])
    more = f" ({len(failures)} files not copied)" if len(failures) > 1 else ""
    return OSError(code, f"copying {source} failed: {text}{more}", str(final))


class LocalRegistry:
    def __init__(self, root: Union[str, os.PathLike]):
        root_s = os.fspath(root)
        if is_remote(root_s):
            raise ValueError(
                f"the local registry needs a local folder, got {redact_string(root_s)}; "
                "set registry.kubeflow_address to use a Kubeflow Model Registry"
            )
        self.root = _local_path(root_s)
        self.index_path = self.root / "index.json"
        self.lock_path = self.root / ".lock"

    # ------------------------------------------------------------------------------------------------------------
    # index

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _read_index(self) -> dict:
        try:
            text = self.index_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"models": {}}
        try:
            index = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{self.index_path}: not valid JSON ({exc})") from None
        if not isinstance(index, dict) or not isinstance(index.get("models"), dict):
            raise RegistryError(f"{self.index_path}: expected {{\"models\": {{name: [entries]}}}}")
        return index

    def _write_index(self, index: dict) -> None:
        tmp = self.root / f"index.json.tmp-{os.getpid()}"
        try:
            _write_file(tmp, redacted_json(json_safe(index), indent=2, sort_keys=False) + "\n")
            os.replace(tmp, self.index_path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(self.root)

    # ------------------------------------------------------------------------------------------------------------
    # queries

    def models(self) -> list[str]:
        return sorted(self._read_index()["models"])

    def list_versions(self, name: str) -> list[dict]:
        entries = self._read_index()["models"].get(name, [])
        return sorted(entries, key=lambda e: e["version"])

    def get(self, name: str, version: Optional[int] = None) -> dict:
        """One entry; version None: the latest. KeyError names what is missing."""
        entries = self.list_versions(name)
        if not entries:
            raise KeyError(f"no model named '{name}' in registry {self.root}")
        if version is None:
            return entries[-1]
        for entry in entries:
            if entry["version"] == int(version):
                return entry
        raise KeyError(
            f"model '{name}' has no version {version} in registry {self.root}; "
            f"versions: {[e['version'] for e in entries]}"
        )

    # ------------------------------------------------------------------------------------------------------------
    # registration

    def _next_version(self, index: dict, name: str, model_dir: Path) -> int:
        numbers = [int(e["version"]) for e in index["models"].get(name, [])]
        if model_dir.is_dir():
            for child in model_dir.iterdir():
                if _VERSION_DIR.match(child.name):
                    numbers.append(int(child.name[1:]))
                elif _TMP_DIR.match(child.name):  # left by a crashed registration (we hold the lock)
                    shutil.rmtree(child, ignore_errors=True)
        return max(numbers, default=0) + 1

    def register(
        self,
        name: str,
        student_dir: str,
        metrics: dict,
        card_markdown: CardSource,
        extra: Optional[dict] = None,
    ) -> dict:
        """Register a student as the next version of `name`; returns its index entry.

        `card_markdown` is the README text, or a callable (version, model_uri) -> text for a card that names
        its own version and location (model_uri: the version folder, or the remote URI of a remote student). `extra` keys are added to the entry (`gates` goes in the entry's gates list); they
        cannot replace the entry's own keys.
        """
        if not NAME_PATTERN.match(name or ""):
            raise ValueError(
                f"model name {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        student_dir = os.fspath(student_dir)
        check_student_folder(student_dir)
        remote = is_remote(student_dir)
        extra = dict(extra or {})
        gates = extra.pop("gates", [])

        with self._locked():
            index = self._read_index()
            model_dir = self.root / name
            version = self._next_version(index, name, model_dir)
            final = model_dir / f"v{version}"
            tmp = model_dir / f"v{version}.tmp-{os.getpid()}"
            renamed = False
            try:
                model_dir.mkdir(parents=True, exist_ok=True)
                if remote:
                    tmp.mkdir()
                else:
                    copy_folder(_local_path(student_dir), tmp, final)
                final_s = str(final.resolve())
                model_uri = redact_string(student_dir) if remote else final_s
                card = card_markdown(version, model_uri) if callable(card_markdown) else card_markdown
                _write_file(tmp / "README.md", card)
                _write_file(tmp / "metrics.json", redacted_json(json_safe(metrics), indent=2) + "\n")
                os.rename(tmp, final)
                renamed = True
                _fsync_dir(model_dir)
                entry = {
                    "name": name,
                    "version": version,
                    "path": final_s,
                    "model_uri": model_uri,
                    "metrics": json_safe(metrics),
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "gates": json_safe(gates),
                    "source": redact_string(student_dir),
                }
                for key, value in redact(json_safe(extra)).items():
                    entry.setdefault(key, value)
                index["models"].setdefault(name, []).append(entry)
                self._write_index(index)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                if renamed:
                    shutil.rmtree(final, ignore_errors=True)
                with contextlib.suppress(OSError):
                    model_dir.rmdir()  # only when empty
                raise
        return entry

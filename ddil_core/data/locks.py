"""One writer per output folder: a lock file beside the folder with its owner (host, pid) and start time.

Two runs into different folders never interfere; a second run into the same folder is refused with a message
naming the owner, instead of silently mixing outputs. A lock left by a dead process on this host is taken over.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)


class OutputLockedError(RuntimeError):
    """Another run is writing the same output folder."""


def lock_path(folder: Path) -> Path:
    folder = Path(folder).resolve()
    return folder.with_name(f".{folder.name}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(folder: Path):
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                held = {}
            if held.get("host") == owner["host"] and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
                log.warning("taking over the stale lock %s of dead process %s", path, held["pid"])
                path.unlink(missing_ok=True)
                continue
            raise OutputLockedError(
                f"{folder}: another run is writing this folder (pid {held.get('pid')} on {held.get('host')} since "
                f"{held.get('started')}); wait for it, choose another --out, or remove {path} if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)

"""One writer per output folder: a lock file beside the folder, `.NAME.lock`, held with filelock's SoftFileLock.

Two runs into different folders never interfere; a second run into the same folder is refused with a message naming
the owner (pid, host, since when), instead of silently mixing outputs. filelock creates the file exclusively with the
owner's pid and host in it, takes over a lock whose owner on this host is dead, and removes the file on release.
SoftFileLock rather than filelock's flock-based FileLock: every contender of a FileLock opens (and truncates) the lock
file, so the refused run could not read who holds it, and the file would stay behind after the run.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from filelock import SoftFileLock, Timeout


class OutputLockedError(RuntimeError):
    """Another run is writing the same output folder."""


def lock_path(folder: Path) -> Path:
    folder = Path(folder).resolve()
    return folder.with_name(f".{folder.name}.lock")


def _owner(path: Path) -> str:
    """'pid P on HOST since T' from the record filelock wrote (its first two lines: pid, host) and the file's age."""
    try:
        lines = path.read_text().splitlines()
        since = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(path.stat().st_mtime))
    except OSError:
        return "an owner that just finished"
    pid = lines[0] if lines else "?"
    host = lines[1] if len(lines) > 1 else "?"
    return f"pid {pid} on {host} since {since}"


@contextlib.contextmanager
def output_lock(folder: Path):
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = SoftFileLock(str(path), timeout=0)  # a held lock is refused at once, never waited for
    try:
        lock.acquire()
    except Timeout:
        raise OutputLockedError(
            f"{folder}: another run is writing this folder ({_owner(path)}); wait for it, choose another --out, or "
            f"remove {path} if that run is gone") from None
    try:
        yield
    finally:
        lock.release()  # removes the file

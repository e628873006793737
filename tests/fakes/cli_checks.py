"""What every bad-input test asserts about a `ddil` run: the exit code, exactly one error line naming the
culprit and no traceback, and what the output location holds afterwards."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import diffusers  # noqa: F401  imported at collection: its log handler then writes to the session's stderr, not to
#                   the stream of whichever test's capsys imported it first (closed after that test: "Logging error")

from ddil_core.cli import EXIT_BAD_INPUT, main

NOISE = ("[transformers]", "Loading", "Writing model shards", "safety checker", "There are modules")


def run(capsys, *args: str) -> tuple[int, str]:
    """main(args) in-process; (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("ddil ")]


def assert_fails(code: int, err: str, *named: str, exit_code: int = EXIT_BAD_INPUT) -> str:
    """Exit `exit_code`, one `ddil ...` line that names each of `named`, no traceback; returns that line."""
    assert code == exit_code, err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for text in named:
        assert str(text) in lines[0], (text, lines[0])
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Locks, staging and partial folders beside or inside `folder`: none may stay after a failed run."""
    folder = Path(folder)
    found = []
    for root in (folder.parent, folder):
        if root.is_dir():
            found += [p.name for p in root.iterdir() if p.name.startswith(f".{folder.name}.") or ".tmp-" in p.name]
    return found


def assert_untouched(out: Path, before: Optional[dict] = None) -> None:
    """`out` is as it was: absent (before None) or holding exactly the files and bytes of `before`."""
    out = Path(out)
    if before is None:
        assert not out.exists(), sorted(p.name for p in out.iterdir()) if out.is_dir() else out
    else:
        assert snapshot(out) == before
    assert not leftovers(out), leftovers(out)


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

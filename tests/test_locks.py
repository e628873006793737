"""One writer per output folder."""
import json
import os
import subprocess
import sys

import pytest

from ddil_core.data.locks import OutputLockedError, lock_path, output_lock


def test_second_writer_is_refused_with_the_owner_named(tmp_path):
    out = tmp_path / "run"
    with output_lock(out):
        with pytest.raises(OutputLockedError, match=rf"{out}: another run is writing this folder \(pid {os.getpid()}"):
            with output_lock(out):
                pass
        with output_lock(tmp_path / "other"):  # another folder is fine
            pass
    assert not lock_path(out).exists()
    with output_lock(out):  # released
        pass


def test_a_dead_owner_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock_path(out).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "x"}))
    with output_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()

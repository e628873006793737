"""One writer per output folder."""
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

    lock_path(out).write_text(f"{int(dead.stdout)}\n{socket.gethostname()}\n")  # filelock's record: pid, host
    with output_lock(out):
        assert lock_path(out).read_text().splitlines()[:2] == [str(os.getpid()), socket.gethostname()]
    assert not lock_path(out).exists()


def test_a_live_owner_on_another_process_is_named(tmp_path):
    """A lock held by another live process (a child holding it) is refused naming that process."""
    out = tmp_path / "run"
    code = ("import sys, time; from ddil_core.data.locks import output_lock\n"
            f"with output_lock({str(out)!r}):\n    print('held', flush=True); sys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=rf"another run is writing this folder \(pid {child.pid} on "):
            with output_lock(out):
                pass
    finally:
        child.communicate("\n", timeout=30)
    with output_lock(out):  # released by its owner
        pass

"""A real Prometheus Pushgateway for tests.

Usage from any test module::

    from tests.fakes.pushgateway import pushgateway, read_metrics, metric_value  # noqa: F401

    def test_something(pushgateway):          # pushgateway == "http://127.0.0.1:PORT"
        ...
        assert metric_value(pushgateway, "ddil_train_step", run_id="r1", stage="distill") == 10

The fixture is session-scoped (one gateway process for the whole test session; use a unique run_id per test).
:func:`start_pushgateway` gives a private gateway as a context manager. When the
``prometheus-pushgateway`` binary is missing, the fixture skips: run ``.ci/install-services.sh`` (CI does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator, Optional

import pytest

BINARY = "prometheus-pushgateway"
INSTALL_HINT = "prometheus-pushgateway is not installed: run .ci/install-services.sh"


def find_binary() -> Optional[str]:
    path = shutil.which(BINARY)
    if path is None and os.access(f"/usr/bin/{BINARY}", os.X_OK):
        path = f"/usr/bin/{BINARY}"
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (also usable as a 'closed port')."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _url(address: str) -> str:
    address = address.rstrip("/")
    return address if "://" in address else "http://" + address


def _get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode("utf-8")


def read_metrics(address: str) -> str:
    """GET ``/metrics`` of the gateway (or any exporter) at ``address`` and return the text."""
    return _get(_url(address) + "/metrics")


def metric_value(address_or_text: str, name: str, **labels: str) -> Optional[float]:
    """The value of sample ``name`` whose labels include ``labels``; None if absent.

    ``address_or_text`` is an address to GET /metrics from, or exposition text already read.
    """
    from prometheus_client.parser import text_string_to_metric_families

    text = address_or_text
    if "\n" not in text and ("://" in text or text.count(":") == 1):
        text = read_metrics(text)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            _get(url + "/-/ready", timeout=0.5)
            return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    return False


@contextlib.contextmanager
def start_pushgateway(timeout_s: float = 15.0, attempts: int = 3) -> Iterator[str]:
    """Start a private Pushgateway on 127.0.0.1 (free port), yield ``http://127.0.0.1:PORT``, stop it."""
    binary = find_binary()
    if binary is None:
        pytest.skip(INSTALL_HINT)
    workdir = tempfile.mkdtemp(prefix="ddil-pushgateway-")
    log_path = os.path.join(workdir, "pushgateway.log")
    proc = None
    try:
        for _ in range(attempts):  # a port can be taken between free_port() and bind: retry on a new one
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [
                        binary,
                        f"--web.listen-address=127.0.0.1:{port}",
                        f"--persistence.file={os.path.join(workdir, 'pushgateway.data')}",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if _wait_ready(proc, url, timeout_s):
                break
            _stop(proc)
            proc = None
        if proc is None:
            with open(log_path, "rb") as f:
                tail = f.read()[-2000:].decode("utf-8", "replace")
            raise RuntimeError(f"prometheus-pushgateway did not become ready; its log:\n{tail}")
        yield url
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def pushgateway() -> Iterator[str]:
    """Address (``http://127.0.0.1:PORT``) of a real Pushgateway shared by the test session."""
    with start_pushgateway() as url:
        yield url


__all__ = ["pushgateway", "start_pushgateway", "read_metrics", "metric_value", "free_port", "find_binary"]

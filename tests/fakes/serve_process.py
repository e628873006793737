"""Start `ddil serve` (the real kserve.ModelServer) and a real S3 server (moto) as processes, for the serving tests.

The S3 server runs as its own process (not moto's in-process thread) so that a test can pause it with SIGSTOP:
a student on a paused S3 keeps `ddil serve` loading, which makes "not ready until loaded" observable.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx

from tests import ROOT
from tests.fakes.s3_server import free_port

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def wait_for(url: str, status: int = 200, timeout: float = 180.0, process: Optional[subprocess.Popen] = None,
              log: Optional[Path] = None) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text() if log else ''}")
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == status:
                return response
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {status} in {timeout} s:\n{log.read_text() if log else ''}")


class S3Process:
    """moto_server on 127.0.0.1 in a child process; `env` reaches it (credentials and endpoint)."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = dict(S3_ENV, AWS_ENDPOINT_URL=self.endpoint, AWS_ENDPOINT_URL_S3=self.endpoint)
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                         str(self.port)], stdout=open(log, "w"), stderr=subprocess.STDOUT)
        wait_for(self.endpoint + "/moto-api/", timeout=60, process=self.process, log=log)

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> str:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, **{k.lower(): v for k, v in S3_ENV.items()
                                                                if k != "AWS_DEFAULT_REGION"},
                          region_name=S3_ENV["AWS_DEFAULT_REGION"])
        s3.create_bucket(Bucket=bucket)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.process.terminate()
        self.process.wait(30)


class ServeProcess:
    """`python -m ddil_core.cli serve ARGS` with this checkout first on PYTHONPATH."""

    def __init__(self, args: list[str], log: Path, env: Optional[dict] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        OMP_NUM_THREADS="1", **(env or {}))
        self.process = subprocess.Popen([sys.executable, "-m", "ddil_core.cli", "serve", *args, "--http-port",
                                         str(self.port)], env=full_env, stdout=open(log, "w"),
                                        stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_live(self, timeout: float = 180.0) -> None:
        wait_for(self.url + "/", timeout=timeout, process=self.process, log=self.log)

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

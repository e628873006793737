"""A real S3-compatible server (moto) on 127.0.0.1 for tests, with credentials in the environment."""
from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_server(monkeypatch):
    """Yields the endpoint URL; boto3/s3fs clients in this process and its children reach it via env vars.

    fsspec caches filesystem instances by their arguments, not by the environment: an S3FileSystem made for an
    earlier test's server (now stopped) would be handed out again, so the cache is cleared on the way in and out."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()  # per class: each filesystem class keeps its own cache

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    try:
        yield endpoint
    finally:
        server.stop()
        S3FileSystem.clear_instance_cache()

"""The HTTP plumbing every API stub here shares, written once: a ThreadingHTTPServer on 127.0.0.1 and a free port,
served from a daemon thread, started and stopped as a context manager. A stub says which methods it answers and
implements `handle(request)`; everything about the API it imitates stays in its own module.

    class MyStub(HttpStub):
        methods = ("GET", "POST")

        def handle(self, request):          # request: a StubRequest (a BaseHTTPRequestHandler)
            request.send_json(200, {"path": request.path, "body": request.body().decode()})

    with MyStub() as stub:
        httpx.get(stub.url + "/x")
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional


class StubRequest(BaseHTTPRequestHandler):
    """One request to a stub: no access log, and helpers to read the body and answer with JSON."""

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _to_stub(self) -> None:
        self.server.stub.handle(self)


class HttpStub:
    """Base of the API stubs. A method not in `methods` is answered 501, as BaseHTTPRequestHandler answers it."""

    methods: tuple[str, ...] = ("GET", "POST", "DELETE")
    protocol_version = "HTTP/1.1"  # keep-alive; streamed answers (the Kubernetes stub's watches) close themselves
    request_class: type[StubRequest] = StubRequest
    bind: tuple[str, int] = ("127.0.0.1", 0)  # port 0: a free one
    _server: Optional[ThreadingHTTPServer] = None

    def handle(self, request: StubRequest) -> None:
        raise NotImplementedError

    def start(self):
        members = {f"do_{method}": self.request_class._to_stub for method in self.methods}
        handler = type("Request", (self.request_class,), {"protocol_version": self.protocol_version, **members})
        self._server = ThreadingHTTPServer(self.bind, handler)
        self._server.stub = self
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         name=type(self).__name__, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None, "stub not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        assert self._server is not None, "stub not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

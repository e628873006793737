"""The OpenAI images API on the same server: `POST /openai/v1/images/generations` (and `/v1/images/generations`),
`GET /openai/v1/models`, answered by the same student, batcher and sampler as KServe v1 and v2.

    {"prompt": "a handwritten digit seven", "n": 2, "size": "24x16", "response_format": "b64_json",
     "model": "ddil-student", "seed": 7, "num_inference_steps": 2, "guidance_scale": 1.5, "negative_prompt": "...",
     "eta": 0.3}
    -> {"created": 1767225600, "data": [{"b64_json": PNG base64}, {"b64_json": ...}]}

Image i of a request has seed `seed + i` (seed default 0, as `ddil sample`), so `n` images are those of n
`ddil sample` runs. Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with `param` the
request field at fault, so the official `openai` client raises BadRequestError / NotFoundError naming it.

The routes are mounted under /openai/v1 (KServe's own prefix for its OpenAI endpoints, KSERVE_OPENAI_ROUTE_PREFIX)
because KServe's v1 protocol already answers `GET /v1/models` with its own list ({"models": [...]}): an OpenAI
client uses base_url http://HOST:PORT/openai/v1. `POST /v1/images/generations` clashes with nothing in KServe, so
it is answered at the root too. They are added to KServe's FastAPI app (kserve.model_server.app) with
`app.include_router` before the server starts, beside the routes KServe registers itself.
"""
from __future__ import annotations

import base64
import json
import logging
import re
import time
from typing import Any, Optional

from ddil_core.config.limits import LimitExceeded, check_json_nesting
from ddil_core.serving.protocol import BadRequest, Instance, Limits, _integer, make_instance

log = logging.getLogger(__name__)

PREFIX = "/openai/v1"
# OpenAI's fields and the extensions diffusion clients send; each maps to make_instance's option of that meaning
EXTENSIONS = {"seed": "seed", "num_inference_steps": "steps", "guidance_scale": "guidance",
              "negative_prompt": "negative_prompt", "eta": "eta"}
FIELDS = ("prompt", "n", "size", "response_format", "model", "quality", "style", "output_format", "stream", "user",
          *EXTENSIONS)
_SIZE = re.compile(r"(\d+)x(\d+)")


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type_: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(field: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{field}: {message}", param=field)


def parse_images_request(body: Any, limits: Limits, model_name: str) -> list[Instance]:
    """The instances of an images request, each field checked; OpenAIError (400 naming the field, or 404 for
    another model) otherwise."""
    if not isinstance(body, dict):
        raise OpenAIError(400, f"request: expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise _bad(unknown[0], f"unknown field (known: {', '.join(FIELDS)})")
    model = body.get("model")
    if model is not None and model != model_name:
        raise OpenAIError(404, f"model: '{model}' is not served here (this server serves '{model_name}')",
                          param="model", code="model_not_found")
    response_format = body.get("response_format") or "b64_json"
    if response_format == "url":
        raise _bad("response_format", "'url' is not supported: this server keeps no images to link to; "
                                      "ask for 'b64_json'")
    if response_format != "b64_json":
        raise _bad("response_format", f"{response_format!r} is not one of 'b64_json'")
    for field, allowed in (("quality", ("auto", "standard")), ("style", ()), ("output_format", ("png",)),
                           ("stream", (False,))):
        if body.get(field) is not None and body[field] not in allowed:
            raise _bad(field, f"{body[field]!r} is not supported" + (
                f" (supported: {', '.join(allowed)})" if allowed else ""))
    if "prompt" not in body:
        raise _bad("prompt", "missing")
    try:
        n = 1 if body.get("n") is None else _integer("n", body["n"])
    except BadRequest as exc:
        raise _bad("n", str(exc).partition(": ")[2]) from None
    if not 1 <= n <= limits.max_batch_size:
        raise _bad("n", f"{n} is outside [1, {limits.max_batch_size}] (the server's --max-batch-size)")
    options = {name: body.get(field) for field, name in EXTENSIONS.items()}
    size = body.get("size")
    if size is not None and size != "auto":
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise _bad("size", f"expected 'WIDTHxHEIGHT' such as '512x768', got {size!r}")
        options["width"], options["height"] = int(match.group(1)), int(match.group(2))
    try:
        seed = 0 if options["seed"] is None else _integer("seed", options["seed"])
    except BadRequest as exc:
        raise _bad("seed", str(exc).partition(": ")[2]) from None
    out = []
    for i in range(n):
        options["seed"] = seed + i  # n images: the seeds seed, seed + 1, ... (each checked by make_instance)
        try:
            out.append(make_instance(body["prompt"], options, limits))
        except BadRequest as exc:  # name the field as the client sent it
            field, _, message = str(exc).partition(": ")
            field = {"width": "size", "height": "size"}.get(field) or next(
                (f for f, name in EXTENSIONS.items() if name == field), field)
            raise _bad(field, message) from None
    return out


def images_response(pngs: list[bytes]) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(p).decode("ascii")} for p in pngs]}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "ddil"}


def openai_router(predictor):
    """The FastAPI router of the OpenAI routes for `predictor` (a StudentPredictor), to include in KServe's app."""
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse

    created = int(time.time())

    def error(exc: OpenAIError) -> JSONResponse:
        log.info("openai: %d %s", exc.status, exc.message)  # a client's error: one line, no traceback
        return JSONResponse(exc.body(), status_code=exc.status)

    async def generate(request):
        try:
            try:
                raw = await request.body()
                check_json_nesting(raw, "request body")
                body = json.loads(raw)
            except LimitExceeded as exc:
                raise OpenAIError(400, str(exc)) from None
            except (ValueError, UnicodeDecodeError) as exc:
                raise OpenAIError(400, f"request: not JSON ({exc})") from None
            if not predictor.ready:
                raise OpenAIError(503, f"model '{predictor.name}' is loading", type_="server_error")
            instances = parse_images_request(body, predictor.limits, predictor.name)
        except OpenAIError as exc:
            return error(exc)
        try:
            pngs = await predictor.batcher.submit(instances)
        except Exception as exc:  # noqa: BLE001 - a failed batch is a 500 for its requests; the server goes on
            log.exception("generation failed")
            return JSONResponse(OpenAIError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                            type_="server_error").body(), status_code=500)
        return JSONResponse(images_response(pngs))

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_card(predictor.name, created)]})

    async def model(request):
        model_id = request.path_params["model_id"]
        if model_id != predictor.name:
            return error(OpenAIError(404, f"model: '{model_id}' is not served here", param="model",
                                     code="model_not_found"))
        return JSONResponse(model_card(predictor.name, created))

    # Plain Starlette routes (handlers of the request itself): the body is parsed and checked here, with OpenAI's
    # error shape, not by FastAPI's schema validation
    router = APIRouter()
    router.add_route(f"{PREFIX}/images/generations", generate, methods=["POST"])
    router.add_route("/v1/images/generations", generate, methods=["POST"])  # clashes with nothing of KServe's
    router.add_route(f"{PREFIX}/models", models, methods=["GET"])
    router.add_route(f"{PREFIX}/models/{{model_id}}", model, methods=["GET"])
    return router


class RequestSizeLimit:
    """ASGI middleware, in front of every route (KServe's v1 / v2 and the OpenAI ones): a request body over
    `max_bytes` (by its Content-Length) is answered 413 before it is read, and a body without a Content-Length
    (chunked) 411, so no route reads an unbounded body (uvicorn holds a body to its declared length). A JSON body
    (or one without a content type, which KServe parses as JSON) nested deeper than the limit is answered 400 before
    any parser recurses into it (KServe's orjson and FastAPI's json.loads would answer 500 or fail)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        problem = None
        if length is None and b"chunked" in headers.get(b"transfer-encoding", b""):
            problem = 411, "request body: send a Content-Length (chunked bodies are not accepted)"
        elif length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            problem = 413, (f"request body: {length.decode('latin-1')} bytes, more than the limit of "
                            f"{self.max_bytes} (--max-request-bytes)")
        if problem is None:
            content_type = headers.get(b"content-type", b"application/json").lower()
            if b"json" not in content_type:
                return await self.app(scope, receive, send)
            body, more = b"", True  # at most max_bytes: its Content-Length was checked
            while more:
                event = await receive()
                if event["type"] != "http.request":  # the client went away
                    return await self.app(scope, _replay(b"", event, receive), send)
                body += event.get("body", b"")
                more = event.get("more_body", False)
            try:
                check_json_nesting(body, "request body")
            except LimitExceeded as exc:
                problem = 400, str(exc)
            else:
                return await self.app(scope, _replay(body, None, receive), send)
        status, message = problem
        log.info("%d %s", status, message)
        if scope["path"].startswith((PREFIX + "/", "/v1/images/")):
            body = OpenAIError(status, message).body()
        else:
            body = {"error": message}  # KServe's error shape
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def _replay(body: bytes, first, receive):
    """An ASGI receive that gives the body already read (or the message that ended the reading), then the rest."""
    sent = []

    async def replay():
        if not sent:
            sent.append(True)
            return first if first is not None else {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

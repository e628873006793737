"""The parts of `ddil serve` on their own: the request batcher, request parsing, model sources and the command line.

The Kubeflow Model Registry server cannot run here: registry:// lookups in it go to
tests/fakes/kubeflow_registry_stub.py. The server itself, over HTTP, is tests/serving/test_serve.py.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ddil_core.models.pipeline_io import ModelError
from ddil_core.serving.batcher import Batcher
from ddil_core.serving.protocol import BadRequest, Limits, parse_v1, parse_v2
from ddil_core.serving.source import parse_registry_uri, resolve_source, storage_location
from tests.fakes.kubeflow_registry_stub import KubeflowRegistryStub

LIMITS = Limits(max_batch_size=4, max_steps=50, native_size=16, max_size=32, default_steps=2, default_guidance=7.0)


# ----------------------------------------------------------------------------------------------------------------
# batcher


def run_async(coro):
    return asyncio.run(coro)


def test_batcher_groups_waiting_items_by_key_up_to_the_limit_and_keeps_order():
    batches = []
    gate = asyncio.Event()

    def run(items):
        batches.append(list(items))
        return [f"done {item}" for item in items]

    async def scenario():
        batcher = Batcher(run, key=lambda item: item[0], max_batch_size=3)
        loop = asyncio.get_running_loop()
        original = batcher._run

        def blocking_first(items):  # the first batch holds the worker until every other request is queued
            if len(batches) == 0:
                asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
            return original(items)

        batcher._run = blocking_first
        first = asyncio.create_task(batcher.submit([("a", 0)]))
        await asyncio.sleep(0.05)
        later = [asyncio.create_task(batcher.submit(items)) for items in
                 ([("a", 1), ("b", 2)], [("a", 3)], [("a", 4), ("a", 5)], [("b", 6)])]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(first, *later)
        batcher.close()
        return results

    results = run_async(scenario())
    assert results == [["done ('a', 0)"], ["done ('a', 1)", "done ('b', 2)"], ["done ('a', 3)"],
                       ["done ('a', 4)", "done ('a', 5)"], ["done ('b', 6)"]]
    assert batches == [[("a", 0)], [("a", 1), ("a", 3), ("a", 4)], [("b", 2), ("b", 6)], [("a", 5)]]


def test_batcher_fails_only_the_batch_that_raised():
    def run(items):
        if any(item == "bad" for item in items):
            raise RuntimeError("out of memory")
        return [item.upper() for item in items]

    async def scenario():
        batcher = Batcher(run, key=lambda item: item, max_batch_size=8)
        with pytest.raises(RuntimeError, match="out of memory"):
            await batcher.submit(["bad"])
        ok = await batcher.submit(["fine"])
        batcher.close()
        return ok

    assert run_async(scenario()) == ["FINE"]


def test_batcher_waits_for_more_only_when_asked():
    sizes = []

    def run(items):
        sizes.append(len(items))
        return items

    async def scenario(wait):
        batcher = Batcher(run, key=lambda item: 0, max_batch_size=4, max_wait_s=wait)
        first = asyncio.create_task(batcher.submit([1]))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit([2]))
        await asyncio.gather(first, second)
        batcher.close()

    run_async(scenario(0.0))
    assert sizes == [1, 1]
    sizes.clear()
    run_async(scenario(0.5))
    assert sizes == [2]


# ----------------------------------------------------------------------------------------------------------------
# request parsing (the HTTP side of the same messages is in tests/serving/test_serve.py)


def test_v1_defaults_parameters_and_per_instance_options():
    [a, b] = parse_v1({"instances": ["a digit", {"prompt": "a cat", "seed": 5, "steps": 4, "width": 24}],
                       "parameters": {"guidance": 3}}, LIMITS)
    assert (a.prompt, a.seed, a.steps, a.guidance, a.width, a.height) == ("a digit", 0, 2, 3.0, 16, 16)
    assert (b.prompt, b.seed, b.steps, b.guidance, b.width, b.height) == ("a cat", 5, 4, 3.0, 24, 24)  # one side
    assert a.batch_key != b.batch_key


def test_non_square_sizes_never_share_a_batch():
    [wide, tall, wide_again] = parse_v1({"instances": [{"prompt": "a", "width": 24, "height": 16},
                                                       {"prompt": "b", "width": 16, "height": 24},
                                                       {"prompt": "c", "width": 24, "height": 16, "seed": 3}]},
                                        LIMITS)
    assert (wide.width, wide.height, tall.width, tall.height) == (24, 16, 16, 24)
    assert wide.batch_key != tall.batch_key and wide.batch_key == wide_again.batch_key


def test_eta_and_negative_prompt_only_where_the_student_can_use_them():
    tcd = Limits(max_batch_size=4, max_steps=50, native_size=16, max_size=32, default_steps=2,
                 default_guidance=7.0, accepts_eta=True, default_eta=0.3)
    [default, given] = parse_v1({"instances": ["a", {"prompt": "b", "eta": 0.7, "negative_prompt": "blur"}]}, tcd)
    assert (default.eta, given.eta, given.negative_prompt) == (0.3, 0.7, "blur")
    assert default.batch_key != given.batch_key
    for body, limits, field in [
        ({"instances": [{"prompt": "a", "eta": 0.5}]}, LIMITS, "instances[0].eta"),  # LCM-like: no eta
        ({"instances": [{"prompt": "a", "eta": 1.5}]}, tcd, "instances[0].eta"),
        ({"instances": ["a"], "parameters": {"negative_prompt": "blur", "guidance": 1.0}}, tcd,
         "parameters.negative_prompt"),
        ({"instances": [{"prompt": "a", "negative_prompt": "blur"}]},
         Limits(4, 50, 16, 32, 2, 7.0, guidance_embedded=True), "instances[0].negative_prompt"),
    ]:
        with pytest.raises(BadRequest) as info:
            parse_v1(body, limits)
        assert str(info.value).startswith(field + ":"), info.value


def v2_request(inputs, parameters=None):
    from kserve import InferInput

    return SimpleNamespace(inputs=[InferInput(**i) for i in inputs], parameters=parameters, id="r1")


def test_v2_tensors_broadcast_one_value_or_take_one_per_prompt():
    request = v2_request([
        {"name": "prompt", "shape": [2, 1], "datatype": "BYTES", "data": [["a digit"], ["a cat"]]},
        {"name": "seed", "shape": [2], "datatype": "INT64", "data": [4, 9]},
        {"name": "guidance", "shape": [1], "datatype": "FP32", "data": [1.5]}], {"steps": 3})
    [a, b] = parse_v2(request, LIMITS)
    assert [(i.prompt, i.seed, i.steps, i.guidance) for i in (a, b)] == [("a digit", 4, 3, 1.5), ("a cat", 9, 3, 1.5)]


@pytest.mark.parametrize("inputs, parameters, field", [
    ([{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]},
      {"name": "width", "shape": [1], "datatype": "INT32", "data": [16]},
      {"name": "height", "shape": [1], "datatype": "INT32", "data": [44]}], None, "inputs[height][0]"),
    ([{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]}], {"seed": 2**63}, "parameters.seed"),
    ([{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x" * 5000]}], None, "inputs[prompt][0]"),
    ([{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]},
      {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["y"]}], None, "inputs[prompt]"),
    ([{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]}], {"guidance": float("nan")},
     "parameters.guidance"),
])
def test_v2_bad_fields_are_named(inputs, parameters, field):
    with pytest.raises(BadRequest) as info:
        parse_v2(v2_request(inputs, parameters), LIMITS)
    assert str(info.value).startswith(field + ":"), info.value


def test_limits_reject_impossible_settings():
    with pytest.raises(ValueError, match="max batch size"):
        Limits(max_batch_size=0, max_steps=50, native_size=16, max_size=32, default_steps=2, default_guidance=7.0)
    with pytest.raises(ValueError, match="max size"):
        Limits(max_batch_size=1, max_steps=50, native_size=16, max_size=20, default_steps=2, default_guidance=7.0)


# ----------------------------------------------------------------------------------------------------------------
# the OpenAI images API (over HTTP with the official client: tests/serving/test_serve.py)


def test_openai_request_n_images_take_consecutive_seeds_and_the_size_is_width_x_height():
    from ddil_core.serving.openai_api import parse_images_request

    instances = parse_images_request({"prompt": "a cat", "n": 3, "size": "24x16", "seed": 5,
                                      "num_inference_steps": 4, "guidance_scale": 1.5, "model": "m",
                                      "response_format": "b64_json"}, LIMITS, "m")
    assert [(i.seed, i.width, i.height, i.steps, i.guidance) for i in instances] == [
        (5, 24, 16, 4, 1.5), (6, 24, 16, 4, 1.5), (7, 24, 16, 4, 1.5)]
    [default] = parse_images_request({"prompt": "a cat"}, LIMITS, "m")
    assert (default.seed, default.width, default.height, default.steps) == (0, 16, 16, 2)


@pytest.mark.parametrize("body, param, status", [
    ({}, "prompt", 400),
    ({"prompt": ""}, "prompt", 400),
    ({"prompt": "x" * 5000}, "prompt", 400),
    ({"prompt": "a", "n": 0}, "n", 400),
    ({"prompt": "a", "n": 5}, "n", 400),  # over --max-batch-size (4 here)
    ({"prompt": "a", "n": "two"}, "n", 400),
    ({"prompt": "a", "size": "16"}, "size", 400),
    ({"prompt": "a", "size": "20x16"}, "size", 400),  # not a multiple of 8
    ({"prompt": "a", "size": "16x40"}, "size", 400),  # over --max-size (32 here)
    ({"prompt": "a", "num_inference_steps": 51}, "num_inference_steps", 400),
    ({"prompt": "a", "guidance_scale": "high"}, "guidance_scale", 400),
    ({"prompt": "a", "seed": -1}, "seed", 400),
    ({"prompt": "a", "seed": 1.5}, "seed", 400),
    ({"prompt": "a", "eta": 0.3}, "eta", 400),  # this student's scheduler takes none
    ({"prompt": "a", "response_format": "url"}, "response_format", 400),
    ({"prompt": "a", "response_format": "jpeg"}, "response_format", 400),
    ({"prompt": "a", "quality": "hd"}, "quality", 400),
    ({"prompt": "a", "steps": 2}, "steps", 400),  # a typo is named, not ignored
    ({"prompt": "a", "model": "dall-e-3"}, "model", 404),
])
def test_openai_bad_fields_are_named_in_openai_error_shape(body, param, status):
    from ddil_core.serving.openai_api import OpenAIError, parse_images_request

    with pytest.raises(OpenAIError) as info:
        parse_images_request(body, LIMITS, "m")
    error = info.value.body()["error"]
    assert (info.value.status, error["param"]) == (status, param), error
    assert error["message"].startswith(param + ":") and error["type"] == "invalid_request_error"
    assert error["code"] == ("model_not_found" if status == 404 else None)


def test_request_size_limit_answers_413_and_411_before_the_route_reads_the_body():
    from fastapi import FastAPI
    from starlette.responses import JSONResponse
    from starlette.testclient import TestClient

    from ddil_core.serving.openai_api import RequestSizeLimit

    app = FastAPI()
    seen = []

    async def echo(request):
        seen.append(len(await request.body()))
        return JSONResponse({"ok": True})

    app.add_route("/v1/models/m:predict", echo, methods=["POST"])
    app.add_route("/openai/v1/images/generations", echo, methods=["POST"])
    app.add_middleware(RequestSizeLimit, max_bytes=100)
    client = TestClient(app)
    assert client.post("/v1/models/m:predict", content=b"x" * 100).status_code == 200
    too_big = client.post("/v1/models/m:predict", content=b"x" * 101)
    assert too_big.status_code == 413 and too_big.json()["error"].startswith("request body: 101 bytes")
    openai = client.post("/openai/v1/images/generations", content=b"x" * 101)
    assert openai.status_code == 413 and "--max-request-bytes" in openai.json()["error"]["message"]
    chunked = client.post("/v1/models/m:predict", content=iter([b"x"] * 3))
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]
    assert seen == [100]  # the refused bodies never reached the route


# ----------------------------------------------------------------------------------------------------------------
# model sources


def fake_student(path: Path) -> Path:
    """A folder that passes check_model_folder (the registry copies it; nothing loads it here)."""
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        index[part] = ["diffusers", "X"]
        (path / part).mkdir(parents=True)
        if part in ("unet", "vae", "text_encoder"):
            (path / part / "model.safetensors").write_bytes(b"0")
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def test_registry_uris_resolve_in_a_local_registry(tmp_path):
    from ddil_core.registry import LocalRegistry

    registry = LocalRegistry(tmp_path / "registry")
    student = fake_student(tmp_path / "student")
    one = registry.register("digits", str(student), {"models": {}}, "card")
    two = registry.register("digits", str(student), {"models": {}}, "card")
    remote = registry.register("digits", "s3://bucket/runs/3/student", {"models": {}}, "card")
    root = str(tmp_path / "registry")
    assert resolve_source("registry://digits/1", registry=root).location == one["path"]
    assert resolve_source("registry://digits/v2", registry=root).location == two["path"]
    latest = resolve_source("registry://digits", registry=root)
    assert latest.location == "s3://bucket/runs/3/student" and latest.registry_entry["version"] == remote["version"]
    missing = r"registry://digits/9: model 'digits' has no version 9.*versions: \[1, 2, 3\]"
    with pytest.raises(ModelError, match=missing):
        resolve_source("registry://digits/9", registry=root)
    with pytest.raises(ModelError, match="no model named 'cats'"):
        resolve_source("registry://cats/1", registry=root)


def test_registry_uris_resolve_in_a_kubeflow_model_registry(tmp_path):
    from ddil_core.registry import KubeflowRegistry

    with KubeflowRegistryStub() as stub:
        registry = KubeflowRegistry("127.0.0.1", stub.port)
        registry.register("digits", str(fake_student(tmp_path / "a")), {"models": {}})
        registry.register("digits", "minio://mlpipeline/v2/artifacts/ddil/run-7/distill/student", {"models": {}})
        address = f"127.0.0.1:{stub.port}"
        first = resolve_source("registry://digits/v1", kubeflow_registry=address)
        assert first.location == str((tmp_path / "a").resolve())  # file:// as a path
        latest = resolve_source("registry://digits/latest", kubeflow_registry=address)
        assert latest.location == "s3://mlpipeline/v2/artifacts/ddil/run-7/distill/student"
        with pytest.raises(ModelError, match="has no version v5"):
            resolve_source("registry://digits/5", kubeflow_registry=address)


def test_model_uris_are_checked_before_the_server_starts(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        resolve_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="a served model is a folder, s3://"):
        resolve_source("gs://bucket/student")
    assert resolve_source("s3://bucket/student").location == "s3://bucket/student"  # checked when it loads
    for bad in ("registry://", "registry://digits/one", "registry://a/1/2"):
        with pytest.raises(ModelError, match="registry://"):
            parse_registry_uri(bad)
    assert storage_location("file:///srv/x") == "/srv/x" and storage_location("minio://b/k") == "s3://b/k"


# ----------------------------------------------------------------------------------------------------------------
# the command line


def test_every_serve_option_has_help():
    from ddil_core.cli import build_parser

    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    options = [a for a in serve._actions if a.option_strings and a.dest != "help"]
    assert {a.option_strings[0] for a in options} >= {"--model", "--host", "--http-port", "--max-batch-size", "--name",
                                                      "--max-request-bytes"}
    for action in options:
        assert action.help and len(action.help) > 10, action.option_strings
    assert "registry://NAME/VERSION" in serve.format_help()


def test_serve_rejects_a_bad_model_with_exit_2_and_one_line(tmp_path, capsys):
    from ddil_core.cli import main

    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ddil serve: error: model folder not found: {tmp_path / 'nowhere'}"


@pytest.mark.parametrize("flag, value", [("--max-size", "20"), ("--max-batch-size", "0"), ("--http-port", "99999"),
                                         ("--batch-wait-ms", "-1"), ("--max-request-bytes", "0")])
def test_serve_rejects_bad_flags(flag, value, capsys):
    from ddil_core.cli import main

    assert main(["serve", "--model", "x", flag, value]) == 2  # argparse's exit code, returned (cli.main)
    assert flag in capsys.readouterr().err

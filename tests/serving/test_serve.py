"""`ddil serve` end to end: the real kserve.ModelServer with a tiny LCM student, over HTTP on 127.0.0.1.

The student is distilled here (tiny://sd15 teacher, objective lcm: an LCMScheduler student with its own
timesteps) and served from a real S3 server (moto, its own process). That S3 server is paused (SIGSTOP) while
`ddil serve` starts, so the test sees the server live but the model not ready, then resumes it and sees the
model become ready. Every image, over KServe v1 and v2 and over the OpenAI images API through the official `openai`
client, is checked against `ddil sample` (which samples a student with its own scheduler) for the same prompt,
seed, steps, guidance and size, square or not; every bad request gets a 4xx naming its field, and the server
answers the next good request. The server listens on 127.0.0.1 only (`--host`).
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from ddil_core.cli import main
from tests.conftest import tiny_config
from tests.fakes.serve_process import S3Process, ServeProcess, wait_for

NAME = "student"
MAX_BATCH = 4
MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def lcm_student(tiny_data, tmp_path_factory):
    from ddil_core.stages.distill import distill

    latents, rollouts = tiny_data["sd15"]
    return distill(tiny_config("sd15", "objective.name=lcm"), latents, [rollouts],
                   tmp_path_factory.mktemp("lcm") / "run")


@pytest.fixture(scope="module")
def server(lcm_student, tmp_path_factory):
    """The server, with what it answered while its S3 was paused."""
    logs = tmp_path_factory.mktemp("serve-logs")
    s3 = S3Process(logs / "s3.log")
    uri = s3.upload_folder(lcm_student, "models", "ddil/lcm-student")
    s3.pause()
    serve = ServeProcess(["--model", uri, "--name", NAME, "--max-batch-size", str(MAX_BATCH), "--host", "127.0.0.1",
                          "--max-request-bytes", str(MAX_REQUEST_BYTES)], logs / "serve.log",
                         env=dict(s3.env, DDIL_CACHE=str(tmp_path_factory.mktemp("cache"))))
    try:
        serve.wait_live()
        while_loading = {
            "v1 ready": httpx.get(f"{serve.url}/v1/models/{NAME}").status_code,
            "v2 ready": httpx.get(f"{serve.url}/v2/models/{NAME}/ready").status_code,
            "v1 predict": httpx.post(f"{serve.url}/v1/models/{NAME}:predict", json={"instances": ["a digit"]},
                                     timeout=30).status_code,
            "openai": httpx.post(f"{serve.url}/openai/v1/images/generations", json={"prompt": "a digit"},
                                 timeout=30).status_code,
        }
        s3.resume()
        wait_for(f"{serve.url}/v2/models/{NAME}/ready", process=serve.process, log=serve.log)
        serve.while_loading = while_loading
        yield serve
    finally:
        serve.stop()
        s3.stop()


def v1(server, body, timeout=120) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{NAME}:predict", json=body, timeout=timeout)


def v2(server, body, timeout=120) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{NAME}/infer", json=body, timeout=timeout)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def ddil_sample(student, tmp_path, prompt, seed, *extra) -> bytes:
    """The PNG of `ddil sample` with its defaults (a student samples with its own scheduler)."""
    out = tmp_path / f"sample-{seed}-{'_'.join(extra)}.png"
    code = main(["sample", "--model", str(student), "--prompt", prompt, "--seed", str(seed), "--out", str(out),
                 *extra])
    assert code == 0
    return out.read_bytes()


def prompt_input(prompts, **kw):
    return dict({"name": "prompt", "datatype": "BYTES", "shape": [len(prompts)], "data": prompts}, **kw)


def good_request_succeeds(server) -> None:
    response = v1(server, {"instances": ["a handwritten digit two"]})
    assert response.status_code == 200, response.text
    assert pixels(base64.b64decode(response.json()["predictions"][0]["image"]["b64"])).shape == (16, 16, 3)


# ----------------------------------------------------------------------------------------------------------------
# readiness and protocols


def test_not_ready_until_the_student_is_loaded(server):
    assert server.while_loading == {"v1 ready": 503, "v2 ready": 503, "v1 predict": 503, "openai": 503}
    assert httpx.get(f"{server.url}/v1/models/{NAME}").json() == {"name": NAME, "ready": True}
    assert httpx.get(f"{server.url}/v2/models/{NAME}/ready").json() == {"name": NAME, "ready": True}


def test_v1_image_equals_ddil_sample(server, lcm_student, tmp_path):
    prompt = "a handwritten digit seven"
    response = v1(server, {"instances": [{"prompt": prompt, "seed": 7}]})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    info = json.loads((lcm_student / "ddil_student.json").read_text())
    assert {k: prediction[k] for k in ("seed", "steps", "guidance", "width", "height")} == {
        "seed": 7, "steps": info["num_inference_steps"], "guidance": info["guidance_scale"], "width": 16,
        "height": 16}  # the student's recommendation
    served = base64.b64decode(prediction["image"]["b64"])
    expected = ddil_sample(lcm_student, tmp_path, prompt, 7)
    assert served[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(pixels(served), pixels(expected))
    assert served == expected  # the same PNG file, byte for byte


def test_v2_batch_equals_ddil_sample_per_image(server, lcm_student, tmp_path):
    prompts, seeds = ["a handwritten digit one", "a handwritten digit eight"], [3, 11]
    response = v2(server, {
        "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": prompts},
                   {"name": "seed", "datatype": "INT64", "shape": [2], "data": seeds}],
        "parameters": {"steps": 3, "guidance": 4.5}})
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["image"]["datatype"] == "BYTES" and outputs["image"]["shape"] == [2]
    assert outputs["seed"]["data"] == seeds and outputs["steps"]["data"] == [3, 3]
    for prompt, seed, b64 in zip(prompts, seeds, outputs["image"]["data"]):
        expected = pixels(ddil_sample(lcm_student, tmp_path, prompt, seed, "--steps", "3", "--guidance", "4.5"))
        # One batch of 2 against a batch of 1: the same arithmetic up to float summation order, so a pixel may
        # round to the neighbouring level; anything more is a different image.
        assert np.abs(pixels(base64.b64decode(b64)) - expected).max() <= 1


def test_size_option_gives_that_square_image(server, lcm_student):
    from ddil_core.models.pipeline_io import load_pipeline, read_student_info
    from ddil_core.models.sampling import png_bytes, student_images

    response = v1(server, {"instances": [{"prompt": "a handwritten digit four", "seed": 1, "width": 24}]})
    assert response.status_code == 200, response.text
    served = pixels(base64.b64decode(response.json()["predictions"][0]["image"]["b64"]))
    assert served.shape == (24, 24, 3)
    pipe = load_pipeline(str(lcm_student))
    [image] = student_images(pipe, read_student_info(lcm_student), ["a handwritten digit four"], [1], resolution=24)
    assert np.array_equal(served, pixels(png_bytes(image)))


def test_non_square_images_over_v1_and_v2_equal_ddil_sample(server, lcm_student, tmp_path):
    prompt = "a handwritten digit six"
    expected = pixels(ddil_sample(lcm_student, tmp_path, prompt, 2, "--width", "24", "--height", "16"))
    assert expected.shape == (16, 24, 3)  # rows are the height
    response = v1(server, {"instances": [{"prompt": prompt, "seed": 2, "width": 24, "height": 16}]})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    assert (prediction["width"], prediction["height"]) == (24, 16)
    assert np.array_equal(pixels(base64.b64decode(prediction["image"]["b64"])), expected)
    response = v2(server, {"inputs": [prompt_input([prompt]), {"name": "seed", "datatype": "INT64", "shape": [1],
                                                               "data": [2]}],
                           "parameters": {"width": 24, "height": 16}})
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert (outputs["width"]["data"], outputs["height"]["data"]) == ([24], [16])
    assert np.array_equal(pixels(base64.b64decode(outputs["image"]["data"][0])), expected)


# ----------------------------------------------------------------------------------------------------------------
# the OpenAI images API, through the official client


def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", timeout=120, max_retries=0)


def test_openai_client_image_equals_ddil_sample(server, lcm_student, tmp_path):
    prompt = "a handwritten digit seven"
    result = openai_client(server).images.generate(
        model=NAME, prompt=prompt, size="16x16", response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 3, "guidance_scale": 2.0})
    assert abs(result.created - time.time()) < 600
    [image] = result.data
    served = base64.b64decode(image.b64_json)
    assert served == ddil_sample(lcm_student, tmp_path, prompt, 7, "--steps", "3", "--guidance", "2.0")


def test_openai_client_non_square_size_equals_ddil_sample(server, lcm_student, tmp_path):
    prompt = "a handwritten digit three"
    [image] = openai_client(server).images.generate(prompt=prompt, size="16x32", extra_body={"seed": 4}).data
    served = pixels(base64.b64decode(image.b64_json))  # b64_json is the default: the server keeps no files
    assert served.shape == (32, 16, 3)  # "WIDTHxHEIGHT": 16 wide, 32 high
    expected = ddil_sample(lcm_student, tmp_path, prompt, 4, "--width", "16", "--height", "32")
    assert np.array_equal(served, pixels(expected))


def test_openai_client_n_images_are_those_of_consecutive_seeds(server, lcm_student, tmp_path):
    prompt = "a handwritten digit nine"
    result = openai_client(server).images.generate(model=NAME, prompt=prompt, n=3, size="24x16",
                                                   response_format="b64_json", extra_body={"seed": 10})
    assert len(result.data) == 3
    served = [pixels(base64.b64decode(image.b64_json)) for image in result.data]
    for seed, got in zip((10, 11, 12), served):
        expected = pixels(ddil_sample(lcm_student, tmp_path, prompt, seed, "--width", "24", "--height", "16"))
        assert np.abs(got - expected).max() <= 1  # one batch of 3 against single images: summation order only
    assert not np.array_equal(served[0], served[1])


def test_openai_and_kserve_model_lists_both_answer(server):
    [model] = openai_client(server).models.list().data
    assert (model.id, model.object) == (NAME, "model")
    assert openai_client(server).models.retrieve(NAME).id == NAME
    assert httpx.get(f"{server.url}/v1/models").json() == {"models": [NAME]}  # KServe's v1 list, unchanged
    root = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a digit", "seed": 1}, timeout=120)
    assert root.status_code == 200 and len(root.json()["data"]) == 1, root.text


OPENAI_BAD = [
    (dict(prompt="a digit", size="20x16"), "size"),
    (dict(prompt="a digit", size="16x4096"), "size"),
    (dict(prompt="a digit", size="big"), "size"),
    (dict(prompt="a digit", n=MAX_BATCH + 1), "n"),
    (dict(prompt="a digit", n=0), "n"),
    (dict(prompt="a digit", response_format="url"), "response_format"),
    (dict(prompt="x" * 5000), "prompt"),
    (dict(prompt="a digit", extra_body={"num_inference_steps": 51}), "num_inference_steps"),
    (dict(prompt="a digit", extra_body={"guidance_scale": 31}), "guidance_scale"),
    (dict(prompt="a digit", extra_body={"seed": "seven"}), "seed"),
    (dict(prompt="a digit", extra_body={"eta": 0.3}), "eta"),
    (dict(prompt="a digit", extra_body={"negative_prompt": "blur"}), "negative_prompt"),
    (dict(prompt="a digit", extra_body={"steps": 2}), "steps"),
]


@pytest.mark.parametrize("kwargs, param", OPENAI_BAD, ids=[f"openai-{i}-{p}" for i, (_, p) in enumerate(OPENAI_BAD)])
def test_openai_bad_request_names_the_field(server, kwargs, param):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        openai_client(server).images.generate(**kwargs)
    error = info.value.body
    assert error["param"] == param and error["message"].startswith(param + ":"), error
    assert error["type"] == "invalid_request_error" and info.value.status_code == 400
    good_request_succeeds(server)


def test_openai_unknown_model_and_oversized_body(server):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        openai_client(server).images.generate(model="dall-e-3", prompt="a digit")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    big = httpx.post(f"{server.url}/openai/v1/images/generations", json={"prompt": "a" * MAX_REQUEST_BYTES},
                     timeout=30)
    assert big.status_code == 413 and "--max-request-bytes" in big.json()["error"]["message"], big.text
    big = v1(server, {"instances": ["a" * MAX_REQUEST_BYTES]})
    assert big.status_code == 413 and big.json()["error"].startswith("request body:"), big.text
    good_request_succeeds(server)


def metric(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def wait_for_metric(server, name: str, value: float, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, name, model=NAME) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


def test_concurrent_requests_share_a_batch_and_get_their_own_images(server):
    """A long request (3 images of 50 steps at 32 px, about a second here) holds the generator while 4 one-image
    requests arrive: they queue (the server's gauges show it), and run as one batch of 4 when it is done. Each
    still gets the image it would get alone."""
    prompts = [f"a handwritten digit {w}" for w in ("zero", "three", "five", "nine")]
    alone = [v1(server, {"instances": [{"prompt": p, "seed": i}]}).json()["predictions"][0] for i, p in
             enumerate(prompts)]
    before = metric(server, "ddil_serve_batches_total", model=NAME, size=MAX_BATCH)
    with concurrent.futures.ThreadPoolExecutor(len(prompts) + 1) as pool:
        slow = pool.submit(v1, server, {"instances": ["a large dog"] * (MAX_BATCH - 1),
                                        "parameters": {"steps": 50, "width": 32}})
        wait_for_metric(server, "ddil_serve_running_images", MAX_BATCH - 1)  # the long batch is generating
        together = [pool.submit(v1, server, {"instances": [{"prompt": p, "seed": i}]}) for i, p in
                    enumerate(prompts)]
        wait_for_metric(server, "ddil_serve_queued_images", len(prompts))  # all 4 arrived while it ran
        assert metric(server, "ddil_serve_running_images", model=NAME) == MAX_BATCH - 1
        results = [f.result() for f in together]
        assert slow.result().status_code == 200
    assert metric(server, "ddil_serve_queued_images", model=NAME) == 0
    assert metric(server, "ddil_serve_running_images", model=NAME) == 0
    for response, single in zip(results, alone):
        assert response.status_code == 200, response.text
        got = pixels(base64.b64decode(response.json()["predictions"][0]["image"]["b64"]))
        assert np.abs(got - pixels(base64.b64decode(single["image"]["b64"]))).max() <= 1
    assert metric(server, "ddil_serve_batches_total", model=NAME, size=MAX_BATCH) == before + 1


# ----------------------------------------------------------------------------------------------------------------
# bad requests: 4xx naming the field, then the server still answers


V1_BAD = [
    ({}, "instances"),
    ({"instances": "a digit"}, "instances"),
    ({"instances": []}, "instances"),
    ({"instances": [{"seed": 1}]}, "instances[0].prompt"),
    ({"instances": [{"prompt": ""}]}, "instances[0].prompt"),
    ({"instances": [5]}, "instances[0]"),
    ({"instances": [{"prompt": "a digit", "steps": 0}]}, "instances[0].steps"),
    ({"instances": [{"prompt": "a digit", "steps": 51}]}, "instances[0].steps"),
    ({"instances": [{"prompt": "a digit", "steps": 2.5}]}, "instances[0].steps"),
    ({"instances": [{"prompt": "a digit", "seed": "seven"}]}, "instances[0].seed"),
    ({"instances": [{"prompt": "a digit", "seed": -1}]}, "instances[0].seed"),
    ({"instances": [{"prompt": "a digit", "guidance": "high"}]}, "instances[0].guidance"),
    ({"instances": [{"prompt": "a digit", "guidance": 31}]}, "instances[0].guidance"),
    ({"instances": [{"prompt": "a digit", "width": 20}]}, "instances[0].width"),
    ({"instances": [{"prompt": "a digit", "height": 4096}]}, "instances[0].height"),
    ({"instances": [{"prompt": "a digit", "width": 16, "height": 40}]}, "instances[0].height"),
    ({"instances": [{"prompt": "a digit", "eta": 0.3}]}, "instances[0].eta"),  # LCMScheduler takes no eta
    ({"instances": [{"prompt": "a digit", "negative_prompt": "blur"}]}, "instances[0].negative_prompt"),
    ({"instances": [{"prompt": "a digit", "stepz": 2}]}, "instances[0].stepz"),
    ({"instances": ["a digit"] * (MAX_BATCH + 1)}, "instances"),
    ({"instances": ["a digit"], "parameters": {"steps": "two"}}, "parameters.steps"),
    ({"instances": ["a digit"], "extra": 1}, "extra"),
]


@pytest.mark.parametrize("body, field", V1_BAD, ids=[f"v1-{i}-{f}" for i, (_, f) in enumerate(V1_BAD)])
def test_v1_bad_request_names_the_field(server, body, field):
    response = v1(server, body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert message.startswith(field + ":") or message.startswith(field + " "), message
    good_request_succeeds(server)


V2_BAD = [
    ({"inputs": []}, "inputs[prompt]"),
    ({"inputs": [prompt_input(["a digit"], datatype="INT64")]}, "inputs[prompt]"),
    ({"inputs": [prompt_input(["a digit"], shape=[2])]}, "inputs[prompt]"),
    ({"inputs": [prompt_input(["a digit"] * (MAX_BATCH + 1))]}, "inputs[prompt]"),
    ({"inputs": [prompt_input(["a digit", 7])]}, "inputs[prompt][1]"),
    ({"inputs": [prompt_input(["a", "b"]), {"name": "seed", "datatype": "INT64", "shape": [3],
                                             "data": [1, 2, 3]}]}, "inputs[seed]"),
    ({"inputs": [prompt_input(["a", "b"]), {"name": "seed", "datatype": "FP32", "shape": [2],
                                             "data": [1.0, 2.0]}]}, "inputs[seed]"),
    ({"inputs": [prompt_input(["a", "b"]), {"name": "steps", "datatype": "INT32", "shape": [2],
                                             "data": [2, 99]}]}, "inputs[steps][1]"),
    ({"inputs": [prompt_input(["a digit"]), {"name": "sizes", "datatype": "INT32", "shape": [1],
                                              "data": [8]}]}, "inputs[sizes]"),
    ({"inputs": [prompt_input(["a digit"])], "parameters": {"width": 12}}, "parameters.width"),
]


@pytest.mark.parametrize("body, field", V2_BAD, ids=[f"v2-{i}-{f}" for i, (_, f) in enumerate(V2_BAD)])
def test_v2_bad_request_names_the_field(server, body, field):
    response = v2(server, body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert message.startswith(field + ":"), message
    good_request_succeeds(server)


def test_malformed_bodies_are_4xx(server):
    response = httpx.post(f"{server.url}/v1/models/{NAME}:predict", content=b"{not json",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    response = v2(server, {"inputs": "a digit"})  # the v2 schema (FastAPI / pydantic): 422 naming the field
    assert response.status_code == 422 and "inputs" in response.text, response.text
    assert httpx.post(f"{server.url}/v1/models/nobody:predict", json={"instances": ["x"]}).status_code == 404
    good_request_succeeds(server)


def test_a_deeply_nested_body_under_the_byte_cap_is_400_naming_the_limit_on_every_route(server):
    deep = b'{"instances": ' + b"[" * 30_000 + b'"a digit"' + b"]" * 30_000 + b"}"  # 60 KB, under the 64 KiB cap
    for route in (f"/v1/models/{NAME}:predict", f"/v2/models/{NAME}/infer", "/openai/v1/images/generations"):
        response = httpx.post(server.url + route, content=deep, headers={"content-type": "application/json"},
                              timeout=30)
        assert response.status_code == 400, (route, response.status_code, response.text[:300])
        assert "request body: " in response.text and "levels of nesting, more than the limit of 32" in response.text
    good_request_succeeds(server)  # the server is still up and answers


def test_sigterm_stops_the_server_cleanly_and_client_errors_were_one_line_each(server):
    assert server.stop() == 0
    log = server.log.read_text()
    assert "Shutting down" in log
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in log  # --host: bound to this machine only
    assert "INFO kserve: ModelNotReady: " in log and "INFO kserve: InvalidInput: instances[0].steps: " in log
    assert "Traceback" not in log, "a bad request or a readiness probe is not a server error"


# ----------------------------------------------------------------------------------------------------------------
# a student that cannot be loaded


def test_a_student_that_fails_to_load_stops_the_server_with_exit_2(tmp_path):
    s3 = S3Process(tmp_path / "s3.log")
    try:
        s3.upload_folder(tmp_path, "models", "empty")  # the bucket exists, the student does not
        serve = ServeProcess(["--model", "s3://models/no-such-student"], tmp_path / "serve.log",
                             env=dict(s3.env, DDIL_CACHE=str(tmp_path / "cache")))
        assert serve.process.wait(180) == 2
        log = serve.log.read_text()
        assert "ddil serve: error: " in log and "s3://models/no-such-student" in log, log
    finally:
        s3.stop()

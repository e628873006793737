"""`ddil serve` with a TDD student (a TCDScheduler folder whose ddil_student.json carries its eta), through the
official `openai` client on 127.0.0.1: the served image equals `ddil sample`'s at the student's own eta and at an eta
the request gives, and guidance at inference changes the image (decoupled guidance: the student takes ordinary CFG).
"""
from __future__ import annotations

import base64
import json

import pytest

from ddil_core.cli import main
from tests.conftest import tiny_config
from tests.fakes.serve_process import ServeProcess, wait_for

NAME = "tdd"


@pytest.fixture(scope="module")
def tdd_student(tiny_data, tmp_path_factory):
    from ddil_core.stages.distill import distill

    latents, _ = tiny_data["sd15"]
    config = tiny_config("sd15", "objective.name=tdd", "objective.tdd.eta=0.3", "training.steps=2",
                         "ddil.priors.forward=1", "ddil.priors.teacher=0", "ddil.priors.student=0")
    return distill(config, latents, [], tmp_path_factory.mktemp("tdd") / "run")


@pytest.fixture(scope="module")
def server(tdd_student, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-tdd")
    serve = ServeProcess(["--model", str(tdd_student), "--name", NAME, "--host", "127.0.0.1"], logs / "serve.log")
    try:
        wait_for(f"{serve.url}/v2/models/{NAME}/ready", process=serve.process, log=serve.log)
        yield serve
    finally:
        serve.stop()


def generate(server, prompt: str, **extra) -> bytes:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", timeout=120, max_retries=0)
    [image] = client.images.generate(model=NAME, prompt=prompt, size="16x16", extra_body=extra).data
    return base64.b64decode(image.b64_json)


def ddil_sample(student, tmp_path, prompt, seed, *flags) -> bytes:
    out = tmp_path / f"{seed}-{'_'.join(flags)}.png"
    assert main(["sample", "--model", str(student), "--prompt", prompt, "--seed", str(seed), "--out", str(out),
                 *flags]) == 0
    return out.read_bytes()


def test_tdd_student_served_with_its_eta_and_a_requested_one(server, tdd_student, tmp_path):
    info = json.loads((tdd_student / "ddil_student.json").read_text())
    assert info["eta"] == pytest.approx(0.3)
    prompt = "a handwritten digit four"
    own = generate(server, prompt, seed=5)
    assert own == ddil_sample(tdd_student, tmp_path, prompt, 5)  # the folder's eta, 0.3
    asked = generate(server, prompt, seed=5, eta=0.0)
    assert asked == ddil_sample(tdd_student, tmp_path, prompt, 5, "--eta", "0.0")
    assert asked != own  # eta reaches the TCD step


def test_guidance_at_inference_changes_a_tdd_image(server):
    prompt = "a handwritten digit eight"
    assert generate(server, prompt, seed=1, guidance_scale=1.0) != generate(server, prompt, seed=1,
                                                                            guidance_scale=3.0)

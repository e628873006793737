"""One validator of a student folder (ddil_core/models/student_record.py): a record that `ddil sample` refuses,
`ddil serve`, `ddil evaluate`, `ddil diagnose` and `ddil register` refuse alike, before any work, with one line naming
ddil_student.json and the key; and a record that is accepted is one a server can answer its default request with."""
from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddil_core.models.pipeline_io import ModelError
from ddil_core.models.student_record import MAX_GUIDANCE, validate_student_folder
from tests.fakes.cli_checks import assert_fails, assert_untouched, run

STEPS = 4


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    """A tiny SD 1.5 pipeline with an LCMScheduler and a record that agrees with it."""
    from diffusers import LCMScheduler

    from ddil_core.models.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("record") / "student"
    pipe = build_tiny_pipeline("sd15")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    probe = LCMScheduler.from_config(pipe.scheduler.config)
    probe.set_timesteps(STEPS)
    record = {"num_inference_steps": STEPS, "guidance_scale": 1.0, "timesteps": probe.timesteps.tolist()}
    (folder / "ddil_student.json").write_text(json.dumps(record))
    return folder


def _with_record(lcm_folder, tmp_path, text: str):
    folder = tmp_path / "student"
    shutil.copytree(lcm_folder, folder)
    (folder / "ddil_student.json").write_text(text)
    return folder


def _record(lcm_folder, **changes) -> str:
    record = json.loads((lcm_folder / "ddil_student.json").read_text())
    record.update(changes)
    return json.dumps({k: v for k, v in record.items() if v is not ...})


BAD = [  # (ddil_student.json's text as a function of the good record, what the one line must name)
    (lambda f: _record(f, num_inference_steps=5000), "num_inference_steps"),
    (lambda f: _record(f, num_inference_steps=0, timesteps=...), "num_inference_steps"),
    (lambda f: _record(f, num_inference_steps="abc"), "num_inference_steps"),
    (lambda f: _record(f, num_inference_steps=...), "num_inference_steps"),
    (lambda f: _record(f, num_inference_steps=2.5), "num_inference_steps"),
    (lambda f: _record(f, num_inference_steps=True), "num_inference_steps"),
    (lambda f: "{not json", "unreadable"),
    (lambda f: "[1, 2]", "JSON object"),
    (lambda f: _record(f, guidance_scale=1e6), "guidance_scale"),
    (lambda f: _record(f, guidance_scale="high"), "guidance_scale"),
    (lambda f: _record(f, guidance_scale=-1), "guidance_scale"),
    (lambda f: _record(f).replace('"guidance_scale": 1.0', '"guidance_scale": NaN'), "guidance_scale"),
    (lambda f: _record(f, eta=0.5), "eta"),  # an LCMScheduler takes no eta
    (lambda f: _record(f, eta=7), "eta"),
    (lambda f: _record(f, timesteps=[999, 500]), "timesteps"),  # 2 timesteps for 4 steps
    (lambda f: _record(f, timesteps=[999, 749, 499, 249]), "timesteps"),  # not the saved scheduler's grid
    (lambda f: _record(f, timesteps="999"), "timesteps"),
    (lambda f: _record(f, lora={"rank": 4}), "lora"),  # no adapter file beside it
    (lambda f: json.dumps({"num_inference_steps": 4, "pad": "x" * (2 << 20)}), "limit"),
]


@pytest.mark.parametrize("text,named", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_every_command_refuses_the_same_record_naming_it(lcm_folder, tmp_path, capsys, text, named):
    folder = _with_record(lcm_folder, tmp_path, text(lcm_folder))
    with pytest.raises(ModelError) as refused:
        validate_student_folder(folder)
    assert "ddil_student.json" in str(refused.value) and named in str(refused.value)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"protocol": {}, "models": {"student": {}}}))
    commands = {
        "sample": ["sample", "--model", folder, "--prompt", "a digit", "--out", tmp_path / "out" / "x.png"],
        "serve": ["serve", "--model", folder, "--host", "127.0.0.1", "--http-port", "1"],
        "evaluate": ["evaluate", "--config", "tiny", "--student", folder, "--teacher", "tiny://sd15",
                     "--out", tmp_path / "out"],
        "diagnose": ["diagnose", "--config", "tiny", "--student", folder, "--teacher", "tiny://sd15",
                     "--out", tmp_path / "out"],
        "register": ["register", "--config", "tiny", "--student", folder, "--metrics", metrics,
                     "--registry", tmp_path / "registry"],
    }
    for name, args in commands.items():
        code, err = run(capsys, *args)
        line = assert_fails(code, err, "ddil_student.json", named)
        assert line.startswith(f"ddil {name}: error:"), line
    assert_untouched(tmp_path / "out")
    assert not (tmp_path / "registry" / "index.json").exists()


def test_the_good_record_is_accepted(lcm_folder):
    assert validate_student_folder(lcm_folder)["num_inference_steps"] == STEPS


def test_a_folder_without_a_record_is_a_teacher(tmp_path, lcm_folder):
    folder = tmp_path / "teacher"
    shutil.copytree(lcm_folder, folder)
    (folder / "ddil_student.json").unlink()
    assert validate_student_folder(folder) is None


def _default_request_parses(record: dict) -> None:
    """What `ddil serve` would do with the record: its limits, then a request that sends only a prompt."""
    from ddil_core.models.sampling import default_guidance, default_steps
    from ddil_core.serving.protocol import Limits, parse_v1

    steps = default_steps(record)
    limits = Limits(max_batch_size=1, max_steps=max(50, steps), native_size=16, max_size=32, default_steps=steps,
                    default_guidance=default_guidance(record))
    [instance] = parse_v1({"instances": ["a digit"]}, limits)
    assert instance.steps == steps


_NUMBERS = st.one_of(st.integers(-10, 2000), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                     st.booleans(), st.none())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=st.fixed_dictionaries({}, optional={
    "num_inference_steps": _NUMBERS, "guidance_scale": _NUMBERS, "eta": _NUMBERS,
    "timesteps": st.one_of(st.lists(st.integers(-5, 1200), max_size=6), _NUMBERS)}))
def test_generated_records_are_refused_in_one_line_or_served_by_default(lcm_folder, tmp_path_factory, record):
    folder = tmp_path_factory.mktemp("gen") / "student"
    shutil.copytree(lcm_folder, folder)
    (folder / "ddil_student.json").write_text(json.dumps(record))
    try:
        accepted = validate_student_folder(folder)
    except ModelError as exc:
        assert "\n" not in str(exc) and "ddil_student.json" in str(exc)
        return
    _default_request_parses(accepted)
    assert 0 <= accepted.get("guidance_scale", 1.0) <= MAX_GUIDANCE

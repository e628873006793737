"""Every input is bounded before work starts (ddil_core/config/limits.py), and an input is whole or refused: recipes
and `--set` values (size, nesting, alias expansion), captions.jsonl lines and captions, prompts files, request
bodies, tar shards (their end-of-archive marker). Each refusal: exit 2 (or HTTP 400), one line naming the input and
the limit, nothing written. The memory-heavy case runs in a subprocess under an address-space cap."""
from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ddil_core.config.limits import MAX_NESTING, MAX_OVERRIDE_CHARS, MAX_TEXT_CHARS, LimitExceeded, check_json_nesting
from tests.fakes.cli_checks import assert_fails, assert_untouched, error_lines, run


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _cache(capsys, tmp_path, dataset, *args):
    out = tmp_path / "latents"
    code, err = run(capsys, "cache-latents", "--config", "tiny", "--dataset", dataset, "--out", out,
                    "--set", "data.limit=null", *args)
    return code, err, out


def _nested_yaml(depth: int) -> str:
    return "[" * depth + "]" * depth


# ------------------------------------------------------------------------------------------- recipes, --set

ALIAS_BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] +
                       [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)])


@pytest.mark.parametrize("text,named", [
    ("model:\n  teacher: " + _nested_yaml(3000) + "\n", "levels of nesting, more than the limit of 32"),
    ("model: " + "{a: " * 500 + "1" + "}" * 500 + "\n", "levels of nesting"),
    (ALIAS_BOMB + "\n", "with its aliases expanded"),
    ("model:\n  teacher: tiny://sd15\n" + "#" * (2 << 20) + "\n", "more than the limit of 1048576"),
])
def test_a_recipe_beyond_its_bounds_is_one_line(tmp_path, capsys, text, named):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text(text)
    code, err = run(capsys, "cache-latents", "--config", recipe, "--out", tmp_path / "out")
    assert_fails(code, err, str(recipe), named)
    assert len(err) < 2000, err  # no 3,000-line RecursionError
    assert_untouched(tmp_path / "out")


@pytest.mark.parametrize("value,named", [
    (_nested_yaml(5000), "levels of nesting"),
    ("{a: " * 100 + "1" + "}" * 100, "levels of nesting"),
    ("[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], "
     "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]", "aliases expanded"),
    ("x" * 70000, "characters, more than the limit"),
])
def test_a_set_value_beyond_its_bounds_is_one_line(tmp_path, capsys, value, named):
    code, err = run(capsys, "cache-latents", "--config", "tiny", "--set", f"model.teacher={value}",
                    "--out", tmp_path / "out")
    assert_fails(code, err, "--set model.teacher", named)
    assert_untouched(tmp_path / "out")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(1, 400), style=st.sampled_from(["flow-list", "flow-map", "block"]))
def test_generated_nested_overrides_are_accepted_or_refused_in_one_line(capsys, depth, style):
    from ddil_core.config import ConfigError, load_config

    if style == "flow-list":
        value = _nested_yaml(depth)
    elif style == "flow-map":
        value = "{a: " * depth + "1" + "}" * depth
    else:
        value = "".join(f"{'  ' * i}a:\n" for i in range(depth)) + "  " * depth + "1"
    with pytest.raises(ConfigError) as refused:  # a list or mapping is never a teacher: refused either way
        load_config("tiny", [f"model.teacher={value}"])
    message = " ".join(str(refused.value).split())  # as the CLI prints it (a block value echoes its newlines)
    assert "--set model.teacher" in message and "Recursion" not in message
    if len(f"model.teacher={value}") <= MAX_OVERRIDE_CHARS:  # the whole KEY=VALUE is measured; else size first
        assert ("levels of nesting" in message) == (depth > MAX_NESTING), message


# ------------------------------------------------------------------------------------- captions and prompts

def _folder(root, lines: list[bytes]):
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def test_a_long_caption_is_refused_naming_its_line(tmp_path, capsys):
    root = _folder(tmp_path / "data", [json.dumps({"file": "a.png", "caption": "x" * (MAX_TEXT_CHARS + 1)}).encode()])
    code, err, out = _cache(capsys, tmp_path, root)
    assert_fails(code, err, f"{root / 'captions.jsonl'}:1", f"more than the limit of {MAX_TEXT_CHARS}")
    assert_untouched(out)


def test_a_long_line_in_captions_jsonl_is_refused_before_it_is_read(tmp_path, capsys):
    line = json.dumps({"file": "a.png", "caption": "a digit", "pad": "y" * 100_000}).encode()
    root = _folder(tmp_path / "data", [json.dumps({"file": "a.png", "caption": "ok"}).encode(), line])
    code, err, out = _cache(capsys, tmp_path, root)
    assert_fails(code, err, f"{root / 'captions.jsonl'}:2", "longer than the limit of 65536 bytes")
    assert_untouched(out)


def _memory_cap(limit_bytes: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return preexec


def test_a_200_mb_caption_line_under_a_memory_cap_is_one_line(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    with open(root / "captions.jsonl", "wb") as f:
        f.write(b'{"file": "a.png", "caption": "')
        chunk = b"z" * (1 << 20)
        for _ in range(200):
            f.write(chunk)
        f.write(b'"}\n')
    out = tmp_path / "latents"
    proc = subprocess.run([sys.executable, "-m", "ddil_core.cli", "cache-latents", "--config", "tiny", "--dataset",
                           str(root), "--out", str(out)], capture_output=True, text=True, timeout=300,
                          preexec_fn=_memory_cap(6 << 30), env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr
    [line] = error_lines(proc.stderr)
    assert f"{root / 'captions.jsonl'}:1" in line and "limit of 65536 bytes" in line
    assert_untouched(out)


def test_a_prompts_file_with_a_prompt_beyond_the_limit(tmp_path):
    from ddil_core.stages.evaluate.inputs import read_prompt_file

    path = tmp_path / "prompts.txt"
    path.write_text("a digit\n" + "w" * (MAX_TEXT_CHARS + 1) + "\n")
    with pytest.raises(LimitExceeded, match=rf"{path}:2: prompt: {MAX_TEXT_CHARS + 1} characters"):
        read_prompt_file(str(path))


def test_a_sample_prompt_beyond_the_limit(tmp_path, capsys):
    code, err = run(capsys, "sample", "--model", "tiny://sd15", "--prompt", "p" * 5000, "--out", tmp_path / "x.png")
    assert_fails(code, err, "--prompt", f"more than the limit of {MAX_TEXT_CHARS}")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------ requests

@settings(max_examples=60, deadline=None)
@given(depth=st.integers(1, 3000), opener=st.sampled_from(["[", '{"a":']))
def test_generated_request_bodies_are_refused_by_nesting_not_by_recursion(depth, opener):
    from ddil_core.serving.predictor import _json_body
    from ddil_core.serving.protocol import BadRequest

    closer = "]" if opener == "[" else "}"
    body = (opener * depth + "1" + closer * depth).encode()
    if depth > MAX_NESTING:
        with pytest.raises(BadRequest, match="request body: .* levels of nesting, more than the limit of 32"):
            _json_body(body)
    else:
        _json_body(body)


def test_brackets_inside_strings_are_not_nesting():
    check_json_nesting(json.dumps({"prompt": "[" * 1000 + '{"' * 100}), "request body")


# ---------------------------------------------------------------------------------------------- tar shards

def _tar_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            for ext, data in (("png", _png()), ("txt", f"a digit {i}".encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members_end(data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.getmembers()
        return tar.offset


def test_a_whole_shard_is_read(tmp_path, capsys):
    shard = tmp_path / "shard-0.tar"
    shard.write_bytes(_tar_bytes(8))
    code, err, out = _cache(capsys, tmp_path, shard)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["count"] == 8


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.05, 1.0))
def test_a_shard_cut_on_a_block_boundary_is_refused(tmp_path_factory, capsys, cut):
    data = _tar_bytes(8)
    end = _members_end(data) + 2 * tarfile.BLOCKSIZE  # everything after the marker is padding: a cut there is whole
    keep = max(1, int(end * cut) // tarfile.BLOCKSIZE - 1) * tarfile.BLOCKSIZE
    tmp_path = tmp_path_factory.mktemp("cut")
    shard = tmp_path / "shard-0.tar"
    shard.write_bytes(data[:keep])
    code, err, out = _cache(capsys, tmp_path, shard)
    assert_fails(code, err, str(shard))
    assert_untouched(out)

"""Bad input, one test per case: the error names the culprit; policy fail exits 2 with nothing written,
policy skip counts the sample in the manifest; odd but valid images are converted and accepted."""
from __future__ import annotations

import errno
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddil_core.cli import EXIT_BAD_INPUT, main
from ddil_core.data.shards import partial_dir
from tests.fakes.s3_server import s3_server  # noqa: F401


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    """The tiny SD 1.5 teacher saved as a diffusers folder (the same weights as tiny://sd15)."""
    from ddil_core.models.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("teachers") / "sd15"
    build_tiny_pipeline("sd15").save_pretrained(str(folder), safe_serialization=True)
    return folder


def _png(color=(200, 10, 10), size=(16, 16), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def _dataset(tmp_path, files: dict, captions=None, raw_index: bytes = None) -> Path:
    """An image folder: files {name: bytes}; captions.jsonl from `captions` [(file, caption)] or `raw_index`."""
    root = tmp_path / "data"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    if raw_index is None:
        captions = captions if captions is not None else [(n, f"a handwritten digit {i % 10}")
                                                          for i, n in enumerate(files)]
        raw_index = "".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in captions).encode()
    (root / "captions.jsonl").write_bytes(raw_index)
    return root


def _cache(tmp_path, dataset, *sets, teacher=None):
    out = tmp_path / "latents"
    args = ["cache-latents", "--config", "tiny", "--dataset", str(dataset), "--out", str(out), "--set", "data.limit=null"]
    if teacher is not None:
        args += ["--teacher", str(teacher)]
    for item in sets:
        args += ["--set", item]
    return main(args), out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not partial_dir(out).exists()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")]


def _fails(capsys, code, out, *expected):
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("ddil ")]) == 1, err  # one line
    for text in expected:
        assert text in err, err
    _assert_nothing_written(out)
    return err


# ----------------------------------------------------------------------------------------------- datasets


def test_missing_dataset_path(tmp_path, capsys):
    code, out = _cache(tmp_path, tmp_path / "no-such-dataset")
    _fails(capsys, code, out, "dataset not found", str(tmp_path / "no-such-dataset"))


def test_empty_dataset(tmp_path, capsys):
    root = _dataset(tmp_path, {}, raw_index=b"")
    code, out = _cache(tmp_path, root)
    _fails(capsys, code, out, f"{root}: the dataset has no usable samples")


def test_corrupt_image(tmp_path, capsys):
    root = _dataset(tmp_path, {"a.png": _png(), "b.png": b"\x89PNG\r\n\x1a\n" + b"\x13garbage" * 20})
    code, out = _cache(tmp_path, root)
    _fails(capsys, code, out, f"{root / 'b.png'}: not a readable image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, capsys, fmt):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, fmt)
    data = buf.getvalue()
    name = f"half.{fmt.lower()}"
    root = _dataset(tmp_path, {"a.png": _png(), name: data[: len(data) // 2]})
    code, out = _cache(tmp_path, root)
    _fails(capsys, code, out, f"{root / name}: not a readable image", "truncated")


def test_zero_byte_image(tmp_path, capsys):
    root = _dataset(tmp_path, {"a.png": _png(), "empty.png": b""})
    code, out = _cache(tmp_path, root)
    _fails(capsys, code, out, f"{root / 'empty.png'}: empty file (0 bytes)")


def test_zero_byte_image_is_counted_under_the_skip_policy(tmp_path):
    root = _dataset(tmp_path, {"a.png": _png(), "empty.png": b"", "c.png": _png((0, 0, 255))})
    code, out = _cache(tmp_path, root, "data.bad_sample_policy=skip")
    assert code == 0
    manifest = _manifest(out)
    assert manifest["count"] == 2 and manifest["skipped"] == 1
    assert manifest["skip_reasons"] == [f"{root / 'empty.png'}: empty file (0 bytes)"]


def _cached_images(out: Path):
    """The cached tensors (verified against the manifest) and the manifest."""
    from ddil_core.data.shards import load_shards

    tensors, manifest = load_shards(out, "latents")
    assert torch.isfinite(tensors["latents"].float()).all()
    return tensors, manifest


def test_cmyk_jpeg_is_converted_and_accepted(tmp_path):
    from ddil_core.data.datasets import decode_image

    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(buf, "JPEG")  # pure red in CMYK
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "CMYK"
    rgb = decode_image(buf.getvalue(), "red.jpg")
    assert rgb.mode == "RGB" and rgb.getpixel((8, 8))[0] > 200 and rgb.getpixel((8, 8))[1] < 50
    root = _dataset(tmp_path, {"a.png": _png(), "red.jpg": buf.getvalue()})
    code, out = _cache(tmp_path, root)
    assert code == 0
    tensors, manifest = _cached_images(out)
    assert manifest["count"] == 2 and manifest["skipped"] == 0


def test_16_bit_png_is_converted_and_accepted(tmp_path):
    from ddil_core.data.datasets import decode_image

    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    rgb = np.asarray(decode_image(buf.getvalue(), "deep.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and rgb[8, 0, 0] == 128  # rescaled, not clipped
    root = _dataset(tmp_path, {"a.png": _png(), "deep.png": buf.getvalue()})
    code, out = _cache(tmp_path, root)
    assert code == 0 and _manifest(out)["count"] == 2


@pytest.mark.parametrize("mode,color", [("L", 128), ("RGBA", (255, 0, 0, 128)), ("LA", (90, 200)), ("P", 3),
                                        ("1", 1)])
def test_grayscale_rgba_and_palette_images_are_accepted(tmp_path, mode, color):
    from ddil_core.data.datasets import decode_image

    data = _png(color, mode=mode)
    assert decode_image(data, "x.png").mode == "RGB"
    if mode == "RGBA":  # transparency is composited on white: half-transparent red -> pink
        r, g, b = decode_image(data, "x.png").getpixel((0, 0))
        assert r == 255 and 120 < g < 135 and 120 < b < 135
    root = _dataset(tmp_path, {"a.png": _png(), "odd.png": data})
    code, out = _cache(tmp_path, root)
    assert code == 0 and _manifest(out)["count"] == 2


def test_tiny_image_is_refused_and_named(tmp_path, capsys):
    root = _dataset(tmp_path, {"a.png": _png(), "speck.png": _png(size=(3, 3))})
    code, out = _cache(tmp_path, root)
    _fails(capsys, code, out, f"{root / 'speck.png'}: image too small (3x3")


def test_non_utf8_captions_file(tmp_path, capsys):
    index = (json.dumps({"file": "a.png", "caption": "a digit"}) + "\n").encode() + \
        b'{"file": "b.png", "caption": "caf\xe9 latin-1"}\n'
    root = _dataset(tmp_path, {"a.png": _png(), "b.png": _png()}, raw_index=index)
    code, out = _cache(tmp_path, root)
    _fails(capsys, code, out, f"{root / 'captions.jsonl'}:2: not valid UTF-8")


def test_empty_caption(tmp_path, capsys):
    root = _dataset(tmp_path, {"a.png": _png(), "b.png": _png()}, [("a.png", "a digit"), ("b.png", "   ")])
    code, out = _cache(tmp_path, root)
    _fails(capsys, code, out, f"{root / 'captions.jsonl'}:2: empty caption")


def test_over_long_caption_is_truncated_with_a_warning(tmp_path, caplog):
    long_caption = " ".join(["a handwritten digit seven"] * 40)  # far more tokens than the text encoder reads
    root = _dataset(tmp_path, {"a.png": _png(), "long.png": _png()}, [("a.png", "a digit"), ("long.png", long_caption)])
    with caplog.at_level(logging.WARNING, logger="ddil_core.models.conditioning"):
        code, out = _cache(tmp_path, root)
    assert code == 0
    assert json.loads((out / "captions.json").read_text())[1] == long_caption  # the caption is kept whole
    warnings = [r.getMessage() for r in caplog.records if r.name == "ddil_core.models.conditioning"]
    assert any("sample 'long'" in w and "truncated to" in w for w in warnings), warnings


def test_duplicate_file_names_in_captions(tmp_path, capsys):
    root = _dataset(tmp_path, {"a.png": _png(), "b.png": _png()},
                    [("a.png", "one"), ("b.png", "two"), ("a.png", "three")])
    code, out = _cache(tmp_path, root)
    _fails(capsys, code, out, f"{root / 'captions.jsonl'}:3: duplicate file name 'a.png'")


# ------------------------------------------------------------------------------------------------ teachers


def test_teacher_folder_missing_a_component(teacher_folder, tmp_path, capsys):
    broken = tmp_path / "teacher"
    shutil.copytree(teacher_folder, broken)
    shutil.rmtree(broken / "vae")
    code, out = _cache(tmp_path, "demo://digits", teacher=broken)
    _fails(capsys, code, out, f"{broken}: missing component folder 'vae/'")


def test_teacher_of_the_wrong_family(teacher_folder, tmp_path, capsys):
    code, out = _cache(tmp_path, "demo://digits", "model.family=sdxl", teacher=teacher_folder)
    _fails(capsys, code, out, f"{teacher_folder}: is an sd15 pipeline but the recipe says model.family = sdxl")


def test_latents_cached_at_another_resolution(tiny_data, tmp_path, capsys):
    latents, rollouts = tiny_data["sd15"]
    out = tmp_path / "run"
    code = main(["distill", "--config", "tiny", "--latents", str(latents), "--rollouts", str(rollouts),
                 "--out", str(out), "--set", "model.resolution=32"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert f"{latents}: latent cache does not match the teacher tiny://sd15" in err
    assert "cached at resolution 16, the teacher runs at 32" in err
    assert not (out / "student").exists() and not (out / "checkpoints").exists()


def test_latents_cached_with_another_vae(tiny_data, teacher_folder, tmp_path, capsys):
    from diffusers import AutoencoderKL

    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_folder, other)
    vae = AutoencoderKL.from_pretrained(str(other / "vae"))
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.01)
    vae.save_pretrained(str(other / "vae"), safe_serialization=True)
    latents, rollouts = tiny_data["sd15"]  # cached with tiny://sd15's VAE
    code = main(["distill", "--config", "tiny", "--teacher", str(other), "--latents", str(latents),
                 "--rollouts", str(rollouts), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert f"{latents}: latent cache does not match the teacher {other}: its VAE" in err
    assert "is not the teacher's" in err


# ------------------------------------------------------------------------------------------ storage, disk


@pytest.fixture
def s3_without_credentials(s3_server, monkeypatch):  # noqa: F811
    """The moto S3 server (tests/fakes/s3_server.py) with a bucket holding a one-image dataset, then an environment with
    no credentials at all (no keys, no profile files, no instance metadata); AWS_ENDPOINT_URL still points at it."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="ddil-data")
    s3.put_object(Bucket="ddil-data", Key="set/a.png", Body=_png())
    s3.put_object(Bucket="ddil-data", Key="set/captions.jsonl",
                  Body=json.dumps({"file": "a.png", "caption": "a handwritten digit one"}) + "\n")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(Path("/nonexistent") / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(Path("/nonexistent") / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _forget_s3_filesystems()
    yield s3_server
    _forget_s3_filesystems()


def _forget_s3_filesystems():
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass


def test_s3_dataset_without_credentials(s3_without_credentials, tmp_path, capsys, monkeypatch):
    code, out = _cache(tmp_path, "s3://ddil-data/set")
    _fails(capsys, code, out, "s3://ddil-data/set: no credentials", "AWS_ACCESS_KEY_ID")
    # the same dataset with credentials in the environment is read (so the error above was about credentials)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    _forget_s3_filesystems()
    code, out = _cache(tmp_path, "s3://ddil-data/set")
    assert code == 0, capsys.readouterr().err
    assert _manifest(out)["count"] == 1


def _full_disk_after(monkeypatch, module, name: str, calls: int):
    """Make `module.name` (a file writer) fail with ENOSPC from its `calls`-th call on, as a full disk does."""
    real = getattr(module, name)
    seen = {"n": 0}

    def writer(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] >= calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, writer)
    return seen


def test_disk_full_during_cache_latents(tmp_path, capsys, monkeypatch):
    from ddil_core.data import shards

    seen = _full_disk_after(monkeypatch, shards, "save_file", 2)  # the second shard does not fit
    code, out = _cache(tmp_path, "demo://digits", "data.limit=64", "data.shard_size=16")
    assert seen["n"] == 2
    _fails(capsys, code, out, f"{out}: no space left on device")


def test_disk_full_during_teacher_rollouts(tiny_data, tmp_path, capsys, monkeypatch):
    from ddil_core.data import shards

    _full_disk_after(monkeypatch, shards, "save_file", 2)
    latents, _ = tiny_data["sd15"]
    out = tmp_path / "rollouts"
    code = main(["teacher-rollouts", "--config", "tiny", "--latents", str(latents), "--out", str(out)])
    _fails(capsys, code, out, f"{out}: no space left on device")


def test_disk_full_while_writing_a_checkpoint(tiny_data, tmp_path, capsys, monkeypatch):
    from ddil_core.training import checkpoint

    latents, rollouts = tiny_data["sd15"]
    _full_disk_after(monkeypatch, checkpoint, "save_file", 5)  # the first checkpoint fits, the second does not
    out = tmp_path / "run"
    code = main(["distill", "--config", "tiny", "--latents", str(latents), "--rollouts", str(rollouts),
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert f"{out / 'checkpoints'}: no space left on device while writing checkpoint step" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]  # no half-written checkpoint
    assert not (out / "student").exists()


def test_disk_full_while_writing_the_student(tiny_data, tmp_path, capsys, monkeypatch):
    from ddil_core.models import pipeline_io

    latents, rollouts = tiny_data["sd15"]
    _full_disk_after(monkeypatch, pipeline_io, "write_json_atomic", 1)  # ddil_student.json, after the weights
    out = tmp_path / "run"
    code = main(["distill", "--config", "tiny", "--latents", str(latents), "--rollouts", str(rollouts),
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert f"{out / 'student'}: no space left on device" in err
    assert not (out / "student").exists() and not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert (out / "checkpoints" / "step-0000006").is_dir()  # the rerun resumes from the last checkpoint

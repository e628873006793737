"""Bad input gets a clear one-line error naming the culprit, exit code 2, and no partial output."""
import json
import signal

import pytest
from PIL import Image

from ddil_core.cli import EXIT_BAD_INPUT, main


def _folder(tmp_path, records, images=("a.png", "b.png")):
    root = tmp_path / "data"
    root.mkdir()
    for name in images:
        Image.new("RGB", (16, 16), (200, 10, 10)).save(root / name)
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _cache(tmp_path, dataset, *extra):
    out = tmp_path / "latents"
    code = main(["cache-latents", "--config", "tiny", "--dataset", str(dataset), "--out", str(out),
                 "--set", "data.limit=null", *extra])
    return code, out


def _assert_clean(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no staging folder left behind


def test_missing_image_is_named(tmp_path, capsys):
    root = _folder(tmp_path, [{"file": "a.png", "caption": "a digit one"}, {"file": "gone.png", "caption": "x"}])
    code, out = _cache(tmp_path, root)
    assert code == EXIT_BAD_INPUT
    assert "gone.png: image listed in" in capsys.readouterr().err
    _assert_clean(tmp_path, out)


def test_corrupt_image_is_named(tmp_path, capsys):
    root = _folder(tmp_path, [{"file": "a.png", "caption": "a digit one"}, {"file": "b.png", "caption": "two"}])
    (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code, out = _cache(tmp_path, root)
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "b.png: not a readable image" in err
    _assert_clean(tmp_path, out)


def test_skip_policy_counts_bad_samples_in_the_manifest(tmp_path):
    root = _folder(tmp_path, [{"file": "a.png", "caption": "a digit one"}, {"file": "b.png", "caption": "  "},
                              {"file": "gone.png", "caption": "x"}])
    code, out = _cache(tmp_path, root, "--set", "data.bad_sample_policy=skip")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 1 and manifest["skipped"] == 2
    assert any("empty caption" in r for r in manifest["skip_reasons"])


def test_empty_caption_is_named(tmp_path, capsys):
    root = _folder(tmp_path, [{"file": "a.png", "caption": "a digit one"}, {"file": "b.png", "caption": ""}])
    code, out = _cache(tmp_path, root)
    assert code == EXIT_BAD_INPUT
    assert "captions.jsonl:2: empty caption" in capsys.readouterr().err
    _assert_clean(tmp_path, out)


def test_unreadable_manifest_is_named(tiny_data, tmp_path, capsys):
    import shutil

    latents, _ = tiny_data["sd15"]
    broken = tmp_path / "latents"
    shutil.copytree(latents, broken)
    (broken / "manifest.json").write_text("{not json")
    out = tmp_path / "rollouts"
    code = main(["teacher-rollouts", "--config", "tiny", "--latents", str(broken), "--out", str(out)])
    assert code == EXIT_BAD_INPUT
    assert f"{broken / 'manifest.json'}: unreadable manifest" in capsys.readouterr().err
    _assert_clean(tmp_path, out)


def test_flipped_byte_in_a_shard_is_named(tiny_data, tmp_path, capsys):
    import shutil

    latents, _ = tiny_data["sd15"]
    broken = tmp_path / "latents"
    shutil.copytree(latents, broken)
    shard = broken / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    code = main(["teacher-rollouts", "--config", "tiny", "--latents", str(broken), "--out", str(tmp_path / "r")])
    assert code == EXIT_BAD_INPUT
    assert "shard-00001.safetensors: sha256 does not match" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("training.stepz=3", "unknown config key 'training.stepz'; did you mean 'steps'?"),
    ("ddil.priors.student=0.5", "ddil.priors must sum to 1"),
])
def test_bad_config_is_named_before_anything_is_written(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    code = main(["distill", "--config", "tiny", "--latents", str(tmp_path / "nowhere"), "--out", str(out),
                 "--set", override])
    assert code == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_dataset_is_named(tmp_path, capsys):
    code, out = _cache(tmp_path, tmp_path / "no-such-folder")
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "dataset not found" in err and "no-such-folder" in err
    _assert_clean(tmp_path, out)


def test_main_puts_back_the_callers_sigterm_handler(tmp_path):
    """main() handles SIGTERM while a stage runs; called in-process (a notebook, a test, a KFP component) it must not
    leave that handler behind, or a later SIGTERM raises Preempted in whatever code runs then."""
    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        code = main(["cache-latents", "--config", "tiny", "--dataset", str(tmp_path / "missing"),
                     "--out", str(tmp_path / "out")])
        assert code == EXIT_BAD_INPUT
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)

"""A dataset's samples are its own: what captions.jsonl or a COCO JSON names must stay inside the dataset's root.
'..', an absolute path, or a symlink (to a file or a folder) that resolves outside the root is refused through the
CLI with exit 2 and one line naming the entry, before any output is made (ddil_core/data/datasets.py); a symlink that
stays inside is read as usual. '..' and absolute names are also refused on an object store (keys are joined there).
The plain '..' and absolute cases of a local folder are in tests/config/test_input_rules.py."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from ddil_core.data.datasets import DatasetError, list_samples
from tests.fakes.cli_checks import assert_fails, assert_untouched, run


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _cache(capsys, tmp_path, dataset):
    out = tmp_path / "latents"
    code, err = run(capsys, "cache-latents", "--config", "tiny", "--dataset", dataset, "--out", out,
                    "--set", "data.limit=null")
    return code, err, out


@pytest.fixture
def outside(tmp_path):
    """A secret-looking image and folder outside the dataset root."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "private.png").write_bytes(_png())
    return tmp_path / "elsewhere"


def _folder(tmp_path, names):
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    (root / "a.png").write_bytes(_png())
    (root / "captions.jsonl").write_text("".join(json.dumps({"file": n, "caption": "a digit"}) + "\n"
                                                 for n in names))
    return root


@pytest.mark.parametrize("link", ["file", "folder"])
def test_a_symlink_out_of_an_image_folder_is_refused_naming_the_line(tmp_path, capsys, outside, link):
    root = _folder(tmp_path, ["a.png", "b.png" if link == "file" else "sub/private.png"])
    if link == "file":
        (root / "b.png").symlink_to(outside / "private.png")
        name = "b.png"
    else:
        (root / "sub").symlink_to(outside, target_is_directory=True)
        name = "sub/private.png"
    code, err, out = _cache(capsys, tmp_path, root)
    assert_fails(code, err, f"{root / 'captions.jsonl'}:2: 'file' '{name}' resolves to {outside / 'private.png'}",
                 f"outside the dataset folder {root}")
    assert_untouched(out)


def test_a_symlink_that_stays_inside_the_folder_is_read(tmp_path, capsys):
    root = _folder(tmp_path, ["a.png", "same.png"])
    (root / "same.png").symlink_to(root / "a.png")
    code, err, out = _cache(capsys, tmp_path, root)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["count"] == 2


@pytest.mark.parametrize("file_name", ["../elsewhere/private.png", "ABSOLUTE", "link.png"])
def test_a_coco_file_name_outside_its_image_folder_is_refused(tmp_path, capsys, outside, file_name):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(_png())
    (images / "link.png").symlink_to(outside / "private.png")
    file_name = str(outside / "private.png") if file_name == "ABSOLUTE" else file_name
    coco = images / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": file_name}],
                                "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 2, "caption": "y"}]}))
    code, err, out = _cache(capsys, tmp_path, coco)
    if file_name == "link.png":
        assert_fails(code, err, f"{coco}: image id 2 file_name 'link.png' resolves to {outside / 'private.png'}",
                     f"outside the image folder {images}")
    else:
        assert_fails(code, err, f"{coco}", "images[1].file_name must be a path inside the image folder", file_name)
    assert_untouched(out)


@pytest.mark.parametrize("file_value", ["../other/x.png", "sub/../../x.png", "/x.png"])
def test_keys_that_leave_the_dataset_on_an_object_store_are_refused(file_value):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/ds-containment/data/captions.jsonl", (json.dumps({"file": file_value, "caption": "c"}) + "\n").encode())
    fs.pipe("/ds-containment/other/x.png", _png())
    try:
        with pytest.raises(DatasetError, match=r"captions.jsonl:1: 'file' must be a path inside the dataset folder"):
            list(list_samples("memory://ds-containment/data"))
    finally:
        fs.rm("/ds-containment", recursive=True)

"""Every dataset reader and teacher source: image folder, COCO captions JSON, webdataset tars, demo://digits, and
s3:// paths against a real S3-compatible server on 127.0.0.1."""
import io
import json
import tarfile

import pytest
from PIL import Image

from ddil_core.data.datasets import DatasetError, iter_samples
from tests.fakes.s3_server import s3_server  # noqa: F401


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), color).save(buf, format="PNG")
    return buf.getvalue()


def test_coco_captions_json_first_caption_per_image(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in (1, 2):
        (tmp_path / "imgs" / f"{i:012d}.png").write_bytes(_png((i * 50, 0, 0)))
    ann = {"images": [{"id": 1, "file_name": "000000000001.png"}, {"id": 2, "file_name": "000000000002.png"}],
           "annotations": [{"image_id": 1, "caption": "a red thing"}, {"image_id": 1, "caption": "another"},
                           {"image_id": 2, "caption": "a darker red thing"}]}
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    samples = list(iter_samples(str(tmp_path / "captions.json"), images=str(tmp_path / "imgs")))
    assert [(s.key, s.caption) for s in samples] == [("1", "a red thing"), ("2", "a darker red thing")]
    assert samples[0].image.mode == "RGB"


def test_webdataset_tar_shards(tmp_path):
    for shard in range(2):
        with tarfile.open(tmp_path / f"part-{shard}.tar", "w") as tar:
            for i in range(3):
                key = f"s{shard}{i}"
                for ext, data in (("png", _png((0, 100, 0))), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    samples = list(iter_samples(str(tmp_path)))
    assert [s.caption for s in samples] == [f"caption s{a}{b}" for a in range(2) for b in range(3)]


def test_demo_digits_splits():
    train = list(iter_samples("demo://digits", limit=5))
    held = list(iter_samples("demo://digits/eval", limit=5))
    assert train[0].caption.startswith("a handwritten digit ") and train[0].image.size == (16, 16)
    assert {s.key for s in train}.isdisjoint({s.key for s in held})


def test_s3_dataset_and_s3_teacher(s3_server, tmp_path, monkeypatch):  # noqa: F811
    import boto3
    import fsspec

    from ddil_core.config import load_config
    from ddil_core.models.tiny import build_tiny_pipeline
    from ddil_core.stages.cache_latents import cache_latents

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="data")
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server})
    records = []
    for i in range(3):
        fs.pipe(f"data/set/img{i}.png", _png((i * 80, 10, 10)))
        records.append(json.dumps({"file": f"img{i}.png", "caption": f"a handwritten digit {['one', 'two', 'three'][i]}"}))
    fs.pipe("data/set/captions.jsonl", ("\n".join(records) + "\n").encode())
    build_tiny_pipeline("sd15").save_pretrained(tmp_path / "teacher")
    fs.put(str(tmp_path / "teacher") + "/", "data/teacher/", recursive=True)

    samples = list(iter_samples("s3://data/set"))
    assert [s.key for s in samples] == ["img0", "img1", "img2"]
    with pytest.raises(DatasetError, match="dataset not found: s3://data/nothing"):
        list(iter_samples("s3://data/nothing"))

    config = load_config("tiny", ["model.teacher=s3://data/teacher", "data.dataset=s3://data/set", "data.limit=null"])
    monkeypatch.setenv("DDIL_CACHE", str(tmp_path / "cache"))  # where s3:// teachers are downloaded
    manifest = cache_latents(config, tmp_path / "latents")
    assert manifest["count"] == 3 and manifest["teacher"] == "s3://data/teacher"
    assert (tmp_path / "cache" / "models" / "s3" / "data" / "teacher" / "model_index.json").exists()

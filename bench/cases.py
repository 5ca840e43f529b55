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
CALIBRATION, CALIBRATION_LABELS = "calibration.npz", "calibration_labels.npy"
EVALUATION, EVALUATION_LABELS = "evaluation.npz", "evaluation_labels.npy"
# Labelled zoo models: rows of the train split the lossy systems calibrate on (codebooks,
# the auto plan's costs), rows of the test split every system is scored on.
CALIBRATION_ROWS, EVALUATION_ROWS = 1024, 512
# Other models: samples (each of the case's batch) from the zoo's train/test sentences or random.
CALIBRATION_SAMPLES, EVALUATION_SAMPLES = 64, 16


@dataclass
class PreparedCase:
    """Files every system of a case uses.

    model_path: the original ONNX file (what the compilers import).
    simplified_path: our import's shape-bound, onnxslim-simplified graph (what ORT runs).
    feeds_path: .npz with one array per input, the same feeds for every system.
    calibration_path: .npz of other inputs (stacked samples) the lossy systems calibrate on.
    evaluation_path: .npz of held-out inputs (stacked samples) every system is scored on.
    calibration_labels/evaluation_labels: .npy int64 [samples, batch] (labelled zoo models), else None.
    input_shapes: the static binding of every input, passed to every compiler.
    inputs/outputs: (name, shape, dtype) in graph order.
    seconds: time to prepare (model build on first use + import), in seconds.
    """

    model_path: str
    simplified_path: str
    feeds_path: str
    calibration_path: str
    evaluation_path: str
    calibration_labels: str | None
    evaluation_labels: str | None
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
    labels = {}
    for name, split, path, labels_path in (("calibration", "train", CALIBRATION, CALIBRATION_LABELS),
                                           ("evaluation", "test", EVALUATION, EVALUATION_LABELS)):
        samples, y = _samples(case, imported.inputs, split, seed)
        np.savez(out / path, **{s.name: np.stack([x[s.name] for x in samples]) for s in imported.inputs})
        labels[name] = None
        if y is not None:
            np.save(out / labels_path, y)
            labels[name] = str(out / labels_path)
    return PreparedCase(
        model_path=str(model_path.resolve()),
        simplified_path=str(out / SIMPLIFIED),
        feeds_path=str(out / FEEDS),
        calibration_path=str(out / CALIBRATION),
        evaluation_path=str(out / EVALUATION),
        calibration_labels=labels["calibration"],
        evaluation_labels=labels["evaluation"],
        input_shapes=shapes,
        inputs=[(s.name, tuple(s.shape), s.dtype) for s in imported.inputs],
        outputs=[(s.name, tuple(s.shape), s.dtype) for s in imported.outputs],
        sha256=imported.sha256,
        seconds=round(time.perf_counter() - start, 3),
    )


def _samples(case: Case, specs, split: str, seed: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """Samples of the case's batch from one split, and their labels int64 [samples, batch] if any.

    Labelled zoo models: a seeded choice of the split's rows (CALIBRATION_ROWS / EVALUATION_ROWS);
    sentence models: the zoo's train/test sentences; ONNX files: random feeds.
    """
    calibrating = split == "train"
    count = CALIBRATION_SAMPLES if calibrating else EVALUATION_SAMPLES
    offset = seed + (1 if calibrating else 1 + CALIBRATION_SAMPLES)  # never the timed feeds' seed
    if not case.is_zoo:
        return [random_feeds(specs, offset + i) for i in range(count)], None
    from .. import zoo

    if zoo.MODELS[case.model].labelled_data is None:
        options = {"seq": case.seq} if case.seq is not None else {}
        return [zoo.sample_inputs(case.model, batch=case.batch, seed=offset + i, split=split, **options)
                for i in range(count)], None
    feeds, labels = zoo.labelled_data(case.model, split)
    rows = CALIBRATION_ROWS if calibrating else EVALUATION_ROWS
    count = max(1, min(rows, len(labels)) // case.batch)
    order = np.random.default_rng(offset).choice(len(labels), count * case.batch, replace=count * case.batch > len(labels))
    samples = [{name: value[order[i * case.batch:(i + 1) * case.batch]] for name, value in feeds.items()}
               for i in range(count)]
    return samples, labels[order].reshape(count, case.batch)

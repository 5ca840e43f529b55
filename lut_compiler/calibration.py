"""Calibration data: validate the user's samples, run the fp32 model, collect layer inputs.

A sample is one feed dict that matches the model's inputs exactly (names, shapes, dtypes,
finite). Sources: an .npz path or a dict of arrays (each input stacked along a new leading
axis, or concatenated along the batch axis), an iterable of feed dicts, or an object with
``get_next()`` like ONNX Runtime's ``CalibrationDataReader``.

The fp32 model runs in ONNX Runtime with each selected layer's input tensor added as a
graph output; every sample contributes a few random rows (receptive fields for
convolutions) so memory stays bounded. Rows of padding tokens are left out: when the model
has a 2-D integer input named like ``attention_mask`` (Hugging Face exports), a matmul whose
rows are the [batch, seq] tokens keeps only those where the mask is non-zero (their
activations never reach the outputs, and a padded sentence is mostly padding).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from tqdm import tqdm

from .errors import CalibrationError
from .feeds import check_names, load_npz
from .tensor_spec import TensorSpec

CalibrationSource = str | os.PathLike | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]
Feeds = dict[str, np.ndarray]


def _split_stacked(arrays: Mapping[str, np.ndarray], specs: list[TensorSpec]) -> list[Feeds]:
    """Arrays [S, *shape] (stacked) or [S * batch, *shape[1:]] (concatenated) -> S feeds."""
    check_names(specs, arrays, "calibration inputs", CalibrationError)
    counts = {}
    for spec in specs:
        value = np.asarray(arrays[spec.name])
        if tuple(value.shape[1:]) == spec.shape:
            counts[spec.name] = (value.shape[0], lambda v, i: v[i])
        elif spec.shape and tuple(value.shape[1:]) == spec.shape[1:] and value.shape[0] % spec.shape[0] == 0:
            b = spec.shape[0]
            counts[spec.name] = (value.shape[0] // b, lambda v, i, b=b: v[i * b:(i + 1) * b])
        else:
            raise CalibrationError(
                f"calibration input {spec.name!r} has shape {_fmt(value.shape)}; expected [S, {_fmt(spec.shape)}] "
                f"samples or [S*{spec.shape[0] if spec.shape else 1}, {_fmt(spec.shape[1:])}] rows"
            )
    sizes = {n: c for n, (c, _) in counts.items()}
    if len(set(sizes.values())) != 1:
        raise CalibrationError(f"calibration inputs hold different numbers of samples: {sizes}")
    total = next(iter(sizes.values()))
    return [{n: take(np.asarray(arrays[n]), i) for n, (_, take) in counts.items()} for i in range(total)]


def _fmt(shape) -> str:
    return "x".join(map(str, shape))


def _check_sample(feeds: Mapping, specs: list[TensorSpec], index: int) -> Feeds:
    check_names(specs, feeds, f"calibration sample {index} inputs", CalibrationError)
    checked = {}
    for spec in specs:
        value = np.asarray(feeds[spec.name])
        if value.dtype != np.dtype(spec.dtype) or tuple(value.shape) != spec.shape:
            raise CalibrationError(
                f"calibration sample {index}: input {spec.name!r} is {value.dtype.name}[{_fmt(value.shape)}], "
                f"expected {spec.dtype}[{_fmt(spec.shape)}]"
            )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = "NaN" if np.isnan(value).any() else "inf"
            raise CalibrationError(f"calibration sample {index}: input {spec.name!r} contains {bad}")
        checked[spec.name] = np.ascontiguousarray(value)
    return checked


def _iterate(source) -> Iterable[Mapping]:
    if hasattr(source, "get_next"):  # onnxruntime.quantization.CalibrationDataReader
        return iter(source.get_next, None)
    return source


def load_samples(source: CalibrationSource, specs: list[TensorSpec]) -> list[Feeds]:
    """Validated calibration samples, each a feed dict for the (shape-bound) model."""
    if isinstance(source, (str, os.PathLike)):
        source = load_npz(source, CalibrationError)
    if isinstance(source, Mapping):
        raw = _split_stacked(source, specs)
    else:
        raw = list(_iterate(source))
    if not raw:
        raise CalibrationError("calibration data holds no samples")
    return [_check_sample(feeds, specs, i) for i, feeds in enumerate(raw)]


def split_holdout(samples: list[Feeds], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(calibration, held-out) sample indices; with one sample both are [0]."""
    if len(samples) < 2 or holdout == 0:
        every = list(range(len(samples)))
        return every, every
    order = np.random.default_rng(seed).permutation(len(samples))
    held = max(1, round(holdout * len(samples)))
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """The model with ``names`` added as graph outputs (typed when shape inference knows them)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input)}
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(known.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def _session(model: onnx.ModelProto, names: list[str]):
    """An ONNX Runtime session of ``model`` that also outputs the tensors ``names``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.log_severity_level = 3
    return ort.InferenceSession(_with_outputs(model, names), options, providers=["CPUExecutionProvider"])


def mask_input(samples: list[Feeds]) -> str | None:
    """The input that marks padding tokens (0) of [batch, seq] rows: a 2-D integer or bool
    input whose name contains "attention_mask", else None."""
    for name, value in samples[0].items() if samples else ():
        if "attention_mask" in name.lower() and value.ndim == 2 and value.dtype.kind in "biu":
            return name
    return None


def _kept_rows(feeds: Feeds, mask: str | None, total: int) -> np.ndarray:
    """Row indices of a layer with `total` rows that carry real tokens (all when the rows are
    not the mask's tokens, or no token is real)."""
    if mask is not None and feeds[mask].size == total and feeds[mask].any():
        return np.flatnonzero(feeds[mask].reshape(-1))
    return np.arange(total)


def activation_absmax(model: onnx.ModelProto, samples: list[Feeds], candidates: list,
                      progress: bool = True) -> dict[str, float]:
    """max |input| of each candidate layer over ``samples`` (real tokens only, see the module
    doc): call var -> float (candidates traced to an ONNX tensor, ``Candidate.activation``)."""
    names = sorted({c.activation for c in candidates})
    session = _session(model, names)
    mask = mask_input(samples)
    peak = dict.fromkeys([c.var for c in candidates], 0.0)
    for feeds in tqdm(samples, desc="activation ranges", unit="sample", disable=not progress, leave=False):
        values = dict(zip(names, session.run(names, feeds)))
        for c in candidates:
            rows = values[c.activation].reshape(-1, c.input_shape[-1])
            kept = rows[_kept_rows(feeds, mask, len(rows))] if c.conv is None else rows
            peak[c.var] = max(peak[c.var], float(np.abs(kept).max(initial=0.0)))
    return peak


def capture(model: onnx.ModelProto, samples: list[Feeds], plans: list, rows_per_layer: int, seed: int,
            progress: bool = True) -> dict[str, np.ndarray]:
    """Input sub-vectors of each plan's layer over ``samples``: call var -> float32 [rows, C, V].

    plans: LayerPlan per layer (``passes.lut_plan``), each traced to an ONNX tensor.
    """
    names = sorted({p.candidate.activation for p in plans})
    session = _session(model, names)
    mask = mask_input(samples)
    rng = np.random.default_rng(seed)
    per_sample = max(1, math.ceil(rows_per_layer / len(samples)))
    parts: dict[str, list[np.ndarray]] = {p.candidate.var: [] for p in plans}
    for feeds in tqdm(samples, desc="calibrate", unit="sample", disable=not progress, leave=False):
        values = dict(zip(names, session.run(names, feeds)))
        for p in plans:
            c = p.candidate
            activation = values[c.activation]
            if activation.size != math.prod(c.input_shape):
                raise CalibrationError(f"layer {c.name}: ONNX tensor {c.activation!r} has shape "
                                       f"{_fmt(activation.shape)}, the layer reads {_fmt(c.input_shape)}")
            activation = activation.reshape(c.input_shape).astype(np.float32, copy=False)
            kept = _kept_rows(feeds, mask, p.rule.num_rows(c)) if c.conv is None else np.arange(p.rule.num_rows(c))
            rows = np.sort(rng.choice(kept, size=min(per_sample, len(kept)), replace=False))
            parts[c.var].append(p.rule.subvectors(activation, c, p.subspace_len, rows))
    return {var: np.concatenate(chunks) for var, chunks in parts.items()}


def rows_per_layer(plans: list, max_rows: int, memory_mb: int) -> int:
    """Rows kept per layer so that all layers' float32 sub-vectors fit in ``memory_mb``."""
    floats_per_row = sum(p.codebooks * p.subspace_len for p in plans) or 1
    return max(1, min(max_rows, memory_mb * 2**20 // (4 * floats_per_row)))

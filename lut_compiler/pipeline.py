"""``compile``: the pipeline as one sequence of named phases.

import (ONNX -> Relax) -> lut (optional: calibrate, learn codebooks, rewrite layers into
encode + lookup-add) -> sparse (optional: prune or detect sparse weights, measure sparse vs
dense per layer, rewrite the winners) -> auto (optional, instead of lut and sparse: every
layer's options measured, the fastest plan within an accuracy budget) -> legalize (ops -> fused TIR kernels) -> tune (MetaSchedule,
optional) -> schedule (tuned records, default CPU schedules for the rest) -> build
-> evaluate (lookup-add, pruned or planned models with calibration data: accuracy against
the fp32 model, on held-out samples).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tvm

from .artifact import CompiledModel, file_sha256
from .auto import apply_auto
from .auto import report as auto_report
from .calibration import CalibrationSource
from .config import CompileConfig
from .errors import CalibrationError
from .calibration import load_samples
from .lut import apply_lut, labels_per_sample
from .lut_report import compare_outputs, evaluate
from .onnx_import import ModelSource, import_onnx
from .sparse import apply_sparse
from .sparse import report as sparse_report
from .target import describe, resolve_target
from .lowering import legalize, schedule
from .tuning import tune


PHASES = ("import", "lut", "sparse", "auto", "legalize", "tune", "schedule", "build", "evaluate")


def reproducibility(config: CompileConfig, source_sha256: str, calibration: CalibrationSource | None,
                    labels: np.ndarray | None) -> dict:
    """What fixes the compiled model's outputs: the same source, config (its seeds listed
    here), calibration data, database (tuning records and measured layer times) and versions
    compile to a model whose outputs on the same inputs are byte-identical
    (tests/test_determinism.py). Digests are sha256; None: nothing of that kind was used or it
    cannot be hashed (calibration from an iterator)."""
    from .layer_timing import LAYER_TIMES
    from .tuning import DATABASE_FILES

    digest = hashlib.sha256()
    work_dir = Path(config.tune.work_dir)
    files = [work_dir / name for name in (*DATABASE_FILES, LAYER_TIMES) if (work_dir / name).is_file()]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        "source_sha256": source_sha256,
        "seeds": _seeds(config.to_json()),
        "calibration_sha256": _data_digest(calibration),
        "labels_sha256": _data_digest(labels),
        "database_sha256": digest.hexdigest() if files else None,
        "database": str(work_dir.resolve()) if files else None,
    }


def _seeds(config: dict, prefix: str = "") -> dict[str, int]:
    """Every `seed` field in the config JSON, by dotted path."""
    found = {}
    for key, value in config.items():
        if isinstance(value, dict):
            found.update(_seeds(value, f"{prefix}{key}."))
        elif key == "seed":
            found[f"{prefix}{key}"] = value
    return found


def _data_digest(data) -> str | None:
    """sha256 of a file, an array, or a name -> array mapping (names sorted)."""
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return file_sha256(Path(data))
    digest = hashlib.sha256()
    if isinstance(data, np.ndarray):
        digest.update(np.ascontiguousarray(data).tobytes())
    elif isinstance(data, Mapping):
        for name in sorted(data):
            value = np.ascontiguousarray(data[name])
            digest.update(f"{name}:{value.dtype}:{value.shape}".encode() + value.tobytes())
    else:
        return None
    return digest.hexdigest()


class _Phases:
    """Times each phase and optionally dumps the IR after it."""

    def __init__(self, dump_dir: str | None) -> None:
        self.seconds: dict[str, float] = {}
        self.dump_dir = Path(dump_dir) if dump_dir else None

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)

    def dump(self, name: str, mod: tvm.IRModule) -> None:
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{PHASES.index(name) + 1}_{name}.py").write_text(mod.script(show_meta=False))


def compile(  # noqa: A001 - the public verb
    model: ModelSource,
    config: CompileConfig | None = None,
    target: str | dict | tvm.target.Target = "host",
    progress: bool = True,
    calibration: CalibrationSource | None = None,
    labels: np.ndarray | None = None,
) -> CompiledModel:
    """Compile an ONNX model (path, bytes or ModelProto) for a CPU.

    Inputs must have static shapes, or be bound in ``config.input_shapes``. With
    ``config.lut``, ``calibration`` samples (see ``calibration.load_samples``) train the
    codebooks and the held-out ones measure accuracy; integer ``labels`` (one per output
    row of every sample) add task accuracy. The report lands in ``record["lut"]``. With
    ``config.sparse``, the per-layer decisions land in ``record["sparse"]`` (and, for pruned
    weights with ``calibration``, the model's agreement with fp32 on those samples).
    With ``config.auto``, the plan (and its held-out agreement with fp32) lands in
    ``record["auto"]``.
    """
    config = config or CompileConfig()
    target = resolve_target(target)
    phases = _Phases(config.dump_ir)
    with phases.phase("import"):
        imported = import_onnx(model, config.input_shapes)
    phases.dump("import", imported.mod)
    mod, lut = imported.mod, None
    if config.lut is not None:
        with phases.phase("lut"):
            mod, lut = apply_lut(imported, config.lut, calibration, target, labels, progress)
        phases.dump("lut", mod)
    sparse = samples = None
    if config.sparse is not None:
        with phases.phase("sparse"):
            if calibration is not None and config.sparse.sparsity is not None:
                samples = load_samples(calibration, imported.inputs)
                labels = labels_per_sample(labels, len(samples)) if labels is not None else None
            mod, result = apply_sparse(mod, imported.weight_users, config.sparse, target, config.tune, progress,
                                       onnx_model=imported.onnx_model, samples=samples, labels=labels)
        sparse = sparse_report(result)
        phases.dump("sparse", mod)
    auto = None
    if config.auto is not None:
        if calibration is None:
            raise CalibrationError("the per-layer plan needs calibration data (--calib DATA.npz)")
        with phases.phase("auto"):
            mod, auto = apply_auto(imported, config.auto, calibration, target, config.tune, labels, progress)
        phases.dump("auto", mod)
    with phases.phase("legalize"):
        mod = legalize(mod, target, config.weight_prepack)
    phases.dump("legalize", mod)
    report = None
    if config.tune.trials_per_task > 0:
        with phases.phase("tune"):
            report = tune(mod, target, config.tune, progress=progress)
    with phases.phase("schedule"):
        mod = schedule(mod, target, config.tune.work_dir, config.weight_prepack)
    phases.dump("schedule", mod)
    with phases.phase("build"):
        executable = tvm.compile(mod, target)
    record = {
        "target": json.loads(str(target)),
        "cpu": describe(target).to_json(),
        "config": config.to_json(),
        "source_sha256": imported.sha256,
        "phases": phases.seconds,
        "tuning": report.to_json() if report else None,
        "sparse": sparse,
        "reproducibility": reproducibility(config, imported.sha256, calibration, labels),
    }
    compiled = CompiledModel(executable, imported.inputs, imported.outputs, record)
    if lut is not None:
        with phases.phase("evaluate"):
            record["lut"] = evaluate(lut, compiled, imported.onnx_model, config.lut.task)
    elif auto is not None:
        with phases.phase("evaluate"):
            record["auto"] = auto_report(auto)
            held = auto.held_out
            record["auto"]["accuracy"] = compare_outputs(
                compiled, imported.onnx_model, [auto.samples[i] for i in held], auto.labels is not None,
                auto.labels[held] if auto.labels is not None else None)
    elif samples is not None:
        with phases.phase("evaluate"):  # pruning changed the model: how much, on samples fine-tuning never saw
            held = result.held_out
            sparse["accuracy"] = compare_outputs(compiled, imported.onnx_model, [samples[i] for i in held],
                                                 labels is not None, labels[held] if labels is not None else None)
    return compiled

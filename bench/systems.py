"""The systems: one build function each, and one timed runner for all.

Build functions run in a fresh worker process per (case, system) and leave an
artifact on disk (``model.so`` for the TVM systems, the simplified ONNX graph
for ORT); timing workers load it back with ``open_runner`` and time blocks of
calls with ``timed_block``. Every duration is in seconds.

- ``ort``: ONNX Runtime on the simplified graph, ``cores`` intra-op threads,
  one inter-op thread, sequential execution, all graph optimizations.
- ``tvm-untuned``: ``tvm.compile(imported.mod, target)``, the default Relax
  pipeline (legalize + fuse, no schedules).
- ``tvm-tuned``: the stock ``static_shape_tuning_pipeline`` sequence
  (DecomposeOpsForInference, CanonicalizeBindings, zero_pipeline, tune,
  MetaScheduleApplyDatabase, tvm.compile), tuned by ``tune_relax`` with the
  ``PooledBuilder`` (the stock LocalBuilder records nothing here).
- ``lutc-untuned``: ``lut_compiler.compile`` with no tuning (default CPU schedules only).
- ``lutc``: ``lut_compiler.compile`` (default schedules for untuned kernels,
  weight prepacking, database reuse).
- ``lutc-lut``: ``lutc`` with every eligible layer rewritten into encode + lookup-add
  (k-means codebooks from the case's calibration inputs; lossy: its error column
  shows by how much).
- ``lutc-sparse``: ``lutc`` with every matmul/conv weight pruned to 90% sparsity in 16x1
  blocks by magnitude, each layer kept sparse where measured >= 1.1x faster (lossy: the
  cosine column shows the pruning's effect, no fine-tune).
- ``lutc-learned``: ``lutc`` with lookup-add layers whose centroids are learned by
  distillation (LUT-NN, ``--learn-minutes``, 10 by default) and chosen within the same
  budget as ``lutc-auto`` (``--lut-learn --max-drop 1`` / ``--min-cosine 0.99``); the other
  layers stay dense fp32. Not in the default set: it spends 10 minutes per case learning.
- ``lutc-auto``: ``lutc`` with the per-layer plan (``--auto``): dense, int8, sparse (70% 16x1
  magnitude pruning) or lookup-add per layer, each measured on the target, within 1 point of
  top-1 accuracy (labelled models, on the case's calibration rows) or a mean cosine of 0.99
  to fp32 (others).
"""

from __future__ import annotations

import dataclasses

import gc
import json
import shutil
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

LIBRARY = "model.so"
TUNED_MARKER = "bench_tuned.json"  # in a tuning dir: the budget it was tuned with, and how long it took


@dataclass
class BuildSpec:
    """What a build function needs (all paths absolute or relative to the bench's cwd).

    artifact_dir: where the system writes ``model.so``.
    tuning_dir: the system's own MetaSchedule database, reused across bench runs.
    """

    system: str
    model_path: str
    simplified_path: str
    calibration_path: str
    input_shapes: dict[str, tuple[int, ...]]
    target: str
    trials_per_task: int
    artifact_dir: str
    tuning_dir: str
    cores: int
    calibration_labels: str | None = None  # .npy int64 labels of the calibration samples
    learn_minutes: float = 10.0  # lutc-learned's centroid learning budget
    learn_finer: int = 0  # lutc-learned's LutConfig.finer
    seed: int = 0
    progress: bool = True


@dataclass
class Built:
    """A built system.

    artifact: file the timing worker loads.
    compile_s: seconds to build in this run, tuning excluded (import + legalize +
        codegen for TVM; session creation for ORT).
    tune_s: seconds the tuning took when it ran (None: no tuning).
    tune_cached: the database came from an earlier bench run; tune_s is from then.
    tuning: tasks, trials and successful measurements.
    plan: ``lutc-auto``'s per-layer plan (``auto.report``), ``lutc-learned``'s layer choice, else None.
    """

    system: str
    artifact: str
    compile_s: float
    tune_s: float | None = None
    tune_cached: bool = False
    tuning: dict = field(default_factory=dict)
    plan: dict | None = None


def _target(spec: BuildSpec):
    from ..target import resolve_target

    return resolve_target(spec.target)


def _export(executable, spec: BuildSpec) -> str:
    from ..artifact import quiet_native_stderr

    out = Path(spec.artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_native_stderr():
        executable.export_library(str(out / LIBRARY))
    return str(out / LIBRARY)


def _read_marker(tuning_dir: Path) -> dict | None:
    try:
        return json.loads((tuning_dir / TUNED_MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_marker(tuning_dir: Path, data: dict) -> None:
    (tuning_dir / TUNED_MARKER).write_text(json.dumps(data, indent=1) + "\n")


def build_ort(spec: BuildSpec) -> Built:
    """ORT needs no build: time the session creation (its graph optimizations)."""
    import onnxruntime  # noqa: F401 - not part of the timed creation

    start = time.perf_counter()
    _ort_session(spec.simplified_path, spec.cores)
    return Built(spec.system, spec.simplified_path, round(time.perf_counter() - start, 3))


def build_tvm_untuned(spec: BuildSpec) -> Built:
    """Stock TVM without tuning: our import, then ``tvm.compile`` (default Relax pipeline)."""
    import tvm

    from ..onnx_import import import_onnx

    start = time.perf_counter()
    target = _target(spec)
    imported = import_onnx(spec.model_path, spec.input_shapes)
    executable = tvm.compile(imported.mod, target)
    artifact = _export(executable, spec)
    return Built(spec.system, artifact, round(time.perf_counter() - start, 3))


def build_tvm_tuned(spec: BuildSpec) -> Built:
    """Stock MetaSchedule flow, as ``relax.pipeline.static_shape_tuning_pipeline`` (no weight prepack)."""
    import tvm
    from tvm import relax

    from ..artifact import quiet_native_stderr
    from ..onnx_import import import_onnx

    start = time.perf_counter()
    target = _target(spec)
    imported = import_onnx(spec.model_path, spec.input_shapes)
    with target:
        mod = tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.pipeline.zero_pipeline(),
        ])(imported.mod)
    tuning = {"trials_per_task": 0, "seconds": None, "cached": False}
    tune_seconds = 0.0
    if spec.trials_per_task > 0:  # with 0 trials this is the untuned zero pipeline
        tune_start = time.perf_counter()
        tuning = _stock_tune(mod, target, spec)
        tune_seconds = time.perf_counter() - tune_start
        with target, quiet_native_stderr():  # "Creating JSONDatabase" warning
            mod = relax.transform.MetaScheduleApplyDatabase(spec.tuning_dir)(mod)
    unscheduled = [gv.name_hint for gv, f in mod.functions.items()
                   if isinstance(f, tvm.tirx.PrimFunc) and not f.attrs.get("tirx.is_scheduled", False)]
    tuning["unscheduled_kernels"] = unscheduled
    executable = tvm.compile(mod, target)
    artifact = _export(executable, spec)
    compile_s = time.perf_counter() - start - tune_seconds
    return Built(spec.system, artifact, round(compile_s, 3), tuning["seconds"], tuning["cached"], tuning)


def _stock_tune(mod, target, spec: BuildSpec) -> dict:
    """``tune_relax`` with ``trials_per_task`` x tasks trials, unless this dir was already tuned so."""
    from tvm.s_tir import meta_schedule as ms

    from ..errors import LutcError
    from tqdm import tqdm

    from ..tuning import MeasureCounter, PooledBuilder, load_cpu_tensor_intrinsics

    work_dir = Path(spec.tuning_dir)
    marker = _read_marker(work_dir)
    if marker is not None and marker.get("trials_per_task") == spec.trials_per_task:
        return {**marker, "cached": True}
    shutil.rmtree(work_dir, ignore_errors=True)  # a half-finished run: start over
    work_dir.mkdir(parents=True)
    load_cpu_tensor_intrinsics(target)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    budget = spec.trials_per_task * len(tasks)
    start = time.perf_counter()
    builder = PooledBuilder(max_workers=spec.cores)
    counter = MeasureCounter(tqdm(total=budget, desc="tuning (stock)", unit="trial", disable=not spec.progress,
                                  leave=False))
    # MetaSchedule logs its task table and cost-model lines to stdout: keep them in the tuning dir.
    with open(work_dir / "console.log", "w") as console, redirect_stdout(console):
        try:
            ms.relax_integration.tune_relax(
                mod, params={}, target=target, work_dir=str(work_dir),
                max_trials_global=budget, max_trials_per_task=spec.trials_per_task,
                builder=builder, measure_callbacks=[*ms.MeasureCallback.create("default"), counter],
                seed=spec.seed,
            )
        finally:
            builder.shutdown()
            counter.bar.close()
    if counter.ok == 0:
        raise LutcError(f"stock tuning measured no candidate successfully; first error: "
                        f"{(counter.errors or ['none'])[0]}")
    result = {"trials_per_task": spec.trials_per_task, "tasks": len(tasks), "trials": counter.total,
              "ok": counter.ok, "seconds": round(time.perf_counter() - start, 2)}
    _write_marker(work_dir, result)
    return {**result, "cached": False}


def build_lutc(spec: BuildSpec) -> Built:
    """``lut_compiler.compile`` with the same trials per task, exported as ``model.so``."""
    import lut_compiler

    calibrated = spec.system in ("lutc-lut", "lutc-learned", "lutc-auto")
    labels = np.load(spec.calibration_labels) if calibrated and spec.calibration_labels else None
    config = lut_compiler.CompileConfig(
        input_shapes=dict(spec.input_shapes),
        tune=lut_compiler.TuneConfig(trials_per_task=spec.trials_per_task, work_dir=spec.tuning_dir, seed=spec.seed),
        lut=_lut_config(spec, labels is not None),
        sparse=lut_compiler.SparseConfig(sparsity=0.9, block=(16, 1)) if spec.system == "lutc-sparse" else None,
        auto=_auto_config(labels is not None) if spec.system == "lutc-auto" else None,
    )
    model = lut_compiler.compile(spec.model_path, config, target=spec.target, progress=spec.progress,
                                 calibration=spec.calibration_path if calibrated else None, labels=labels)
    start = time.perf_counter()
    model.export(spec.artifact_dir)
    export_s = time.perf_counter() - start
    phases = model.record["phases"]
    report = model.record.get("tuning") or {}
    tune_s = phases.get("tune")
    compile_s = sum(phases.values()) - (tune_s or 0.0) + export_s
    tuning_dir = Path(spec.tuning_dir)
    tuning = {"trials_per_task": spec.trials_per_task, "tasks": len(report.get("tasks", [])),
              "trials": report.get("new_trials", 0), "seconds": tune_s, "config": config.to_json()}
    cached = False
    if spec.trials_per_task > 0:
        if report.get("new_trials", 0) > 0:
            _write_marker(tuning_dir, tuning)
        else:  # nothing new: the tuning happened in an earlier run
            cached = True
            tuning = {**(_read_marker(tuning_dir) or tuning), "config": config.to_json()}
            tune_s = tuning.get("seconds", tune_s)
    tuning["phases"] = phases
    plan = model.record.get("auto") or (_learned_plan(model.record["lut"]) if spec.system == "lutc-learned" else None)
    return Built(spec.system, str(Path(spec.artifact_dir) / LIBRARY), round(compile_s, 3),
                 tune_s, cached, tuning, plan)


def bench_budget(labelled: bool):
    """The bench's accuracy budget: 1 point of top-1 accuracy (labelled models) or cosine 0.99 to fp32."""
    from ..config import Budget

    return Budget("accuracy", 1.0) if labelled else Budget("cosine", 0.99)


def _auto_config(labelled: bool):
    from ..config import AutoConfig

    return AutoConfig(budget=bench_budget(labelled), prune=0.7)


def _lut_config(spec: BuildSpec, labelled: bool):
    from ..config import LearnConfig, LutConfig

    if spec.system == "lutc-lut":
        return LutConfig()
    if spec.system == "lutc-learned":
        return LutConfig(learn=LearnConfig(minutes=spec.learn_minutes), budget=bench_budget(labelled),
                         finer=spec.learn_finer)
    return None


def _learned_plan(report: dict) -> dict:
    """``lutc-learned``'s layer choice: layers and FLOPs replaced, the validation metric, the learning runs."""
    return {"replaced": sum(r["replaced"] for r in report["layers"]), "candidates": len(report["layers"]),
            "flops_replaced": report["flops_replaced"], "budget": report["budget"],
            "learn": [{k: run[k] for k in ("layers", "samples", "epochs", "seconds")} for run in report["learn"]]}


def build_lutc_untuned(spec: BuildSpec) -> Built:
    """``lut_compiler.compile`` without tuning: every kernel gets the default CPU schedule."""
    return build_lutc(replace(spec, trials_per_task=0))


BUILDERS: dict[str, Callable[[BuildSpec], Built]] = {
    "ort": build_ort,
    "tvm-untuned": build_tvm_untuned,
    "tvm-tuned": build_tvm_tuned,
    "lutc-untuned": build_lutc_untuned,
    "lutc": build_lutc,
    "lutc-lut": build_lutc,
    "lutc-sparse": build_lutc,
    "lutc-learned": build_lutc,
    "lutc-auto": build_lutc,
}


# ---- timing side: one loaded system per worker process -------------------------------------


@dataclass
class _Runner:
    call: Callable[[], object]  # one inference on the bound feeds
    read: Callable[[], dict[str, np.ndarray]]  # one inference, outputs as arrays
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # one inference on other feeds


_RUNNER: _Runner | None = None


def _ort_session(path: str, cores: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cores
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _open_ort(artifact: str, feeds: dict[str, np.ndarray], output_names: list[str], cores: int) -> _Runner:
    """Inputs bound once with IOBinding (no per-call conversion), outputs allocated by ORT."""
    session = _ort_session(artifact, cores)
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for name in output_names:
        binding.bind_output(name)

    def call():
        session.run_with_iobinding(binding)

    def read():
        call()
        return dict(zip(output_names, binding.copy_outputs_to_cpu()))

    def run(other: dict[str, np.ndarray]):
        return dict(zip(output_names, session.run(output_names, other)))

    return _Runner(call, read, run)


def _open_tvm(artifact: str, feeds: dict[str, np.ndarray], input_names: list[str], output_names: list[str]) -> _Runner:
    """The exported library in a Relax VM; inputs converted to TVM tensors once."""
    import tvm
    from tvm import relax

    from ..artifact import quiet_native_stderr

    with quiet_native_stderr():
        library = tvm.runtime.load_module(artifact)
    main = relax.VirtualMachine(library, tvm.cpu())["main"]
    args = [tvm.runtime.tensor(feeds[name]) for name in input_names]

    def call():
        return main(*args)

    def arrays(result) -> dict[str, np.ndarray]:
        values = [result] if len(output_names) == 1 else list(result)
        return {name: v.numpy() for name, v in zip(output_names, values)}

    def run(other: dict[str, np.ndarray]):
        return arrays(main(*[tvm.runtime.tensor(np.ascontiguousarray(other[name])) for name in input_names]))

    return _Runner(call, lambda: arrays(call()), run)


def open_runner(system: str, artifact: str, feeds_path: str, input_names: list[str], output_names: list[str],
                cores: int) -> None:
    """Load a built system into this worker (the timing functions below use it)."""
    global _RUNNER
    with np.load(feeds_path) as data:
        feeds = {name: np.ascontiguousarray(data[name]) for name in input_names}
    if system == "ort":
        _RUNNER = _open_ort(artifact, feeds, output_names, cores)
    else:
        _RUNNER = _open_tvm(artifact, feeds, input_names, output_names)


def outputs() -> dict[str, np.ndarray]:
    """One inference; its outputs (compared with ORT's)."""
    return _RUNNER.read()


def evaluate(samples_path: str, max_seconds: float) -> list[dict[str, np.ndarray]]:
    """Outputs on the stacked samples of ``samples_path``, in order, for at most ``max_seconds``
    (at least one sample; slow systems are scored on a prefix)."""
    results = []
    start = time.perf_counter()
    with np.load(samples_path) as data:
        stacked = {name: data[name] for name in data.files}
    for i in range(len(next(iter(stacked.values())))):
        results.append(_RUNNER.run({name: value[i] for name, value in stacked.items()}))
        if time.perf_counter() - start > max_seconds:
            break
    return results


def warm_up(seconds: float) -> float:
    """Untimed calls for ``seconds`` (at least one), then an estimate of seconds per call."""
    call = _RUNNER.call
    start = time.perf_counter()
    while True:
        before = time.perf_counter()
        call()
        last = time.perf_counter() - before
        if time.perf_counter() - start >= seconds:
            break
    if last >= 0.05:  # slow enough: one more call would estimate nothing better
        return last
    n, start = 0, time.perf_counter()
    while True:
        call()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min(0.05, seconds / 4):
            return elapsed / n


def timed_block(iterations: int) -> float:
    """Seconds for ``iterations`` back-to-back calls (garbage collection paused)."""
    call = _RUNNER.call
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(iterations):
            call()
        return time.perf_counter() - start
    finally:
        gc.enable()

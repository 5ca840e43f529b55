"""Sparse kernel benchmark (issue 6): a pruned linear or conv layer, block-sparse vs dense, side by side.

    python -m lut_compiler.bench.sparse [--shapes linear768x768 ...] [--sparsity 0.5 0.9] [--blocks 16x1 1x1]
                                         [--trials 8] [--repeat 5] [--out bench/results]

Per layer shape (MiniLM/BERT linear layers at M = 128, ResNet-style convs; the seeded weights of
`kernels.LayerShape`), block shape and sparsity, the weight W^T [N, K] is pruned by block
magnitude (`sparse_format.prune_magnitude`) and three systems are timed side by side:

- ``ort``: ONNX Runtime (`cores` threads) on the layer's ONNX model, the pruned weight a dense
  initializer.
- ``tvm-dense``: stock TVM tuned (`systems.build_tvm_tuned`: the stock ``relax.pipeline``
  zero pipeline, ``tune_relax`` with the trial budget, ``MetaScheduleApplyDatabase``), tuned and
  built once per shape with W a runtime input (the same kernel as with a constant W: the stock
  flow does not prepack weights); each row binds its pruned W.
- ``sparse``: ours: a Relax ``main`` calling `sparse_matmul` with the pattern baked in (convs:
  NCHW form on `im2col` patches, both timed together; 1x1 convs on the input reshaped), through
  lut_compiler's `legalize`, `tune` (same trials per task) and `schedule`.

Each system runs in its own persistent worker process; per row the three load their artifact,
their outputs are checked against NumPy (float64; max |error| / max |reference| <= 1e-4, else
the system is not timed and the run exits non-zero), then `measure.time_rounds` times rotating
rounds of calibrated blocks. Tuning databases live under --work-dir and are reused: dense per
shape, sparse per (shape, block, sparsity). Writes sparse.json, sparse.md and sparse.png
(speed-up vs sparsity with break-even points) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .config import TimingConfig
from .kernels import SHAPES as KERNEL_SHAPES
from .kernels import LayerShape, clock_hz
from .measure import time_rounds
from .report import output_errors
from .systems import BuildSpec, build_tvm_tuned, open_runner, outputs
from .worker import Worker, WorkerError

SHAPES = [
    *KERNEL_SHAPES[:3],
    LayerShape("linear768x768", "linear", 128, 768, 768),
    LayerShape("linear768x3072", "linear", 128, 768, 3072),
    LayerShape("linear3072x768", "linear", 128, 3072, 768),
    *KERNEL_SHAPES[3:],
]
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
BLOCKS = ((1, 1), (16, 1))
SYSTEMS = ("ort", "tvm-dense", "sparse")
MAX_REL_ERR = 1e-4
# Shorter blocks than the model bench (layers take 10 us - 5 ms; 3 systems x 90 rows).
TIMING = TimingConfig(rounds=5, block_seconds=0.05, warmup_seconds=0.1, gap_seconds=0.15, min_rounds=3)


# ---------------------------------------------------------------- layers and references


def geometry(shape: LayerShape):
    """ConvGeometry of a conv LayerShape (batch 1, stride 1, pad k // 2)."""
    from ..schedules.conv_patches import ConvGeometry

    pad = shape.kernel // 2
    return ConvGeometry.of((1, shape.dim, shape.rows, shape.rows), shape.cols, (shape.kernel,) * 2, padding=(pad,) * 4)


def input_shape(shape: LayerShape) -> tuple[int, ...]:
    return (shape.rows, shape.dim) if shape.kind == "linear" else (1, shape.dim, shape.rows, shape.rows)


def to_w_t(shape: LayerShape, w: np.ndarray) -> np.ndarray:
    """The layer's weight (W [D, N], or OIHW) as the sparse kernel's W^T [N, K]."""
    return np.ascontiguousarray(w.T if shape.kind == "linear" else w.reshape(shape.cols, -1))


def from_w_t(shape: LayerShape, w_t: np.ndarray) -> np.ndarray:
    """Inverse of `to_w_t`."""
    return np.ascontiguousarray(w_t.T if shape.kind == "linear" else w_t.reshape(shape.cols, shape.dim, shape.kernel,
                                                                                shape.kernel))


def reference(shape: LayerShape, x: np.ndarray, w_t: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """NumPy float64 layer output (float32): linear [M, N]; conv [1, N, OH, OW]."""
    if shape.kind == "linear":
        return (x.astype(np.float64) @ w_t.T.astype(np.float64) + bias).astype(np.float32)
    from ..schedules.im2col import im2col_ref

    geom = geometry(shape)
    y = np.einsum("nk,bkp->bnp", w_t.astype(np.float64), im2col_ref(x, geom).astype(np.float64)) + bias[:, None]
    return y.reshape(1, shape.cols, geom.out_height, geom.out_width).astype(np.float32)


def sparse_module(shape: LayerShape, weights: list[tuple[np.ndarray, tuple[int, int]]], bias: np.ndarray,
                  lanes: int):
    """Relax ``main(x)`` = the layer as `sparse_matmul`, once per (W^T [N, K], block) of
    `weights` (pattern baked in; data and bias constants): a tensor for one weight, else a
    tuple. Convs: NCHW form on im2col patches (one im2col for all; 1x1: x reshaped), outputs
    reshaped to [1, N, OH, OW]."""
    from tvm import relax

    from ..schedules.im2col import im2col
    from ..schedules.sparse_matmul import kernel_data, sparse_matmul
    from ..sparse_format import to_block_sparse

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(input_shape(shape), "float32"))
    linear = shape.kind == "linear"
    with bb.function("main", [x]):
        with bb.dataflow():
            if linear:
                cols, rows, images = x, shape.rows, None
            else:
                geom = geometry(shape)
                rows, images = geom.out_height * geom.out_width, 1
                cols_type = relax.TensorType((1, shape.dim * shape.kernel**2, rows), "float32")
                if geom.kernel == (1, 1) and geom.stride == (1, 1) and not any(geom.padding):
                    cols = bb.emit(relax.op.reshape(x, cols_type.shape))
                else:
                    cols = bb.emit(relax.call_tir(bb.add_func(im2col(geom).without_attr("global_symbol"), "im2col"),
                                                  [x], cols_type))
            outs = []
            for w_t, block in weights:
                sparse = to_block_sparse(w_t, block)
                kernel = bb.add_func(sparse_matmul(sparse, rows, images, lanes).without_attr("global_symbol"),
                                     "sparse_matmul")
                args = [cols, relax.const(kernel_data(sparse)), relax.const(bias)]
                if linear:
                    outs.append(bb.emit(relax.call_tir(kernel, args, relax.TensorType((rows, shape.cols), "float32"))))
                else:
                    y = bb.emit(relax.call_tir(kernel, args, relax.TensorType((1, shape.cols, rows), "float32")))
                    outs.append(bb.emit(relax.op.reshape(y, (1, shape.cols, geom.out_height, geom.out_width))))
            out = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def write_dense_onnx(shape: LayerShape, path: Path) -> None:
    """The layer's ONNX model with W a graph input (bias stays an initializer)."""
    import onnx
    from onnx import helper

    shape.write_onnx(path)
    model = onnx.load(path)
    w = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.input.append(helper.make_tensor_value_info("W", w.data_type, list(w.dims)))
    model.graph.initializer.remove(w)
    onnx.save(model, path)


# ---------------------------------------------------------------- sparse build (in a worker)


@dataclass
class SparseJob:
    """The sparse kernels of one shape: weights_paths (one per row) hold w_t f32 [N, K] and
    bias f32 [N]; artifact_dirs get each row's model.so; one tuning database for all."""

    shape: LayerShape
    blocks: list[tuple[int, int]]
    weights_paths: list[str]
    artifact_dirs: list[str]
    target: str
    trials_per_task: int
    tuning_dir: str


def build_sparse(job: SparseJob) -> dict:
    """Tune every row's kernels together (one module, `trials_per_task` each, database reused),
    then per row: legalize -> schedule -> compile -> model.so. Returns the tuning summary and
    per row the artifact, build seconds and the sparse kernel's knobs."""
    import tvm

    from ..artifact import quiet_native_stderr
    from ..config import TuneConfig
    from ..pipeline import legalize, schedule
    from ..schedules.default_cpu import cpu_knobs
    from ..schedules.sparse_matmul import scheduled_knobs
    from ..target import resolve_target
    from ..tuning import tune

    target = resolve_target(job.target)
    lanes = cpu_knobs(target).lanes("float32")
    weights = []
    for path in job.weights_paths:
        with np.load(path) as data:
            weights.append(data["w_t"])
            bias = data["bias"]
    tuning = {"trials_per_task": job.trials_per_task, "new_trials": 0, "seconds": 0.0, "tasks": []}
    if job.trials_per_task > 0:
        mod = legalize(sparse_module(job.shape, list(zip(weights, job.blocks)), bias, lanes), target, False)
        report = tune(mod, target, TuneConfig(trials_per_task=job.trials_per_task, work_dir=job.tuning_dir),
                      progress=False)
        tuning.update(new_trials=report.new_trials, seconds=round(report.seconds, 2),
                      tasks=[{"name": t.name, "trials": t.total_trials, "best_us": t.best_us} for t in report.tasks])
    built = []
    for w_t, block, out_dir in zip(weights, job.blocks, job.artifact_dirs):
        start = time.perf_counter()
        mod = legalize(sparse_module(job.shape, [(w_t, block)], bias, lanes), target, False)
        mod = schedule(mod, target, job.tuning_dir, False)
        knobs = [scheduled_knobs(f) for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
        executable = tvm.compile(mod, target)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        artifact = str(Path(out_dir) / "model.so")
        with quiet_native_stderr():
            executable.export_library(artifact)
        built.append({"artifact": artifact, "build_s": round(time.perf_counter() - start, 2),
                      "knobs": next((asdict(k) for k in knobs if k is not None), None)})
    return {"tuning": tuning, "rows": built}


# ---------------------------------------------------------------- results


def speedups(row: dict) -> dict[str, float | None]:
    """Median time of each dense system / median sparse time."""
    t = {s: row["systems"].get(s, {}).get("median_s") for s in SYSTEMS}
    return {s: (t[s] / t["sparse"] if t[s] and t["sparse"] else None) for s in ("ort", "tvm-dense")}


def break_even(points: list[tuple[float, float]]) -> float | None:
    """Sparsity where the speed-up first reaches 1 (log-linear interpolation between grid
    points; the lowest sparsity if already there); None if it never does."""
    points = sorted((p, s) for p, s in points if s)
    for i, (p, s) in enumerate(points):
        if s >= 1:
            if i == 0:
                return p
            p0, s0 = points[i - 1]
            return p0 + (p - p0) * -math.log(s0) / (math.log(s) - math.log(s0))
    return None


def _curves(rows: list[dict]) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    """(shape, block, reference system) -> [(sparsity, speed-up)]."""
    curves: dict = {}
    for row in rows:
        for system, value in speedups(row).items():
            curves.setdefault((row["shape"]["name"], row["block"], system), []).append((row["sparsity"], value))
    return curves


def _ms(stats: dict | None) -> str:
    if not stats or stats.get("median_s") is None:
        return "failed" if stats else "-"
    spread = (stats["p90_s"] - stats["p10_s"]) / 2 / stats["median_s"]
    return f"{1e3 * stats['median_s']:.3f} ±{100 * spread:.0f}%"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Sparse kernel vs dense, one layer per row. Clock {m['clock_hz'] / 1e9:.2f} GHz (/proc/cpuinfo, current, "
        f"mean over cores), {m['cores']} cores ({m['cpu']}), every system on {m['cores']} threads; load average "
        f"{m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after the run. Tuning: {result['trials']} "
        "MetaSchedule trials per task for both TVM systems (dense: stock relax pipeline + tune_relax, once per "
        "shape; sparse: lut_compiler legalize + tune + schedule, per row).",
        "",
        "Times: ms per call, median over rotating rounds (each round one calibrated block of back-to-back calls "
        f"of ~{result['timing']['block_seconds']} s per system, {result['timing']['gap_seconds']} s apart, each "
        "system in its own process), ± half the p10-p90 spread. x ORT / x TVM = dense median / sparse median "
        "(> 1: sparse faster). Every system's output was checked against NumPy before timing. 3x3 convs: "
        "im2col + sparse kernel timed together.",
        "",
        "| shape | block | sparsity | ORT dense | TVM dense tuned | sparse | x ORT | x TVM |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        up = speedups(row)
        sys_ = row["systems"]
        lines.append(
            f"| {row['shape']['name']} | {row['block']} | {100 * row['sparsity']:.0f}% | {_ms(sys_.get('ort'))} | "
            f"{_ms(sys_.get('tvm-dense'))} | {_ms(sys_.get('sparse'))} | "
            + " | ".join(f"{up[s]:.2f}" if up[s] else "-" for s in ("ort", "tvm-dense")) + " |")
    lines += ["", "Break-even sparsity (speed-up 1, interpolated; '<= p': already faster at the lowest sparsity "
              "measured; '-' none up to the highest):", "",
              "| shape | block | vs ORT | vs TVM dense tuned |", "|---|---|---:|---:|"]
    curves = _curves(result["rows"])
    for (name, block) in dict.fromkeys((k[0], k[1]) for k in curves):
        cells = []
        for system in ("ort", "tvm-dense"):
            points = curves.get((name, block, system), [])
            p = break_even(points)
            lowest = min((q for q, s in points if s), default=None)
            cells.append("-" if p is None else f"<= {100 * p:.0f}%" if p == lowest else f"{100 * p:.0f}%")
        lines.append(f"| {name} | {block} | {' | '.join(cells)} |")
    if result["errors"]:
        lines += ["", "Failures:", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Speed-up vs sparsity, one panel per shape: a curve per block x dense system, the break-even
    line, each curve's crossing marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(result["rows"])
    names = list(dict.fromkeys(k[0] for k in curves))
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    colors = {}
    for ax, name in zip(axes.flat, names):
        for (shape, block, system), points in curves.items():
            points = sorted((p, s) for p, s in points if s)
            if shape != name or not points:
                continue
            color = colors.setdefault(block, f"C{len(colors)}")
            style = "-" if system == "tvm-dense" else "--"
            label = f"{block} vs {'TVM tuned' if system == 'tvm-dense' else 'ORT'}"
            ax.plot([100 * p for p, _ in points], [s for _, s in points], style, marker="o", ms=3, color=color,
                    label=label)
            cross = break_even(points)
            if cross is not None and cross > points[0][0]:
                ax.plot(100 * cross, 1, "x", color=color, ms=9, mew=2)
                ax.annotate(f"{100 * cross:.0f}%", (100 * cross, 1), textcoords="offset points",
                            xytext=(4, 6 if system == "tvm-dense" else -12), fontsize=8, color=color)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("sparsity %")
        ax.set_ylabel("speed-up (dense / sparse)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Sparse kernel speed-up, {result['trials']} trials per task, {result['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- run


class _Workers:
    """The persistent processes of a run: one builder and one timing worker per system,
    respawned after a failure."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: dict[str, Worker] = {}

    def __getitem__(self, name: str) -> Worker:
        if name not in self.procs:
            self.procs[name] = Worker(name, self.env)
        return self.procs[name]

    def reset(self, name: str) -> None:
        worker = self.procs.pop(name, None)
        if worker is not None:
            worker.close(timeout=5)

    def close(self) -> None:
        for name in list(self.procs):
            self.reset(name)


def _block_name(block: tuple[int, int]) -> str:
    return f"{block[0]}x{block[1]}"


def _time_row(workers: _Workers, artifacts: dict[str, tuple[str, list[str]]], feeds: str, expected: np.ndarray,
              cores: int, timing: TimingConfig, errors: list[str], label: str) -> dict[str, dict]:
    """Load, check against `expected` and time the systems of one row (artifacts: system ->
    (artifact, input names))."""
    from .report import Row

    stats: dict[str, dict] = {}
    loaded: dict[str, Worker] = {}

    def fail(system: str, err: Exception) -> None:
        stats[system] = {"median_s": None, "error": str(err)}
        errors.append(f"{label} {system}: {err}")
        loaded.pop(system, None)
        workers.reset(system)

    for system, (artifact, inputs) in artifacts.items():
        workers[system].submit(open_runner, "ort" if system == "ort" else "tvm", artifact, feeds, inputs, ["y"], cores)
    for system in artifacts:
        try:
            workers[system].result()
            got = workers[system].call(outputs)
        except WorkerError as err:
            fail(system, err)
            continue
        abs_err, rel_err = output_errors(got, {"y": expected})
        stats[system] = {"max_abs_err": abs_err, "max_rel_err": rel_err}
        if rel_err > MAX_REL_ERR:
            fail(system, ValueError(f"output differs from NumPy: max |err| / max |ref| = {rel_err:.2e}"))
        else:
            loaded[system] = workers[system]
    for system, (iterations, per_round) in time_rounds(dict(loaded), timing, fail).items():
        row = Row("", "", "", system)
        row.set_times(per_round)
        stats[system].update(iterations=iterations, per_round_s=row.per_round_s, median_s=row.median_s,
                             p10_s=row.p10_s, p90_s=row.p90_s)
    return stats


def run(shapes: list[LayerShape], sparsities: list[float], blocks: list[tuple[int, int]], trials: int,
        timing: TimingConfig, work_dir: Path, target: str, log=print) -> dict:
    """Every (shape, block, sparsity) row; the result dict that `markdown` and `plot` render."""
    from ..sparse_format import prune_magnitude
    from ..target import host_cores, resolve_target

    cores = host_cores()
    machine = {"cores": cores, "cpu": json.loads(str(resolve_target(target))).get("mcpu", "?"),
               "load_before": list(os.getloadavg())}
    rows, errors, shape_info = [], [], {}
    start = time.perf_counter()
    # Dense and sparse builds in separate processes: the stock tuning's loggers outlive its
    # redirected stdout and would break MetaSchedule logging in a later tuning there.
    workers = _Workers({"TVM_NUM_THREADS": str(cores)})
    with ExitStack() as stack:
        stack.callback(workers.close)
        for shape in shapes:
            shape_dir = (work_dir / shape.name).resolve()
            shape_dir.mkdir(parents=True, exist_ok=True)
            w, bias = shape.weights()
            w_t = to_w_t(shape, w)
            x = np.random.default_rng(zlib.crc32(shape.name.encode())).standard_normal(input_shape(shape))
            x = x.astype(np.float32)
            write_dense_onnx(shape, shape_dir / "dense.onnx")
            spec = BuildSpec(system="tvm-tuned", model_path=str(shape_dir / "dense.onnx"),
                             simplified_path=str(shape_dir / "dense.onnx"), calibration_path="",
                             input_shapes={"x": input_shape(shape), "W": tuple(w.shape)}, target=target,
                             trials_per_task=trials, artifact_dir=str(shape_dir / "dense"),
                             tuning_dir=str(shape_dir / "dense" / f"tuning-t{trials}"), cores=cores, progress=False)
            t0 = time.perf_counter()
            info = shape_info[shape.name] = {}
            try:
                dense = workers["build-dense"].call(build_tvm_tuned, spec)
                info["dense"] = {"seconds": round(time.perf_counter() - t0, 1), "tune_s": dense.tune_s,
                                 "tune_cached": dense.tune_cached, "tuning": dense.tuning}
                log(f"{shape.name}: dense built in {time.perf_counter() - t0:.0f} s"
                    + (" (tuning database reused)" if dense.tune_cached else ""))
            except WorkerError as err:
                errors.append(f"{shape.name} tvm-dense build: {err}")
                workers.reset("build-dense")
                dense = None
            grid = [(block, sparsity) for block in blocks for sparsity in sparsities]
            row_dirs, pruned = [], []
            for block, sparsity in grid:
                row_dir = shape_dir / _block_name(block) / f"s{round(100 * sparsity)}"
                row_dir.mkdir(parents=True, exist_ok=True)
                pruned.append(prune_magnitude(w_t, sparsity, block))
                shape.write_onnx(row_dir / "ort.onnx", from_w_t(shape, pruned[-1]), bias)
                np.savez(row_dir / "feeds.npz", x=x, W=from_w_t(shape, pruned[-1]))
                np.savez(row_dir / "weights.npz", w_t=pruned[-1], bias=bias)
                row_dirs.append(row_dir)
            job = SparseJob(shape, [b for b, _ in grid], [str(d / "weights.npz") for d in row_dirs],
                            [str(d) for d in row_dirs], target, trials, str(shape_dir / "sparse" / f"tuning-t{trials}"))
            t0 = time.perf_counter()
            try:
                sparse = workers["build"].call(build_sparse, job)
                info["sparse"] = {"seconds": round(time.perf_counter() - t0, 1), "tuning": sparse["tuning"]}
                log(f"{shape.name}: {len(grid)} sparse kernels tuned and built in {time.perf_counter() - t0:.0f} s"
                    + ("" if sparse["tuning"]["new_trials"] else " (tuning database reused)"))
            except WorkerError as err:
                errors.append(f"{shape.name} sparse build: {err}")
                workers.reset("build")
                sparse = None
            for i, (block, sparsity) in enumerate(grid):
                label = f"{shape.name} {_block_name(block)} {100 * sparsity:.0f}%"
                row = {"shape": asdict(shape), "block": _block_name(block), "sparsity": sparsity,
                       "density": float(np.count_nonzero(pruned[i])) / pruned[i].size}
                artifacts = {"ort": (str(row_dirs[i] / "ort.onnx"), ["x"])}
                if dense is not None:
                    artifacts["tvm-dense"] = (dense.artifact, ["x", "W"])
                if sparse is not None:
                    row["sparse_build"] = sparse["rows"][i]
                    artifacts["sparse"] = (sparse["rows"][i]["artifact"], ["x"])
                row["systems"] = _time_row(workers, artifacts, str(row_dirs[i] / "feeds.npz"),
                                           reference(shape, x, pruned[i], bias), cores, timing, errors, label)
                for system in set(SYSTEMS) - set(row["systems"]):
                    row["systems"][system] = {"median_s": None, "error": "build failed"}
                rows.append(row)
                up = speedups(row)
                log(f"{label}: " + "  ".join(f"{s} {_ms(row['systems'].get(s))}" for s in SYSTEMS)
                    + "  speed-up " + "  ".join(f"x{s} {up[s]:.2f}" for s in up if up[s]))
    machine.update(clock_hz=clock_hz(), load_after=list(os.getloadavg()))
    return {"machine": machine, "trials": trials, "timing": asdict(timing), "wall_s": round(time.perf_counter() - start),
            "shapes": shape_info, "rows": rows, "errors": errors}


def parse_block(text: str) -> tuple[int, int]:
    bn, bk = text.lower().split("x")
    return int(bn), int(bk)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in SHAPES], choices=[s.name for s in SHAPES])
    parser.add_argument("--sparsity", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--blocks", nargs="+", type=parse_block, default=list(BLOCKS), help="bn x bk, e.g. 16x1 1x1")
    parser.add_argument("--trials", type=int, default=4, help="MetaSchedule trials per task, dense and sparse")
    parser.add_argument("--repeat", type=int, default=TIMING.rounds, help="timed rounds per system and row")
    parser.add_argument("--work-dir", default=".lutc/bench-sparse", help="models, artifacts, tuning databases")
    parser.add_argument("--out", default="bench/results", help="directory for sparse.{json,md,png}")
    parser.add_argument("--target", default="host")
    args = parser.parse_args(argv)
    timing = replace(TIMING, rounds=args.repeat, min_rounds=min(TIMING.min_rounds, args.repeat))
    shapes = [s for s in SHAPES if s.name in args.shapes]
    result = run(shapes, args.sparsity, args.blocks, args.trials, timing, Path(args.work_dir), args.target)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "sparse.md").write_text(markdown(result))
    plot(result, out / "sparse.png")
    print(markdown(result))
    if result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

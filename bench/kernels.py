"""Kernel benchmark: one linear or conv layer as encode + lookup-add vs dense, side by side.

    python -m lut_compiler.bench.kernels [--trials 16] [--shapes linear384x384 ...] [--out bench/results]

Per layer shape (MiniLM/BERT linear layers at M = 128 rows, ResNet-style convs), the bench
harness times, each system in its own process with rotating rounds: ONNX Runtime's dense
MatMul/Conv (2 threads), stock TVM tuned with the trial budget, lutc dense and lutc with the
layer as encode + lookup-add (``lutc-lut``, same budget). Then the encode and the
lookup-add kernels alone (the PrimFuncs the rewrite emits, tuned with the same budget),
and the lookup-add's table lookups per cycle per core: M x C x N / (seconds x clock x cores),
the clock read from /proc/cpuinfo ("cpu MHz", the current clock, not a turbo maximum).
Writes ``kernels.json`` and ``kernels.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import BenchConfig, Case, TimingConfig


@dataclass(frozen=True)
class LayerShape:
    """A linear layer [M, D] x [D, N], or a conv [1, D, H, H] * [N, D, k, k] (pad k // 2)."""

    name: str
    kind: str  # "linear" | "conv"
    rows: int  # linear: M; conv: input height = width
    dim: int  # D: input features / channels
    cols: int  # N: output features / channels
    kernel: int = 1

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The seeded layer: W float32 [D, N] (linear) or [N, D, k, k] (conv), bias float32 [N]."""
        rng = np.random.default_rng(0)
        if self.kind == "linear":
            w = rng.standard_normal((self.dim, self.cols)) / np.sqrt(self.dim)
        else:
            w = rng.standard_normal((self.cols, self.dim, self.kernel, self.kernel)) / np.sqrt(self.dim * self.kernel**2)
        return w.astype(np.float32), rng.standard_normal(self.cols).astype(np.float32)

    def write_onnx(self, path: Path, w: np.ndarray | None = None, bias: np.ndarray | None = None) -> None:
        """The layer as ONNX (MatMul + Add, or Conv with pads k // 2), W and bias as initializers
        (default: `weights()`)."""
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        if w is None or bias is None:
            w, bias = self.weights()
        if self.kind == "linear":
            x_shape, y_shape = [self.rows, self.dim], [self.rows, self.cols]
            nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
        else:
            x_shape, y_shape = [1, self.dim, self.rows, self.rows], [1, self.cols, self.rows, self.rows]
            pad = self.kernel // 2
            nodes = [helper.make_node("Conv", ["x", "W", "b"], ["y"], pads=[pad] * 4)]
        graph = helper.make_graph(
            nodes, self.name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
            [numpy_helper.from_array(np.asarray(w, np.float32), "W"), numpy_helper.from_array(np.asarray(bias, np.float32), "b")],
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


SHAPES = [
    LayerShape("linear384x384", "linear", 128, 384, 384),
    LayerShape("linear384x1536", "linear", 128, 384, 1536),
    LayerShape("linear1536x384", "linear", 128, 1536, 384),
    LayerShape("conv3x3-64-28", "conv", 28, 64, 64, 3),
    LayerShape("conv3x3-128-14", "conv", 14, 128, 128, 3),
    LayerShape("conv1x1-64-256-28", "conv", 28, 64, 256, 1),
]
SYSTEMS = ("ort", "tvm-tuned", "lutc", "lutc-lut")


def clock_hz() -> float:
    """Mean current clock of the online CPUs from /proc/cpuinfo (Hz)."""
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("cpu MHz")]
    return 1e6 * sum(mhz) / len(mhz)


def _kernel_module(func, name: str):
    """A Relax ``main`` whose parameters are the kernel's inputs, calling it once."""
    from tvm import relax

    params = [relax.Var(f"arg{i}", relax.TensorType([int(d) for d in p.ty.shape], str(p.ty.dtype)))
              for i, p in enumerate(func.params[:-1])]
    out = func.params[-1].ty
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        gv = bb.add_func(func.without_attr("global_symbol"), name)
        with bb.dataflow():
            result = bb.emit_output(relax.call_tir(gv, params, relax.TensorType([int(d) for d in out.shape],
                                                                                   str(out.dtype))))
        bb.emit_func_output(result)
    return bb.get()


def _random_args(func, centroids: int) -> list:
    """Inputs of a kernel: codes in [0, K), int8 tables, standard normal floats."""
    import tvm

    rng = np.random.default_rng(1)
    args = []
    for p in func.params[:-1]:
        shape, dtype = [int(d) for d in p.ty.shape], str(p.ty.dtype)
        if dtype == "uint8":
            value = rng.integers(0, centroids, shape).astype(dtype)
        elif dtype == "int8":
            value = rng.integers(-127, 128, shape).astype(dtype)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        args.append(tvm.runtime.tensor(value))
    return args


def kernel_times(shape: LayerShape, model_path: str, trials: int, work_dir: str, target: str) -> dict:
    """Seconds of the encode and the lookup-add alone (median of 10 repeats), tuned with ``trials``."""
    import tvm
    from tvm import relax

    from ..config import LutConfig, TuneConfig
    from ..lut import plan
    from ..onnx_import import import_onnx
    from ..schedules.default_cpu import default_schedule_pass
    from ..target import resolve_target
    from ..tuning import apply_database, tune

    tvm_target = resolve_target(target)
    layer = next(p for p in plan(import_onnx(model_path), LutConfig(), tvm_target) if p.replaced)
    times = {"V": layer.subspace_len, "C": layer.codebooks, "K": layer.centroids, "lanes": layer.lanes}
    for name, func in zip(("encode", "lookup_add"), layer.rule.kernels(layer, "int8")):
        mod = _kernel_module(func, f"lut_{name}")
        if trials > 0:
            tune(mod, tvm_target, TuneConfig(trials_per_task=trials, work_dir=work_dir), progress=False)
            mod = apply_database(mod, tvm_target, work_dir)
        vm = relax.VirtualMachine(tvm.compile(default_schedule_pass(tvm_target)(mod), tvm_target), tvm.cpu())
        timer = vm.time_evaluator("main", tvm.cpu(), number=20, repeat=10, min_repeat_ms=50)
        times[f"{name}_s"] = float(np.median(timer(*_random_args(func, layer.centroids)).results))
    return times


def _lookups(shape: LayerShape, codebooks: int) -> int:
    rows = shape.rows if shape.kind == "linear" else shape.rows * shape.rows
    return rows * codebooks * shape.cols


def markdown(rows: list[dict], clock: float, cores: int) -> str:
    lines = [f"Clock {clock / 1e9:.2f} GHz (/proc/cpuinfo, current), {cores} cores; ms, median over rounds. "
             "x ORT = time / ORT dense; lookups/cycle/core = M*C*N / (lookup-add s x clock x cores); "
             "the byte-shuffle limit is 64 (two 32-byte VPSHUFB per cycle on Zen 3, one 64-byte on Zen 4); "
             "this kernel's exact uint16 sums use each shuffle for half as many lookups (16 per ymm), "
             "so its own ceiling is 32.",
             "",
             "| layer | V | C | ORT dense | TVM tuned | lutc dense | lutc LUT (x ORT, x TVM) | encode | lookup-add | lookups/cycle/core |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = {k: (f"{1e3 * v:.3f}" if v else "-") for k, v in r["systems"].items()}
        lut, ort, tvm = r["systems"].get("lutc-lut"), r["systems"].get("ort"), r["systems"].get("tvm-tuned")
        ratio = f" ({lut / ort:.2f}, {lut / tvm:.2f})" if lut and ort and tvm else ""
        lines.append(
            f"| {r['shape']['name']} | {r['V']} | {r['C']} | {ms.get('ort', '-')} | {ms.get('tvm-tuned', '-')} | "
            f"{ms.get('lutc', '-')} | {ms.get('lutc-lut', '-')}{ratio} | {1e3 * r['encode_s']:.3f} | "
            f"{1e3 * r['lookup_add_s']:.3f} | {r['lookups_per_cycle_core']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from ..target import host_cores
    from .measure import bench_case

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="MetaSchedule trials per kernel for every tuned system")
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in SHAPES], choices=[s.name for s in SHAPES])
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per system")
    parser.add_argument("--work-dir", default=".lutc/bench-kernels", help="models, artifacts, tuning databases")
    parser.add_argument("--out", default="bench/results", help="directory for kernels.{json,md}")
    parser.add_argument("--target", default="host")
    args = parser.parse_args(argv)
    cores = host_cores()
    os.environ["TVM_NUM_THREADS"] = str(cores)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for shape in (s for s in SHAPES if s.name in args.shapes):
        path = work / f"{shape.name}.onnx"
        shape.write_onnx(path)
        cfg = BenchConfig(cases=[Case(str(path))], systems=SYSTEMS, trials_per_task=args.trials,
                          timing=TimingConfig(rounds=args.repeat), target=args.target, cores=cores,
                          work_dir=str(work / "bench"), out_dir=args.out, progress=False)
        start = time.perf_counter()
        rows = bench_case(cfg.cases[0], cfg, print)
        kernels = kernel_times(shape, str(path), args.trials, str(work / "kernels" / shape.name), args.target)
        seconds = kernels["lookup_add_s"]
        results.append({
            "shape": asdict(shape), **kernels,
            "systems": {r.system: r.median_s for r in rows},
            "errors": {r.system: r.error for r in rows if r.error},
            "lookups_per_cycle_core": _lookups(shape, kernels["C"]) / (seconds * clock_hz() * cores),
            "wall_s": round(time.perf_counter() - start, 1),
        })
        print(markdown(results[-1:], clock_hz(), cores).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = clock_hz()
    (out / "kernels.json").write_text(json.dumps({"clock_hz": clock, "cores": cores, "trials": args.trials,
                                                 "rows": results}, indent=1))
    (out / "kernels.md").write_text(markdown(results, clock, cores) + "\n")
    print(markdown(results, clock, cores))


if __name__ == "__main__":
    main()

"""Sparse matmul kernel (schedules/sparse_matmul.py) vs dense TVM on the same layer.

    python bench/sparse_matmul_bench.py [--runs 200] [--tune-trials 0] [--work-dir DIR]

Each case is a Relax function y = x @ W + bias with a pruned constant W: the dense one through
legalize + fuse + the default CPU schedule (optionally MetaSchedule-tuned), the sparse one as a
call_tir of `sparse_matmul` with its data and bias constant (default knobs, optionally tuned).
Both run in this process on the Relax VM and are timed alternately (perf_counter, median of
`runs` calls each); TVM_NUM_THREADS sets the threads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import tvm
from tvm import relax

from lut_compiler.config import TuneConfig
from lut_compiler.schedules.default_cpu import default_schedule_pass
from lut_compiler.schedules.sparse_matmul import kernel_data, sparse_matmul
from lut_compiler.sparse_format import prune_magnitude, to_block_sparse
from lut_compiler.target import resolve_target
from lut_compiler.tuning import apply_database, tune

# name, (M, K, N), sparsity, block
CASES = [
    ("BERT 768x768 M=128 90% 16x1", (128, 768, 768), 0.9, (16, 1)),
    ("MiniLM 384x1536 M=128 90% 16x1", (128, 384, 1536), 0.9, (16, 1)),
    ("MiniLM 384x1536 M=128 90% 1x1", (128, 384, 1536), 0.9, (1, 1)),
]


def _fuse(mod: tvm.IRModule, target) -> tvm.IRModule:
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
              relax.transform.FuseOps(), relax.transform.FuseTIR()]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def dense_module(w: np.ndarray, bias: np.ndarray, m: int) -> tvm.IRModule:
    """main(x [M, K]) = x @ W + bias, W [K, N] constant."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, w.shape[0]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w)))
            out = bb.emit_output(relax.op.add(y, relax.const(bias)))
        bb.emit_func_output(out)
    return bb.get()


def sparse_module(w_t: np.ndarray, block, bias: np.ndarray, m: int, lanes: int) -> tvm.IRModule:
    """main(x [M, K]) = sparse_matmul(x) with W^T [N, K] in `block` blocks, its pattern baked in."""
    sparse = to_block_sparse(w_t, block)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, w_t.shape[1]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            kernel = bb.add_func(sparse_matmul(sparse, m, lanes=lanes).without_attr("global_symbol"), "sparse_matmul")
            args = [x, relax.const(kernel_data(sparse)), relax.const(bias)]
            out = bb.emit_output(relax.call_tir(kernel, args, relax.TensorType((m, w_t.shape[0]), "float32")))
        bb.emit_func_output(out)
    return bb.get()


def _vm(mod: tvm.IRModule, target) -> relax.VirtualMachine:
    return relax.VirtualMachine(tvm.compile(default_schedule_pass(target)(mod), target), tvm.cpu())


def _time(fns: dict, x, runs: int) -> dict[str, float]:
    """Median ms per call of each function, calls interleaved."""
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn(x)  # warm-up
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(x)
            samples[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per kernel (0: untuned)")
    parser.add_argument("--work-dir", default=None, help="tuning database (default: a fresh temporary one)")
    args = parser.parse_args()
    target = resolve_target("host")
    lanes = 16 if "avx512f" in str(target.attrs.get("mattr", "")) else 8
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="sparse-bench-")
    rng = np.random.default_rng(0)
    for name, (m, k, n), sparsity, block in CASES:
        w_t = prune_magnitude(rng.standard_normal((n, k)), sparsity, block)
        bias = rng.standard_normal(n).astype("float32")
        x = tvm.runtime.tensor(rng.standard_normal((m, k)).astype("float32"))
        mods = {"dense": _fuse(dense_module(np.ascontiguousarray(w_t.T), bias, m), target),
                "sparse": _fuse(sparse_module(w_t, block, bias, m, lanes), target)}
        if args.tune_trials:
            for mod in mods.values():
                tune(mod, target, TuneConfig(trials_per_task=args.tune_trials, work_dir=work_dir), progress=False)
            mods = {key: apply_database(mod, target, work_dir) for key, mod in mods.items()}
        vms = {key: _vm(mod, target)["main"] for key, mod in mods.items()}
        expected = x.numpy() @ w_t.T.astype("float32") + bias
        for key, fn in vms.items():
            np.testing.assert_allclose(fn(x).numpy(), expected, rtol=1e-4, atol=1e-3, err_msg=key)
        ms = _time(vms, x, args.runs)
        print(f"{name:<34} dense {ms['dense']:8.3f} ms  sparse {ms['sparse']:8.3f} ms  "
              f"speed-up {ms['dense'] / ms['sparse']:5.2f}x  (tuned trials {args.tune_trials})", flush=True)


if __name__ == "__main__":
    main()

"""Latency of untuned kernels: stock Relax pipeline vs default CPU schedules vs ONNX Runtime.

    python bench/default_schedule_bench.py [--threads 2] [--rounds 3]

Both TVM variants run in this process (TVM_NUM_THREADS = --threads); ONNX Runtime (as many
intra-op threads) runs in a child process between them, so the three are measured in the
same run without sharing thread pools.
Prints one row per case: median latency in ms (and the ratios) over all rounds.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Case:
    """A layer: matmul x (M, K) @ W (K, N) [+ bias + relu], or a 3x3 conv (pad 1) + bias + relu
    on x (1, C, H, W) with F filters. fp32, weights are constants."""

    name: str
    kind: str  # "matmul" | "conv"
    shape: tuple[int, ...]  # (M, K, N) or (C, H, W, F)
    bias_relu: bool


CASES = [
    Case("dense 64x512 @ 512x1024 + bias + relu", "matmul", (64, 512, 1024), True),
    Case("MiniLM FFN 128x384 @ 384x1536", "matmul", (128, 384, 1536), False),
    Case("conv3x3 1x64x56x56 -> 64 + bias + relu", "conv", (64, 56, 56, 64), True),
]


def _arrays(case: Case) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if case.kind == "matmul":
        m, k, n = case.shape
        shapes = {"x": (m, k), "w": (k, n), "b": (n,)}
    else:
        c, h, w, f = case.shape
        shapes = {"x": (1, c, h, w), "w": (f, c, 3, 3), "b": (f,)}
    return {name: rng.standard_normal(s).astype("float32") for name, s in shapes.items()}


def _onnx_model(case: Case, arrays: dict[str, np.ndarray]):
    from onnx import TensorProto, helper, numpy_helper

    if case.kind == "matmul":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if case.bias_relu else "out"])]
        if case.bias_relu:
            nodes += [
                helper.make_node("Add", ["y", "b"], ["z"]),
                helper.make_node("Relu", ["z"], ["out"]),
            ]
    else:
        nodes = [
            helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["y"], ["out"]),
        ]
    weights = [numpy_helper.from_array(arrays[n], n) for n in ("w", "b")]
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, arrays["x"].shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _relax_module(case: Case, arrays: dict[str, np.ndarray]):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(arrays["x"].shape, "float32"))
    w = relax.const(arrays["w"])
    with bb.function("main", [x]):
        with bb.dataflow():
            if case.kind == "matmul":
                y = bb.emit(relax.op.matmul(x, w))
                bias = relax.const(arrays["b"])
            else:
                y = bb.emit(relax.op.nn.conv2d(x, w, padding=1))
                bias = relax.const(arrays["b"].reshape(1, -1, 1, 1))
            if case.bias_relu:
                y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, bias))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _tvm_runner(case: Case, arrays: dict[str, np.ndarray], scheduled: bool):
    """Compile the layer; return a function timing `repeat` runs (seconds each)."""
    import tvm
    from tvm import relax

    from lut_compiler.schedules.default_cpu import default_schedule_pass

    target = tvm.target.Target(
        {
            "kind": "llvm",
            "mtriple": "x86_64-linux-gnu",
            "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "num-cores": 2,
        }
    )
    mod = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )(_relax_module(case, arrays))
    if scheduled:
        mod = default_schedule_pass(target)(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    x = tvm.runtime.tensor(arrays["x"])
    number = 1 if not scheduled else 20
    timer = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=5)
    return lambda: list(timer(x).results)


def _ort_times(case_index: int, threads: int) -> list[float]:
    """Run ONNX Runtime in a child process; return 5 timings (seconds per run)."""
    out = subprocess.run(
        [sys.executable, __file__, "--ort-case", str(case_index), "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def _ort_child(case: Case, threads: int) -> None:
    import onnxruntime as ort

    arrays = _arrays(case)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        _onnx_model(case, arrays).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {"x": arrays["x"]}
    for _ in range(20):
        session.run(None, feed)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20):
            session.run(None, feed)
        times.append((time.perf_counter() - start) / 20)
    print(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ort-case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ort_case is not None:
        _ort_child(CASES[args.ort_case], args.threads)
        return
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when tvm is first imported
    print(f"{args.threads} threads, {args.rounds} rounds, median ms")
    print("| case | stock TVM | default schedules | ONNX Runtime | stock/default | default/ORT |")
    print("|---|---|---|---|---|---|")
    for index, case in enumerate(CASES):
        arrays = _arrays(case)
        runners = {s: _tvm_runner(case, arrays, s) for s in (False, True)}
        times = {"stock": [], "default": [], "ort": []}
        for _ in range(args.rounds):
            times["stock"] += runners[False]()
            times["default"] += runners[True]()
            time.sleep(0.5)  # let the TVM thread pool go idle
            times["ort"] += _ort_times(index, args.threads)
        ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        print(
            f"| {case.name} | {ms['stock']:.1f} | {ms['default']:.3f} | {ms['ort']:.3f} "
            f"| {ms['stock'] / ms['default']:.0f}x | {ms['default'] / ms['ort']:.2f}x |"
        )


if __name__ == "__main__":
    main()

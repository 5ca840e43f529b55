"""The sparse phase of ``compile``: pick layers with sparse (or pruned) weights, measure their
block-sparse kernel against the dense one on the target, rewrite the ones that win.

    module --find_candidates--> matmul/conv2d calls with constant weights
        --prune_magnitude (SparseConfig.sparsity) or detect_block--> BlockSparse W^T
        --measure: the layer alone, dense vs sparse, same schedules/tuning as the model-->
        --rewrite_sparse--> module with sparse_matmul calls where sparse was >= min_speedup faster
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import tvm
from tqdm import tqdm

from .calibration import split_holdout
from .config import SparseConfig, TuneConfig
from .errors import CalibrationError
from .layer_timing import MeasureConfig, dense_call, layer_module, time_layer
from .lut_report import format_agreement
from .onnx_import import WeightUser
from .passes.find_candidates import Candidate, find_candidates, select
from .passes.sparse_rewrite import SparseLayer, check, rewrite_sparse, weight_t
from .schedules.default_cpu import cpu_knobs
from .sparse_finetune import finetune
from .sparse_format import detect_block, prune_magnitude, to_block_sparse


HOLDOUT = 0.2  # share of the calibration samples the fine-tune leaves for the report


@dataclass
class SparseDecision:
    """One matmul/conv2d: its block structure and the measured times (ms) when measured."""

    name: str
    op: str
    weight: str  # shape, e.g. "384x1536"
    flops: int
    block: str | None = None  # "16x1"
    sparsity: float | None = None  # share of zero blocks (after pruning)
    pruned: bool = False
    dense_ms: float | None = None
    sparse_ms: float | None = None
    sparse: bool = False
    reason: str = ""

    @property
    def speedup(self) -> float | None:
        return self.dense_ms / self.sparse_ms if self.dense_ms and self.sparse_ms else None


def sparse_layer(c: Candidate, cfg: SparseConfig) -> tuple[SparseLayer | None, SparseDecision]:
    """The call's sparse layer (weights pruned when cfg.sparsity is set, else their own
    block structure), or None with the reason in the decision."""
    decision = SparseDecision(c.name, c.op, "x".join(map(str, c.weight_shape)) or "?", c.flops)
    reason = check(c)
    if reason is not None:
        decision.reason = reason
        return None, decision
    w_t = weight_t(c)
    block = cfg.block if cfg.sparsity is not None else detect_block(w_t)
    if w_t.shape[0] % block[0] or w_t.shape[1] % block[1]:
        decision.reason = f"block {block[0]}x{block[1]} does not divide W^T {w_t.shape[0]}x{w_t.shape[1]}"
        return None, decision
    if cfg.sparsity is not None:
        w_t, decision.pruned = prune_magnitude(w_t, cfg.sparsity, block), True
    weight = to_block_sparse(w_t, block)
    decision.block, decision.sparsity = f"{block[0]}x{block[1]}", round(1.0 - weight.density, 4)
    if decision.sparsity < cfg.min_sparsity:
        decision.reason = f"{decision.sparsity:.0%} zero blocks < min_sparsity {cfg.min_sparsity:.0%}"
        return None, decision
    bias = c.bias if c.bias is not None else np.zeros(weight.shape[0], np.float32)
    return SparseLayer(c, weight, bias), decision


def measure(layer: SparseLayer, target: tvm.target.Target, tune_cfg: TuneConfig,
            cfg: MeasureConfig = MeasureConfig()) -> tuple[float, float, float]:
    """(dense ms, sparse ms, max |sparse - dense| / max |dense|) of the layer alone on random
    inputs, both tuned with `tune_cfg` (or default schedules), timed in alternating rounds
    (median), or the times an earlier compile measured (`LayerTimes`; error 0: checked then).
    The error checks the sparse kernel against the dense computation."""
    c, lanes = layer.candidate, cpu_knobs(target).lanes("float32")
    mods = {"dense": layer_module(c.input_shape, dense_call(c, layer.weight.dense(), layer.bias)),
            "sparse": layer_module(c.input_shape, lambda bb, x: layer.emit(bb, x, lanes))}
    ms, out = time_layer(mods, c.input_shape, target, tune_cfg, cfg)
    if not out:  # both times known from an earlier compile, which checked the error
        return ms["dense"], ms["sparse"], 0.0
    error = float(np.abs(out["sparse"] - out["dense"]).max() / max(np.abs(out["dense"]).max(), 1e-30))
    return ms["dense"], ms["sparse"], error


@dataclass
class SparseResult:
    """What the phase did: a decision per matmul/conv2d, fine-tune stats, held-out samples."""

    decisions: list[SparseDecision]
    layers: list[SparseLayer]  # the rewritten ones, as compiled
    finetune: dict | None = None
    held_out: list[int] | None = None  # sample indices for the report, never fine-tuned on


def apply_sparse(mod: tvm.IRModule, weight_users: dict[str, WeightUser] | None, cfg: SparseConfig,
                 target: tvm.target.Target, tune_cfg: TuneConfig, progress: bool = True,
                 measure_cfg: MeasureConfig = MeasureConfig(), onnx_model=None, samples: list | None = None,
                 labels: np.ndarray | None = None) -> tuple[tvm.IRModule, SparseResult]:
    """Rewrite the selected layers whose sparse kernel is measured >= cfg.min_speedup faster;
    with cfg.finetune, first fine-tune their pruned weights on `samples` (feeds of
    `onnx_model`, labels int [S, batch]) but the 20% held out for the report."""
    candidates = find_candidates(mod, weight_users)
    checked = [(c, *sparse_layer(c, cfg)) for c in candidates]
    chosen = select([c for c, layer, _ in checked if layer is not None], cfg.layers)
    rewritten = []
    measured = [(c, layer, d) for c, layer, d in checked if layer is not None and c.var in chosen]
    for c, layer, d in checked:
        if layer is not None and c.var not in chosen:
            d.reason = f"not selected (layers={cfg.layers})"
    if cfg.min_speedup == 0:  # sparse wherever it can be, unmeasured
        for _, layer, d in measured:
            d.sparse, d.reason = True, "min_speedup 0"
            rewritten.append(layer)
        measured = []
    for c, layer, d in tqdm(measured, desc="sparse vs dense", unit="layer", disable=not progress, leave=False):
        dense_ms, sparse_ms, error = measure(layer, target, tune_cfg, measure_cfg)
        if error > 1e-4:
            raise AssertionError(f"sparse kernel of {c.name} differs from the dense layer by {error:.2e} (relative)")
        d.dense_ms, d.sparse_ms = round(dense_ms, 4), round(sparse_ms, 4)
        d.sparse = d.speedup >= cfg.min_speedup
        if d.sparse:
            rewritten.append(layer)
        else:
            d.reason = f"sparse {d.speedup:.2f}x < min_speedup {cfg.min_speedup}"
    result = SparseResult([d for _, _, d in checked], rewritten)
    if samples:
        train, result.held_out = split_holdout(samples, HOLDOUT, 0)
    if cfg.finetune is not None and rewritten:
        if not samples:
            raise CalibrationError("fine-tuning pruned weights needs calibration data (--calib DATA.npz)")
        result.layers, result.finetune = finetune(onnx_model, rewritten, [samples[i] for i in train], cfg.finetune,
                                                  labels[train] if labels is not None else None, progress=progress)
    lanes = cpu_knobs(target).lanes("float32")
    return rewrite_sparse(mod, result.layers, lanes), result


def report(result: SparseResult) -> dict:
    """JSON-able: a row per layer, the share of matmul/conv FLOPs made sparse, fine-tune stats."""
    decisions = result.decisions
    total = sum(d.flops for d in decisions)
    sparse = sum(d.flops for d in decisions if d.sparse)
    rep = {"layers": [{**asdict(d), "speedup": round(d.speedup, 3) if d.speedup else None} for d in decisions],
           "flops_sparse": round(sparse / max(total, 1), 4)}
    if result.finetune is not None:
        rep["finetune"] = result.finetune
    return rep


def format_report(rep: dict) -> str:
    """The decision table: layer, weight, block, zero blocks, dense and sparse ms, speed-up, choice."""
    rows = rep["layers"]
    width = max([len(r["name"]) for r in rows] + [5])
    lines = [f"{'layer':<{width}} {'op':<7} {'weight':<12} {'block':<6} {'zeros':>6} {'dense ms':>9} {'sparse ms':>9} "
             f"{'speedup':>7}  decision"]
    for r in rows:
        zeros = f"{r['sparsity']:.0%}" if r["sparsity"] is not None else "-"
        times = [f"{r[k]:.4f}" if r[k] is not None else "-" for k in ("dense_ms", "sparse_ms")]
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        choice = "sparse" + (" (pruned)" if r["pruned"] else "") if r["sparse"] else "dense: " + r["reason"]
        lines.append(f"{r['name']:<{width}} {r['op']:<7} {r['weight']:<12} {r['block'] or '-':<6} {zeros:>6} "
                     f"{times[0]:>9} {times[1]:>9} {speedup:>7}  {choice}")
    lines.append(f"{sum(r['sparse'] for r in rows)} of {len(rows)} layers sparse ({rep['flops_sparse']:.0%} of "
                 "matmul/conv FLOPs)")
    if "finetune" in rep:
        run = rep["finetune"]
        loss = f", loss {run['loss'][0]:.4g} -> {run['loss'][-1]:.4g}" if run["loss"] else ""
        lines.append(f"fine-tuned the pruned weights: {run['epochs']} epochs in {run['seconds']:.0f} s{loss}")
    if "accuracy" in rep:  # pruned: the model against fp32
        lines += format_agreement(rep["accuracy"], "pruned", "held-out calibration samples")
    return "\n".join(lines)

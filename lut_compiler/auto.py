"""The per-layer plan: dense, sparse or lookup-add for every layer, by measurement, under an
accuracy budget (``CompileConfig.auto``).

For each selected matmul/conv2d the options are built (k-means or learned codebooks for
lookup-add, pruned or detected block-sparse weights for sparse) and then:

- latency: the layer alone as each option, lowered and tuned like the model (same budget and
  database), timed in alternating rounds on the target (`layer_timing`); layers with the same
  shapes share one measurement per option (`LayerOptions.timing_key`), and times measured by
  an earlier compile with the same database are reused (`LayerTimes`);
- accuracy cost: the metric lost on validation samples when only this layer takes the option
  (the torch view computes exactly what the kernels do: PQ layers, masked sparse weights);
- plan: the least summed latency whose summed costs fit the budget (`planner`); the whole plan
  is then scored on the validation samples (the mean less one standard error, as in
  `layer_choice`) and, while over budget, re-planned with half the budget (costs do not add
  exactly); failing that, every layer stays dense.

Samples: a `holdout` share is kept for the final report (never used here); of the rest a
`validation` share measures costs, the others fit codebooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import tvm
from tqdm import tqdm

from .calibration import (CalibrationSource, Feeds, activation_absmax, capture, load_samples, rows_per_layer,
                          split_holdout)
from .codebooks import LutLayer, learn_layer
from .config import AutoConfig, SparseConfig, TuneConfig
from .distill import learn_centroids, pq_module
from .int8 import Int8Module, int8_layer
from .layer_choice import Metric, within
from .layer_timing import LayerTimes, build_vms, dense_call, layer_module, time_vms
from .lut import labels_per_sample
from .lut_report import format_agreement
from .lut import plan as lut_plans
from .onnx_import import ImportedModel
from .passes.call_rewrite import Replacement, rewrite_calls
from .passes.find_candidates import Candidate, find_candidates, select
from .passes.lut_rewrite import LayerConstants
from .passes.int8_rewrite import Int8Layer
from .passes.sparse_rewrite import SparseLayer, check, weight_t
from .planner import Option, plan
from .schedules.default_cpu import cpu_knobs
from .schedules.int8_matmul import int8_isa, weight_bits
from .sparse import sparse_layer
from .sparse_finetune import masked_module

MAX_REPLANS = 4
KINDS = ("int8", "sparse", "lut")  # the options besides dense, in report order


@dataclass
class LayerOptions:
    """One selected layer: its options, their measured ms and accuracy costs, the choice."""

    candidate: Candidate
    int8: Int8Layer | None = None
    lut: LutLayer | None = None
    sparse: SparseLayer | None = None
    ms: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    choice: str = "dense"

    def kinds(self) -> list[str]:
        return [k for k in KINDS if getattr(self, k) is not None]

    def timing_key(self, kind: str) -> tuple:
        """What `kind`'s latency depends on: the layer's shapes and attributes, the PQ shape
        (lookup-add) or the stored block count (sparse; the pattern itself is not keyed)."""
        c = self.candidate
        detail = ()
        if kind == "lut":
            detail = (self.lut.plan.subspace_len, self.lut.plan.centroids)
        elif kind == "sparse":
            detail = (self.sparse.weight.block, self.sparse.weight.nnzb)
        return (kind, c.op, c.input_shape, c.weight_shape, c.conv, *detail)

    def module(self, kind: str):
        """The torch module computing the layer's ONNX node as `kind`."""
        if kind == "int8":
            return Int8Module(self.int8)
        return pq_module(self.lut) if kind == "lut" else masked_module(self.sparse)

    def emit(self, kind: str, target: tvm.target.Target):
        """(bb, x) -> the layer as `kind` for `target` (bias included)."""
        lanes = cpu_knobs(target).lanes("float32")
        if kind == "int8":
            isa = int8_isa(target)
            return lambda bb, x: self.int8.emit(bb, x, isa)
        if kind == "lut":
            p = self.lut.plan
            return lambda bb, x: p.rule.emit(bb, x, p, LayerConstants.of(self.lut))
        if kind == "sparse":
            return lambda bb, x: self.sparse.emit(bb, x, lanes)
        c, w_t = self.candidate, weight_t(self.candidate)
        return dense_call(c, w_t, c.bias if c.bias is not None else np.zeros(w_t.shape[0], np.float32))


@dataclass
class AutoResult:
    """The plan and what it was chosen on (samples by index into `samples`)."""

    layers: list[LayerOptions]
    samples: list[Feeds]
    held_out: list[int]
    labels: np.ndarray | None
    metric: str
    budget: float  # in cost units: points of accuracy, or cosine
    baseline: float  # validation metric of the fp32 model
    planned: float  # validation metric of the chosen plan
    replans: int
    validation_samples: int


def apply_auto(imported: ImportedModel, cfg: AutoConfig, calibration: CalibrationSource, target: tvm.target.Target,
               tune_cfg: TuneConfig, labels: np.ndarray | None = None,
               progress: bool = True) -> tuple[tvm.IRModule, AutoResult]:
    """``imported.mod`` with every selected layer as its planned implementation."""
    samples = load_samples(calibration, imported.inputs)
    labels = labels_per_sample(labels, len(samples)) if labels is not None else None
    train_ids, held_ids = split_holdout(samples, cfg.holdout, 0)
    fit_ids, val_ids = split_holdout([samples[i] for i in train_ids], cfg.validation, 1)
    fit_ids, val_ids = [train_ids[i] for i in fit_ids], [train_ids[i] for i in val_ids]
    layers = _options(imported, cfg, target, samples, labels, fit_ids, val_ids, progress)

    metric = Metric(imported.onnx_model, [samples[i] for i in val_ids],
                    labels[val_ids] if labels is not None else None, cfg.budget.metric)
    baseline = metric.score(None)
    scale = 100.0 if cfg.budget.metric == "accuracy" else 1.0
    budget = cfg.budget.limit if cfg.budget.metric == "accuracy" else max(0.0, baseline - cfg.budget.limit)
    keys = [{kind: layer.timing_key(kind) for kind in ["dense", *layer.kinds()]} for layer in layers]
    mods = {}  # timing key -> the layer alone as that option: layers of one shape share them
    for layer, layer_keys in zip(layers, keys):
        for kind, key in layer_keys.items():
            if key not in mods:
                mods[key] = layer_module(layer.candidate.input_shape, layer.emit(kind, target))
    times = LayerTimes(target, tune_cfg)  # what an earlier compile with this database measured
    measured = {key: ms for key, mod in mods.items() if (ms := times.get(mod)) is not None}
    vms = build_vms({key: mod for key, mod in mods.items() if key not in measured}, target, tune_cfg,
                    progress)  # one tuning session for every option of every layer
    for layer, layer_keys in tqdm(list(zip(layers, keys)), desc="measure options", unit="layer",
                                  disable=not progress, leave=False):
        todo = {kind: vms[key] for kind, key in layer_keys.items() if key not in measured}
        if todo:
            ms = {kind: round(v, 4) for kind, v in time_vms(todo, layer.candidate.input_shape)[0].items()}
            measured.update({layer_keys[kind]: v for kind, v in ms.items()})
            times.update({mods[layer_keys[kind]]: v for kind, v in ms.items()})
        layer.ms = {kind: measured[key] for kind, key in layer_keys.items()}
        layer.cost = {kind: round(scale * (baseline - metric.of_modules({layer.candidate.name: layer.module(kind)})), 5)
                      for kind in layer.kinds()}

    options = {layer.candidate.var: [Option("dense", layer.ms["dense"])]
               + [Option(k, layer.ms[k], layer.cost[k]) for k in layer.kinds()] for layer in layers}
    limit, replans = budget, 0
    while True:
        chosen = plan(options, limit) if options else {}
        for layer in layers:
            layer.choice = chosen[layer.candidate.var].kind
        lossy = {layer.candidate.name: layer.module(layer.choice) for layer in layers if layer.choice != "dense"}
        if not lossy or within(cfg.budget, baseline, metric.of_modules(lossy, bound=True)):
            planned = metric.of_modules(lossy) if lossy else baseline
            break
        replans += 1
        limit = limit / 2 if replans < MAX_REPLANS else 0.0

    replacements = [Replacement(layer.candidate, layer.emit(layer.choice, target), f"{layer.choice}_out")
                    for layer in layers if layer.choice != "dense"]
    result = AutoResult(layers, samples, held_ids, labels, cfg.budget.metric, budget, baseline, planned, replans,
                        len(val_ids))
    return rewrite_calls(imported.mod, replacements), result


def _options(imported: ImportedModel, cfg: AutoConfig, target: tvm.target.Target, samples: list[Feeds],
             labels: np.ndarray | None, fit_ids: list[int], val_ids: list[int], progress: bool) -> list[LayerOptions]:
    """LayerOptions of the selected layers that have at least one option besides dense."""
    candidates = find_candidates(imported.mod, imported.weight_users)
    chosen = select(candidates, cfg.layers)
    layers = {c.var: LayerOptions(c) for c in candidates if c.var in chosen}
    if "int8" in cfg.kinds:
        eligible = [layer.candidate for layer in layers.values()
                    if check(layer.candidate) is None and layer.candidate.activation is not None]
        absmax = activation_absmax(imported.onnx_model, [samples[i] for i in fit_ids], eligible, progress)
        bits = weight_bits(target)
        for c in eligible:
            layers[c.var].int8 = int8_layer(c, absmax[c.var], bits)
    if "sparse" in cfg.kinds:
        sparse_cfg = SparseConfig(sparsity=cfg.prune, block=cfg.block)
        for layer in layers.values():
            layer.sparse = sparse_layer(layer.candidate, sparse_cfg)[0]
    if "lut" in cfg.kinds:
        lut_cfg = replace(cfg.lut, layers="all", budget=None)
        plans = [p for p in lut_plans(imported, lut_cfg, target) if p.replaced and p.candidate.var in layers]
        if plans:
            rows = rows_per_layer(plans, lut_cfg.max_rows, lut_cfg.memory_mb)
            fit = capture(imported.onnx_model, [samples[i] for i in fit_ids], plans, rows, lut_cfg.seed, progress)
            val = capture(imported.onnx_model, [samples[i] for i in val_ids], plans, rows, lut_cfg.seed + 1, progress)
            luts = [learn_layer(p, fit[p.candidate.var], val[p.candidate.var], lut_cfg)
                    for p in tqdm(plans, desc="codebooks", unit="layer", disable=not progress, leave=False)]
            if lut_cfg.learn is not None:
                luts, _ = learn_centroids(imported.onnx_model, luts, [samples[i] for i in fit_ids], lut_cfg.learn,
                                          labels[fit_ids] if labels is not None else None, lut_cfg.seed, progress)
            for lut in luts:
                layers[lut.plan.candidate.var].lut = lut
    return [layer for layer in layers.values() if layer.kinds()]


def report(result: AutoResult) -> dict:
    """JSON-able: a row per layer (options with ms and cost, the choice) and the plan's totals."""
    rows = [{"name": layer.candidate.name, "op": layer.candidate.op, "flops": layer.candidate.flops,
             "ms": layer.ms, "cost": layer.cost, "choice": layer.choice} for layer in result.layers]
    dense = sum(layer.ms["dense"] for layer in result.layers)
    planned = sum(layer.ms[layer.choice] for layer in result.layers)
    return {"metric": result.metric, "budget": result.budget, "validation_samples": result.validation_samples,
            "fp32": round(result.baseline, 5), "planned": round(result.planned, 5), "replans": result.replans,
            "layers_ms": {"dense": round(dense, 4), "planned": round(planned, 4)}, "layers": rows}


def format_report(rep: dict) -> str:
    """The plan as a table: layer, each option's ms (and accuracy cost), the choice; totals."""
    rows = rep["layers"]
    unit = "points" if rep["metric"] == "accuracy" else "cosine"
    width = max([len(r["name"]) for r in rows] + [5])
    lines = [f"{'layer':<{width}} {'op':<7} {'dense ms':>9} " + " ".join(f"{k + ' ms (cost)':>20}" for k in KINDS)
             + "  choice"]
    for r in rows:
        cells = [f"{r['ms'][k]:.4f} ({r['cost'][k]:+.3f})" if k in r["cost"] else "-" for k in KINDS]
        lines.append(f"{r['name']:<{width}} {r['op']:<7} {r['ms']['dense']:>9.4f} "
                     + " ".join(f"{cell:>20}" for cell in cells) + f"  {r['choice']}")
    t = rep["layers_ms"]
    speedup = t["dense"] / t["planned"] if t["planned"] else 1.0
    lines.append(f"planned layers: {t['dense']:.3f} ms dense -> {t['planned']:.3f} ms ({speedup:.2f}x); budget "
                 f"{rep['budget']:.4g} {unit} of {rep['metric']} on {rep['validation_samples']} validation samples: "
                 f"fp32 {rep['fp32']:.4f}, plan {rep['planned']:.4f}"
                 + (f" (re-planned {rep['replans']}x)" if rep["replans"] else ""))
    if "accuracy" in rep:
        lines += format_agreement(rep["accuracy"], "planned", "held-out samples")
    return "\n".join(lines)

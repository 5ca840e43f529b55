"""The lookup-add phase of ``compile``: plan layers, calibrate, learn codebooks, rewrite.

    imported Relax module --plan_layers--> LayerPlan per matmul/conv2d
        --capture (ORT on calibration samples)--> sub-vectors per replaced layer
        --learn_layer (k-means, tables)--> LutLayer per replaced layer
        --rewrite_lut--> module with encode + lookup-add calls
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm
from tqdm import tqdm

from .calibration import CalibrationSource, Feeds, capture, load_samples, rows_per_layer, split_holdout
from .codebooks import LutLayer, learn_layer, snr_db
from .config import LutConfig
from .distill import learn_centroids
from .errors import CalibrationError
from .layer_choice import Metric, choose_layers
from .onnx_import import ImportedModel
from .passes.find_candidates import find_candidates
from .passes.lut_plan import LayerPlan, halved, plan_layers
from .passes.lut_rewrite import rewrite_lut


@dataclass
class LutResult:
    """What the rewrite did, and the held-out samples (indices into the calibration data)."""

    plans: list[LayerPlan]
    layers: list[LutLayer]
    samples: list[Feeds]
    held_out: list[int]
    calibration_rows: int
    labels: np.ndarray | None = None  # int [S, batch]
    refined: dict | None = None  # {"budget": layer choice, "learn": training runs} (`_refine`), JSON-able

    @property
    def measured_on_calibration(self) -> bool:
        """True when there was no sample to hold out (a single sample, or holdout=0)."""
        return len(self.held_out) == len(self.samples)


def plan(imported: ImportedModel, cfg: LutConfig, target: tvm.target.Target | None = None) -> list[LayerPlan]:
    """A plan per matmul/conv2d; layers whose input ONNX Runtime cannot show stay dense.

    With a target, replaced layers also get their lookup-add kernel (shuffle lanes or generic).
    """
    plans = plan_layers(find_candidates(imported.mod, imported.weight_users), cfg)
    for p in plans:
        if p.replaced and p.candidate.activation is None:
            p.reason = "input not traced to an ONNX tensor (cannot calibrate)"
        if p.replaced and target is not None:
            p.lanes = p.rule.shuffle_lanes(p, cfg, target)
    return plans


def apply_lut(imported: ImportedModel, cfg: LutConfig, calibration: CalibrationSource | None,
              target: tvm.target.Target, labels: np.ndarray | None = None,
              progress: bool = True) -> tuple[tvm.IRModule, LutResult]:
    """Rewrite the selected layers of ``imported.mod`` into encode + lookup-add calls.

    labels: integer labels, one per output row of every calibration sample (optional).
    """
    if calibration is None:
        raise CalibrationError("the lookup-add rewrite needs calibration data (--calib DATA.npz)")
    samples = load_samples(calibration, imported.inputs)
    labels = labels_per_sample(labels, len(samples)) if labels is not None else None
    plans = plan(imported, cfg, target)
    chosen = [p for p in plans if p.replaced]
    train_ids, held_ids = split_holdout(samples, cfg.holdout, cfg.seed)
    fit_ids, val_ids = train_ids, train_ids
    if cfg.budget is not None:  # a quarter validates the layer choice: unseen by k-means and learning
        fit, val = split_holdout([samples[i] for i in train_ids], 0.25, cfg.seed + 2)
        fit_ids, val_ids = [train_ids[i] for i in fit], [train_ids[i] for i in val]
    rows = rows_per_layer(chosen, cfg.max_rows, cfg.memory_mb)
    layers, refined = [], None
    if chosen:
        held_rows = max(1, round(rows * cfg.holdout)) if held_ids != train_ids else rows
        sets = ([samples[i] for i in fit_ids], rows), ([samples[i] for i in held_ids], held_rows)
        held: dict[tuple[str, int], np.ndarray] = {}  # (call var, V) -> held-out sub-vectors
        variants = [[layer] for layer in _codebooks(imported, chosen, sets, held, cfg, progress)]
        finer = chosen
        for _ in range(cfg.finer if cfg.budget is not None else 0):
            finer = [h for h in map(halved, finer) if h is not None]
            if not finer:
                break
            by_var = {layer.plan.candidate.var: layer for layer in _codebooks(imported, finer, sets, held, cfg, progress)}
            for v in variants:
                if v[0].plan.candidate.var in by_var:
                    v.append(by_var[v[0].plan.candidate.var])
        layers, refined = _refine(imported, variants, samples, (fit_ids, val_ids), labels, cfg, progress)
        final = {layer.plan.candidate.var: layer.plan for layer in layers}
        plans = [final.get(p.candidate.var, p) for p in plans]
        for layer in layers:
            sub = held[layer.plan.candidate.var, layer.plan.subspace_len]
            layer.snr_db = round(snr_db(layer.dense(sub), layer.forward(sub)), 2)
    return rewrite_lut(imported.mod, layers), LutResult(plans, layers, samples, held_ids, rows, labels, refined)


def _codebooks(imported: ImportedModel, plans: list[LayerPlan], sets: tuple, held: dict, cfg: LutConfig,
               progress: bool) -> list[LutLayer]:
    """k-means codebooks and tables of `plans` from the calibration (train, held-out) sample
    sets, each (samples, rows per layer); the held-out sub-vectors go into `held`."""
    (train_samples, rows), (held_samples, held_rows) = sets
    train = capture(imported.onnx_model, train_samples, plans, rows, cfg.seed, progress)
    held_sub = capture(imported.onnx_model, held_samples, plans, held_rows, cfg.seed + 1, progress)
    layers = []
    for p in tqdm(plans, desc="codebooks", unit="layer", disable=not progress, leave=False):
        var = p.candidate.var
        layers.append(learn_layer(p, train[var], held_sub[var], cfg))
        held[var, p.subspace_len] = held_sub[var]
    return layers


def _refine(imported: ImportedModel, variants: list[list[LutLayer]], samples: list[Feeds],
            split: tuple[list[int], list[int]], labels: np.ndarray | None, cfg: LutConfig,
            progress: bool) -> tuple[list[LutLayer], dict | None]:
    """Learn the centroids (cfg.learn) and/or keep the layers within cfg.budget.

    variants: per layer, its LutLayer at V, then at finer V (`LutConfig.finer`); the budget's
    choice picks one of them or dense. split: (fit, validation) sample ids; the fit samples
    train, the validation ones (the same ids without a budget) check the choice; the report's
    held-out samples stay unseen. Learning runs on all candidate layers (at their V) before the
    choice (at most half of `cfg.learn.minutes`), and again on the kept ones after it (what is
    left of the minutes; kept if no worse on validation).
    """
    layers = [v[0] for v in variants]
    if cfg.budget is None and cfg.learn is None:
        return layers, None
    fit_ids, val_ids = split
    runs = []

    def learn(chosen: list[LutLayer], minutes: float) -> list[LutLayer]:
        if cfg.learn is None or not chosen:
            return chosen
        fit_labels = labels[fit_ids] if labels is not None else None
        learned, stats = learn_centroids(imported.onnx_model, chosen, [samples[i] for i in fit_ids],
                                         replace(cfg.learn, minutes=minutes), fit_labels, cfg.seed, progress)
        runs.append({"layers": len(chosen), "samples": len(fit_ids), **stats})
        return learned

    total = cfg.learn.minutes if cfg.learn is not None else 0.0
    layers = learn(layers, total if cfg.budget is None else total / 2)
    if cfg.budget is None:
        return layers, {"learn": runs}
    variants = [[layer, *v[1:]] for layer, v in zip(layers, variants)]
    metric = Metric(imported.onnx_model, [samples[i] for i in val_ids],
                    labels[val_ids] if labels is not None else None, cfg.budget.metric)
    choice = choose_layers(metric, variants, cfg.budget, [layer.plan.candidate.flops for layer in layers], progress)
    kept = [v[at] for v, at in zip(variants, choice.variant) if at is not None]
    for layer, keep, loss in zip(layers, choice.kept, choice.sensitivity):
        if not keep:
            layer.plan.reason = f"over the {cfg.budget.metric} budget (alone it costs {loss:+.4f})"
    finer = {v[at].plan.candidate.name: v[at].plan.subspace_len for v, at in zip(variants, choice.variant) if at}
    final = choice.final
    rest = total - sum(run["seconds"] for run in runs) / 60
    if kept and choice.variant != [0] * len(layers) and cfg.learn is not None and rest > 0:
        relearned = learn(kept, rest)
        value = metric(relearned)
        if value >= final:  # learning again without the dropped layers (finer ones: from k-means); kept only if no worse
            kept, final = relearned, value
    report = {"budget": {"metric": cfg.budget.metric, "limit": cfg.budget.limit, "validation_samples": len(val_ids),
                         "fp32": round(choice.baseline, 5), "chosen": round(final, 5),
                         "sensitivity": {layer.plan.candidate.name: round(v, 5)
                                         for layer, v in zip(layers, choice.sensitivity)},
                         "finer": finer},
              "learn": runs}
    return kept, report


def labels_per_sample(labels: np.ndarray, samples: int) -> np.ndarray:
    """Integer labels [S * batch] or [S, batch] -> [S, batch]."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise CalibrationError(f"labels must be integers, got {labels.dtype}")
    if labels.size % samples:
        raise CalibrationError(f"{labels.size} labels do not split evenly over {samples} calibration samples")
    return labels.reshape(samples, -1)

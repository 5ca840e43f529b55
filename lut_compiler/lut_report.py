"""Accuracy of a lookup-add model against its fp32 original, on held-out calibration samples.

Per replaced layer: SNR (dB) of the layer output on held-out rows. Per model output:
SQNR (dB), mean cosine similarity of output vectors (along the last axis); for a
classifier (``LutConfig.task``, or labels given) top-1 agreement on its logits
[batch, classes] and, with labels, the accuracy of both models. The fp32 reference is ONNX Runtime on the imported (simplified) graph.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from .codebooks import snr_db
from .lut import LutResult


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean cosine similarity of the vectors along the last axis of `got` and `ref` (same shape)."""
    ref = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    got = got.reshape(-1, got.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    return float(np.mean(np.sum(ref * got, axis=1) / np.maximum(norms, 1e-30)))


def _logits(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[1] > 1


def compare_outputs(compiled, onnx_model: onnx.ModelProto, samples: list, classify: bool,
                    labels: np.ndarray | None = None) -> dict:
    """``compiled`` (a CompiledModel) against ONNX Runtime on ``samples`` (feeds): per output
    SQNR and mean cosine (and top-1 agreement of logits when ``classify``); with integer
    ``labels`` [S, batch], the accuracy of both models on the first logits output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    session = ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in compiled.outputs]
    refs: dict[str, list] = {n: [] for n in names}
    gots: dict[str, list] = {n: [] for n in names}
    for feeds in samples:
        for name, ref in zip(names, session.run(names, feeds)):
            refs[name].append(ref)
        for name, got in compiled.run(feeds).items():
            gots[name].append(got)
    stacked = {n: (np.stack(refs[n]), np.stack(gots[n])) for n in names}  # [samples, *output shape]
    outputs = []
    for name, (ref, got) in stacked.items():
        row = {"name": name, "sqnr_db": round(snr_db(ref, got), 2), "cosine": round(cosine(ref, got), 5)}
        if classify and _logits(ref.shape[1:]):
            row["top1_agreement"] = round(float(np.mean(ref.argmax(-1) == got.argmax(-1))), 4)
        outputs.append(row)
    report = {"samples": len(samples), "outputs": outputs}
    classifier = next((n for n, (ref, _) in stacked.items() if classify and _logits(ref.shape[1:])), None)
    if labels is not None and classifier is not None:
        ref, got = (a.argmax(-1) for a in stacked[classifier])
        report["accuracy"] = {"output": classifier, "fp32": round(float(np.mean(ref == labels)), 4),
                              "model": round(float(np.mean(got == labels)), 4)}
    return report


def format_agreement(agreement: dict, model: str, where: str) -> list[str]:
    """Lines for a `compare_outputs` result: per output SQNR, cosine (top-1), then accuracy;
    `model` names the compiled model ("pruned", "planned"), `where` the samples."""
    lines = [f"{model} model vs fp32 on {agreement['samples']} {where}:"]
    for o in agreement["outputs"]:
        extra = f", top-1 agreement {o['top1_agreement']:.1%}" if "top1_agreement" in o else ""
        lines.append(f"  {o['name']}: SQNR {o['sqnr_db']:.1f} dB, cosine {o['cosine']:.4f}{extra}")
    if "accuracy" in agreement:
        a = agreement["accuracy"]
        lines.append(f"  accuracy ({a['output']}): fp32 {a['fp32']:.1%}, {model} {a['model']:.1%}")
    return lines


def evaluate(result: LutResult, compiled, onnx_model: onnx.ModelProto, task: str) -> dict:
    """The JSON-able accuracy report of ``compiled`` (a CompiledModel) on the held-out samples.

    task: "classification", "embedding", or "auto" (classification when labels are given).
    """
    classify = task == "classification" or (task == "auto" and result.labels is not None)
    labels = result.labels[result.held_out] if result.labels is not None else None
    agreement = compare_outputs(compiled, onnx_model, [result.samples[i] for i in result.held_out], classify, labels)
    report = {
        "held_out_samples": len(result.held_out),
        "measured_on_calibration": result.measured_on_calibration,
        "calibration_rows_per_layer": result.calibration_rows,
        "flops_replaced": _flops_share(result),
        "layers": [_layer_row(p, result) for p in result.plans],
        "outputs": agreement["outputs"],
    }
    if result.refined is not None:
        report.update({k: v for k, v in result.refined.items() if v})
    if "accuracy" in agreement:
        accuracy = agreement["accuracy"]
        report["accuracy"] = {"output": accuracy["output"], "fp32": accuracy["fp32"], "lut": accuracy["model"]}
    return report


def _flops_share(result: LutResult) -> float:
    total = sum(p.candidate.flops for p in result.plans)
    return round(sum(p.candidate.flops for p in result.plans if p.replaced) / max(total, 1), 4)


def _layer_row(plan, result: LutResult) -> dict:
    row = {"name": plan.candidate.name, "op": plan.candidate.op, "mflop": round(plan.candidate.flops / 1e6, 3)}
    layer = next((lay for lay in result.layers if lay.plan is plan), None)
    if layer is None:
        return {**row, "replaced": False, "reason": plan.reason}
    return {**row, "replaced": True, "V": plan.subspace_len, "C": plan.codebooks, "K": plan.centroids,
            "table_dtype": str(layer.tables.dtype), "snr_db": layer.snr_db}


def format_report(report: dict) -> str:
    """Human-readable lines: replaced layers with their SNR, then per-output agreement."""
    lines = []
    replaced = [r for r in report["layers"] if r["replaced"]]
    width = max([len(r["name"]) for r in replaced] + [5])
    lines.append(f"{'layer':<{width}} {'op':<7} {'V':>3} {'C':>4} {'K':>4}  table  SNR dB (held-out rows)")
    for r in replaced:
        lines.append(f"{r['name']:<{width}} {r['op']:<7} {r['V']:>3} {r['C']:>4} {r['K']:>4}  "
                     f"{r['table_dtype']:<5}  {r['snr_db']:.1f}")
    if "budget" in report:
        b = report["budget"]
        bound = f"drop <= {b['limit']} points" if b["metric"] == "accuracy" else f"cosine >= {b['limit']}"
        lines.append(f"budget: {b['metric']} {bound} on {b['validation_samples']} validation samples: fp32 "
                     f"{b['fp32']:.4f}, chosen layers {b['chosen']:.4f}; left dense over budget:")
        lines += [f"  {r['name']}: {r['reason']}" for r in report["layers"] if "budget" in (r.get("reason") or "")]
        if b.get("finer"):
            lines.append("at a finer V to fit the budget: " + ", ".join(f"{n} (V={v})" for n, v in b["finer"].items()))
    for run in report.get("learn", []):
        loss = f", loss {run['loss'][0]:.4g} -> {run['loss'][-1]:.4g}" if run["loss"] else ""
        lines.append(f"learned centroids of {run['layers']} layers on {run['samples']} samples: {run['epochs']} epochs "
                     f"in {run['seconds']:.0f} s{loss}")
    where = "calibration samples (none held out)" if report["measured_on_calibration"] else "held-out samples"
    lines.append(f"{len(replaced)} of {len(report['layers'])} layers replaced ({report['flops_replaced']:.0%} of "
                 f"matmul/conv FLOPs); model vs fp32 on {report['held_out_samples']} {where}:")
    for o in report["outputs"]:
        extra = f", top-1 agreement {o['top1_agreement']:.1%}" if "top1_agreement" in o else ""
        lines.append(f"  {o['name']}: SQNR {o['sqnr_db']:.1f} dB, cosine {o['cosine']:.4f}{extra}")
    if "accuracy" in report:
        a = report["accuracy"]
        lines.append(f"  accuracy ({a['output']}): fp32 {a['fp32']:.1%}, lookup-add {a['lut']:.1%}")
    return "\n".join(lines)

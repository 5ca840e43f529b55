"""Accuracy of the lookup-add rewrite on the bundled real models: k-means codebooks, and
with --learn also learned ones (distillation from the fp32 model, LUT-NN).

    python -m lut_compiler.bench.lut_accuracy [--learn] [--learn-minutes 10] [--out bench/results]

Selections are "all", "last:N", or "budget": the layer choice among all layers within the
bench's budget (`systems.bench_budget`: 1 point of top-1 accuracy for digits, a mean cosine
of 0.99 for MiniLM) on validation samples.
For each model and layer selection: layers and share of matmul/conv FLOPs replaced,
held-out accuracy of fp32 vs lookup-add (digits) or cosine of sentence embeddings
(MiniLM), output SQNR, and the time the lookup-add phase took (calibration + k-means
[+ learning]). The held-out samples are never seen by k-means or learning. Writes
``lut_accuracy.json`` and ``lut_accuracy.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

import lut_compiler
from lut_compiler import zoo

from .systems import bench_budget

# model -> (layer selections, number of samples, share of them held out)
GRID = {
    "mlp": (["all", "last:2", "last:1", "budget"], 360, 0.2),
    "digits_cnn": (["all", "last:5", "last:3", "budget"], 2000, 0.2),
    "minilm_pooled": (["all", "last:12", "budget"], 184, 1 / 3),
}


def real_samples(model: str, count: int) -> tuple[dict, np.ndarray | None]:
    """`count` real inputs of a zoo model, stacked (digits: test split, with int labels [count];
    MiniLM: tokenized sentences at seq 128, no labels)."""
    if model == "minilm_pooled":
        return zoo.sample_inputs(model, batch=count, seq=128), None
    feeds, labels = zoo.labelled_data(model, "test")
    return {k: v[:count] for k, v in feeds.items()}, labels[:count]


def measure(model: str, layers: str, base: lut_compiler.LutConfig, samples: int | None = None) -> dict:
    """One row: `base` (tables, learning, V, finer) with this model's samples (or the first
    `samples` of them) and selection."""
    _, count, holdout = GRID[model]
    count = samples or count
    feeds, labels = real_samples(model, count)
    shapes = {k: (1, *v.shape[1:]) for k, v in feeds.items()}
    budget = None
    if layers == "budget":
        budget = bench_budget(labels is not None)
    lut = dataclasses.replace(base, layers="all" if budget else layers, budget=budget, holdout=holdout,
                              finer=base.finer if budget else 0)
    config = lut_compiler.CompileConfig(input_shapes=shapes, lut=lut)
    start = time.perf_counter()
    compiled = lut_compiler.compile(zoo.get_model(model), config, progress=False, calibration=feeds, labels=labels)
    report = compiled.record["lut"]
    out = report["outputs"][0]
    row = {
        "model": model, "layers": _label(layers, lut), "table_dtype": lut.table_dtype, "codebooks": _codebooks(lut),
        "replaced": sum(r["replaced"] for r in report["layers"]), "layers_total": len(report["layers"]),
        "flops_replaced": report["flops_replaced"], "held_out_samples": report["held_out_samples"],
        "sqnr_db": out["sqnr_db"], "cosine": out["cosine"], "top1_agreement": out.get("top1_agreement"),
        "lut_seconds": compiled.record["phases"]["lut"], "compile_seconds": round(time.perf_counter() - start, 1),
        "learn_seconds": sum(run["seconds"] for run in report.get("learn", [])),
        "learn_epochs": [run["epochs"] for run in report.get("learn", [])],
        "subspaces": sorted({r["V"] for r in report["layers"] if r["replaced"]}),
    }
    if "budget" in report:  # the layer choice's metric on its validation samples (fp32, chosen; bound not applied)
        row["validation"] = {k: report["budget"][k] for k in ("validation_samples", "fp32", "chosen", "finer")}
    if "accuracy" in report:
        row.update(fp32_accuracy=report["accuracy"]["fp32"], lut_accuracy=report["accuracy"]["lut"])
    return row


def _label(layers: str, lut: lut_compiler.LutConfig) -> str:
    """The selection as the table shows it, with the options that change it from the defaults."""
    default = lut_compiler.LutConfig()
    return (layers + (f" finer:{lut.finer}" if lut.finer else "")
            + (f" V:{lut.linear_subspace}" if lut.linear_subspace != default.linear_subspace else "")
            + (f" fit:{lut.table_fit:g}" if lut.table_fit not in (None, default.table_fit) else "")
            + (f" K:{lut.centroids}" if lut.centroids != default.centroids else "")
            + (f" rows:{lut.max_rows}" if lut.max_rows != default.max_rows else ""))


def _codebooks(lut: lut_compiler.LutConfig) -> str:
    """How the codebooks and tables were made: "k-means" or "learned" (+ weights) (+ bias) (+ fit)."""
    learn = lut.learn
    name = "k-means" if learn is None else "learned" + " + weights" * learn.train_weights + " + bias" * learn.train_bias
    return name + (" + fit" if lut.table_fit is not None else "")


def markdown(rows: list[dict]) -> str:
    lines = ["| model | layers | codebooks | replaced | FLOPs replaced | held-out | fp32 acc | LUT acc | top-1 agree | "
             "cosine | SQNR dB | learning s (epochs) | LUT phase s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = (f"{r['fp32_accuracy']:.1%}", f"{r['lut_accuracy']:.1%}") if "lut_accuracy" in r else ("-", "-")
        agree = f"{r['top1_agreement']:.1%}" if r["top1_agreement"] is not None else "-"
        learned = f"{r['learn_seconds']:.0f} ({'+'.join(map(str, r['learn_epochs']))})" if r.get("learn_epochs") else "-"
        layers = r["layers"].replace("|", "\\|")  # a regex selection inside a table cell
        lines.append(f"| {r['model']} | {layers} | {r.get('codebooks', 'k-means')} | {r['replaced']}/{r['layers_total']} | "
                     f"{r['flops_replaced']:.0%} | "
                     f"{r['held_out_samples']} | {acc[0]} | {acc[1]} | {agree} | {r['cosine']:.4f} | {r['sqnr_db']:.1f} | "
                     f"{learned} | {r['lut_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="directory for lut_accuracy.{json,md}")
    parser.add_argument("--models", nargs="+", default=list(GRID), choices=list(GRID))
    parser.add_argument("--tables", default="int8", choices=["int8", "float32"])
    parser.add_argument("--learn", action="store_true", help="also learn the centroids (a second row per selection)")
    parser.add_argument("--learn-minutes", type=float, default=10.0, help="learning budget per selection")
    parser.add_argument("--learn-layer-loss", type=float, default=0.0,
                        help="weight of the replaced layers' own outputs in the learning loss")
    parser.add_argument("--learn-weights", action="store_true",
                        help="the replaced layers' weights train too (LearnConfig.train_weights)")
    parser.add_argument("--learn-bias", action="store_true",
                        help="a shift of each replaced layer's output trains too (LearnConfig.train_bias)")
    parser.add_argument("--layers", nargs="+", help="layer selections instead of the grid's")
    parser.add_argument("--append", action="store_true", help="keep the rows already in the output files")
    parser.add_argument("--finer", type=int, default=0,
                        help="budget rows: a layer over the budget may halve its V this many times (LutConfig.finer)")
    parser.add_argument("--linear-subspace", type=int, default=lut_compiler.LutConfig().linear_subspace,
                        help="V of matmul/Gemm layers (LutConfig.linear_subspace; convs keep theirs)")
    parser.add_argument("--samples", type=int, help="samples per model instead of the grid's (the same share held out)")
    parser.add_argument("--table-fit", type=float, default=lut_compiler.LutConfig().table_fit,
                        help="ridge of the least-squares table correction (LutConfig.table_fit; 0: none)")
    parser.add_argument("--centroids", type=int, default=lut_compiler.LutConfig().centroids,
                        help="K, centroids per sub-space (LutConfig.centroids)")
    parser.add_argument("--max-rows", type=int, default=lut_compiler.LutConfig().max_rows,
                        help="calibration rows per layer for k-means and the fit (LutConfig.max_rows; "
                             "memory_mb grows with it)")
    args = parser.parse_args(argv)
    default = lut_compiler.LutConfig()
    memory_mb = default.memory_mb * max(1, args.max_rows // default.max_rows)
    learn = lut_compiler.LearnConfig(minutes=args.learn_minutes, layer_loss=args.learn_layer_loss,
                                     train_weights=args.learn_weights, train_bias=args.learn_bias)
    variants = [None] + ([learn] if args.learn else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "lut_accuracy.json"
    rows = json.loads(saved.read_text()) if args.append and saved.exists() else []
    for model in args.models:
        for layers in args.layers or GRID[model][0]:
            for learn in variants:
                base = lut_compiler.LutConfig(table_dtype=args.tables, learn=learn, finer=args.finer,
                                              linear_subspace=args.linear_subspace, table_fit=args.table_fit or None,
                                              centroids=args.centroids, max_rows=args.max_rows,
                                              memory_mb=memory_mb)
                rows.append(measure(model, layers, base, args.samples))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
                # after every row: an interrupted run keeps what it measured
                saved.write_text(json.dumps(rows, indent=1))
                (out / "lut_accuracy.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()

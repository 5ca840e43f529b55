"""Accuracy of magnitude pruning on the bundled real models, with and without the short
distillation fine-tune of the pruned weights (issue 6).

    python -m lut_compiler.bench.sparse_accuracy [--sparsity 0.5 0.7 0.9] [--block 16x1]
                                                  [--finetune-minutes 5] [--out bench/results]

Every eligible matmul/conv is pruned to the sparsity in blocks and made sparse without a
speed measurement (``min_speedup=0``: this is about accuracy; `bench.sparse` measures speed).
Per row: layers and share of matmul/conv FLOPs made sparse, held-out accuracy of fp32 vs the
pruned model (digits) or cosine of sentence embeddings (MiniLM), output SQNR, fine-tune time.
The held-out 20% of the samples is the same for both variants and never fine-tuned on.
Writes ``sparse_accuracy.json`` and ``sparse_accuracy.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lut_compiler

from .lut_accuracy import real_samples
from .sparse import parse_block

# model -> number of samples (80% fine-tune, 20% held out)
SAMPLES = {"digits_cnn": 1000, "minilm_pooled": 40}


def measure(model: str, sparsity: float, block: tuple[int, int], finetune: lut_compiler.LearnConfig | None) -> dict:
    from lut_compiler import zoo

    feeds, labels = real_samples(model, SAMPLES[model])
    shapes = {k: (1, *v.shape[1:]) for k, v in feeds.items()}
    sparse = lut_compiler.SparseConfig(sparsity=sparsity, block=block, min_speedup=0, finetune=finetune)
    config = lut_compiler.CompileConfig(input_shapes=shapes, sparse=sparse)
    start = time.perf_counter()
    compiled = lut_compiler.compile(zoo.get_model(model), config, progress=False, calibration=feeds, labels=labels)
    report = compiled.record["sparse"]
    out = report["accuracy"]["outputs"][0]
    row = {
        "model": model, "sparsity": sparsity, "block": f"{block[0]}x{block[1]}", "finetuned": finetune is not None,
        "sparse_layers": sum(r["sparse"] for r in report["layers"]), "layers_total": len(report["layers"]),
        "flops_sparse": report["flops_sparse"], "held_out_samples": report["accuracy"]["samples"],
        "sqnr_db": out["sqnr_db"], "cosine": out["cosine"], "top1_agreement": out.get("top1_agreement"),
        "finetune": report.get("finetune"), "compile_seconds": round(time.perf_counter() - start, 1),
    }
    if "accuracy" in report["accuracy"]:
        acc = report["accuracy"]["accuracy"]
        row.update(fp32_accuracy=acc["fp32"], pruned_accuracy=acc["model"])
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | sparsity | block | weights | sparse layers | FLOPs sparse | held-out | fp32 acc | pruned acc | "
             "top-1 agree | cosine | SQNR dB | fine-tune s |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = (f"{r['fp32_accuracy']:.1%}", f"{r['pruned_accuracy']:.1%}") if "pruned_accuracy" in r else ("-", "-")
        agree = f"{r['top1_agreement']:.1%}" if r["top1_agreement"] is not None else "-"
        tuned = f"{r['finetune']['seconds']:.0f}" if r["finetune"] else "-"
        lines.append(f"| {r['model']} | {r['sparsity']:.0%} | {r['block']} | "
                     f"{'fine-tuned' if r['finetuned'] else 'magnitude'} | {r['sparse_layers']}/{r['layers_total']} | "
                     f"{r['flops_sparse']:.0%} | {r['held_out_samples']} | {acc[0]} | {acc[1]} | {agree} | "
                     f"{r['cosine']:.4f} | {r['sqnr_db']:.1f} | {tuned} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SAMPLES), choices=list(SAMPLES))
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--block", type=parse_block, default=(16, 1), help="bn x bk, e.g. 16x1")
    parser.add_argument("--finetune-minutes", type=float, default=5.0, help="fine-tune budget per row (0: none)")
    parser.add_argument("--out", default="bench/results", help="directory for sparse_accuracy.{json,md}")
    args = parser.parse_args(argv)
    variants = [None] + ([lut_compiler.LearnConfig(minutes=args.finetune_minutes)] if args.finetune_minutes else [])
    rows = []
    for model in args.models:
        for sparsity in args.sparsity:
            for finetune in variants:
                rows.append(measure(model, sparsity, args.block, finetune))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse_accuracy.json").write_text(json.dumps(rows, indent=1))
    (out / "sparse_accuracy.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()

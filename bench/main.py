"""``lutc bench``: ONNX Runtime, stock TVM (untuned, MetaSchedule-tuned) and lut-compiler, side by side.

CLI glue only: parse the options into a BenchConfig, run every case, write
``results.json``, ``results.md`` and ``results.png`` into ``--out`` and print the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from .config import DEFAULT_SYSTEMS, SYSTEMS, BenchConfig, TimingConfig, default_cases

DEFAULT_MODELS = ("mlp", "digits_cnn", "minilm")
QUICK = {"models": ["mlp"], "batch": [1], "trials": 2, "repeat": 3, "learn_minutes": 0.25}


def _list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lutc bench`` (the global ``--debug``/``--quiet`` come from the caller)."""
    from ..cli import parse_shape_binding

    parser.add_argument("--models", nargs="+", type=_list, default=None, metavar="NAME|FILE.onnx",
                        help=f"zoo names or ONNX files (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--batch", nargs="+", type=int, default=None, metavar="N",
                        help="batch sizes for zoo models (default: per model, mlp 1 64, digits_cnn 1 16, minilm 1 8)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length for minilm (default 128)")
    parser.add_argument("--input-shape", action="append", type=parse_shape_binding, default=[], metavar="NAME=1x128",
                        help="bind an ONNX file's dynamic input dims (repeatable)")
    parser.add_argument("--systems", type=_list, default=list(DEFAULT_SYSTEMS), metavar="A,B",
                        help=f"subset of {','.join(SYSTEMS)} (default: all but lutc-sparse; ort is the reference)")
    parser.add_argument("--trials", type=int, default=None, metavar="N",
                        help="MetaSchedule trials per task for tvm-tuned and lutc (default 16)")
    parser.add_argument("--repeat", type=int, default=None, metavar="R",
                        help="timed rounds; each system runs one block per round (default 10)")
    parser.add_argument("--block-seconds", type=float, default=0.2, metavar="S",
                        help="target length of one timed block, in seconds (default 0.2)")
    parser.add_argument("--max-system-seconds", type=float, default=60.0, metavar="S",
                        help="cap on one system's timed blocks per case; slower systems run fewer rounds (min 3)")
    parser.add_argument("--learn-minutes", type=float, default=None, metavar="M",
                        help="centroid learning budget of lutc-learned per case (default 10)")
    parser.add_argument("--learn-finer", type=int, default=0, metavar="N",
                        help="lutc-learned: times a layer may halve its V before it stays dense (default 0)")
    parser.add_argument("--target", default="host", help='"host", an LLVM CPU name, or a JSON target dict')
    parser.add_argument("--work-dir", default=".lutc/bench", help="artifacts and tuning databases (reused)")
    parser.add_argument("--out", default="bench/results", help="results.json, results.md, results.png go here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample inputs and of tuning")
    parser.add_argument("--quick", action="store_true",
                        help="CI mode: mlp, batch 1, 2 trials per task, 3 rounds, 15 s of learning (explicit options still win)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """BenchConfig from parsed options; --quick fills what was not given explicitly."""
    from ..errors import UsageError
    from ..target import host_cores

    quick = QUICK if args.quick else {}
    models = [m for group in args.models for m in group] if args.models else quick.get("models", DEFAULT_MODELS)
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        raise UsageError(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    trials = args.trials if args.trials is not None else quick.get("trials", 16)
    repeat = args.repeat if args.repeat is not None else quick.get("repeat", 10)
    learn_minutes = args.learn_minutes if args.learn_minutes is not None else quick.get("learn_minutes", 10.0)
    if trials < 0 or repeat < 1 or args.block_seconds <= 0 or args.seq < 1 or learn_minutes <= 0 \
            or args.learn_finer < 0:
        raise UsageError("--trials must be >= 0, --repeat >= 1, --block-seconds > 0, --seq >= 1, --learn-minutes > 0, "
                         "--learn-finer >= 0")
    from .. import zoo

    unknown = sorted(m for m in models if m not in zoo.MODELS and not Path(m).is_file())
    if unknown:
        raise UsageError(f"{', '.join(unknown)}: neither a zoo model ({', '.join(zoo.MODELS)}) nor an ONNX file")
    batches = args.batch or quick.get("batch")
    if batches and min(batches) < 1:
        raise UsageError("--batch sizes must be >= 1")
    return BenchConfig(
        cases=default_cases(list(models), batches, args.seq, dict(args.input_shape)),
        systems=tuple(s for s in SYSTEMS if s in args.systems),
        trials_per_task=trials,
        learn_minutes=learn_minutes,
        learn_finer=args.learn_finer,
        timing=TimingConfig(rounds=repeat, block_seconds=args.block_seconds,
                            max_system_seconds=args.max_system_seconds),
        target=args.target,
        cores=host_cores(),
        work_dir=args.work_dir,
        out_dir=args.out,
        seed=args.seed,
        quick=args.quick,
        progress=not getattr(args, "quiet", False),
    )


def _machine(cfg: BenchConfig) -> tuple[dict, dict]:
    from ..target import detect_host, resolve_target

    host = detect_host()
    target = resolve_target(cfg.target)
    machine = {"cpu": host.model, "vendor": host.vendor, "mcpu": host.mcpu, "mtriple": host.mtriple,
               "cores": cfg.cores, "features": list(host.features), "hidden_features": list(host.mattr),
               "platform": sys.platform}
    return machine, json.loads(str(target))


def _versions() -> dict[str, str]:
    from importlib import metadata

    from ..artifact import versions

    found = versions()
    for dist in ("matplotlib", "xgboost"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def run(args: argparse.Namespace) -> None:
    """Run the bench described by ``args`` and write its results."""
    from tqdm import tqdm

    from ..errors import LutcError
    from . import report
    from .measure import bench_case

    cfg = config_from_args(args)
    debug = getattr(args, "debug", False)
    start = time.perf_counter()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    machine, target = _machine(cfg)
    os.environ["TVM_NUM_THREADS"] = str(cfg.cores)

    def log(message: str) -> None:
        if cfg.progress:
            tqdm.write(message, file=sys.stderr)

    meta = {
        "date": date,
        "wall_seconds": 0.0,
        "complete": False,  # True once every case ran (results are rewritten after each case)
        "machine": machine,
        "target": target,
        "versions": _versions(),
        "config": cfg.to_json(),
        "method": "per round, each system runs one block of back-to-back calls from Python on pre-bound "
                  "inputs (ORT: IOBinding; TVM: Relax VM main on tvm tensors), one system at a time, order "
                  "rotating; latency = block seconds / calls; statistics over rounds",
    }
    out = Path(cfg.out_dir)
    rows = []
    for i, case in enumerate(cfg.cases, 1):
        log(f"[{i}/{len(cfg.cases)}] {case.model_label} {case.shape_label}")
        case_start = time.perf_counter()
        rows += bench_case(case, cfg, log, debug)
        log(f"  done in {time.perf_counter() - case_start:.0f} s")
        meta.update(wall_seconds=round(time.perf_counter() - start, 1), complete=i == len(cfg.cases))
        paths = report.write_all(out, rows, meta)
    print(report.table(rows))
    print(f"total {meta['wall_seconds']:.0f} s; wrote {', '.join(map(str, paths))}")
    for row in rows:
        if row.status != "ok":
            print(f"failed: {row.model} {row.shape} {row.system}: {row.error}", file=sys.stderr)
    if all(row.status != "ok" for row in rows):
        raise LutcError("every system failed on every case (see above)")

"""``lutc demo``: the main job end to end on a bundled model trained on real digits.

1. build the zoo model (ResNet-style CNN on MNIST digits) as ONNX;
2. compile it with a short MetaSchedule tuning and export ``model.so`` + ``manifest.json``;
3. load the artifact and classify held-out digits, against ONNX Runtime;
4. rewrite the last layers into lookup-add (k-means codebooks from digits) and report
   its accuracy against the fp32 model on digits k-means did not see;
5. measure ONNX Runtime, stock TVM (untuned and tuned) and lutc side by side.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="digits_cnn", help="labelled zoo model (default digits_cnn)")
    parser.add_argument("--trials", type=int, default=8, help="MetaSchedule trials per kernel (default 8)")
    parser.add_argument("--work-dir", default=".lutc/demo", help="models, tuning databases, artifact, results")
    parser.add_argument("--images", type=int, default=500, help="held-out images to classify (default 500)")
    parser.add_argument("--lut-layers", default="last:3", help="layers the lookup-add step replaces (default last:3)")


def _accuracy(run_one, feeds: dict[str, np.ndarray], labels: np.ndarray, count: int) -> tuple[float, np.ndarray]:
    """Top-1 accuracy of batch-1 runs over the first ``count`` examples; also the predictions."""
    name = next(iter(feeds))
    predictions = np.array([int(np.argmax(run_one({name: feeds[name][i:i + 1]}))) for i in range(count)])
    return float(np.mean(predictions == labels[:count])), predictions


def run(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    import lut_compiler
    from lut_compiler import zoo
    from lut_compiler.bench import report
    from lut_compiler.bench.config import BenchConfig, Case, TimingConfig, tuning_dir
    from lut_compiler.bench.measure import bench_case
    from lut_compiler.target import host_cores

    work = Path(args.work_dir)
    case = Case(args.model, batch=1)
    bench = BenchConfig(cases=[case], trials_per_task=args.trials, timing=TimingConfig(rounds=5),
                        cores=host_cores(), work_dir=str(work / "bench"), out_dir=str(work / "results"),
                        progress=not args.quiet)

    print(f"[1/5] model: {args.model} from the zoo")
    path = zoo.get_model(args.model)
    feeds, labels = zoo.labelled_data(args.model, "test")
    shapes = {k: (1, *v.shape[1:]) for k, v in feeds.items()}
    print(f"      {path} ({path.stat().st_size / 1e6:.1f} MB), inputs {shapes}")

    print(f"[2/5] compile for this CPU with {args.trials} trials per kernel (database reused across runs)")
    config = lut_compiler.CompileConfig(
        input_shapes=shapes,
        tune=lut_compiler.TuneConfig(trials_per_task=args.trials, work_dir=tuning_dir(bench, case, "lutc")),
    )
    model = lut_compiler.compile(path, config, progress=not args.quiet)
    artifact = model.export(work / "artifact")
    tuning = model.record["tuning"]
    print(f"      {len(tuning['tasks'])} kernels, {tuning['new_trials']} new trials in {tuning['seconds']:.0f} s; "
          f"wrote {artifact}/model.so and manifest.json")

    count = min(args.images, len(labels))
    print(f"[3/5] classify {count} held-out digits with the exported artifact")
    loaded = lut_compiler.load(artifact)
    ours, predicted = _accuracy(lambda f: next(iter(loaded.run(f).values())), feeds, labels, count)
    options = ort.SessionOptions()
    options.intra_op_num_threads = host_cores()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    reference, ort_predicted = _accuracy(lambda f: session.run(None, f)[0], feeds, labels, count)
    print(f"      accuracy: lutc {ours:.1%}, ONNX Runtime {reference:.1%}; "
          f"same prediction on {np.mean(predicted == ort_predicted):.1%} of images")

    print(f"[4/5] lookup-add on layers {args.lut_layers}: codebooks from 80% of {args.images} test digits, "
          "accuracy on the other 20%")
    from lut_compiler.lut_report import format_report

    calib = {k: v[:args.images] for k, v in feeds.items()}
    lut_config = lut_compiler.CompileConfig(input_shapes=shapes, lut=lut_compiler.LutConfig(layers=args.lut_layers))
    lut_model = lut_compiler.compile(path, lut_config, progress=not args.quiet, calibration=calib,
                                     labels=labels[:args.images])
    print("      " + format_report(lut_model.record["lut"]).replace("\n", "\n      "))

    print("[5/5] side by side, each system in its own process (latency per image, batch 1)")
    os.environ["TVM_NUM_THREADS"] = str(bench.cores)
    rows = bench_case(case, bench, print if not args.quiet else (lambda _: None), getattr(args, "debug", False))
    print(report.table(rows))

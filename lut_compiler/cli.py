"""``lutc``: compile, tune, run, inspect and bench ONNX models (and a demo). Parses arguments, calls the API.

Exit codes: 0 success, 2 bad input (one ``error:`` line on stderr), 1 internal error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path



def parse_shape_binding(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape:
        raise argparse.ArgumentTypeError(f"expected NAME=DxDx..., e.g. input_ids=1x128, got {text!r}")
    return name, shape


def parse_override(text: str):
    from .config import LayerOverride

    pattern, sep, value = text.rpartition("=")
    v, _, k = value.partition(":")
    if not sep or not pattern or not v.isdigit() or (k and not k.isdigit()):
        raise argparse.ArgumentTypeError(f"expected REGEX=V or REGEX=V:K, e.g. 'output/dense=8:16', got {text!r}")
    return pattern, LayerOverride(int(v), int(k) if k else None)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--input-shape", action="append", type=parse_shape_binding, default=[], metavar="NAME=1x128",
                   help="bind an input's dynamic dimensions (repeatable)")


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="host",
                   help='"host" (detect this CPU), an LLVM CPU name (znver4), or a JSON target dict')


def _add_tuning_args(p: argparse.ArgumentParser, default_trials: int) -> None:
    from .config import PRESETS, RpcConfig

    p.add_argument("--trials", type=int, default=None, metavar="N",
                   help=f"MetaSchedule trials per kernel (default {default_trials}; 0 = no tuning)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named tuning budget instead of --trials")
    p.add_argument("--max-trials", type=int, default=None, metavar="N", help="cap on trials over all kernels")
    p.add_argument("--work-dir", default=".lutc/tuning", help="tuning database, reused across runs")
    g = p.add_argument_group("measuring on another machine (TVM RPC; builds stay on this one)")
    g.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure candidates on the RPC servers of this tracker")
    g.add_argument("--rpc-key", metavar="KEY", help="the key the target's RPC servers registered with")
    g.add_argument("--rpc-timeout", type=int, metavar="SECONDS",
                   help=f"limit of one measurement session, and wait for a server (default {RpcConfig.timeout})")
    g.add_argument("--rpc-parallel", type=int, metavar="N",
                   help=f"measurements at once, on as many servers (default {RpcConfig.parallel})")


def _add_lut_args(p: argparse.ArgumentParser, with_data: bool) -> None:
    g = p.add_argument_group("lookup-add rewrite")
    if with_data:
        g.add_argument("--lut", action="store_true", help="replace eligible layers by encode + lookup-add")
        g.add_argument("--calib", metavar="DATA.npz",
                       help="calibration inputs: per model input, samples stacked [S, *shape] or rows [S*batch, ...]")
        g.add_argument("--labels", metavar="LABELS.npy", help="integer labels per output row, for task accuracy")
        g.add_argument("--lut-task", choices=["auto", "classification", "embedding"], default="auto",
                       help="report top-1 agreement of logits (classification; auto: when --labels is given)")
        g.add_argument("--lut-learn", action="store_true",
                       help="learn the centroids by distillation from the fp32 model (LUT-NN) after k-means")
        g.add_argument("--lut-learn-epochs", type=int, default=30, metavar="N", help="learning epochs (default 30)")
        g.add_argument("--lut-learn-minutes", type=float, default=10.0, metavar="M",
                       help="learning time budget (default 10)")
        g.add_argument("--lut-learn-layer-loss", type=float, default=0.0, metavar="W",
                       help="also match each replaced layer's output to fp32, with weight W (default 0)")
        g.add_argument("--lut-learn-weights", action="store_true",
                       help="the replaced layers' weights train too (default: only centroids and temperatures)")
        g.add_argument("--lut-learn-bias", action="store_true",
                       help="a shift of each replaced layer's output trains too (added to its bias)")
        g.add_argument("--lut-learn-checkpoint", metavar="FILE", help="save learning state here after each epoch, "
                       "and resume from it")
        budget = g.add_mutually_exclusive_group()
        budget.add_argument("--max-drop", type=float, metavar="POINTS",
                            help="replace only the layers that keep top-1 accuracy (agreement with fp32 without "
                                 "--labels) within POINTS of fp32 on validation samples")
        budget.add_argument("--min-cosine", type=float, metavar="C",
                            help="replace only the layers that keep the outputs' mean cosine to fp32 >= C")
        g.add_argument("--lut-finer", type=int, default=0, metavar="N",
                       help="with a budget: a layer over it may halve its V up to N times before it stays dense "
                            "(finer codebooks, more lookups; default 0)")
    g.add_argument("--lut-layers", default="all", metavar="all|last:N|REGEX", help="which eligible layers to replace")
    g.add_argument("--lut-centroids", type=int, default=16, metavar="K", help="centroids per sub-space")
    g.add_argument("--lut-v", type=int, default=4, metavar="V", help="sub-space length of matmul/Gemm layers")
    g.add_argument("--lut-tables", choices=["int8", "float32"], default="int8", help="table precision")
    g.add_argument("--lut-table-fit", type=float, default=0.05, metavar="RIDGE",
                   help="fit the tables to the layer outputs by ridge least squares, shrunk toward "
                        "centroids x weights by RIDGE x table entries (default 0.05; 0: no fit)")
    g.add_argument("--lut-kernel", choices=["auto", "shuffle", "generic"], default="auto",
                   help="lookup-add kernel of matmul layers: VPSHUFB (AVX2/AVX-512BW) or generic (default auto)")
    g.add_argument("--lut-override", action="append", type=parse_override, default=[], metavar="REGEX=V[:K]",
                   help="sub-space length V (and centroids K) for layers whose name matches REGEX (repeatable)")


def parse_block(text: str) -> tuple[int, int]:
    rows, sep, cols = text.lower().partition("x")
    if not sep or not rows.isdigit() or not cols.isdigit() or min(int(rows), int(cols)) < 1:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS, e.g. 16x1, got {text!r}")
    return int(rows), int(cols)


def _add_sparse_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sparse kernels (each layer measured dense vs sparse on the target)")
    g.add_argument("--sparse", action="store_true", help="use block-sparse kernels for weights that are sparse")
    g.add_argument("--prune", type=float, metavar="SPARSITY",
                   help="prune weights by block magnitude to this share of zero blocks (implies --sparse)")
    g.add_argument("--sparse-block", type=parse_block, default=(16, 1), metavar="RxC",
                   help="pruning block, R along the output channels, C along the inputs (default 16x1)")
    g.add_argument("--sparse-layers", default="all", metavar="all|last:N|REGEX", help="which layers may be sparse")
    g.add_argument("--sparse-min-speedup", type=float, default=1.1, metavar="X",
                   help="keep a layer dense unless its sparse kernel is measured X times faster (default 1.1; "
                        "0: every selected layer sparse, unmeasured)")
    g.add_argument("--prune-finetune", action="store_true",
                   help="fine-tune the pruned weights by distillation from the fp32 model on --calib (20%% held out)")
    g.add_argument("--prune-finetune-minutes", type=float, default=10.0, metavar="M",
                   help="fine-tune time budget (default 10)")


def _add_auto_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-layer plan (each layer's options measured on the target, within --max-drop or "
                             "--min-cosine on --calib)")
    g.add_argument("--auto", action="store_true",
                   help="choose dense, int8, sparse or lookup-add per layer: least latency within the accuracy budget")
    g.add_argument("--auto-kinds", type=lambda t: tuple(k for k in t.split(",") if k),
                   default=("int8", "sparse", "lut"), metavar="int8,sparse,lut",
                   help="options besides dense (default int8,sparse,lut)")
    g.add_argument("--auto-prune", type=float, metavar="SPARSITY",
                   help="the sparse option prunes dense weights to this sparsity (--sparse-block blocks); "
                        "default: only weights that already are sparse")
    g.add_argument("--auto-layers", default="all", metavar="all|last:N|REGEX", help="which layers get options")


def _auto_config(args):
    from .config import AutoConfig

    if not args.auto:
        if args.auto_prune is not None:
            raise _usage("--auto-prune is only used with --auto")
        return None
    if args.lut or args.sparse or args.prune is not None:
        raise _usage("--auto chooses lookup-add and sparse layers itself: drop --lut/--sparse/--prune")
    if args.max_drop is None and args.min_cosine is None:
        raise _usage("--auto needs an accuracy budget: --max-drop POINTS or --min-cosine C")
    try:
        return AutoConfig(budget=_budget(args), kinds=args.auto_kinds, prune=args.auto_prune, block=args.sparse_block,
                          lut=_lut_config(args, budget=False), layers=args.auto_layers)
    except ValueError as err:
        raise _usage(str(err)) from None


def _budget(args):
    from .config import Budget

    if getattr(args, "max_drop", None) is not None:
        return Budget("accuracy", args.max_drop)
    if getattr(args, "min_cosine", None) is not None:
        return Budget("cosine", args.min_cosine)
    return None


def _sparse_config(args):
    from .config import LearnConfig, SparseConfig

    if not (args.sparse or args.prune is not None):
        if args.prune_finetune:
            raise _usage("--prune-finetune is only used with --prune")
        return None
    try:
        finetune = LearnConfig(minutes=args.prune_finetune_minutes) if args.prune_finetune else None
        return SparseConfig(layers=args.sparse_layers, sparsity=args.prune, block=args.sparse_block,
                            min_speedup=args.sparse_min_speedup, finetune=finetune)
    except ValueError as err:
        raise _usage(str(err)) from None


def _lut_config(args, budget: bool = True):
    """LutConfig from the --lut-* options (with the --max-drop/--min-cosine budget unless not `budget`)."""
    from .config import LearnConfig, LutConfig

    try:
        learn = None
        if getattr(args, "lut_learn", False):
            learn = LearnConfig(epochs=args.lut_learn_epochs, minutes=args.lut_learn_minutes,
                                layer_loss=args.lut_learn_layer_loss, train_weights=args.lut_learn_weights,
                                train_bias=args.lut_learn_bias, checkpoint=args.lut_learn_checkpoint)
        return LutConfig(layers=args.lut_layers, centroids=args.lut_centroids, linear_subspace=args.lut_v,
                         table_dtype=args.lut_tables, table_fit=args.lut_table_fit or None,
                         overrides=dict(args.lut_override),
                         task=getattr(args, "lut_task", "auto"), kernel=args.lut_kernel, learn=learn,
                         budget=_budget(args) if budget else None, finer=getattr(args, "lut_finer", 0))
    except ValueError as err:
        raise _usage(str(err)) from None


def _config(args, default_trials: int):
    from .config import PRESETS, CompileConfig, TuneConfig

    if args.preset and args.trials is not None:
        raise _usage("give --trials or --preset, not both")
    trials = PRESETS[args.preset].trials_per_task if args.preset else args.trials
    tune = TuneConfig(
        trials_per_task=default_trials if trials is None else trials,
        max_trials=args.max_trials,
        work_dir=args.work_dir,
        rpc=_rpc_config(args),
    )
    config = CompileConfig(
        input_shapes=dict(args.input_shape),
        tune=tune,
        weight_prepack=not getattr(args, "no_prepack", False),
        dump_ir=getattr(args, "dump_ir", None),
        lut=_lut_config(args) if getattr(args, "lut", False) else None,
        sparse=_sparse_config(args) if hasattr(args, "sparse") else None,
        auto=_auto_config(args) if hasattr(args, "auto") else None,
    )
    if tune.rpc and (config.auto or (config.sparse and config.sparse.min_speedup > 0)):
        raise _usage("--rpc-tracker measures tuning candidates only; --auto and --sparse time layers on this machine")
    return config


def _rpc_config(args):
    """RpcConfig from --rpc-tracker HOST:PORT, --rpc-key and the optional --rpc-* limits."""
    from .config import RpcConfig

    limits = {"timeout": args.rpc_timeout, "parallel": args.rpc_parallel}
    if args.rpc_tracker is None:
        if args.rpc_key is not None or any(v is not None for v in limits.values()):
            raise _usage("--rpc-key, --rpc-timeout and --rpc-parallel are only used with --rpc-tracker HOST:PORT")
        return None
    host, sep, port = args.rpc_tracker.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise _usage(f"--rpc-tracker must be HOST:PORT, e.g. 192.168.1.5:9190, got {args.rpc_tracker!r}")
    if not args.rpc_key:
        raise _usage("--rpc-tracker needs --rpc-key KEY (the key the target's RPC servers registered with)")
    try:
        return RpcConfig(host, int(port), args.rpc_key, **{k: v for k, v in limits.items() if v is not None})
    except ValueError as err:
        raise _usage(str(err)) from None


def _usage(message: str):
    from .errors import UsageError

    return UsageError(message)


def cmd_compile(args) -> None:
    import lut_compiler

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise _usage(f"output {out} exists and is not a directory")
    _check_writable(out.parent)
    config = _config(args, default_trials=0)
    if args.calib and not (config.lut or config.auto or (config.sparse and config.sparse.sparsity is not None)):
        raise _usage("--calib is only used with --lut, --prune or --auto")
    if not args.calib and (config.lut or config.auto):
        step = "lookup-add rewrite" if config.lut else "per-layer plan"
        raise _usage(f"the {step} needs calibration data (--calib DATA.npz)")
    if args.lut_learn and not (config.lut or config.auto):
        raise _usage("--lut-learn is only used with --lut or --auto")
    if (args.max_drop is not None or args.min_cosine is not None) and not (config.lut or config.auto):
        raise _usage("--max-drop/--min-cosine are only used with --lut or --auto")
    labels = None
    if args.labels:
        if not args.calib:
            raise _usage("--labels is only used with --calib")
        labels = _load_labels(args.labels)
    model = lut_compiler.compile(args.model, config, target=args.target, progress=not args.quiet,
                                 calibration=args.calib, labels=labels)
    model.export(out)
    tuning = model.record.get("tuning")
    if tuning and not args.quiet:
        print(f"tuning: {tuning['new_trials']} new trials in {tuning['seconds']} s")
    if model.record.get("lut"):
        from .lut_report import format_report

        print(format_report(model.record["lut"]))
    if model.record.get("sparse"):
        from .sparse import format_report as format_sparse

        print(format_sparse(model.record["sparse"]))
    if model.record.get("auto"):
        from .auto import format_report as format_auto

        print(format_auto(model.record["auto"]))
    library = model.library_name()
    print(f"wrote {out / library} and {out / 'manifest.json'}")
    if library.endswith(".tar"):
        print(f"note: {library} holds {model.record['target']['mtriple']} object files and no linked library: "
              f"tvm.runtime.load_module links it on the target (with its C++ compiler)")


def _check_writable(directory: Path) -> None:
    """Fail before compiling when the output cannot be written (read-only, no space for a file)."""
    from .errors import OutputError

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".lutc-probe."):
            pass
    except OSError as err:
        raise OutputError(f"cannot write into {directory}: {err.strerror or err}") from None


def _load_labels(path: str):
    import numpy as np

    from .errors import CalibrationError

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CalibrationError(f"cannot read labels {path}: {err}") from None


def cmd_tune(args) -> None:
    from .onnx_import import import_onnx
    from .lowering import legalize
    from .target import resolve_target
    from .tuning import tune

    config = _config(args, default_trials=32)
    if config.tune.trials_per_task == 0:
        raise _usage("tune needs --trials > 0")
    target = resolve_target(args.target)
    mod = legalize(import_onnx(args.model, config.input_shapes).mod, target, config.weight_prepack)
    print(tune(mod, target, config.tune, progress=not args.quiet).table())


def cmd_run(args) -> None:
    import numpy as np

    from .artifact import load
    from .feeds import check_feeds, load_npz

    model = load(args.artifact)
    feeds = load_npz(args.inputs)
    check_feeds(model.inputs, feeds)  # before loading the library
    outputs = model.run(feeds)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **outputs)
    os.replace(tmp.name, out)
    for name, value in outputs.items():
        print(f"{name}: {value.dtype}[{'x'.join(map(str, value.shape))}]")
    if args.time:
        seconds = model.time(feeds, number=args.time, repeat=5)
        print(f"latency: median {1e3 * float(np.median(seconds)):.3f} ms over 5 x {args.time} runs")


def cmd_inspect(args) -> None:
    from .lut import plan
    from .onnx_import import import_onnx
    from .passes.lut_plan import table

    imported = import_onnx(args.model, dict(args.input_shape))
    print("inputs:  " + ", ".join(s.describe() for s in imported.inputs))
    print("outputs: " + ", ".join(s.describe() for s in imported.outputs))
    print(table(plan(imported, _lut_config(args))))


def cmd_bench(args) -> None:
    from .bench.main import run

    run(args)


def _global_options(default) -> argparse.ArgumentParser:
    """--debug and --quiet, accepted before or after the command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars")
    return p


def cmd_demo(args) -> None:
    from .demo import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lutc", description=__doc__.splitlines()[0],
                                     parents=[_global_options(False)])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_subparser_class(_global_options(argparse.SUPPRESS)))

    p = sub.add_parser("compile", help="compile an ONNX model into OUT/model.so + OUT/manifest.json")
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="artifact directory")
    _add_target_args(p)
    _add_tuning_args(p, default_trials=0)
    p.add_argument("--no-prepack", action="store_true", help="keep weight layouts as in the model")
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after each phase into DIR")
    _add_lut_args(p, with_data=True)
    _add_sparse_args(p)
    _add_auto_args(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("tune", help="tune a model's kernels into the database (no artifact)")
    _add_model_args(p)
    _add_target_args(p)
    _add_tuning_args(p, default_trials=32)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("run", help="run a compiled artifact on inputs from an .npz file")
    p.add_argument("artifact", metavar="OUT_DIR", help="directory written by lutc compile")
    p.add_argument("--inputs", required=True, metavar="FEEDS.npz", help="one array per model input name")
    p.add_argument("--output", required=True, metavar="OUT.npz", help="where to write one array per output")
    p.add_argument("--time", type=int, default=0, metavar="N", help="also time N runs x 5 repeats")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="list the model's inputs, outputs and matmul/conv layers with the "
                                       "lookup-add decision for each")
    _add_model_args(p)
    _add_lut_args(p, with_data=False)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="compare ONNX Runtime, stock TVM and lut-compiler side by side")
    from .bench.main import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the main job end to end on a bundled model trained on real digits")
    from .demo import add_arguments as add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _subparser_class(options: argparse.ArgumentParser):
    class Subparser(argparse.ArgumentParser):
        def __init__(self, **kwargs):
            super().__init__(parents=[options], **kwargs)

    return Subparser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_USAGE, LutcError, UsageError

    try:
        args.func(args)
    except LutcError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, UsageError) else EXIT_INPUT
    except OSError as err:  # the file system said no: a read-only or full output location, ...
        if args.debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # anything else is our bug: say so in one line
        if args.debug:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"error: internal error ({type(err).__name__}: {first}); rerun with --debug for a traceback",
              file=sys.stderr)
        return EXIT_INTERNAL
    return 0


if __name__ == "__main__":
    sys.exit(main())

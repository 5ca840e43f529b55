"""lut-compiler: ONNX -> Relax -> tuned CPU kernels, deployable with plain TVM."""

import os

# TVM's runtime uses half the logical CPUs (1 of 2 here) unless told otherwise;
# this must be set before its thread pool starts.
try:
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
except AttributeError:  # pragma: no cover - not Linux
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from .artifact import CompiledModel, load  # noqa: E402
from .config import (  # noqa: E402
    PRESETS, Budget, CompileConfig, LayerOverride, LearnConfig, LutConfig, SparseConfig, TuneConfig,
)
from .errors import LutcError  # noqa: E402
from .pipeline import compile  # noqa: E402,A004
from .target import detect_host, resolve_target  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Budget", "CompileConfig", "CompiledModel", "LayerOverride", "LearnConfig", "LutConfig", "LutcError", "PRESETS",
    "SparseConfig", "TuneConfig",
    "compile", "detect_host", "load", "resolve_target",
]

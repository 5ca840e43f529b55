"""One layer's implementations timed against each other on the target, each compiled alone.

Every implementation is a Relax module ``main(x)`` of the layer (the same input, the same
output); each is lowered like a model (`lowering`), tuned with the model's budget and
database (many modules in one tuning session), built, and timed in alternating rounds of
~`seconds` blocks (median per round). Times are kept in the work dir (`LayerTimes`), so a
recompile with the same database makes the same measured decisions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from .config import TuneConfig
from .lowering import legalize, schedule
from .passes.find_candidates import Candidate
from .tuning import tune

Emit = Callable[[relax.BlockBuilder, relax.Expr], relax.Expr]  # (bb, x) -> the layer's output
Key = TypeVar("Key", bound=Hashable)
LAYER_TIMES = "layer_times.json"


def layer_module(input_shape: tuple[int, ...], emit: Emit) -> tvm.IRModule:
    """Relax ``main(x: float32 input_shape)`` computing ``emit(bb, x)``."""
    x = relax.Var("x", relax.TensorType(input_shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(emit(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def dense_call(c: Candidate, w_t: np.ndarray, bias: np.ndarray) -> Emit:
    """The candidate's call as stock ops with weight W^T [N, K] and bias [N]: matmul + add,
    or conv2d (W^T reshaped to OIHW) + add."""

    def emit(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        if c.op == "matmul":
            y = bb.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(w_t.T, np.float32))))
            return relax.op.add(y, relax.const(bias.astype(np.float32)))
        a = c.conv
        weight = relax.const(np.ascontiguousarray(w_t.reshape(c.weight_shape), np.float32))
        y = bb.emit(relax.op.nn.conv2d(x, weight, a.strides, a.padding, a.dilation))
        return relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1).astype(np.float32)))

    return emit


@dataclass(frozen=True)
class MeasureConfig:
    """How a layer is timed: `rounds` alternating over the implementations, each ~`seconds` long."""

    rounds: int = 5
    seconds: float = 0.05


def build_vms(mods: dict[Key, tvm.IRModule], target: tvm.target.Target,
              tune_cfg: TuneConfig, progress: bool = False) -> dict[Key, relax.VirtualMachine]:
    """Every module legalized, all their kernels tuned in one session with `tune_cfg` (or given
    default schedules), built, on the CPU."""
    legal = {key: legalize(mod, target, weight_prepack=False) for key, mod in mods.items()}
    if tune_cfg.trials_per_task > 0 and legal:
        tune(list(legal.values()), target, tune_cfg, progress)
    return {key: relax.VirtualMachine(tvm.compile(schedule(mod, target, tune_cfg.work_dir, weight_prepack=False),
                                                  target), tvm.cpu())
            for key, mod in legal.items()}


def time_vms(vms: dict[str, relax.VirtualMachine], input_shape: tuple[int, ...],
             cfg: MeasureConfig = MeasureConfig()) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Median ms of each built implementation on a random float32 input of `input_shape`, and
    its output on that input (for the caller's correctness check)."""
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(input_shape).astype("float32"))
    outputs = {kind: vm["main"](x).numpy() for kind, vm in vms.items()}
    timers = {}
    for kind, vm in vms.items():
        once = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=3)(x).median
        timers[kind] = vm.time_evaluator("main", tvm.cpu(), number=max(1, int(cfg.seconds / max(once, 1e-7))))
    times: dict[str, list[float]] = {kind: [] for kind in vms}
    for _ in range(cfg.rounds):
        for kind, timer in timers.items():
            times[kind].append(timer(x).mean)
    return {kind: float(np.median(t)) * 1e3 for kind, t in times.items()}, outputs


def time_layer(mods: dict[str, tvm.IRModule], input_shape: tuple[int, ...], target: tvm.target.Target,
               tune_cfg: TuneConfig, cfg: MeasureConfig = MeasureConfig()
               ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """`time_vms` of the implementations `mods` built by `build_vms`; when every one of them
    is in the work dir's `LayerTimes`, those times and no outputs."""
    times = LayerTimes(target, tune_cfg)
    known = {kind: times.get(mod) for kind, mod in mods.items()}
    if all(ms is not None for ms in known.values()):
        return known, {}
    ms, outputs = time_vms(build_vms(mods, target, tune_cfg), input_shape, cfg)
    times.update({mods[kind]: value for kind, value in ms.items()})
    return ms, outputs


class LayerTimes:
    """Measured ms of layer modules, kept beside the tuning database (`LAYER_TIMES` in the
    work dir) and keyed by the module's structural hash (weights included), the target and
    the trial budget: recompiling with the same database repeats every decision made by
    measurement exactly, and measures nothing again. Untuned compiles (no database) keep
    nothing: they measure every time."""

    def __init__(self, target: tvm.target.Target, tune_cfg: TuneConfig) -> None:
        self.path = Path(tune_cfg.work_dir) / LAYER_TIMES
        self.suffix = f"{target}:t{tune_cfg.trials_per_task}"
        self.enabled = tune_cfg.trials_per_task > 0
        self.known = _read_json(self.path) if self.enabled else {}

    def key(self, mod: tvm.IRModule) -> str:
        return f"{tvm_ffi.structural_hash(mod):x}:{self.suffix}"

    def get(self, mod: tvm.IRModule) -> float | None:
        return self.known.get(self.key(mod))

    def update(self, measured: dict[tvm.IRModule, float]) -> None:
        """Record new times (merged with what other processes wrote meanwhile; atomic)."""
        from .tuning import work_dir_lock

        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with work_dir_lock(self.path.parent, exclusive=True):
            self.known = {**_read_json(self.path), **{self.key(mod): ms for mod, ms in measured.items()}}
            tmp = self.path.with_name(f".{LAYER_TIMES}.{os.getpid()}")
            tmp.write_text(json.dumps(self.known, indent=1, sort_keys=True))
            os.replace(tmp, self.path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}

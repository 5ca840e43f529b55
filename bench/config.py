"""What a bench run measures: the systems, the model x shape grid, the timing budget.

Times are in seconds everywhere in code and JSON; the printed table and the
markdown show milliseconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

BENCH_CONFIG_VERSION = 1

# Measured side by side, in this order in every table (lutc-sparse only when asked for).
SYSTEMS: tuple[str, ...] = ("ort", "tvm-untuned", "tvm-tuned", "lutc-untuned", "lutc", "lutc-lut", "lutc-sparse",
                             "lutc-learned", "lutc-auto")
DEFAULT_SYSTEMS: tuple[str, ...] = ("ort", "tvm-untuned", "tvm-tuned", "lutc", "lutc-lut", "lutc-auto")
TUNED = frozenset({"tvm-tuned", "lutc", "lutc-lut", "lutc-sparse", "lutc-learned", "lutc-auto"})  # spend the trial budget
REFERENCE = "ort"

# Default grid: zoo model -> batch sizes (MiniLM also takes --seq).
DEFAULT_BATCHES: dict[str, tuple[int, ...]] = {"mlp": (1, 64), "digits_cnn": (1, 16), "minilm": (1, 8)}
# Models whose sample inputs take a sequence length.
SEQ_MODELS = frozenset({"minilm", "minilm_pooled"})


@dataclass
class TimingConfig:
    """How latencies are measured (all durations in seconds).

    rounds: R; in each round every system runs one timed block, the order rotating
        by one system per round.
    block_seconds: target duration of one timed block; its iteration count is
        calibrated per system after warm-up.
    warmup_seconds: untimed calls before calibration (at least one call).
    max_system_seconds: cap on one system's timed blocks per case; a system whose
        single call is so slow that R blocks would exceed it runs fewer rounds
        (never fewer than ``min_rounds``).
    gap_seconds: idle pause between blocks, so spinning worker threads of the
        previous system go to sleep before the next one starts (with 0.05 s, ORT
        blocks right after a TVM block looked slower than with 0.5-2 s here).
    eval_seconds: cap on one system's pass over the evaluation samples (accuracy columns);
        a system that takes longer is scored on the samples it finished (at least one).
    """

    rounds: int = 10
    block_seconds: float = 0.2
    warmup_seconds: float = 0.2
    max_system_seconds: float = 60.0
    min_rounds: int = 3
    gap_seconds: float = 0.2
    eval_seconds: float = 30.0


@dataclass
class Case:
    """One model at one input shape.

    model: a zoo name (``mlp``) or an ONNX file path.
    batch/seq: the zoo model's dynamic dims (None for ONNX files).
    input_shapes: explicit bindings (``--input-shape``) for ONNX files.
    """

    model: str
    batch: int | None = None
    seq: int | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def is_zoo(self) -> bool:
        return not (self.model.endswith(".onnx") or os.path.sep in self.model or Path(self.model).is_file())

    @property
    def model_label(self) -> str:
        return self.model if self.is_zoo else Path(self.model).stem

    @property
    def shape_label(self) -> str:
        """``b8 s128`` for zoo models, the bindings (``x=1x64``) for files."""
        if self.is_zoo:
            return f"b{self.batch}" + (f" s{self.seq}" if self.seq is not None else "")
        return " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in sorted(self.input_shapes.items())) or "static"

    @property
    def key(self) -> str:
        """Directory name of this case under the work dir."""
        if self.is_zoo:
            return f"{self.model}-b{self.batch}" + (f"-s{self.seq}" if self.seq is not None else "")
        path = str(Path(self.model).resolve())
        digest = hashlib.sha1(f"{path}|{sorted(self.input_shapes.items())}".encode()).hexdigest()[:10]
        return f"{Path(self.model).stem}-{digest}"

    def to_json(self) -> dict:
        return {"model": self.model, "batch": self.batch, "seq": self.seq,
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()}}


@dataclass
class BenchConfig:
    """One bench run.

    trials_per_task: MetaSchedule trials per kernel, the same for ``tvm-tuned``
        and ``lutc``.
    learn_minutes: ``lutc-learned``'s centroid learning budget per case.
    learn_finer: ``lutc-learned``'s ``LutConfig.finer`` (halvings of V before a layer stays dense).
    work_dir: compiled artifacts and tuning databases (databases are reused, so
        re-running does not retune).
    out_dir: where results.{json,md,png} go.
    cores: threads for every system (ORT intra-op threads, TVM_NUM_THREADS).
    """

    cases: list[Case]
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    trials_per_task: int = 16
    learn_minutes: float = 10.0
    learn_finer: int = 0
    timing: TimingConfig = field(default_factory=TimingConfig)
    target: str = "host"
    cores: int = 1
    work_dir: str = ".lutc/bench"
    out_dir: str = "bench/results"
    seed: int = 0
    quick: bool = False
    progress: bool = True
    version: int = BENCH_CONFIG_VERSION

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["cases"] = [c.to_json() for c in self.cases]
        data["systems"] = list(self.systems)
        return data


def default_cases(models: list[str], batches: list[int] | None, seq: int,
                  input_shapes: dict[str, tuple[int, ...]]) -> list[Case]:
    """The model x batch grid: zoo models get ``batches`` (or their default list), files their bindings."""
    cases = []
    for model in models:
        probe = Case(model)
        if not probe.is_zoo:
            cases.append(Case(model, input_shapes=dict(input_shapes)))
            continue
        for batch in batches or DEFAULT_BATCHES.get(model, (1,)):
            cases.append(Case(model, batch=batch, seq=seq if model in SEQ_MODELS else None))
    return cases


def tuning_dir(cfg: BenchConfig, case: Case, system: str) -> str:
    """A system's MetaSchedule database for one case, target CPU and trial budget (reused across runs)."""
    from ..target import resolve_target

    mcpu = resolve_target(cfg.target).attrs.get("mcpu", "generic")
    return str((Path(cfg.work_dir) / case.key / system / f"tuning-{mcpu}-t{cfg.trials_per_task}").resolve())

"""Compile configuration: dataclasses with a JSON round trip, and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

CONFIG_VERSION = 1


@dataclass
class TuneConfig:
    """MetaSchedule budget and the on-disk database that makes tuning reusable.

    trials_per_task: measured candidates per kernel; 0 means no tuning (every
        kernel gets the default CPU schedule).
    max_trials: global cap over all kernels; None means trials_per_task x kernels.
    work_dir: JSON tuning database shared by all models and runs.
    """

    trials_per_task: int = 0
    max_trials: int | None = None
    work_dir: str = ".lutc/tuning"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trials_per_task < 0:
            raise ValueError(f"trials_per_task must be >= 0, got {self.trials_per_task}")
        if self.max_trials is not None and self.max_trials < 0:
            raise ValueError(f"max_trials must be >= 0, got {self.max_trials}")


@dataclass
class CompileConfig:
    """Everything that decides what ``lut_compiler.compile`` produces.

    input_shapes: static shape per input name, binding the model's dynamic dims.
    weight_prepack: let tuned kernels choose a weight layout, folded at compile time.
    dump_ir: directory that receives the IR after each phase (for debugging).
    """

    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tune: TuneConfig = field(default_factory=TuneConfig)
    weight_prepack: bool = True
    dump_ir: str | None = None
    version: int = CONFIG_VERSION

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> CompileConfig:
        if data.get("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise ValueError(f"unsupported config version {data.get('version')}")
        data = dict(data)
        data["tune"] = TuneConfig(**data.get("tune", {}))
        data["input_shapes"] = {k: tuple(v) for k, v in data.get("input_shapes", {}).items()}
        return cls(**data)


# Named tuning budgets the CLI refers to with --preset.
PRESETS: dict[str, TuneConfig] = {
    "none": TuneConfig(trials_per_task=0),
    "quick": TuneConfig(trials_per_task=8),
    "default": TuneConfig(trials_per_task=32),
    "thorough": TuneConfig(trials_per_task=64),
}

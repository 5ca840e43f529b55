"""Compile configuration: dataclasses with a JSON round trip, and named presets."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

CONFIG_VERSION = 1


def check_layers(layers: str) -> None:
    """A layer selection: "all", "last:N" or a regular expression on layer names."""
    if layers != "all" and not layers.startswith("last:"):
        try:
            re.compile(layers)
        except re.error as err:
            raise ValueError(f"layers pattern {layers!r} is not a regular expression: {err}") from None
    elif layers.startswith("last:") and not layers[5:].isdigit():
        raise ValueError(f"layers must be all, last:N or a regex, got {layers!r}")


@dataclass(frozen=True)
class RpcConfig:
    """Measure tuning candidates on other machines through TVM's RPC tracker (builds stay
    local): the servers registered with the tracker under `key` run them.

    host, port: the tracker (``python -m tvm.exec.rpc_tracker``).
    key: the key the target's servers registered with (``rpc_server --key``).
    timeout: seconds one measurement session may last (upload, link, run), and how long
        tuning waits for a server under `key` before it gives up.
    parallel: measurements at once, each in its own session (on its own server).
    """

    host: str
    port: int
    key: str
    timeout: int = 60
    parallel: int = 1

    def __post_init__(self) -> None:
        if not self.host or not 0 < self.port < 65536:
            raise ValueError(f"RPC tracker must be HOST:PORT with a port in 1-65535, got {self.host}:{self.port}")
        if not self.key:
            raise ValueError("RPC key must not be empty")
        if self.timeout <= 0 or self.parallel < 1:
            raise ValueError(f"RPC timeout must be > 0 and parallel >= 1, got {self.timeout} and {self.parallel}")


@dataclass
class TuneConfig:
    """MetaSchedule budget and the on-disk database that makes tuning reusable.

    trials_per_task: measured candidates per kernel; 0 means no tuning (every
        kernel gets the default CPU schedule).
    max_trials: global cap over all kernels; None means trials_per_task x kernels.
    work_dir: JSON tuning database shared by all models and runs.
    rpc: measure on the RPC servers of a tracker instead of this machine (None: here).
    """

    trials_per_task: int = 0
    max_trials: int | None = None
    work_dir: str = ".lutc/tuning"
    seed: int = 0
    rpc: RpcConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rpc, dict):
            self.rpc = RpcConfig(**self.rpc)
        if self.trials_per_task < 0:
            raise ValueError(f"trials_per_task must be >= 0, got {self.trials_per_task}")
        if self.max_trials is not None and self.max_trials < 0:
            raise ValueError(f"max_trials must be >= 0, got {self.max_trials}")


@dataclass
class LayerOverride:
    """Per-layer product-quantization shape: sub-space length V and centroids K (None: default)."""

    subspace_len: int | None = None
    centroids: int | None = None


@dataclass
class LearnConfig:
    """Centroid learning (LUT-NN): the replaced layers become differentiable PQ layers in a
    torch view of the model, distilled from the fp32 model on the calibration samples.

    epochs: passes over the training samples (stops earlier at `minutes`).
    minutes: wall-time budget of the training loop.
    lr: Adam learning rate of centroids and temperatures.
    batch: calibration samples per step.
    train_weights: let the replaced layers' weights train too (their tables follow);
        off by default: only centroids and temperatures move, the rest of the model is fixed.
    train_bias: learn a shift of each replaced layer's output [N] too (added to its bias in
        the compiled model); off by default.
    layer_loss: weight of the intermediate loss, the mean over replaced layers of the
        normalized MSE of each layer's output to the fp32 model's (0: model outputs only).
    checkpoint: file the training state is saved to after each epoch and resumed from.
    """

    epochs: int = 30
    minutes: float = 10.0
    lr: float = 1e-3
    batch: int = 8
    train_weights: bool = False
    train_bias: bool = False
    layer_loss: float = 0.0
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.minutes <= 0 or self.lr <= 0 or self.batch < 1 or self.layer_loss < 0:
            raise ValueError(f"learning needs epochs >= 1, minutes > 0, lr > 0, batch >= 1, layer_loss >= 0; got {self}")


@dataclass(frozen=True)
class Budget:
    """How much accuracy the layer choice may spend: metric "accuracy" (a drop of at most
    `limit` points of top-1 accuracy, or of agreement with fp32 without labels) or
    "cosine" (mean cosine similarity of the outputs to fp32 at least `limit`)."""

    metric: str
    limit: float

    def __post_init__(self) -> None:
        if self.metric not in ("accuracy", "cosine"):
            raise ValueError(f"budget metric must be accuracy or cosine, got {self.metric!r}")
        if self.metric == "cosine" and not -1.0 <= self.limit <= 1.0:
            raise ValueError(f"min cosine must be in [-1, 1], got {self.limit}")
        if self.metric == "accuracy" and not 0.0 <= self.limit <= 100.0:
            raise ValueError(f"max accuracy drop must be in [0, 100] points, got {self.limit}")


@dataclass
class LutConfig:
    """Which layers become encode + lookup-add, and how their codebooks are made.

    layers: "all" eligible layers, "last:N" (the last N in program order; LUT-NN found
        later layers lose far less accuracy), or a regular expression searched in layer names.
    centroids: K, centroids per sub-space (<= 256; 16 fits a shuffle lookup).
    linear_subspace: V for matmul/Gemm; D must be a multiple of it.
    pointwise_subspace: V for 1x1 convs (that many input channels per sub-space).
    spatial_channels: input channels per sub-space of a kh x kw conv (V = channels * kh * kw).
    overrides: layer-name regex -> LayerOverride; the first match wins.
    table_dtype: "int8" (per-output-column scale, int32 accumulation) or "float32" (debugging).
    table_fit: ridge weight of the least-squares table correction (`codebooks.fit_correction`:
        tables fitted to the layer's exact outputs on the calibration rows, shrunk toward
        centroids x weights by table_fit x C x K: more table entries, more shrinkage);
        None: tables = centroids x weights.
    max_rows: calibration rows kept per layer (4096 = 256 per centroid at K = 16, what faiss
        samples by default); memory_mb caps all layers' rows together.
    holdout: share of calibration samples kept out of k-means for the accuracy report.
    kmeans_iters: Lloyd iterations per sub-space.
    task: what the accuracy report treats the outputs as: "classification" (top-1
        agreement of logits), "embedding", or "auto" (classification when labels are given).
    kernel: lookup-add kernel of matmul layers: "shuffle" (VPSHUFB table lookups; needs
        AVX2 or AVX-512BW, K = 16 and int8 tables), "generic", or "auto" (shuffle where it
        applies and the layer has at least one shuffle's worth of rows).
    learn: centroid learning after k-means (None: k-means codebooks only).
    budget: choose, among the layers `layers` selects, the ones to replace so that the
        validation metric stays within this budget (`layer_choice`); None replaces them all.
    finer: with a budget, how many times a layer that costs too much may halve its V (a
        closer approximation with twice the codebooks, lookups and table bytes: int8 tables
        of K x D x N bytes / V) before it stays dense; 0: replaced at its V or dense.
    """

    layers: str = "all"
    centroids: int = 16
    linear_subspace: int = 4
    pointwise_subspace: int = 4
    spatial_channels: int = 1
    overrides: dict[str, LayerOverride] = field(default_factory=dict)
    table_dtype: str = "int8"
    table_fit: float | None = 0.05
    max_rows: int = 4096
    memory_mb: int = 512
    holdout: float = 0.2
    kmeans_iters: int = 50
    task: str = "auto"
    kernel: str = "auto"
    learn: LearnConfig | None = None
    budget: Budget | None = None
    finer: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.overrides = {k: v if isinstance(v, LayerOverride) else LayerOverride(**v) for k, v in self.overrides.items()}
        if isinstance(self.learn, dict):
            self.learn = LearnConfig(**self.learn)
        if isinstance(self.budget, dict):
            self.budget = Budget(**self.budget)
        if self.task not in ("auto", "classification", "embedding"):
            raise ValueError(f"task must be auto, classification or embedding, got {self.task!r}")
        if self.kernel not in ("auto", "shuffle", "generic"):
            raise ValueError(f"kernel must be auto, shuffle or generic, got {self.kernel!r}")
        if self.table_dtype not in ("int8", "float32"):
            raise ValueError(f"table_dtype must be int8 or float32, got {self.table_dtype!r}")
        for k in [self.centroids] + [o.centroids for o in self.overrides.values() if o.centroids]:
            if not 2 <= k <= 256:
                raise ValueError(f"centroids must be in [2, 256] (codes are uint8), got {k}")
        sizes = [self.linear_subspace, self.pointwise_subspace, self.spatial_channels]
        sizes += [o.subspace_len for o in self.overrides.values() if o.subspace_len is not None]
        if min(sizes) < 1:
            raise ValueError(f"sub-space sizes must be >= 1, got {sizes}")
        if self.table_fit is not None and self.table_fit <= 0:
            raise ValueError(f"table_fit must be > 0 (or None: no fit), got {self.table_fit}")
        if self.finer < 0:
            raise ValueError(f"finer must be >= 0, got {self.finer}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        check_layers(self.layers)


@dataclass
class SparseConfig:
    """Block-sparse kernels for layers whose weights are sparse (or pruned by the compiler).

    layers: "all" eligible layers, "last:N" or a regex on layer names.
    sparsity: prune each selected weight by block magnitude to this share of zero blocks
        (None: no pruning; only weights already sparse in the model are candidates).
    block: (rows along N, columns along K) of a pruning block; with no pruning the weight's
        own block structure is detected (`sparse_format.detect_block`).
    min_sparsity: weights with fewer zero blocks than this stay dense without a measurement.
    min_speedup: a layer becomes sparse only if its sparse kernel is measured at least this
        much faster than its dense one on the target (LIBXSMM's margin: 1.1); 0: every
        selected layer becomes sparse, nothing is measured (accuracy studies).
    finetune: distill the pruned layers' remaining weights from the fp32 model on the
        calibration samples (the LUT path's training loop; 20% held out for the report);
        None: magnitude pruning only. Needs `sparsity`.
    """

    layers: str = "all"
    sparsity: float | None = None
    block: tuple[int, int] = (16, 1)
    min_sparsity: float = 0.5
    min_speedup: float = 1.1
    finetune: LearnConfig | None = None

    def __post_init__(self) -> None:
        self.block = tuple(self.block)
        if isinstance(self.finetune, dict):
            self.finetune = LearnConfig(**self.finetune)
        if self.finetune is not None and self.sparsity is None:
            raise ValueError("finetune needs sparsity (fine-tuning trains pruned weights)")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if len(self.block) != 2 or min(self.block) < 1:
            raise ValueError(f"block must be two sizes >= 1, got {self.block}")
        if not 0.0 <= self.min_sparsity < 1.0:
            raise ValueError(f"min_sparsity must be in [0, 1), got {self.min_sparsity}")
        if self.min_speedup < 0:
            raise ValueError(f"min_speedup must be >= 0, got {self.min_speedup}")
        check_layers(self.layers)


@dataclass
class AutoConfig:
    """The per-layer plan (`auto`): every selected layer gets the fastest of its
    implementations, measured alone on the target with the model's tuning budget, such that
    the summed accuracy costs (each measured alone on validation samples) stay within
    `budget`; the whole plan is then checked on those samples and tightened until it fits.

    budget: max accuracy drop (points) or min cosine to the fp32 model.
    kinds: implementations besides dense fp32 (tuned): "int8" (int8 weights per output
        channel, activations min-max calibrated), "sparse" (block-sparse kernel on sparse or
        pruned weights), "lut" (encode + lookup-add, `lut` codebooks).
    prune: sparsity the "sparse" option prunes dense weights to, in `block`s (None: only
        weights that already are sparse get the option).
    lut: codebook settings of the "lut" option (its `layers` and `budget` are not used).
    layers: "all", "last:N" or a regex: the layers that get options; the rest stay dense.
    holdout: share of the calibration samples kept for the final report (never used to
        fit or choose); validation: share of the rest that measures the accuracy costs.
    """

    budget: Budget
    kinds: tuple[str, ...] = ("int8", "sparse", "lut")
    prune: float | None = None
    block: tuple[int, int] = (16, 1)
    lut: LutConfig = field(default_factory=LutConfig)
    layers: str = "all"
    holdout: float = 0.2
    validation: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.budget, dict):
            self.budget = Budget(**self.budget)
        if isinstance(self.lut, dict):
            self.lut = LutConfig(**self.lut)
        self.kinds, self.block = tuple(self.kinds), tuple(self.block)
        unknown = set(self.kinds) - {"int8", "sparse", "lut"}
        if unknown:
            raise ValueError(f"unknown implementation kind(s) {sorted(unknown)}; known: int8, sparse, lut")
        if self.prune is not None and not 0.0 < self.prune < 1.0:
            raise ValueError(f"prune must be in (0, 1), got {self.prune}")
        if not 0.0 < self.holdout < 1.0 or not 0.0 < self.validation < 1.0:
            raise ValueError("holdout and validation must be in (0, 1)")
        check_layers(self.layers)


@dataclass
class CompileConfig:
    """Everything that decides what ``lut_compiler.compile`` produces.

    input_shapes: static shape per input name, binding the model's dynamic dims.
    weight_prepack: let tuned kernels choose a weight layout, folded at compile time.
    dump_ir: directory that receives the IR after each phase (for debugging).
    lut: the lookup-add rewrite (needs calibration data); None keeps every layer dense.
    sparse: block-sparse kernels for sparse (or pruned) weights, chosen per layer by
        measurement; runs after the lookup-add rewrite, on the layers it left dense.
    auto: the per-layer plan under an accuracy budget (instead of `lut` and `sparse`).
    """

    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tune: TuneConfig = field(default_factory=TuneConfig)
    weight_prepack: bool = True
    dump_ir: str | None = None
    lut: LutConfig | None = None
    sparse: SparseConfig | None = None
    auto: AutoConfig | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.auto is not None and (self.lut is not None or self.sparse is not None):
            raise ValueError("auto chooses lookup-add and sparse layers itself: give auto, or lut/sparse, not both")

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
        if data.get("lut") is not None:
            data["lut"] = LutConfig(**data["lut"])
        if data.get("sparse") is not None:
            data["sparse"] = SparseConfig(**data["sparse"])
        if data.get("auto") is not None:
            data["auto"] = AutoConfig(**data["auto"])
        return cls(**data)


# Named tuning budgets the CLI refers to with --preset.
PRESETS: dict[str, TuneConfig] = {
    "none": TuneConfig(trials_per_task=0),
    "quick": TuneConfig(trials_per_task=8),
    "default": TuneConfig(trials_per_task=32),
    "thorough": TuneConfig(trials_per_task=64),
}

"""Which layers to replace under an accuracy budget (LUT-NN's layer choice, greedy).

The metric runs the torch view of the model (`torch_view.OnnxModule`) with the candidate
layers as PQ modules, whose forward pass is exactly what the compiled kernels compute, on
validation samples (calibration samples outside the report's held-out set):

- "accuracy": share of rows whose argmax of output 0 equals the label (top-1 agreement with
  the fp32 model when there are no labels); the budget is a drop in points (`max_drop`).
- "cosine": mean cosine similarity of output 0's rows to the fp32 model's (`min_cosine`).

Each layer comes as variants, coarse to fine (its V, then V/2, ...: `LutConfig.finer`);
past the last one it stays dense. Cost of a variant: the metric lost when only it is
replaced; its layer's sensitivity is the cost of its coarsest variant. To replace as much
compute as possible, layers are ranked by cost per FLOP (a greedy knapsack): from every layer
at its coarsest variant, each step moves the layer whose current variant costs the most per
FLOP one finer, or to dense (ties: earlier layers first, LUT-NN's preference for later ones).
The choice takes the fewest steps that fit the budget, found by bisection (the whole model is
measured: learned centroids are trained together, so costs need not add up), then tries the
layers that stepped back coarser, cheapest per FLOP first. The budget is checked against the
metric less one standard error of its per-row difference to fp32, so that a choice at the
edge of the budget on the validation rows is less likely to miss it on unseen ones. Metric
evaluations: one per variant, about log2(steps) for the bisection, one per try back, plus two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .calibration import Feeds
from .codebooks import LutLayer
from .config import Budget
from .distill import student_view
from .torch_view import OnnxModule


def within(budget: Budget, baseline: float, value: float) -> bool:
    if budget.metric == "cosine":
        return value >= budget.limit
    return (baseline - value) * 100.0 <= budget.limit + 1e-9


@dataclass
class Choice:
    """Per layer (same order as the input): sensitivity of its coarsest variant and the
    variant chosen (an index into its variants; None: dense); baseline and final metric on
    the validation samples."""

    sensitivity: list[float]
    variant: list[int | None]
    baseline: float
    final: float

    @property
    def kept(self) -> list[bool]:
        return [v is not None for v in self.variant]


class Metric:
    """The budget's metric of the model with some layers replaced, on fixed samples."""

    def __init__(self, onnx_model, samples: list[Feeds], labels: np.ndarray | None, metric: str) -> None:
        self.onnx_model, self.metric = onnx_model, metric
        self.inputs = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in s.items()} for s in samples]
        teacher = OnnxModule(onnx_model).eval()
        with torch.no_grad():
            outputs = [teacher(**x)[0] for x in self.inputs]
        self.reference = [out.reshape(len(out), -1) for out in outputs]
        if labels is not None:
            self.targets = [torch.from_numpy(np.asarray(y).reshape(-1).astype(np.int64)) for y in labels]
        else:
            self.targets = [r.argmax(-1) for r in self.reference]

    def __call__(self, layers: list[LutLayer], bound: bool = False) -> float:
        return self.score(student_view(self.onnx_model, layers) if layers else None, bound)

    def of_modules(self, modules: dict[str, torch.nn.Module], bound: bool = False) -> float:
        """The metric with each named ONNX node computed by its module (a PQ layer, a
        masked sparse layer, ...; `torch_view.OnnxModule`)."""
        return self.score(OnnxModule(self.onnx_model, modules) if modules else None, bound)

    def score(self, model: OnnxModule | None, bound: bool = False) -> float:
        """The metric of `model` (None: the fp32 model): the mean over validation rows or, with
        `bound`, that mean less one standard error of its per-row difference to fp32 (what
        the budget is checked against, so that it holds on rows the choice never saw)."""
        rows = self._rows(model)
        value = float(rows.mean())
        if bound and len(rows) > 1:
            value -= float((rows - self._rows(None)).std() / len(rows) ** 0.5)
        return value

    def _rows(self, model: OnnxModule | None) -> torch.Tensor:
        """Per validation row: cosine to fp32, or 1.0 where the argmax is the target."""
        if model is not None:
            model.eval()
        scores = []
        with torch.no_grad():
            for x, ref, target in zip(self.inputs, self.reference, self.targets):
                out = model(**x)[0].reshape(len(ref), -1) if model is not None else ref  # fp32: already run
                if self.metric == "cosine":
                    scores.append(torch.nn.functional.cosine_similarity(out, ref, dim=-1))
                else:
                    scores.append((out.argmax(-1) == target).float())
        return torch.cat(scores)


def choose_layers(metric: Metric, variants: list[list[LutLayer]], budget: Budget, flops: list[float] | None = None,
                  progress: bool = True) -> Choice:
    """A variant or dense for each layer (program order; variants coarse to fine) within
    `budget` of the fp32 metric (module docstring); flops: per layer (None: all equal)."""
    n = len(variants)
    flops = flops or [1.0] * n
    baseline = metric([])
    costs = [[baseline - metric([v]) for v in vs]
             for vs in tqdm(variants, desc="sensitivity", unit="layer", disable=not progress, leave=False)]
    steps, level = [], [0] * n  # level len(variants[i]): dense
    while live := [i for i in range(n) if level[i] < len(variants[i])]:
        i = max(live, key=lambda i: (round(costs[i][level[i]], 6) / flops[i], -i))
        level[i] += 1
        steps.append(i)

    def after(k: int) -> list[int]:
        """The levels after the first k steps."""
        return [steps[:k].count(i) for i in range(n)]

    bar = tqdm(desc="choose layers", unit="eval", disable=not progress, leave=False)

    def fits(at: list[int]) -> bool:
        bar.update()
        return within(budget, baseline, metric([v[a] for v, a in zip(variants, at) if a < len(v)], bound=True))

    # the fewest steps that fit: none, or by bisection (every layer dense fits: the fp32 model)
    low, high = 0, 0 if fits(after(0)) else len(steps)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(after(mid)) else (mid, high)
    level = after(high)
    # the last step made the rest fit: try the others back coarser, cheapest per FLOP first
    for i in sorted(set(steps[:high]) - set(steps[high - 1:high]), key=lambda i: (round(costs[i][0], 6) / flops[i], -i)):
        while level[i] > 0:
            level[i] -= 1
            if not fits(level):
                level[i] += 1
                break
    bar.close()
    chosen = [at if at < len(v) else None for v, at in zip(variants, level)]
    final = metric([v[at] for v, at in zip(variants, chosen) if at is not None])
    return Choice([c[0] for c in costs], chosen, baseline, final)

"""The per-layer plan: for every layer one implementation, total latency minimal, the summed
accuracy cost within a budget (a multiple-choice knapsack, solved exactly on a cost grid).

Costs are what the caller measured: each option's latency on the target (ms) and its
accuracy cost (the metric lost when only this layer uses it, >= 0; summing them is the
planner's model of the whole network, which the caller then checks on held-out data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    """One implementation of a layer: `kind` ("dense", "int8", "sparse", "lut"), its
    latency (ms) and accuracy cost (metric points lost; 0 for the exact dense one; a
    negative measured cost counts as 0)."""

    kind: str
    ms: float
    cost: float = 0.0


def plan(layers: dict[str, list[Option]], budget: float, steps: int = 1000) -> dict[str, Option]:
    """The option per layer minimising the summed ms with summed cost <= `budget`.

    Costs are rounded up to multiples of budget / `steps` (so the plan never exceeds the
    budget; it is optimal among plans whose rounded costs fit). Every layer needs an option
    of cost 0 (its exact implementation), so a plan always exists."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    def units(cost: float) -> int:  # grid units a cost takes; > steps: never fits
        if cost <= 0:
            return 0
        return math.ceil(cost / (budget / steps) - 1e-9) if budget > 0 else steps + 1

    names = list(layers)
    # best[b]: least ms of the layers so far within b units; pick[i][b]: layer i's option there
    best = np.zeros(steps + 1)
    picks = []
    for name in names:
        options = layers[name]
        if not any(o.cost == 0 for o in options):
            raise ValueError(f"layer {name} has no exact option (cost 0)")
        grid = np.full(steps + 1, math.inf)
        pick = np.full(steps + 1, -1)
        for k, option in enumerate(options):
            used = units(option.cost)
            if used > steps:
                continue
            total = np.full(steps + 1, math.inf)
            total[used:] = best[: steps + 1 - used] + option.ms
            better = total < grid
            grid[better], pick[better] = total[better], k
        best = grid
        picks.append(pick)
    chosen, b = {}, steps
    for name, pick in zip(reversed(names), reversed(picks)):
        option = layers[name][pick[b]]
        chosen[name] = option
        b -= units(option.cost)
    return {name: chosen[name] for name in names}

"""The layer planner against exhaustive search on toy cost tables."""

import itertools

import numpy as np
import pytest

from lut_compiler.planner import Option, plan

KINDS = ("dense", "int8", "sparse", "lut")


def _brute_force(layers: dict[str, list[Option]], budget: float) -> float:
    best = np.inf
    for combo in itertools.product(*layers.values()):
        if sum(o.cost for o in combo) <= budget + 1e-9:
            best = min(best, sum(o.ms for o in combo))
    return best


def _table(rng, n_layers: int, grid: float) -> dict[str, list[Option]]:
    layers = {}
    for i in range(n_layers):
        dense = float(rng.uniform(1, 10))
        options = [Option("dense", dense)]
        for kind in KINDS[1:]:
            if rng.random() < 0.8:  # not every kind fits every layer
                options.append(Option(kind, dense * float(rng.uniform(0.1, 1.2)), grid * int(rng.integers(0, 40))))
        layers[f"layer{i}"] = options
    return layers


@pytest.mark.parametrize("seed", range(8))
def test_plan_is_the_exhaustive_optimum(seed):
    rng = np.random.default_rng(seed)
    budget = 1.0
    layers = _table(rng, int(rng.integers(1, 7)), budget / 100)  # costs on the planner's grid
    chosen = plan(layers, budget, steps=100)
    assert list(chosen) == list(layers)
    assert all(chosen[name] in layers[name] for name in layers)
    assert sum(o.cost for o in chosen.values()) <= budget + 1e-9
    assert sum(o.ms for o in chosen.values()) == pytest.approx(_brute_force(layers, budget))


def test_known_optimum_trades_the_budget_where_it_buys_most():
    layers = {
        "qkv": [Option("dense", 4.0), Option("lut", 1.0, 0.6), Option("sparse", 2.0, 0.3)],
        "ffn1": [Option("dense", 8.0), Option("lut", 2.0, 0.5), Option("int8", 4.0, 0.1)],
        "ffn2": [Option("dense", 8.0), Option("lut", 2.5, 0.5), Option("int8", 4.0, 0.1)],
        "head": [Option("dense", 0.5), Option("lut", 0.1, 0.9)],
    }
    # 1.0 point: sparse qkv + lut ffn1 + int8 ffn2 saves 12 ms for 0.9; the greedy-looking
    # lut on both ffn saves 11.5 for 1.0, lut qkv + int8 on both ffn 11 for 0.8
    kinds = {name: o.kind for name, o in plan(layers, 1.0).items()}
    assert kinds == {"qkv": "sparse", "ffn1": "lut", "ffn2": "int8", "head": "dense"}
    assert {o.kind for o in plan(layers, 0.0).values()} == {"dense"}
    everything = plan(layers, 10.0)
    assert sum(o.ms for o in everything.values()) == pytest.approx(1.0 + 2.0 + 2.5 + 0.1)


def test_slower_lossy_options_are_never_chosen_and_inexact_tables_are_refused():
    layers = {"a": [Option("dense", 1.0), Option("lut", 2.0, 0.0)]}
    assert plan(layers, 5.0)["a"].kind == "dense"
    with pytest.raises(ValueError, match="no exact option"):
        plan({"a": [Option("lut", 1.0, 0.2)]}, 1.0)
    with pytest.raises(ValueError, match="budget"):
        plan(layers, -1.0)

"""Which matmul/conv2d layers can become encode + lookup-add, with which V, C and K.

Runs on the imported module (``find_candidates``), before calibration. Every layer gets
a plan: replaced, or kept dense with the reason (not eligible, or not selected).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..config import LutConfig
from . import lut_conv2d, lut_matmul
from .find_candidates import Candidate, select

# op -> the rewrite rule that knows its eligibility, sub-spaces and replacement.
RULES = {"matmul": lut_matmul, "conv2d": lut_conv2d}


@dataclass
class LayerPlan:
    """One candidate's product-quantization shape and fate.

    subspace_len V and codebooks C (D = C x V) are 0 when not eligible; reason says why a
    layer stays dense (None when it is replaced). lanes: rows per shuffle of the VPSHUFB
    lookup-add (32 AVX2, 64 AVX-512BW), None for the generic kernel (set per target).
    """

    candidate: Candidate
    subspace_len: int
    codebooks: int
    centroids: int
    reason: str | None
    lanes: int | None = None

    @property
    def replaced(self) -> bool:
        return self.reason is None

    @property
    def rule(self):
        return RULES[self.candidate.op]


def _override(name: str, cfg: LutConfig):
    return next((o for pattern, o in cfg.overrides.items() if re.search(pattern, name)), None)


def _eligibility(c: Candidate, cfg: LutConfig) -> tuple[str | None, int, int]:
    """(reason or None, V, K) for one candidate."""
    override = _override(c.name, cfg)
    k = (override.centroids if override and override.centroids else None) or cfg.centroids
    if not c.static:
        return "dynamic shape (bind it with --input-shape)", 0, k
    if c.dtype != "float32":
        return f"dtype {c.dtype} (float32 only)", 0, k
    if not c.const_weight:
        what = "activation x activation matmul, e.g. attention" if c.op == "matmul" else "weight is computed"
        return f"weight is not a constant ({what})", 0, k
    rule = RULES[c.op]
    v = (override.subspace_len if override and override.subspace_len else None) or rule.default_subspace_len(c, cfg)
    return rule.check(c, v), v, k


def plan_layers(candidates: list[Candidate], cfg: LutConfig) -> list[LayerPlan]:
    """A plan per candidate, in program order; ``cfg.layers`` picks among the eligible ones."""
    checked = [(c, *_eligibility(c, cfg)) for c in candidates]
    eligible = [c for c, reason, _, _ in checked if reason is None]
    chosen = select(eligible, cfg.layers)
    plans = []
    for c, reason, v, k in checked:
        codebooks = RULES[c.op].codebooks(c, v) if reason is None else 0
        if reason is None and c.var not in chosen:
            reason = f"not selected (layers={cfg.layers})"
        plans.append(LayerPlan(c, v if codebooks else 0, codebooks, k, reason))
    return plans


def halved(plan: LayerPlan) -> LayerPlan | None:
    """The same replaced layer with V/2 (twice the codebooks), or None when V is odd or the
    layer's rule refuses V/2."""
    v = plan.subspace_len // 2
    if plan.subspace_len % 2 or plan.rule.check(plan.candidate, v) is not None:
        return None
    return replace(plan, subspace_len=v, codebooks=plan.rule.codebooks(plan.candidate, v))


def table(plans: list[LayerPlan]) -> str:
    """One row per matmul/conv2d: shapes, FLOPs, V and C, and LUT or the reason it stays dense."""
    def fmt(shape):
        return "x".join(map(str, shape)) or "?"

    width = max([len(p.candidate.name) for p in plans] + [5])
    rows = [f"{'layer':<{width}} {'op':<7} {'input':<14} {'weight':<14} {'output':<14} {'MFLOP':>8} {'V':>3} {'C':>4}  decision"]
    for p in plans:
        c = p.candidate
        v, cb = (str(p.subspace_len), str(p.codebooks)) if p.codebooks else ("-", "-")
        rows.append(
            f"{c.name:<{width}} {c.op:<7} {fmt(c.input_shape):<14} {fmt(c.weight_shape):<14} {fmt(c.output_shape):<14} "
            f"{c.flops / 1e6:>8.2f} {v:>3} {cb:>4}  {'lookup-add' if p.replaced else 'dense: ' + p.reason}"
        )
    total = sum(p.candidate.flops for p in plans)
    replaced = sum(p.candidate.flops for p in plans if p.replaced)
    rows.append(f"{len(plans)} matmul/conv layers, {total / 1e6:.1f} MFLOP; "
                f"{sum(p.replaced for p in plans)} replaced by lookup-add ({replaced / max(total, 1):.0%} of FLOPs)")
    return "\n".join(rows)

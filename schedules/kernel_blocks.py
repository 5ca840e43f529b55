"""What the hand-scheduled kernels (custom schedule rules) share: finding their main block,
checking knobs against their legal values."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from tvm import s_tir
from tvm.s_tir.schedule import SBlockRV


def unscheduled_block(sch: s_tir.Schedule, rule: str, scheduled_marker: str) -> SBlockRV | None:
    """The root's child block annotated ``schedule_rule = rule``; None when there is none, or
    when the root carries `scheduled_marker` (the kernel was scheduled already)."""
    try:
        root = sch.get_sblock("root")
    except (RuntimeError, ValueError):  # no root block
        return None
    if scheduled_marker in sch.get(root).annotations:
        return None
    return next((b for b in sch.get_child_blocks(root) if sch.get(b).annotations.get("schedule_rule") == rule), None)


def first_illegal(knobs: object, allowed: Mapping[str, Collection]) -> str | None:
    """Why `knobs` are illegal: the first knob (attribute) whose value is not among its
    `allowed` values; None if all are."""
    for name, values in allowed.items():
        if getattr(knobs, name) not in values:
            return f"{name}={getattr(knobs, name)!r} not in {list(values)}"
    return None

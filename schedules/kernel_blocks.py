"""Finding a hand-scheduled kernel's main block: shared by the kernels with custom schedule rules."""

from __future__ import annotations

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

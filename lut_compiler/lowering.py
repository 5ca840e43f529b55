"""Relax -> scheduled TIR: the two halves of the pipeline around tuning (shared by ``compile`` and
the per-layer measurements of the sparse phase)."""

from __future__ import annotations

import tvm
from tvm import relax

from .schedules.default_cpu import default_schedule_pass
from .tuning import apply_database

FIXED_LAYOUT = "lutc.fixed_layout"  # PrimFunc attribute: keep the weight layout of this kernel


def legalize(mod: tvm.IRModule, target: tvm.target.Target, weight_prepack: bool) -> tvm.IRModule:
    """Relax ops -> fused TIR kernels (the stock tuning flow's front half)."""
    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    if weight_prepack:  # tuned kernels may then pick a weight layout
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
    return _keep_fixed_layouts(mod) if weight_prepack else mod


def _keep_fixed_layouts(mod: tvm.IRModule) -> tvm.IRModule:
    """FIXED_LAYOUT kernels without "layout_free_buffers": a tuned layout rewrite of the sparse
    kernels' block values moves their reads before the pattern tables' DeclBuffers, which
    then fails to build ("Buffer indptr_t is used before its definition")."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs and FIXED_LAYOUT in func.attrs:
            mod[gv] = func.without_attr("layout_free_buffers")
    return mod


def schedule(mod: tvm.IRModule, target: tvm.target.Target, work_dir: str, weight_prepack: bool) -> tvm.IRModule:
    """Tuned schedules from the database, constant weight layouts folded, defaults for the rest."""
    mod = apply_database(mod, target, work_dir)
    with target:
        if weight_prepack:
            mod, fixed = _hide_fixed_layout(mod)
            mod = tvm.transform.Sequential([
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.LiftTransformParams(),
                relax.transform.FoldConstant(),
            ])(mod)
            for gv, func in fixed.items():
                mod[gv] = func
        return default_schedule_pass(target)(mod)


def _hide_fixed_layout(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict]:
    """(``mod`` with each FIXED_LAYOUT kernel replaced by a copy without the statements before
    its first block, the originals by GlobalVar). SplitLayoutRewritePreproc visits every
    PrimFunc and fails on a root block whose body starts with the sparse kernels' pattern
    tables (DeclBuffer); their weights keep their layout anyway."""
    fixed = {}
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs and FIXED_LAYOUT in func.attrs:
            fixed[gv] = func
            realize = func.body
            root = realize.block
            body = root.body
            if isinstance(body, tvm.tirx.SeqStmt):
                stmts = [st for st in body.seq if not isinstance(st, tvm.tirx.DeclBuffer)]
                body = stmts[0] if len(stmts) == 1 else tvm.tirx.SeqStmt(stmts)
            root = tvm.s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, body, root.init,
                                    root.alloc_buffers, root.match_buffers, root.annotations)
            mod[gv] = func.with_body(tvm.s_tir.SBlockRealize(realize.iter_values, realize.predicate, root))
    return mod, fixed

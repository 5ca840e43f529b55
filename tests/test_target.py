"""Target detection and construction; generated code uses the CPU's widest vectors."""

import numpy as np
import pytest
import tvm
from tvm import relax

from lut_compiler.errors import TargetError
from lut_compiler.lowering import legalize
from lut_compiler.schedules.default_cpu import default_schedule_pass
from lut_compiler.target import detect_host, resolve_target


def test_host_detection():
    host = detect_host()
    assert host.mcpu == tvm.target.codegen.llvm_get_system_cpu()
    assert host.mtriple.startswith(("x86_64", "aarch64"))
    assert host.cores >= 1
    flags = open("/proc/cpuinfo").read()
    for feature, flag in [("avx2", " avx2"), ("avx512f", " avx512f"), ("avx512vnni", " avx512_vnni")]:
        assert (feature in host.features) == (flag in flags)


def test_host_target_is_explicit():
    target = resolve_target("host")
    assert str(target.attrs["mcpu"]) == detect_host().mcpu != "generic"
    assert str(target.attrs["mtriple"]) == detect_host().mtriple
    assert int(target.attrs["num-cores"]) == detect_host().cores


@pytest.mark.parametrize("spec", ["znver4", {"kind": "llvm", "mcpu": "znver4", "num-cores": 4},
                                  '{"kind": "llvm", "mcpu": "znver4", "mtriple": "x86_64-linux-gnu"}'])
def test_explicit_targets(spec):
    target = resolve_target(spec)
    assert str(target.attrs["mcpu"]) == "znver4"
    assert str(target.attrs["mtriple"]) == "x86_64-linux-gnu"


def test_native_becomes_the_detected_cpu():
    assert str(resolve_target({"mcpu": "native"}).attrs["mcpu"]) == detect_host().mcpu


@pytest.mark.parametrize("spec,message", [("notacpu", "unknown CPU"), ("{oops", "not valid JSON"),
                                          ({"kind": "cuda"}, "only CPU")])
def test_bad_targets(spec, message):
    with pytest.raises(TargetError, match=message):
        resolve_target(spec)


def matmul_asm(target) -> str:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64, 256), "float32"))
    w = relax.const(np.random.default_rng(0).standard_normal((256, 256)).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(out)
    mod = legalize(bb.get(), target, weight_prepack=False)
    with target:
        mod = default_schedule_pass(target)(mod)
    return "\n".join(m.inspect_source("asm") for m in tvm.compile(mod, target).mod.imports)


def test_avx512_target_emits_zmm():
    """Cross-compiling for Zen 4 uses 512-bit registers whatever the host is."""
    asm = matmul_asm(resolve_target("znver4"))
    assert "zmm" in asm and "vfmadd" in asm


def test_host_uses_its_widest_vectors():
    host = detect_host()
    asm = matmul_asm(resolve_target("host"))
    if "avx512f" in host.features:
        assert "zmm" in asm
    elif "avx2" in host.features:
        assert "ymm" in asm and "zmm" not in asm
    else:
        pytest.skip("host has neither AVX2 nor AVX-512")


def test_generic_x86_target_has_no_wide_vectors():
    """The reason targets name a CPU: x86-64 baseline means SSE only."""
    asm = matmul_asm(resolve_target("x86-64"))
    assert "ymm" not in asm and "zmm" not in asm

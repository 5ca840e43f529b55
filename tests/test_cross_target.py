"""Cross-compiling for a named aarch64 target on this machine: the target takes nothing from
the host, the kernels take their generic (non-x86) paths and build for aarch64, and the
artifact is exported as model.tar of aarch64 objects without a cross compiler (model.so
with one), which this machine refuses to run with one `error:` line."""

import json
import os
import platform
import shutil
import struct
import tarfile

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm.support.tar import tar

from lut_compiler.artifact import load
from lut_compiler.cli import main
from lut_compiler.errors import TargetError
from lut_compiler.schedules.default_cpu import CpuKnobs, cpu_knobs, default_schedule
from lut_compiler.schedules.int8_matmul import int8_isa, int8_matmul
from lut_compiler.schedules.lut_encode_linear import encode_linear
from lut_compiler.schedules.lut_lookup_linear import lookup_add_linear
from lut_compiler.schedules.lut_lookup_shuffle import shuffle_lanes
from lut_compiler.target import FOREIGN_CORES, resolve_target

TRIPLE = "aarch64-linux-gnu"
ARM = {"kind": "llvm", "mtriple": TRIPLE, "mcpu": "cortex-a72"}
EM_AARCH64 = 183  # ELF e_machine
CROSS_COMPILER = shutil.which(f"{TRIPLE}-g++") or shutil.which(f"{TRIPLE}-gcc")


def elf_machine(data: bytes) -> int:
    """e_machine of a little-endian ELF file's header."""
    assert data[:4] == b"\x7fELF", data[:4]
    return struct.unpack_from("<H", data, 18)[0]


def tar_machines(path) -> dict[str, int]:
    """Member name -> ELF machine of every object file in a tar archive."""
    with tarfile.open(path) as archive:
        return {m.name: elf_machine(archive.extractfile(m).read(20)) for m in archive.getmembers()}


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    """x [4, 32] -> MatMul -> Relu -> MatMul -> y [4, 8]."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), f"W{i}")
               for i, s in enumerate([(32, 16), (16, 8)])]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W1"], ["y"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], weights)
    path = tmp_path_factory.mktemp("two") / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_foreign_target_takes_nothing_from_the_host():
    target = resolve_target(json.dumps(ARM))
    assert (str(target.attrs["mtriple"]), str(target.attrs["mcpu"])) == (TRIPLE, "cortex-a72")
    assert int(target.attrs["num-cores"]) == FOREIGN_CORES and "mattr" not in target.attrs
    assert "arm_cpu" in target.keys
    bare = resolve_target({"mtriple": TRIPLE, "num-cores": 8})
    assert (str(bare.attrs["mcpu"]), int(bare.attrs["num-cores"])) == ("generic", 8)
    with pytest.raises(TargetError, match="names this machine's CPU"):
        resolve_target({"mtriple": TRIPLE, "mcpu": "native"})
    with pytest.raises(TargetError, match="unknown CPU 'znver4' for aarch64"):
        resolve_target({"mtriple": TRIPLE, "mcpu": "znver4"})


def test_kernels_take_their_generic_paths_and_build_for_aarch64(tmp_path):
    target = resolve_target(ARM)
    assert cpu_knobs(target) == CpuKnobs(128, 16, FOREIGN_CORES)
    assert int8_isa(target) == "generic" and shuffle_lanes(target) is None
    funcs = {"int8": int8_matmul(8, 64, 32, "generic"), "encode": encode_linear(8, 64, 16, 16),
             "lookup": lookup_add_linear(8, 16, 16, 32, "int8")}
    mod = tvm.IRModule({name: default_schedule(f, target).mod["main"].with_attr("global_symbol", name)
                        for name, f in funcs.items()})
    tvm.compile(mod, target).export_library(str(tmp_path / "kernels.tar"), fcompile=tar)
    assert set(tar_machines(tmp_path / "kernels.tar").values()) == {EM_AARCH64}


def _compile(model, out, capfd):
    code = main(["compile", str(model), "-o", str(out), "--target", json.dumps(ARM), "-q"])
    out_text, err = capfd.readouterr()
    assert code == 0, err
    return out_text


def test_without_cross_compiler_exports_objects_for_the_target(two_layers, tmp_path, capfd, monkeypatch):
    tools = tmp_path / "bin"  # what export needs on PATH, and no cross compiler
    tools.mkdir()
    for tool in ("tar", "gzip"):
        os.symlink(shutil.which(tool), tools / tool)
    monkeypatch.setenv("PATH", str(tools))
    out = tmp_path / "arm"
    out.mkdir()
    (out / "model.so").write_bytes(b"an earlier export's library")
    printed = _compile(two_layers, out, capfd)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["library"] == "model.tar"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.tar"]  # the stale model.so is gone
    machines = tar_machines(out / "model.tar")
    assert machines and set(machines.values()) == {EM_AARCH64}, machines
    assert manifest["target"]["mtriple"] == TRIPLE and manifest["num_threads"] == FOREIGN_CORES
    assert f"wrote {out / 'model.tar'}" in printed
    assert [line for line in printed.splitlines() if line.startswith("note:")] == [
        f"note: model.tar holds {TRIPLE} object files and no linked library: tvm.runtime.load_module links it on "
        "the target (with its C++ compiler)"]

    model = load(out)  # the manifest's sha256 matches the archive
    np.savez(tmp_path / "feeds.npz", x=np.zeros((4, 32), np.float32))
    code = main(["run", str(out), "--inputs", str(tmp_path / "feeds.npz"), "--output", str(tmp_path / "y.npz")])
    _, err = capfd.readouterr()
    assert code == 3 and err.splitlines() == [
        f"error: this model is compiled for {TRIPLE}: run it there, not on this {platform.machine()} machine"]
    assert model.library_name() == "model.tar"


@pytest.mark.skipif(CROSS_COMPILER is None, reason=f"no {TRIPLE}-g++ or -gcc on PATH")
def test_cross_compiler_links_a_shared_library(two_layers, tmp_path, capfd):
    out = tmp_path / "arm"
    _compile(two_layers, out, capfd)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["library"] == "model.so" and not (out / "model.tar").exists()
    header = (out / "model.so").read_bytes()[:20]
    assert elf_machine(header) == EM_AARCH64 and struct.unpack_from("<H", header, 16)[0] == 3  # ET_DYN


def test_tuning_a_foreign_target_needs_rpc_servers(two_layers, tmp_path, capfd):
    code = main(["tune", str(two_layers), "--target", json.dumps(ARM), "--trials", "2", "--work-dir",
                 str(tmp_path / "db"), "-q"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and err[0].startswith(f"error: tuning for {TRIPLE} measures on such a machine")

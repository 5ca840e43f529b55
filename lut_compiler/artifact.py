"""The compiled model: run it, export it as ``model.so`` + ``manifest.json``, load it back.

The exported library needs only ``tvm`` to run::

    lib = tvm.runtime.load_module("out/model.so")
    vm = tvm.relax.VirtualMachine(lib, tvm.cpu())
    outputs = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])

A model cross-compiled for another architecture is linked by ``{triple}-g++`` (or -gcc) if
one is on PATH; without one it is exported as ``model.tar`` (its object files), which
``tvm.runtime.load_module`` links on the target with the compiler there. The manifest's
``"library"`` names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm.support.cc import cross_compiler
from tvm.support.tar import tar

from .errors import LutcError, OutputError
from .feeds import check_feeds
from .target import runs_here
from .tensor_spec import TensorSpec

FORMAT = "lutc-artifact/1"
LIBRARY = "model.so"
OBJECTS = "model.tar"  # a foreign target's object files, linked where it runs
MANIFEST = "manifest.json"


@contextmanager
def quiet_native_stderr():
    """Hide TVM's C++ log lines (a "Scope Saving/Loaded" warning per kernel) around a call.

    What was written is replayed if the call fails, so no error text is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_writer(mtriple: str | None) -> tuple[str, Callable | None]:
    """File name and ``export_library`` fcompile for code of `mtriple`: model.so linked by
    this machine's compiler (None: here or unknown), by ``{mtriple}-g++``/``-gcc`` from PATH
    (another architecture), or else model.tar of object files that the target links."""
    if mtriple is None or runs_here(mtriple):
        return LIBRARY, None
    compiler = shutil.which(f"{mtriple}-g++") or shutil.which(f"{mtriple}-gcc")
    if compiler is not None:
        return LIBRARY, cross_compiler(compiler)
    return OBJECTS, tar


def versions() -> dict[str, str]:
    """Versions of what produced an artifact."""
    found = {"python": platform.python_version()}
    for dist in ("lut-compiler", "apache-tvm", "apache-tvm-ffi", "onnx", "onnxruntime", "onnxslim", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


class CompiledModel:
    """A Relax VM executable with its input/output specs and compile record.

    record: JSON-able facts about how it was made (target, config, tuning, phases).
    """

    def __init__(self, executable, inputs: list[TensorSpec], outputs: list[TensorSpec], record: dict,
                 library: Path | None = None) -> None:
        self._executable = executable
        self._library = library  # loaded on first use when executable is None
        self.inputs = inputs
        self.outputs = outputs
        self.record = record
        self._vm = None

    @property
    def mtriple(self) -> str | None:
        return self.record.get("target", {}).get("mtriple")

    def _check_runs_here(self) -> None:
        """A one-line error for a model of another architecture (TVM's is an internal error)."""
        if self.mtriple is not None and not runs_here(self.mtriple):
            raise LutcError(f"this model is compiled for {self.mtriple}: run it there, not on this "
                            f"{platform.machine()} machine")

    def library_name(self) -> str:
        """The file `export` writes the code into (`library_writer`)."""
        return library_writer(self.mtriple)[0]

    @property
    def executable(self):
        if self._executable is None:
            self._check_runs_here()
            with quiet_native_stderr():
                self._executable = tvm.runtime.load_module(str(self._library))
        return self._executable

    @property
    def vm(self) -> relax.VirtualMachine:
        if self._vm is None:
            self._check_runs_here()
            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
        return self._vm

    def _args(self, feeds: Mapping[str, np.ndarray]) -> list:
        return [tvm.runtime.tensor(a) for a in check_feeds(self.inputs, feeds)]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once: feeds map input names to arrays of the exact shape and dtype."""
        result = self.vm["main"](*self._args(feeds))
        values = [result] if len(self.outputs) == 1 else list(result)
        return {spec.name: v.numpy() for spec, v in zip(self.outputs, values)}

    def time(self, feeds: Mapping[str, np.ndarray], number: int = 10, repeat: int = 5) -> list[float]:
        """Seconds per run, one value per repeat (each the mean of ``number`` runs)."""
        timer = self.vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)
        return list(timer(*self._args(feeds)).results)

    def manifest(self) -> dict:
        return {
            "format": FORMAT,
            "library": self.library_name(),
            "entry": "main",
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "num_threads": self.record.get("target", {}).get("num-cores"),
            **self.record,
            "versions": versions(),
        }

    def export(self, out_dir: str | os.PathLike) -> Path:
        """Write the library (``model.so``, or ``model.tar`` for a foreign target without a
        cross compiler: `library_writer`) and ``manifest.json`` into out_dir, all or nothing:
        both are written to a staging dir beside it and renamed into place; the manifest
        names the library and its sha256, so `load` refuses a library that is not the one it
        describes. The other kind of library left by an earlier export is removed."""
        out = Path(out_dir)
        library, fcompile = library_writer(self.mtriple)
        staging = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            with quiet_native_stderr():
                self.executable.export_library(str(staging / library), fcompile=fcompile)
            manifest = {**self.manifest(), "library_sha256": file_sha256(staging / library)}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if out.exists():
                for name in (library, MANIFEST):
                    os.replace(staging / name, out / name)
                for stale in {LIBRARY, OBJECTS} - {library}:
                    (out / stale).unlink(missing_ok=True)
            else:
                os.replace(staging, out)
        except OSError as err:
            raise OutputError(f"cannot write {out}: {err.strerror or err}") from None
        except RuntimeError as err:  # the linker writing model.so reports file-system errors as text
            reason = re.search(r"(No space left on device|Read-only file system|Permission denied|Disk quota exceeded)",
                               str(err))
            if reason is None:
                raise
            raise OutputError(f"cannot write {out}: {reason.group(1)}") from None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return out


def load(out_dir: str | os.PathLike) -> CompiledModel:
    """Load an exported artifact (``lutc run`` uses this; deployments may use plain TVM)."""
    out = Path(out_dir)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        raise LutcError(f"{out} is not a compiled model: {MANIFEST} not found") from None
    except json.JSONDecodeError as err:
        raise LutcError(f"{out / MANIFEST} is not valid JSON: {err}") from None
    if manifest.get("format") != FORMAT:
        raise LutcError(f"{out / MANIFEST}: unknown artifact format {manifest.get('format')!r}")
    library = out / manifest["library"]
    if not library.is_file():
        raise LutcError(f"{library} not found")
    if manifest.get("library_sha256") not in (None, file_sha256(library)):
        raise LutcError(f"{library} is not the library {out / MANIFEST} describes (sha256 differs)")
    record = {k: v for k, v in manifest.items()
              if k not in ("format", "library", "library_sha256", "entry", "inputs", "outputs", "versions")}
    return CompiledModel(
        None,
        [TensorSpec.from_json(s) for s in manifest["inputs"]],
        [TensorSpec.from_json(s) for s in manifest["outputs"]],
        record,
        library=library,
    )

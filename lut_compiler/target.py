"""CPU detection and TVM target construction.

TVM 0.27 wants dict targets: ``mcpu=native`` is rejected by its LLVM and a bare
``{"kind": "llvm"}`` emits SSE only, so the host CPU is named explicitly.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass

import tvm

from .errors import TargetError

# ISA features worth knowing for our kernels, by LLVM feature name.
FEATURES = (
    "sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
    "avx512vbmi", "avx512vnni", "avxvnni", "neon", "dotprod", "i8mm", "sve",
)

_TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
# num-cores of a cross-compilation target that names none: a Raspberry Pi 4/5 class board.
FOREIGN_CORES = 4


@dataclass(frozen=True)
class CpuInfo:
    """What the compiler knows about a CPU."""

    vendor: str
    model: str
    mcpu: str
    mtriple: str
    cores: int
    features: tuple[str, ...]
    mattr: tuple[str, ...] = ()

    def has(self, feature: str) -> bool:
        return feature in self.features

    def to_json(self) -> dict:
        return {
            "vendor": self.vendor, "model": self.model, "mcpu": self.mcpu,
            "mtriple": self.mtriple, "cores": self.cores, "features": list(self.features), "mattr": list(self.mattr),
        }


def host_cores() -> int:
    """CPUs this process may run on (the affinity mask, not the machine total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return "unknown"


def _llvm_features(target: tvm.target.Target) -> tuple[str, ...]:
    have = set(tvm.target.codegen.llvm_get_cpu_features(target))
    return tuple(f for f in FEATURES if f in have)


def _os_flags() -> set[str] | None:
    """ISA flags the kernel reports, spelled as LLVM features (None if unknown)."""
    flags = _cpuinfo_field("flags")
    if flags == "unknown":
        return None
    spelled = {"sse4_2": "sse4.2", "avx512_vbmi": "avx512vbmi", "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni"}
    return {spelled.get(f, f) for f in flags.split()}


def detect_host() -> CpuInfo:
    """Describe the CPU we run on: LLVM's name for it, minus features the OS hides.

    A VM may report a CPU model whose features the hypervisor masks; code for the
    plain ``mcpu`` would then die with SIGILL, so those features are disabled.
    """
    machine = platform.machine()
    mtriple = _TRIPLES.get(machine)
    if mtriple is None:
        raise TargetError(f"unsupported host architecture {machine!r}")
    mcpu = tvm.target.codegen.llvm_get_system_cpu()
    features = _llvm_features(tvm.target.Target({"kind": "llvm", "mtriple": mtriple, "mcpu": mcpu}))
    flags = _os_flags() if machine == "x86_64" else None
    hidden = tuple(f for f in features if flags is not None and f not in flags)
    return CpuInfo(
        vendor=_cpuinfo_field("vendor_id"),
        model=_cpuinfo_field("model name"),
        mcpu=mcpu,
        mtriple=mtriple,
        cores=host_cores(),
        features=tuple(f for f in features if f not in hidden),
        mattr=tuple(f"-{f}" for f in hidden),
    )


def describe(target: tvm.target.Target) -> CpuInfo:
    """CpuInfo of an llvm target, with the features its mcpu implies."""
    attrs = target.attrs
    return CpuInfo(
        vendor="",
        model="",
        mcpu=str(attrs.get("mcpu", "generic")),
        mtriple=str(attrs.get("mtriple", "")),
        cores=int(attrs.get("num-cores", 1)),
        features=_llvm_features(target),
    )


def runs_here(mtriple: str) -> bool:
    """Whether code for `mtriple` runs on this machine (same architecture)."""
    return mtriple.split("-")[0] == platform.machine()


def resolve_target(spec: str | dict | tvm.target.Target = "host") -> tvm.target.Target:
    """Turn ``"host"``, a CPU name (``"znver4"``), a JSON string or a dict into a Target.

    For this machine's architecture, missing ``mtriple``/``num-cores`` are filled from the
    host and ``mcpu="native"`` is replaced by the detected CPU name (TVM's LLVM would
    silently emit generic code). An ``mtriple`` of another architecture takes nothing from
    the host: see `_foreign_defaults`.
    """
    if isinstance(spec, tvm.target.Target):
        spec = dict(spec.export())
    elif isinstance(spec, str):
        spec = spec.strip()
        if spec.startswith("{"):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as err:
                raise TargetError(f"target is not valid JSON: {err}") from None
        elif spec in ("host", "native"):
            spec = {}
        else:
            spec = {"mcpu": spec}
    if not isinstance(spec, dict):
        raise TargetError(f"target must be 'host', a CPU name, JSON or a dict, got {type(spec).__name__}")
    spec = {k: v for k, v in spec.items() if v is not None}
    if spec.setdefault("kind", "llvm") != "llvm":
        raise TargetError(f"only CPU (llvm) targets are supported, got kind {spec['kind']!r}")
    if "mtriple" in spec and not runs_here(str(spec["mtriple"])):
        _foreign_defaults(spec)
    else:
        _host_defaults(spec)
    # LLVM accepts unknown CPU names and silently falls back to generic code.
    if not tvm.target.codegen.llvm_is_valid_cpu(str(spec["mcpu"]), str(spec["mtriple"])):
        raise TargetError(
            f"unknown CPU {spec['mcpu']!r} for {spec['mtriple']} (e.g. host, znver4, skylake-avx512, x86-64-v3; "
            f"another architecture needs its mtriple)"
        )
    try:
        target = tvm.target.Target(spec)
    except Exception as err:  # TVM reports bad keys/values as generic errors
        raise TargetError(f"invalid target {json.dumps(spec)}: {str(err).splitlines()[0]}") from None
    return target


def _host_defaults(spec: dict) -> None:
    """Fill a target of this machine's architecture: the detected CPU for a missing or
    "native" mcpu (minus the features the OS hides), the host's triple and core count."""
    if spec.get("mcpu", "native") == "native" or "mtriple" not in spec:
        host = detect_host()
        if spec.get("mcpu", "native") == "native":
            spec["mcpu"] = host.mcpu
            if host.mattr:
                spec.setdefault("mattr", list(host.mattr))
        spec.setdefault("mtriple", host.mtriple)
    spec.setdefault("num-cores", host_cores())


def _foreign_defaults(spec: dict) -> None:
    """Fill a target of another architecture (cross-compiling): this machine's CPU, features
    and core count say nothing about it, so mcpu defaults to "generic" and num-cores to
    FOREIGN_CORES."""
    if spec.get("mcpu") == "native":
        raise TargetError(f"mcpu native names this machine's CPU, not a {spec['mtriple']} one: "
                          f"name the target's CPU (e.g. cortex-a72) or leave mcpu out")
    spec.setdefault("mcpu", "generic")
    spec.setdefault("num-cores", FOREIGN_CORES)

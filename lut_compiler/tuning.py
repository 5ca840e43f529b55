"""MetaSchedule tuning with an on-disk database that is reused across runs.

Fixes over the stock flow: builds skip the 22-30 s import of every tensor
intrinsic that makes the default builder time out (it then records nothing); the
build workers live for the whole session instead of being respawned for every
batch (4-8 s of interpreter start-up each time, for 40 ms of compiling); and a
ledger of trials spent per kernel makes recompiling a model tune nothing new.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from .config import TuneConfig
from .errors import LutcError
from .rpc import wait_for_servers
from .target import host_cores, runs_here

LEDGER = "trials.json"
LOCK = ".lock"
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")  # JSONDatabase's, one record a line


def build_without_intrinsics(mod: tvm.IRModule, target: tvm.target.Target) -> str:
    """Build one candidate and return the path of its tar archive.

    MetaSchedule's default build function, minus ``import tvm.s_tir.tensor_intrin``.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    path = os.path.join(tempfile.mkdtemp(prefix="lutc-build-"), "candidate.tar")
    tvm_build(mod, target=target).export_library(path, fcompile=tar)
    return path


@derived_object
class PooledBuilder(ms.builder.PyBuilder):
    """A LocalBuilder whose worker processes survive from one batch to the next."""

    def __init__(self, max_workers: int, timeout_sec: float = 60.0) -> None:
        super().__init__()
        self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec)
        self.timeout_sec = timeout_sec

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        results = []
        jobs = [(b.mod, b.target) for b in build_inputs]
        for done in self.pool.map_with_error_catching(lambda job: build_without_intrinsics(*job), jobs):
            if done.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(done.value, None))
            elif done.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"build failed: {done.value}"))
        return results

    def shutdown(self) -> None:
        self.pool.shutdown()


@dataclass
class TaskResult:
    """One tuned kernel: trials spent now and before, best measured latency."""

    name: str
    flops: float
    weight: int
    new_trials: int
    total_trials: int
    best_us: float | None


@dataclass
class TuneReport:
    tasks: list[TaskResult]
    seconds: float
    work_dir: str

    @property
    def new_trials(self) -> int:
        return sum(t.new_trials for t in self.tasks)

    def to_json(self) -> dict:
        return {"seconds": round(self.seconds, 2), "work_dir": self.work_dir,
                "new_trials": self.new_trials, "tasks": [asdict(t) for t in self.tasks]}

    def table(self) -> str:
        rows = [f"{'kernel':<40} {'weight':>6} {'MFLOP':>9} {'trials':>7} {'new':>5} {'best us':>10}"]
        for t in self.tasks:
            best = f"{t.best_us:10.1f}" if t.best_us is not None else f"{'-':>10}"
            rows.append(f"{t.name[:40]:<40} {t.weight:>6} {t.flops / 1e6:>9.2f} {t.total_trials:>7} {t.new_trials:>5} {best}")
        rows.append(f"{self.new_trials} new trials in {self.seconds:.1f} s; database {self.work_dir}")
        return "\n".join(rows)


def _task_key(task: ms.ExtractedTask, target: tvm.target.Target) -> str:
    return f"{tvm_ffi.structural_hash(task.dispatched[0]):x}:{target}"


@contextmanager
def work_dir_lock(work_dir: Path, exclusive: bool):
    """Hold ``work_dir/.lock`` (flock: released by the kernel if the process dies); says so
    on stderr when it has to wait for another process."""
    import fcntl

    with open(work_dir / LOCK, "a") as handle:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {work_dir}: another lutc process is using it", file=sys.stderr)
            fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def repair_database(work_dir: Path) -> int:
    """Drop a torn last line from the database files (a run killed while appending one; every
    complete line is a committed record and is kept). Returns the lines dropped."""
    dropped = 0
    for name in DATABASE_FILES:
        path = work_dir / name
        if not path.exists():
            continue
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        tail = data[keep:]
        if tail.strip():
            try:
                json.loads(tail)
                continue  # a complete last line without its newline
            except ValueError:
                dropped += 1
            tmp = path.with_name(f".{name}.{os.getpid()}")
            tmp.write_bytes(data[:keep])
            os.replace(tmp, path)
    return dropped


def _read_ledger(work_dir: Path) -> dict[str, int]:
    try:
        return json.loads((work_dir / LEDGER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_ledger(work_dir: Path, ledger: dict[str, int]) -> None:
    tmp = work_dir / f".{LEDGER}.{os.getpid()}"
    tmp.write_text(json.dumps(ledger, indent=1, sort_keys=True))
    os.replace(tmp, work_dir / LEDGER)


def _task_logger(work_dir: Path, name: str) -> logging.Logger:
    """Per-kernel MetaSchedule log in work_dir/logs, kept off the console."""
    logger = logging.getLogger(f"lut_compiler.tuning.{name}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    if not logger.handlers:
        (work_dir / "logs").mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(work_dir / "logs" / f"{name}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
        logger.addHandler(handler)
    return logger


@derived_object
class MeasureCounter(ms.measure_callback.PyMeasureCallback):
    """Counts measured candidates per task, drives a progress bar, keeps the first errors;
    `on_batch(task_id, trials so far)` runs after each measured batch (after the
    database committed it: the default callbacks come first)."""

    def __init__(self, bar, on_batch: Callable[[int, int], None] | None = None) -> None:
        self.bar = bar
        self.on_batch = on_batch
        self.trials: dict[int, int] = {}
        self.ok = 0
        self.errors: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.trials.values())

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        self.trials[task_id] = self.trials.get(task_id, 0) + len(measure_candidates)
        for built, ran in zip(builder_results, runner_results):
            error = built.error_msg or ran.error_msg
            if error is None:
                self.ok += 1
            elif len(self.errors) < 3:
                self.errors.append(error.strip().splitlines()[-1])
        self.bar.update(len(measure_candidates))
        if self.on_batch is not None:
            self.on_batch(task_id, self.trials[task_id])


def extract_tasks(mod: tvm.IRModule, target: tvm.target.Target) -> list[ms.ExtractedTask]:
    """Tunable kernels of a legalized, fused Relax module."""
    return [t for t in ms.relax_integration.extract_tasks(mod, target) if not t.mod.attrs.get("tirx.is_scheduled", False)]


def tune(mod: tvm.IRModule | list[tvm.IRModule], target: tvm.target.Target, cfg: TuneConfig,
         progress: bool = True) -> TuneReport:
    """Give every kernel of ``mod`` (or of several modules, tuned in one session; a kernel
    they share is tuned once) up to ``cfg.trials_per_task`` trials in total.

    Trials already spent on a kernel (in any earlier run, for any model) count:
    kernels are tuned only by the difference, so an unchanged budget tunes nothing. The
    work dir is locked for the run: a second process tuning into it waits.
    """
    start = time.perf_counter()
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    with work_dir_lock(work_dir, exclusive=True):
        repair_database(work_dir)
        database = ms.database.JSONDatabase(work_dir=str(work_dir))
        unique: dict[str, ms.ExtractedTask] = {}
        for one in mod if isinstance(mod, list) else [mod]:
            for task in extract_tasks(one, target):
                unique.setdefault(_task_key(task, target), task)
        keys, tasks = list(unique), list(unique.values())
        ledger = _read_ledger(work_dir)
        new_trials = _tune_owed(tasks, keys, ledger, database, target, cfg, work_dir, progress)
        return _report(tasks, keys, ledger, new_trials, database, target, time.perf_counter() - start, work_dir)


def _tune_owed(tasks, keys, ledger, database, target, cfg: TuneConfig, work_dir: Path, progress: bool) -> dict[int, int]:
    """Tune each kernel by the trials it is still owed; the ledger is rewritten after every
    measured batch, so a run killed at any point resumes where it stopped. Returns task
    index -> new trials."""
    from tqdm import tqdm

    groups: dict[int, list[int]] = {}  # trials still owed -> kernels owed that many
    for i, key in enumerate(keys):
        owed = cfg.trials_per_task - ledger.get(key, 0)
        if owed > 0:
            groups.setdefault(owed, []).append(i)
    budget = sum(owed * len(ids) for owed, ids in groups.items())
    if cfg.max_trials is not None:
        budget = min(budget, cfg.max_trials)
    new_trials: dict[int, int] = {}
    if budget <= 0:
        return new_trials
    runner = _runner(cfg, target)
    load_cpu_tensor_intrinsics(target)
    builder = PooledBuilder(max_workers=host_cores())  # builds run here, whatever the target
    try:
        _seed_default_schedules(tasks, [i for i, k in enumerate(keys) if k not in ledger], target, database,
                                builder, runner)
        ok, errors = 0, []
        with tqdm(total=budget, desc="tuning", unit="trial", disable=not progress, leave=False) as bar:
            for owed, ids in sorted(groups.items()):
                group_budget = min(owed * len(ids), budget - sum(new_trials.values()))
                if group_budget <= 0:
                    break
                before = {i: ledger.get(keys[i], 0) for i in ids}

                def record(k: int, trials: int, ids=ids, before=before) -> None:
                    ledger[keys[ids[k]]] = before[ids[k]] + trials
                    _write_ledger(work_dir, ledger)

                counter = MeasureCounter(bar, record)
                contexts = _contexts(tasks, ids, target, owed, cfg.seed, work_dir)
                ms.tune_tasks(
                    tasks=contexts, task_weights=[float(tasks[i].weight) for i in ids], work_dir=str(work_dir),
                    max_trials_global=group_budget, max_trials_per_task=owed,
                    num_trials_per_iter=min(64, owed), builder=builder, runner=runner, database=database,
                    measure_callbacks=[*ms.MeasureCallback.create("default"), counter],
                )
                ok, errors = ok + counter.ok, errors + counter.errors
                for k, i in enumerate(ids):
                    new_trials[i] = counter.trials.get(k, 0)
                    # A kernel whose search space ran out before its budget is done too.
                    served = group_budget == owed * len(ids)
                    ledger[keys[i]] = cfg.trials_per_task if served else before[i] + new_trials[i]
    finally:
        builder.shutdown()
    _write_ledger(work_dir, ledger)
    if ok == 0:
        raise LutcError(f"tuning measured no candidate successfully; first error: {(errors or ['none'])[0]}")
    return new_trials


def _runner(cfg: TuneConfig, target: tvm.target.Target) -> ms.runner.Runner:
    """Where candidates are measured: on this machine, or on the RPC servers registered with
    ``cfg.rpc``'s tracker under its key (checked first: the RPC runner would wait forever)."""
    if cfg.rpc is None:
        mtriple = str(target.attrs.get("mtriple", ""))
        if mtriple and not runs_here(mtriple):
            raise LutcError(f"tuning for {mtriple} measures on such a machine: give an RPC tracker and key "
                            f"(--rpc-tracker HOST:PORT --rpc-key KEY) or no trials")
        return ms.runner.LocalRunner()
    rpc = cfg.rpc
    wait_for_servers(rpc)
    config = ms.runner.RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                                 session_timeout_sec=rpc.timeout)
    return ms.runner.RPCRunner(config, max_workers=rpc.parallel)


def _report(tasks, keys, ledger, new_trials, database, target, seconds: float, work_dir: Path) -> TuneReport:
    results = []
    for i, task in enumerate(tasks):
        record = database.query_tuning_record(task.dispatched[0], target, "main")
        best = None
        if record is not None and record.run_secs:
            best = 1e6 * min(float(s) for s in record.run_secs)
        results.append(TaskResult(task.task_name, _flops(task), int(task.weight),
                                  new_trials.get(i, 0), ledger.get(keys[i], 0), best))
    return TuneReport(results, seconds, str(work_dir))


def _flops(task: ms.ExtractedTask) -> float:
    try:
        return float(tvm.s_tir.analysis.estimate_tir_flops(task.dispatched[0]))
    except Exception:  # opaque kernels have no FLOP estimate
        return 0.0


def load_cpu_tensor_intrinsics(target: tvm.target.Target) -> None:
    """Register only the CPU tensor intrinsics before MetaSchedule asks for all of them.

    ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, which parses every CUDA,
    ROCm, Hexagon and ARM intrinsic in TVMScript: 20-95 s here, for a CPU target
    that can only use its own (0.6 s).
    """
    package = "tvm.s_tir.tensor_intrin"
    if package not in sys.modules:
        sys.modules[package] = importlib.util.module_from_spec(importlib.util.find_spec(package))
    arch = "arm_cpu" if "aarch64" in str(target.attrs.get("mtriple", "")) else "x86"
    importlib.import_module(f"{package}.{arch}")


def _search_strategy(trials_per_task: int) -> ms.search_strategy.EvolutionarySearch:
    """Evolutionary search sized to the budget: the stock 512 x 4 generations cost
    ~8 s of CPU per round, more than measuring a small batch."""
    population = min(512, max(64, 16 * trials_per_task))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population, genetic_num_iters=4 if population >= 256 else 2
    )


def _contexts(tasks, ids, target, trials_per_task, seed, work_dir) -> list[ms.TuneContext]:
    return [
        ms.TuneContext(
            mod=tasks[i].dispatched[0],
            target=target,
            space_generator="post-order-apply",
            search_strategy=_search_strategy(trials_per_task),
            task_name=tasks[i].task_name,
            logger=_task_logger(work_dir, tasks[i].task_name),
            rand_state=seed + i,
            num_threads="physical",
        ).clone()
        for i in ids
    ]


def _seed_default_schedules(tasks, ids, target, database, builder, runner) -> None:
    """Measure each kernel's default CPU schedule and commit it as a tuning record.

    The search then draws on it as the best known candidate, and applying the
    database can never pick a tuned schedule slower than the untuned default
    (with small budgets MetaSchedule often finds none faster).
    """
    from .schedules.default_cpu import default_schedule

    if not ids:
        return
    schedules = [default_schedule(tasks[i].dispatched[0]["main"], target) for i in ids]
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for sch in schedules])
    args = [ms.arg_info.ArgInfo.from_prim_func(tasks[i].dispatched[0]["main"]) for i in ids]
    measured = [(i, sch, arg, b) for i, sch, arg, b in zip(ids, schedules, args, built) if b.error_msg is None]
    futures = runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", arg) for _, _, arg, b in measured])
    for (i, sch, arg, _), future in zip(measured, futures):
        result = future.result()
        if result.error_msg is None:
            workload = database.commit_workload(tasks[i].dispatched[0])
            database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, result.run_secs, target, arg))


def apply_database(mod: tvm.IRModule, target: tvm.target.Target, work_dir: str) -> tvm.IRModule:
    """Replace every kernel the database has a record for by its best schedule."""
    if not (Path(work_dir) / DATABASE_FILES[0]).exists():
        return mod
    with work_dir_lock(Path(work_dir), exclusive=True):
        repair_database(Path(work_dir))
        with target, ms.database.JSONDatabase(work_dir=work_dir):
            return tvm.relax.transform.MetaScheduleApplyDatabase()(mod)

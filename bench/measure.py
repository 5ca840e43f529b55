"""One case end to end: prepare, build every system, check outputs, time in rotating rounds.

Building runs one system at a time, each in a fresh process. Timing keeps one
loaded process per system and asks them in turn for a timed block, so only one
system computes at any moment; the order rotates by one system each round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from .cases import PreparedCase, prepare_case
from .config import REFERENCE, TUNED, BenchConfig, Case, TimingConfig, tuning_dir
from .report import Row, output_cosine, output_errors, top1
from .systems import BUILDERS, BuildSpec, Built, evaluate, open_runner, outputs, timed_block, warm_up
from .worker import Worker, WorkerError

Log = Callable[[str], None]


def _env(cfg: BenchConfig) -> dict[str, str]:
    """Environment of every worker: TVM's runtime uses 1 of 2 cores unless told."""
    return {"TVM_NUM_THREADS": str(cfg.cores)}


def _fail(row: Row, err: WorkerError, log: Log, debug: bool) -> None:
    row.status, row.error = "failed", str(err)
    log(f"  {row.system} failed: {err}")
    if debug and err.remote_traceback:
        log(err.remote_traceback)


def bench_case(case: Case, cfg: BenchConfig, log: Log, debug: bool = False) -> list[Row]:
    """Rows for every system of ``case`` (failed systems get a row with the error)."""
    rows = {s: Row(case.model_label, case.shape_label, case.key, s) for s in cfg.systems}
    case_dir = Path(cfg.work_dir) / case.key
    start = time.perf_counter()
    try:
        with Worker("prepare", _env(cfg)) as worker:
            prepared: PreparedCase = worker.call(prepare_case, case, str(case_dir), cfg.seed)
    except WorkerError as err:
        for row in rows.values():
            _fail(row, err, log, debug)
        return list(rows.values())
    log(f"  prepared model and inputs in {time.perf_counter() - start:.0f} s")
    built: dict[str, Built] = {}
    for system in cfg.systems:
        tuned = system in TUNED and cfg.trials_per_task > 0
        log(f"  building {system}" + (f" ({cfg.trials_per_task} trials per task)" if tuned else ""))
        start = time.perf_counter()
        spec = BuildSpec(
            system=system,
            model_path=prepared.model_path,
            simplified_path=prepared.simplified_path,
            calibration_path=prepared.calibration_path,
            calibration_labels=prepared.calibration_labels,
            input_shapes=prepared.input_shapes,
            target=cfg.target,
            trials_per_task=cfg.trials_per_task,
            learn_minutes=cfg.learn_minutes,
            learn_finer=cfg.learn_finer,
            artifact_dir=str((case_dir / system).resolve()),
            tuning_dir=tuning_dir(cfg, case, system),
            cores=cfg.cores,
            seed=cfg.seed,
            progress=cfg.progress,
        )
        try:
            with Worker(system, _env(cfg)) as worker:
                built[system] = result = worker.call(BUILDERS[system], spec)
        except WorkerError as err:
            _fail(rows[system], err, log, debug)
            continue
        log(f"  built {system} in {time.perf_counter() - start:.0f} s"
            + (" (tuning database reused)" if result.tune_cached else ""))
        row = rows[system]
        row.compile_s, row.tune_s, row.tune_cached, row.tuning, row.plan = (
            result.compile_s, result.tune_s, result.tune_cached, result.tuning, result.plan)
    _time_systems(case, cfg, prepared, built, rows, log, debug)
    return list(rows.values())


def _rounds_of(k: int, total: int) -> set[int]:
    """The ``k`` of ``total`` rounds a capped system runs in, spread evenly (all if k == total)."""
    return {r for r in range(total) if (r + 1) * k // total > r * k // total}


def time_rounds(workers: dict[str, Worker], timing: TimingConfig, fail: Callable[[str, WorkerError], None],
                progress: bool = False) -> dict[str, tuple[int, list[float]]]:
    """Time the systems loaded in ``workers`` (``systems.open_runner``) side by side.

    Per system: warm-up, then the iterations of a ``timing.block_seconds`` block; then
    ``timing.rounds`` rounds of one timed block per system, the order rotating by one system
    per round, ``timing.gap_seconds`` apart (slow systems run fewer rounds, see TimingConfig).
    Returns system -> (iterations per block, seconds per call in each round); a system whose
    worker fails is passed to ``fail`` and left out.
    """
    from tqdm import tqdm

    active = dict(workers)

    def drop(system: str, err: WorkerError) -> None:
        del active[system]
        fail(system, err)

    per_call = {}
    for system in list(active):
        try:
            per_call[system] = active[system].call(warm_up, timing.warmup_seconds)
        except WorkerError as err:
            drop(system, err)
    iterations = {s: max(1, round(timing.block_seconds / t)) for s, t in per_call.items()}
    rounds = {}
    for s, t in per_call.items():
        fit = int(timing.max_system_seconds // (iterations[s] * t))
        rounds[s] = _rounds_of(min(timing.rounds, max(timing.min_rounds, fit)), timing.rounds)
    times: dict[str, list[float]] = {s: [] for s in active}
    order = list(active)
    with tqdm(total=sum(len(r) for r in rounds.values()), desc="  timing", unit="block",
              disable=not progress, leave=False) as bar:
        for r in range(timing.rounds):
            shift = r % len(order) if order else 0
            for system in order[shift:] + order[:shift]:
                if system not in active or r not in rounds[system]:
                    continue
                try:
                    seconds = active[system].call(timed_block, iterations[system])
                except WorkerError as err:
                    drop(system, err)
                    continue
                times[system].append(seconds / iterations[system])
                bar.update()
                time.sleep(timing.gap_seconds)
    return {s: (iterations[s], times[s]) for s in active}


def _score(workers: dict[str, Worker], prepared: PreparedCase, max_seconds: float, rows: dict[str, Row],
           drop: Callable[[str, WorkerError], None]) -> None:
    """Accuracy on the held-out evaluation samples: mean cosine of the outputs to ORT's (worst
    output) and, for labelled models, top-1 accuracy; each system on as many samples as it runs
    in ``max_seconds``, compared with ORT on those."""
    import numpy as np

    labels = np.load(prepared.evaluation_labels) if prepared.evaluation_labels else None
    scored = {}
    for system in [REFERENCE] + [s for s in workers if s != REFERENCE]:
        try:
            scored[system] = workers[system].call(evaluate, prepared.evaluation_path, max_seconds)
        except WorkerError as err:
            drop(system, err)
    reference = scored.pop(REFERENCE, None)
    if reference is None:
        return
    first = prepared.outputs[0][0]
    for system, outs in [(REFERENCE, reference), *scored.items()]:
        row, n = rows[system], min(len(outs), len(reference))
        if any(not math.isfinite(output_errors(o, r)[0]) for o, r in zip(outs[:n], reference[:n])):
            continue  # wrong shapes: already reported by max_abs_err
        row.eval_samples = n
        row.cosine = output_cosine(_stack(outs[:n]), _stack(reference[:n]))
        if labels is not None:
            row.top1 = top1(np.stack([o[first] for o in outs[:n]]), labels[:n])


def _stack(outputs: list[dict]) -> dict:
    import numpy as np

    return {name: np.stack([o[name] for o in outputs]) for name in outputs[0]}


def _time_systems(case: Case, cfg: BenchConfig, prepared: PreparedCase, built: dict[str, Built],
                  rows: dict[str, Row], log: Log, debug: bool) -> None:
    input_names = [name for name, _, _ in prepared.inputs]
    output_names = [name for name, _, _ in prepared.outputs]
    workers: dict[str, Worker] = {}

    def drop(system: str, err: WorkerError) -> None:
        _fail(rows[system], err, log, debug)
        workers.pop(system).close(timeout=1)

    try:
        for system, b in built.items():  # load in parallel: nothing is timed yet
            workers[system] = Worker(f"{system}-timing", _env(cfg))
            workers[system].submit(open_runner, system, b.artifact, prepared.feeds_path, input_names, output_names,
                                   cfg.cores)
        start = time.perf_counter()
        for system in list(workers):
            try:
                workers[system].result()
            except WorkerError as err:
                drop(system, err)
        log(f"  loaded {len(workers)} timing workers in {time.perf_counter() - start:.0f} s")
        got = {}
        for system in list(workers):
            try:
                got[system] = workers[system].call(outputs)
            except WorkerError as err:
                drop(system, err)
        if REFERENCE in got:
            for system, values in got.items():
                rows[system].max_abs_err, rows[system].max_rel_err = output_errors(values, got[REFERENCE])
            _score(workers, prepared, cfg.timing.eval_seconds, rows, drop)
        timed = time_rounds(workers, cfg.timing, drop, cfg.progress)
        for system, (iterations, times) in timed.items():
            rows[system].iterations = iterations
            rows[system].set_times(times)
        reference = rows.get(REFERENCE)
        if reference is not None and reference.median_s:
            for row in rows.values():
                if row.median_s is not None:
                    row.ratio_to_ort = row.median_s / reference.median_s
    finally:
        for worker in workers.values():
            worker.close(timeout=5)

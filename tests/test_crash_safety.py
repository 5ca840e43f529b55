"""Tuning killed halfway loses no completed trial and resumes where it stopped; processes
sharing a tuning work dir do not corrupt it."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ort_run, random_feeds

import lut_compiler
from lut_compiler.tuning import DATABASE_FILES, LEDGER, repair_database

pytestmark = pytest.mark.tuning
TRIALS = 8


def _lutc(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lut_compiler.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _ledger(work) -> dict:
    try:
        return json.loads((work / LEDGER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _records(work) -> list[str]:
    path = work / DATABASE_FILES[1]
    return path.read_text().splitlines() if path.exists() else []


def test_sigkill_halfway_loses_nothing_and_resumes(three_kernels, tmp_path):
    work = tmp_path / "db"
    tune = ["tune", three_kernels, "--trials", TRIALS, "--work-dir", work, "-q"]
    proc = _lutc(*tune)
    deadline = time.monotonic() + 300
    while not any(v > 0 for v in _ledger(work).values()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the build and measure workers too
    proc.wait()
    done = _ledger(work)
    assert done and all(v > 0 for v in done.values()) and sum(done.values()) < 3 * TRIALS, done
    kept = _records(work)
    with open(work / DATABASE_FILES[1], "a") as f:  # as if killed inside an append
        f.write(kept[-1][: len(kept[-1]) // 2])

    proc = _lutc(*tune)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert _records(work)[: len(kept)] == kept  # every committed record survived, the torn line did not
    assert all(json.loads(line) for line in _records(work))
    final = _ledger(work)
    assert len(final) == 3 and set(final.values()) == {TRIALS}
    new = int(out.strip().splitlines()[-1].split()[0])  # "N new trials in S s; database ..."
    assert new <= 3 * TRIALS - sum(done.values())  # only what the killed run still owed

    config = lut_compiler.CompileConfig(tune=lut_compiler.TuneConfig(trials_per_task=TRIALS, work_dir=str(work)))
    model = lut_compiler.compile(three_kernels, config, progress=False)
    assert model.record["tuning"]["new_trials"] == 0
    feeds = random_feeds(model.inputs, seed=1)
    np.testing.assert_allclose(model.run(feeds)["y"], ort_run(three_kernels, feeds)[0], rtol=1e-4, atol=1e-4)


def test_repair_keeps_complete_lines(tmp_path):
    lines = [json.dumps({"i": i}) for i in range(3)]
    (tmp_path / DATABASE_FILES[0]).write_text("\n".join(lines) + "\n" + '{"i": 3, "tor')
    (tmp_path / DATABASE_FILES[1]).write_text("\n".join(lines))  # complete, only the newline missing
    assert repair_database(tmp_path) == 1
    assert (tmp_path / DATABASE_FILES[0]).read_text() == "\n".join(lines) + "\n"
    assert (tmp_path / DATABASE_FILES[1]).read_text() == "\n".join(lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DATABASE_FILES)  # no temporary left


def test_two_processes_share_a_work_dir(three_kernels, tmp_path):
    work = tmp_path / "db"
    procs = [_lutc("compile", three_kernels, "-o", tmp_path / f"out{i}", "--trials", 4, "--work-dir", work, "-q")
             for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert any("another lutc process is using it" in err for _, err in results)  # one waited for the other
    assert set(_ledger(work).values()) == {4} and all(json.loads(line) for line in _records(work))
    feeds = random_feeds(lut_compiler.load(tmp_path / "out0").inputs, seed=2)
    expected = ort_run(three_kernels, feeds)[0]
    for i in range(2):
        got = lut_compiler.load(tmp_path / f"out{i}").run(feeds)["y"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

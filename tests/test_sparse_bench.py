"""``python -m lut_compiler.bench.sparse`` in a reduced mode (one small shape, two sparsities, one
block, 2 trials): every system built, checked against NumPy and timed; JSON, markdown and PNG
written. About a minute on 2 cores."""

import json
import subprocess
import sys

import pytest


@pytest.mark.tuning
def test_reduced_sparse_bench(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run(
        [sys.executable, "-m", "lut_compiler.bench.sparse", "--shapes", "linear384x384", "--sparsity", "0.5", "0.9",
         "--blocks", "16x1", "--trials", "2", "--repeat", "3", "--out", str(out), "--work-dir", str(work)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads((out / "sparse.json").read_text())
    assert result["errors"] == [] and result["trials"] == 2
    assert result["machine"]["cores"] >= 1 and result["machine"]["clock_hz"] > 0
    rows = result["rows"]
    assert [(r["shape"]["name"], r["block"], r["sparsity"]) for r in rows] == [
        ("linear384x384", "16x1", 0.5), ("linear384x384", "16x1", 0.9)]
    for row in rows:
        assert abs(row["density"] - (1 - row["sparsity"])) < 0.01, row["density"]
        assert set(row["systems"]) == {"ort", "tvm-dense", "sparse"}
        for system, stats in row["systems"].items():
            assert stats["max_rel_err"] <= 1e-4, (system, stats)  # checked against NumPy in the bench
            assert 0 < stats["p10_s"] <= stats["median_s"] <= stats["p90_s"] < 1, (system, stats)
            assert len(stats["per_round_s"]) == 3, (system, stats)
        assert row["sparse_build"]["knobs"]["n_tile"] >= 1
    sparse = result["shapes"]["linear384x384"]["sparse"]["tuning"]
    assert sparse["trials_per_task"] == 2 and len(sparse["tasks"]) == 2

    markdown = (out / "sparse.md").read_text()
    assert "| shape | block | sparsity | ORT dense | TVM dense tuned | sparse | x ORT | x TVM |" in markdown
    assert markdown.count("| linear384x384 | 16x1 |") == 3  # two rows + the break-even line
    assert (out / "sparse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

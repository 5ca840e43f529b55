"""``lutc bench --quick`` end to end: every system measured, outputs match ORT, files written.

About 5 minutes on 2 cores (MetaSchedule tunings of the MLP at 2 trials per task).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMS = {"ort", "tvm-untuned", "tvm-tuned", "lutc-untuned", "lutc", "lutc-lut", "lutc-sparse", "lutc-learned",
           "lutc-auto"}
LOSSY = {"lutc-lut", "lutc-sparse", "lutc-learned", "lutc-auto"}
TEST_DIGITS = 360  # the mlp's test split: every system is scored on all of it


def _lutc() -> list[str]:
    script = Path(sys.executable).with_name("lutc")
    return [str(script)] if script.exists() else [shutil.which("lutc") or "lutc"]


@pytest.mark.tuning
def test_quick_bench(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run([*_lutc(), "--quiet", "bench", "--quick", "--systems", ",".join(sorted(SYSTEMS)), "--learn-finer", "1", "--out", str(out), "--work-dir", str(work)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert {r["system"] for r in rows} == SYSTEMS
    assert all(r["model"] == "mlp" and r["shape"] == "b1" for r in rows)
    ort = next(r for r in rows if r["system"] == "ort")
    for row in rows:
        assert row["status"] == "ok", row
        assert row["eval_samples"] == TEST_DIGITS and 0 <= row["top1"] <= 100, row
        assert row["median_s"] > 0 and row["rounds"] == 3 and len(row["per_round_s"]) == 3, row
        assert 0 < row["p10_s"] <= row["median_s"] <= row["p90_s"], row
        if row["system"] in LOSSY:  # its error is reported, not bounded here
            assert 0 < row["max_abs_err"] < float("inf") and 0 < row["cosine"] < 1, row
        else:
            assert row["max_abs_err"] < 1e-4 and row["cosine"] > 0.99999 and abs(row["top1"] - ort["top1"]) <= 100 / TEST_DIGITS, row
        assert row["ratio_to_ort"] > 0, row
    auto = next(r for r in rows if r["system"] == "lutc-auto")
    assert {layer["choice"] for layer in auto["plan"]["layers"]} <= {"dense", "int8", "sparse", "lut"}
    assert len(auto["plan"]["layers"]) == 3 and auto["plan"]["budget"] == 1.0
    assert auto["top1"] >= ort["top1"] - 3.0  # 1 point on validation rows; the test split may differ a little
    learned = next(r for r in rows if r["system"] == "lutc-learned")["plan"]
    assert 1 <= learned["replaced"] <= learned["candidates"] == 3 and 0 < learned["flops_replaced"] <= 1
    assert learned["budget"]["fp32"] - learned["budget"]["chosen"] <= 0.01 and learned["learn"][0]["epochs"] >= 1
    tuned = {r["system"]: r for r in rows if r["system"] in {"tvm-tuned", "lutc"} | LOSSY}
    assert all(r["tune_s"] > 0 and r["tuning"]["trials_per_task"] == 2 for r in tuned.values())
    assert results["config"]["quick"] and results["config"]["trials_per_task"] == 2 and results["config"]["learn_finer"] == 1
    assert results["machine"]["cores"] >= 1 and results["machine"]["mcpu"]
    assert {"apache-tvm", "onnxruntime", "lut-compiler"} <= set(results["versions"])

    for png in ("results.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()
    assert "| model | shape | system | median ms" in markdown and markdown.count("| mlp | b1 |") == len(SYSTEMS)
    assert "tvm-tuned" in done.stdout and "mlp b1 lutc-learned: " in markdown

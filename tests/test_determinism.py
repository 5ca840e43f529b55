"""Compiling the same model with the same config, calibration data and database twice gives
byte-identical outputs on the same inputs, and the manifest says what fixed them."""

import json

import numpy as np
import pytest
from conftest import random_feeds
from test_cli import lutc_here

import lut_compiler

pytestmark = pytest.mark.tuning


def _outputs(out, feeds) -> dict[str, bytes]:
    return {name: value.tobytes() for name, value in lut_compiler.load(out).run(feeds).items()}


@pytest.mark.parametrize("mode", [["--lut"], ["--auto", "--auto-kinds", "int8,lut", "--min-cosine", "0.9"]])
def test_recompiling_with_the_same_database_is_byte_identical(models, tmp_path, capfd, mode):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((24, 4, 48)).astype(np.float32))
    args = ["compile", models["mlp"], "--input-shape", "x=4x48", "--calib", calib, *mode, "--trials", 2,
            "--work-dir", tmp_path / "db", "-q"]
    for run in ("first", "second", "third"):  # the first tunes and measures; the others only read
        code, _, err = lutc_here(capfd, *args, "-o", tmp_path / run)
        assert code == 0, err
    manifests = [json.loads((tmp_path / run / "manifest.json").read_text()) for run in ("second", "third")]
    assert manifests[0]["reproducibility"] == manifests[1]["reproducibility"]
    facts = manifests[0]["reproducibility"]
    assert facts["database_sha256"] and facts["calibration_sha256"] and facts["source_sha256"]
    assert facts["seeds"]["tune.seed"] == 0 and all(isinstance(v, int) for v in facts["seeds"].values())
    assert manifests[0]["target"]["mcpu"] and manifests[0]["versions"]["apache-tvm"]
    if "--auto" in mode:
        assert [r["choice"] for r in manifests[0]["auto"]["layers"]] == \
            [r["choice"] for r in manifests[1]["auto"]["layers"]]
    for seed in (1, 2):
        feeds = random_feeds(lut_compiler.load(tmp_path / "second").inputs, seed)
        assert _outputs(tmp_path / "second", feeds) == _outputs(tmp_path / "third", feeds)
        assert _outputs(tmp_path / "first", feeds) == _outputs(tmp_path / "second", feeds)

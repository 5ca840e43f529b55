"""Tuning measured on other machines through TVM's RPC tracker: a tracker and two RPC
servers on loopback stand in for the target; `lutc tune --rpc-tracker` lands its records in
the database and the ledger, and a compile with that database matches ONNX Runtime. An
unreachable tracker, a key nobody serves and malformed options are one `error:` line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tvm.rpc
from conftest import ort_run, random_feeds

import lut_compiler
from lut_compiler.cli import main
from lut_compiler.config import CompileConfig, RpcConfig, TuneConfig
from lut_compiler.tuning import DATABASE_FILES, LEDGER

KEY = "lutc-test"
TRIALS = 2
SERVERS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(log, module: str, *args) -> subprocess.Popen:
    """`python -m module args` in its own session (its popen_worker children with it)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """End the process group: SIGTERM, then SIGKILL for what is left (SIGTERM leaves a popen_worker)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _wait_listening(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.2)


def _free_servers(port: int) -> int:
    return tvm.rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get(KEY, {}).get("free", 0)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """(port, log dir) of a tracker with SERVERS free RPC servers under KEY on 127.0.0.1."""
    logs = tmp_path_factory.mktemp("rpc")
    procs = []
    try:
        port = _free_port()
        procs.append(_start(logs / "tracker.log", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", port,
                            "--port-end", port + 1))
        _wait_listening(port, procs[0])  # else each server retries only every 5 s
        for i in range(SERVERS):
            own = _free_port()
            procs.append(_start(logs / f"server{i}.log", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", own,
                                "--port-end", own + 1, "--tracker", f"127.0.0.1:{port}", "--key", KEY))
        deadline = time.monotonic() + 120
        while _free_servers(port) < SERVERS:
            dead = [p.args[2] for p in procs if p.poll() is not None]
            assert not dead and time.monotonic() < deadline, f"RPC processes did not come up ({dead}); logs in {logs}"
            time.sleep(0.5)
        yield port, logs
    finally:
        for proc in procs:
            _stop(proc)


def _lutc(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lut_compiler.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_rpc_config_round_trips_through_json():
    config = CompileConfig(tune=TuneConfig(trials_per_task=4, rpc=RpcConfig("10.0.0.5", 9190, "pi4", 30, 2)))
    again = CompileConfig.from_json(json.loads(json.dumps(config.to_json())))
    assert again == config and isinstance(again.tune.rpc, RpcConfig)


@pytest.mark.tuning
def test_tune_measures_on_the_rpc_servers(three_kernels, tracker, tmp_path):
    port, logs = tracker
    work = tmp_path / "db"
    rpc = ["--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", KEY, "--rpc-parallel", SERVERS, "--rpc-timeout", 30]
    done = _lutc("tune", three_kernels, "--trials", TRIALS, "--work-dir", work, "-q", *rpc)
    assert done.returncode == 0, done.stderr
    ledger = json.loads((work / LEDGER).read_text())
    assert len(ledger) == 3 and set(ledger.values()) == {TRIALS}, ledger
    records = [json.loads(line) for line in (work / DATABASE_FILES[1]).read_text().splitlines()]
    assert len(records) >= 3  # at least each kernel's default schedule, measured remotely
    served = [(logs / f"server{i}.log").read_text().count("load_module") for i in range(SERVERS)]
    assert all(served) and sum(served) >= len(records), served  # both servers measured, this machine did not

    out = tmp_path / "model"
    done = _lutc("compile", three_kernels, "-o", out, "--trials", TRIALS, "--work-dir", work, "-q", *rpc)
    assert done.returncode == 0, done.stderr
    model = lut_compiler.load(out)
    assert model.record["tuning"]["new_trials"] == 0  # the database served every kernel
    assert CompileConfig.from_json(model.record["config"]).tune.rpc == RpcConfig("127.0.0.1", port, KEY, 30, SERVERS)
    feeds = random_feeds(model.inputs, seed=3)
    np.testing.assert_allclose(model.run(feeds)["y"], ort_run(three_kernels, feeds)[0], rtol=1e-4, atol=1e-4)


def test_a_key_nobody_serves_is_one_line(three_kernels, tracker, tmp_path, capfd):
    port, _ = tracker
    start = time.monotonic()
    code = main(["tune", str(three_kernels), "--trials", "2", "--work-dir", str(tmp_path / "db"), "-q",
                 "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "nobody", "--rpc-timeout", "2"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and time.monotonic() - start < 60, err
    assert err[0].startswith(f"error: no RPC server registered under key 'nobody' at tracker 127.0.0.1:{port}")


def test_unreachable_tracker_is_one_line(three_kernels, tmp_path, capfd):
    port = _free_port()  # nobody listens there
    start = time.monotonic()
    code = main(["tune", str(three_kernels), "--trials", "2", "--work-dir", str(tmp_path / "db"), "-q",
                 "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", KEY])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 3 and time.monotonic() - start < 60
    assert err == [f"error: cannot reach RPC tracker 127.0.0.1:{port} (key '{KEY}'): Connection refused"]


@pytest.mark.parametrize("args,message", [
    (["--rpc-tracker", "nohost", "--rpc-key", KEY], "--rpc-tracker must be HOST:PORT"),
    (["--rpc-tracker", "127.0.0.1:port", "--rpc-key", KEY], "--rpc-tracker must be HOST:PORT"),
    (["--rpc-tracker", "127.0.0.1:70000", "--rpc-key", KEY], "port in 1-65535"),
    (["--rpc-key", KEY], "only used with --rpc-tracker"),
    (["--rpc-tracker", "127.0.0.1:9190"], "needs --rpc-key"),
    (["--rpc-tracker", "127.0.0.1:9190", "--rpc-key", KEY, "--rpc-parallel", "0"], "parallel >= 1"),
])
@pytest.mark.parametrize("command", ["tune", "compile"])
def test_bad_rpc_options_are_usage_errors(three_kernels, tmp_path, capfd, command, args, message):
    out = ["-o", str(tmp_path / "out")] if command == "compile" else []
    code = main([command, str(three_kernels), *out, "--trials", "2", "--work-dir", str(tmp_path / "db"), *args])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "db").exists() and not (tmp_path / "out").exists()

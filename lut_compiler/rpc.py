"""Check a TVM RPC tracker before tuning measures through it.

MetaSchedule's ``RPCRunner`` asks the tracker for a server under the key and waits without
limit: an unreachable tracker or a key nobody serves would hang the tuning run (or end in
a traceback). `wait_for_servers` turns both into one-line errors within the timeout.
"""

from __future__ import annotations

import socket
import threading
import time

import tvm.rpc

from .config import RpcConfig
from .errors import LutcError

POLL_SECONDS = 1.0


def servers_under(summary: dict, key: str) -> int:
    """Servers registered under `key` in a tracker summary (busy or free)."""
    return sum(item["key"].partition(":")[2] == key for item in summary.get("server_info", []))


def tracker_summary(cfg: RpcConfig, timeout: float) -> dict:
    """The tracker's summary (``TrackerSession.summary``), within `timeout` seconds."""
    where = f"RPC tracker {cfg.host}:{cfg.port} (key {cfg.key!r})"
    try:  # TVM's client retries a refused connection for 60 s: probe first, with a timeout
        socket.create_connection((cfg.host, cfg.port), timeout=timeout).close()
    except OSError as err:
        raise LutcError(f"cannot reach {where}: {err.strerror or err}") from None
    answer: list = []

    def ask() -> None:
        try:
            answer.append(tvm.rpc.connect_tracker(cfg.host, cfg.port).summary())
        except Exception as err:  # reported below, in the caller's thread
            answer.append(err)

    thread = threading.Thread(target=ask, daemon=True)  # a silent peer must not keep the process alive
    thread.start()
    thread.join(timeout)
    if not answer:
        raise LutcError(f"{where} did not answer within {timeout:.0f} s")
    if isinstance(answer[0], Exception):
        reason = (str(answer[0]).strip().splitlines() or [type(answer[0]).__name__])[-1]
        raise LutcError(f"{where} does not answer as a tracker: {reason}")
    return answer[0]


def wait_for_servers(cfg: RpcConfig) -> None:
    """Wait up to ``cfg.timeout`` s until a server is registered under ``cfg.key``; raises a
    one-line LutcError naming the tracker and the key."""
    deadline = time.monotonic() + cfg.timeout
    while True:
        if servers_under(tracker_summary(cfg, max(deadline - time.monotonic(), 1.0)), cfg.key):
            return
        if time.monotonic() + POLL_SECONDS > deadline:
            raise LutcError(f"no RPC server registered under key {cfg.key!r} at tracker {cfg.host}:{cfg.port} "
                            f"within {cfg.timeout} s (start one on the target: python -m tvm.exec.rpc_server "
                            f"--tracker {cfg.host}:{cfg.port} --key {cfg.key})")
        time.sleep(POLL_SECONDS)

"""Process plumbing: each system compiles and runs in its own spawned process.

A ``Worker`` is a fresh interpreter (multiprocessing ``spawn``) that executes
module-level functions sent over a pipe, one call at a time, and keeps its
globals between calls (the timing workers keep their loaded model there). Its
environment (``TVM_NUM_THREADS``) is fixed when it starts, before it imports TVM.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from contextlib import contextmanager

from ..errors import LutcError


class WorkerError(LutcError):
    """A call failed in a worker; ``remote_traceback`` is the child's traceback."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


@contextmanager
def _environment(env: dict[str, str]):
    """Set variables in os.environ while a child is spawned (it inherits them)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _serve(conn) -> None:
    """Child main loop: (function, args, kwargs) in, ("ok", result) or ("error", ...) out; None stops."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        if message is None:
            break
        fn, args, kwargs = message
        try:
            reply = ("ok", fn(*args, **kwargs))
        except BaseException as err:  # reported to the parent, which decides
            text = str(err).strip().splitlines()
            reply = ("error", f"{type(err).__name__}: {text[0] if text else ''}", traceback.format_exc())
        try:
            conn.send(reply)
        except (BrokenPipeError, EOFError):
            break
    conn.close()


class Worker:
    """One spawned process; ``call(fn, ...)`` runs ``fn`` there and returns its (picklable) result."""

    def __init__(self, name: str, env: dict[str, str] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child,), name=f"lutc-bench-{name}")
        with _environment(env or {}):
            self._process.start()
        child.close()
        self._pending = False

    def submit(self, fn, *args, **kwargs) -> None:
        """Start ``fn(*args, **kwargs)`` in the worker; collect it with ``result()``."""
        if self._pending:
            raise RuntimeError(f"worker {self.name} is busy")
        self._conn.send((fn, args, kwargs))
        self._pending = True

    def result(self):
        """Wait for the submitted call; raise WorkerError if it failed or the process died."""
        try:
            status, *payload = self._conn.recv()
        except (EOFError, ConnectionResetError):
            self._process.join(5)
            raise WorkerError(f"{self.name} worker died (exit code {self._process.exitcode})") from None
        finally:
            self._pending = False
        if status == "error":
            message, remote = payload
            raise WorkerError(f"{self.name}: {message}", remote)
        return payload[0]

    def call(self, fn, *args, **kwargs):
        self.submit(fn, *args, **kwargs)
        return self.result()

    def close(self, timeout: float = 30.0) -> None:
        """Ask the worker to exit; terminate it if it does not."""
        if self._process.is_alive():
            try:
                if not self._pending:
                    self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout if not self._pending else 0.1)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(5)
        self._conn.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

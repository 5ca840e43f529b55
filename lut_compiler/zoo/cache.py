"""Where zoo models and data live on disk, and building a file exactly once.

The root is ``$LUTC_ZOO_DIR`` if set, else ``~/.cache/lut_compiler/zoo``. A
model's file name carries a digest of the zoo's source files, so editing any
builder makes the next ``get_model`` build afresh instead of serving a stale
file (editing one rebuilds all: simple, and never stale).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

DEFAULT_DIR = Path.home() / ".cache" / "lut_compiler" / "zoo"


def root(cache_dir: Path | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$LUTC_ZOO_DIR``, else the default."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("LUTC_ZOO_DIR") or DEFAULT_DIR)


def code_version(files: Iterable[Path]) -> str:
    """A 12-hex-digit digest of the given source files, in order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def build_once(path: Path, build: Callable[[Path], None]) -> Path:
    """Return ``path``, first calling ``build(tmp)`` and renaming ``tmp`` onto it if absent.

    The rename is atomic, so a reader never sees a half-written file; two
    processes racing both build and the last rename wins.
    """
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        build(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path

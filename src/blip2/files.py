"""Writing files and directories so that a reader never sees half of one: write next to the target, then rename.

A rename within one directory is atomic, so the target holds either its old content or the new one; an
interrupted write leaves only a hidden temporary that is removed. Temporaries get the modes an ordinary
`open` / `mkdir` would give (tempfile creates them owner-only).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# read once: probing it sets the process umask to 0 for a moment, which other threads creating files would see
_UMASK = _read_umask()


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to `path` to write; moves it onto `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_dir(path: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yields a temporary directory next to `path` to fill; when the block succeeds it replaces `path` (an
    existing `path` is moved aside first, then deleted). keep_existing: if `path` appeared meanwhile (another
    process built it), keep that one and drop ours."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp (and some writers) create owner-only modes
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_UMASK)
        _move_into_place(tmp, path, keep_existing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, path: Path, keep_existing: bool) -> None:
    if keep_existing:
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
        return
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

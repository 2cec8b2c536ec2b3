"""One writer per run directory: an exclusive lock (fcntl.flock on <run_dir>/.lock) taken by every stage.

The kernel drops the lock when the process exits, crashes or is killed, so a stale lock never
blocks a resume. The lock is re-entrant within a process (the pipeline runs its stages in one
process), and only the lead process of a multi-host run takes it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"

_held: dict[Path, tuple[int, int]] = {}   # resolved run dir -> (fd, depth) held by this process


class RunDirLocked(ValueError):
  """Another process is writing to the run directory."""


def _is_lead() -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def _holder(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 64).decode(errors="replace").strip()
  return text or "unknown"


def acquire(run_dir: str | Path) -> Path:
  """Take (or re-enter) the lock of `run_dir`, creating the directory; RunDirLocked if another process holds it."""
  key = Path(run_dir).absolute().resolve() if Path(run_dir).exists() else Path(run_dir).absolute()
  if key in _held:
    fd, depth = _held[key]
    _held[key] = (fd, depth + 1)
    return key
  key.mkdir(parents=True, exist_ok=True)
  key = key.resolve()
  fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    pid = _holder(fd)
    os.close(fd)
    raise RunDirLocked(f"run directory {key} is in use by another process (pid {pid}, lock file {key / LOCK_FILE}); "
                       "wait for it to finish or pick another --run-dir") from None
  os.ftruncate(fd, 0)
  os.write(fd, f"{os.getpid()}\n".encode())
  _held[key] = (fd, 1)
  return key


def release(key: Path) -> None:
  """Leave one level of the lock; the last level unlocks and closes it."""
  fd, depth = _held[key]
  if depth > 1:
    _held[key] = (fd, depth - 1)
    return
  del _held[key]
  fcntl.flock(fd, fcntl.LOCK_UN)
  os.close(fd)


@contextlib.contextmanager
def locked(run_dir: str | Path | None) -> Iterator[None]:
  """Hold the run-directory lock for the block (no-op for None and on non-lead processes)."""
  if run_dir is None or not _is_lead():
    yield
    return
  key = acquire(run_dir)
  try:
    yield
  finally:
    release(key)

"""Orbax training checkpoints: train state + data-iterator state + resolved config, keep-last-K, async
saves, sha256 checksums written once a save is final and verified on restore, a fallback past corrupt
checkpoints (moved aside, details in a log file). Model directories are loza_jax.model_dir's.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
import traceback
from pathlib import Path
from typing import Iterable, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from loza_jax.config import Config, to_dict
from loza_jax.model_dir import CheckpointMismatchError, check_compatible

log = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256.json"         # <checkpoints>/<step>.sha256.json beside each step directory
ERROR_LOG = "checkpoint_errors.log"      # in the run directory: full detail of unreadable checkpoints
NOISY_LOGGERS = ("asyncio", "orbax", "absl", "tensorstore")


def _config_diff(saved: dict | None, cfg: Config | None) -> str:
  if not saved or cfg is None:
    return ""
  now = to_dict(cfg)
  diffs = [f"{sec}.{k}: {saved[sec].get(k)!r} -> {v!r}" for sec in ("model", "attention") if sec in saved
           for k, v in now[sec].items() if saved[sec].get(k) != v]
  return f" (config differs: {'; '.join(diffs[:4])})" if diffs else ""


# ----------------------------------------------------------------------------------------
# Checksums, rotation and quiet restores.


def file_digests(step_dir: Path) -> dict[str, str]:
  """sha256 of every file under `step_dir`, keyed by its relative path."""
  out = {}
  for f in sorted(step_dir.rglob("*")):
    if f.is_file():
      h = hashlib.sha256()
      with f.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
          h.update(chunk)
      out[f.relative_to(step_dir).as_posix()] = h.hexdigest()
  return out


def digest_problem(recorded: dict[str, str], found: dict[str, str]) -> str | None:
  """Why `found` does not match the `recorded` digests (first differing file), or None."""
  bad = [k for k in sorted(recorded) if found.get(k) != recorded[k]]
  if not bad:
    return None
  what = "is missing" if bad[0] not in found else "changed after the save"
  more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
  return f"checksum mismatch: {bad[0]} {what}{more}"


def steps_to_delete(steps: Iterable[int], keep: int | None, protected: int | None) -> list[int]:
  """Steps beyond the newest `keep`, sparing `protected` (the newest checkpoint known to be good)."""
  steps = sorted(steps)
  if keep is None or keep <= 0:
    return []
  return [s for s in steps[:-keep] if s != protected]


@contextlib.contextmanager
def quiet_loggers(log_file: Path, names: Sequence[str] = NOISY_LOGGERS):
  """Send the named loggers (asyncio's per-task tracebacks of a failed read, orbax, ...) to `log_file`
  only, so the console shows the one line that says what happened."""
  log_file.parent.mkdir(parents=True, exist_ok=True)
  handler = logging.FileHandler(log_file)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  saved = []
  for name in names:
    lg = logging.getLogger(name)
    saved.append((lg, lg.propagate))
    lg.addHandler(handler)
    lg.propagate = False
  try:
    yield handler
  finally:
    for lg, propagate in saved:
      lg.removeHandler(handler)
      lg.propagate = propagate
    handler.close()


def _first_line(error: Exception, limit: int = 240) -> str:
  text = str(error).splitlines()[0] if str(error) else ""
  return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class Checkpointer:
  """CheckpointManager over `directory` holding items `state`, `data` (grain iterator) and `config`.

  Rotation keeps the newest `keep` steps plus the newest step marked good (`mark_good`), so a run
  that diverges never rotates away the checkpoint it can resume from.
  """

  def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.keep = keep
    self.good_step: int | None = None
    self._unsummed: set[int] = set()
    self._saved = False                 # rotation only in an instance that saved (a reader deletes nothing)
    self.error_log = self.directory.parent / ERROR_LOG
    self._options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save,
                                                 create=True)
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(self.directory, options=self._options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iter=None, cfg: Config | None = None) -> None:
    """Start saving (async unless disabled); a step already on disk is skipped. The previous save is
    finalized (checksummed, old steps rotated) first."""
    self.wait()
    if step in self._manager.all_steps():
      return
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None and hasattr(data_iter, "get_state"):
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if cfg is not None:
      items["config"] = ocp.args.JsonSave(to_dict(cfg))
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._unsummed.add(step)
    self._saved = True

  def wait(self) -> None:
    """Wait for pending saves, then write their checksums and rotate old steps."""
    self._manager.wait_until_finished()
    self._finalize()

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def mark_good(self, step: int) -> None:
    """`step`'s params gave a finite loss afterwards: rotation keeps it until a newer step is good."""
    self.good_step = step if self.good_step is None else max(self.good_step, step)

  def checksum_path(self, step: int) -> Path:
    return self.directory / f"{step}{CHECKSUM_SUFFIX}"

  def _finalize(self) -> None:
    """Checksums of finished saves (process 0; the files are final once orbax returns), then rotation."""
    done, self._unsummed = self._unsummed, set()
    if jax.process_index() == 0:
      for step in sorted(done):
        if (self.directory / str(step)).is_dir():
          self.checksum_path(step).write_text(json.dumps(file_digests(self.directory / str(step)), indent=0))
    for step in steps_to_delete(self._manager.all_steps(), self.keep if self._saved else None, self.good_step):
      self._manager.delete(step)
      if jax.process_index() == 0:
        self.checksum_path(step).unlink(missing_ok=True)

  def verify(self, step: int) -> str | None:
    """Why `step`'s files differ from the checksums written at save, or None (also when none were
    written, e.g. a run killed between the save and its checksum). Agreed by every process."""
    problem = None
    path = self.checksum_path(step)
    if jax.process_index() == 0 and path.is_file():
      try:
        recorded = json.loads(path.read_text())
      except json.JSONDecodeError:
        recorded = None
      problem = (f"{path.name} is not valid JSON" if recorded is None
                 else digest_problem(recorded, file_digests(self.directory / str(step))))
    if jax.process_count() > 1:
      bad = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
      problem = problem or ("checksum mismatch (seen by process 0)" if int(bad) else None)
    return problem

  def quarantine(self, step: int, reason: str, what: str = "is unreadable", after: str = "trying the previous one",
                 details: bool = False) -> Path:
    """Move step (and its checksum) to <checkpoints>.corrupt/<step>-<time>; one log line says why."""
    self._manager.wait_until_finished()
    target = self.directory.parent / f"{self.directory.name}.corrupt" / f"{step}-{int(time.time())}"
    log.error("checkpoint step %d in %s %s (%s); moved to %s, %s%s", step, self.directory, what, reason, target, after,
              f" (full error in {self.error_log})" if details else "")
    if jax.process_index() == 0:
      target.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target / str(step)))
      if self.checksum_path(step).is_file():
        shutil.move(str(self.checksum_path(step)), str(target / self.checksum_path(step).name))
    multihost_utils.sync_global_devices(f"loza_quarantine_{step}")
    self._unsummed.discard(step)
    if self.good_step == step:
      self.good_step = None
    self._manager.close()
    self._manager = self._new_manager()
    return target

  def _quarantine(self, step: int, error: Exception | str) -> None:
    if isinstance(error, Exception):
      with self.error_log.open("a") as f:
        f.write(f"--- checkpoint step {step} in {self.directory} ({time.ctime()}):\n")
        f.write("".join(traceback.format_exception(error)))
    self.quarantine(step, error if isinstance(error, str) else _first_line(error), details=True)

  def _saved_config(self, step: int) -> dict | None:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception:  # pylint: disable=broad-except
      return None

  def restore_latest(self, abstract_state, data_iter=None, cfg: Config | None = None):
    """(state, step) from the newest readable checkpoint, or None when there is none.

    `abstract_state` holds jax.ShapeDtypeStructs with the shardings to restore onto (resharding
    as needed). Unreadable checkpoints (or ones whose checksums differ) are reported in one line
    each and moved aside, with the full detail in <run_dir>/checkpoint_errors.log; a shape
    mismatch raises.
    """
    with quiet_loggers(self.error_log):
      return self._restore_latest(abstract_state, data_iter, cfg)

  def _restore_latest(self, abstract_state, data_iter, cfg):
    for step in reversed(self.all_steps()):
      problem = self.verify(step)
      if problem:
        self.quarantine(step, problem, what="is corrupt")
        continue
      try:
        meta = self._manager.item_metadata(step)
        state_meta = meta["state"] if meta is not None else None
        if state_meta is None:
          raise FileNotFoundError(f"no state metadata in step {step}")
      except Exception as e:  # pylint: disable=broad-except
        self._quarantine(step, e)
        continue
      try:
        check_compatible(abstract_state, state_meta, f"checkpoint {self.directory / str(step)}")
      except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{e}{_config_diff(self._saved_config(step), cfg)}; use a fresh "
                                      "train.run_dir or the matching config") from None
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iter is not None and hasattr(data_iter, "set_state"):
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        self._quarantine(step, e)
        continue
      return restored["state"], step
    return None

"""Orbax checkpoints: train state + data-iterator state + resolved config, keep-last-K, async saves,
restore onto the current mesh with a fallback past corrupt checkpoints; model-only export/load.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils

from loza_jax.config import Config, from_dict, save_config, to_dict

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree or shapes differ from the model being restored."""


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _flat_shapes(tree) -> dict[str, tuple]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(p): tuple(getattr(x, "shape", ())) for p, x in flat}


def check_compatible(expected, found, where: str) -> None:
  """Raise CheckpointMismatchError naming the first parameter whose presence or shape differs."""
  want, have = _flat_shapes(expected), _flat_shapes(found)
  for name in sorted(set(want) | set(have), key=lambda n: (not n.startswith("params"), n)):
    if name not in have:
      raise CheckpointMismatchError(f"{where}: parameter {name!r} (shape {want[name]}) is missing from the "
                                    "checkpoint")
    if name not in want:
      raise CheckpointMismatchError(f"{where}: checkpoint has parameter {name!r} (shape {have[name]}) that the "
                                    "model does not")
    if want[name] != have[name]:
      raise CheckpointMismatchError(f"{where}: parameter {name!r} has shape {have[name]} in the checkpoint but "
                                    f"{want[name]} in the model")


def _config_diff(saved: dict | None, cfg: Config | None) -> str:
  if not saved or cfg is None:
    return ""
  now = to_dict(cfg)
  diffs = [f"{sec}.{k}: {saved[sec].get(k)!r} -> {v!r}" for sec in ("model", "attention") if sec in saved
           for k, v in now[sec].items() if saved[sec].get(k) != v]
  return f" (config differs: {'; '.join(diffs[:4])})" if diffs else ""


class Checkpointer:
  """CheckpointManager over `directory` holding items `state`, `data` (grain iterator) and `config`."""

  def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
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
    """Start saving (async unless disabled); a step already on disk is skipped."""
    if step in self._manager.all_steps():
      return
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None and hasattr(data_iter, "get_state"):
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if cfg is not None:
      items["config"] = ocp.args.JsonSave(to_dict(cfg))
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def _quarantine(self, step: int, error: Exception) -> None:
    target = self.directory.parent / f"{self.directory.name}.corrupt" / f"{step}-{int(time.time())}"
    log.error("checkpoint step %d in %s is unreadable (%s: %s); moved to %s, trying the previous one", step,
              self.directory, type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "", target)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
    multihost_utils.sync_global_devices(f"loza_quarantine_{step}")
    self._manager.close()
    self._manager = self._new_manager()

  def _saved_config(self, step: int) -> dict | None:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception:  # pylint: disable=broad-except
      return None

  def restore_latest(self, abstract_state, data_iter=None, cfg: Config | None = None):
    """(state, step) from the newest readable checkpoint, or None when there is none.

    `abstract_state` holds jax.ShapeDtypeStructs with the shardings to restore onto (resharding
    as needed). Unreadable checkpoints are reported and moved aside; a shape mismatch raises.
    """
    for step in reversed(self.all_steps()):
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


# ----------------------------------------------------------------------------------------
# Model-only export for other stages.


def save_model(directory: str | Path, params, cfg: Config) -> Path:
  """Write params (orbax) and config.yaml to `directory` (which must not hold a model yet)."""
  directory = Path(directory).absolute()
  if (directory / "params").exists():
    raise FileExistsError(f"save_model: {directory / 'params'} already exists; pick a new directory")
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    save_config(cfg, directory / CONFIG_FILE)
  return directory


def export_model(directory: str | Path, params, cfg: Config) -> Path:
  """Replace `directory` with a save_model directory of params/cfg: written beside it, then renamed,
  so a crash never leaves a half-written model; every process takes part."""
  directory = Path(directory).absolute()
  tmp = directory.with_name(directory.name + ".tmp")
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)
  multihost_utils.sync_global_devices("loza_export_start")
  save_model(tmp, params, cfg)
  multihost_utils.sync_global_devices("loza_export_saved")
  if jax.process_index() == 0:
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
  return directory


def load_config_file(directory: str | Path) -> Config:
  path = Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"load_model: {path} not found; is {directory} a directory written by save_model?")
  return from_dict(Config, yaml.safe_load(path.read_text()) or {})


def load_model(directory: str | Path, abstract_params: Any = None) -> tuple[Any, Config]:
  """(params, cfg) from a save_model directory; with `abstract_params` (ShapeDtypeStructs carrying
  shardings) the params are checked against it and placed accordingly, else loaded as saved."""
  directory = Path(directory).absolute()
  cfg = load_config_file(directory)
  if not (directory / "params").is_dir():
    raise FileNotFoundError(f"load_model: {directory / 'params'} not found")
  with ocp.StandardCheckpointer() as ckptr:
    if abstract_params is not None:
      check_compatible(abstract_params, ckptr.metadata(directory / "params").item_metadata.tree,
                       f"model {directory}")
      params = ckptr.restore(directory / "params", abstract_params)
    else:
      params = ckptr.restore(directory / "params")
  return params, cfg

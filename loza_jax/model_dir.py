"""Model directories, the one format the stages, convert and generate exchange.

A model directory holds `params/` (orbax, a nested dict of arrays), `config.yaml` and the
`loza_model.json` marker that lets a later run replace the directory it wrote (and nothing else).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils

from loza_jax.config import Config, from_dict, save_config

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
MODEL_MARKER = "loza_model.json"
SOURCE_FILE = "source.txt"   # optional: how the model was made (reports quote it)


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


# ----------------------------------------------------------------------------------------
# Which directories may be written.


def _listing(directory: Path, n: int = 3) -> str:
  names = sorted(p.name for p in directory.iterdir())
  return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_new_dir(directory: str | Path, what: str = "output directory") -> Path:
  """`directory` (absolute) if it is absent or empty; else FileExistsError naming what is there."""
  directory = Path(directory).absolute()
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f"{what} {directory} is a file; pick a directory path")
  if directory.is_dir() and any(directory.iterdir()):
    raise FileExistsError(f"{what} {directory} is not empty (holds {_listing(directory)}); pick a new or empty "
                          "directory")
  return directory


def is_model_dir(directory: Path) -> bool:
  """Whether `directory` is a model directory we wrote: the marker file, or (written before the
  marker existed) exactly config.yaml + params/ (+ sparsify's selection.json)."""
  if (directory / MODEL_MARKER).is_file():
    return True
  names = {p.name for p in directory.iterdir()}
  return {CONFIG_FILE, PARAMS_DIR} <= names <= {CONFIG_FILE, PARAMS_DIR, "selection.json"}


def check_replaceable(directory: str | Path, what: str = "output directory") -> Path:
  """`directory` if it is absent, empty or one of our model directories; else FileExistsError."""
  directory = Path(directory).absolute()
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f"{what} {directory} is a file; pick a directory path")
  if directory.is_dir() and any(directory.iterdir()) and not is_model_dir(directory):
    raise FileExistsError(f"{what} {directory} is not empty and is not a model directory written by this project "
                          f"(no {MODEL_MARKER}); refusing to replace it: pick a new or empty directory")
  return directory


def check_distinct(src: str | Path, out: str | Path, what: str = "out") -> None:
  """Refuse an output that is the input directory, holds it, or lies inside it."""
  src, out = Path(src).resolve(), Path(out).resolve()
  if out == src or src.is_relative_to(out) or out.is_relative_to(src):
    raise ValueError(f"{what} {out} overlaps the input model {src}; writing there would destroy the input: "
                     "pick another output directory")


# ----------------------------------------------------------------------------------------
# Writing and reading.


def save_model(directory: str | Path, params: Any, cfg: Config) -> Path:
  """Write params (numpy or jax arrays, sharded or not), config.yaml and the marker into `directory`,
  which must be absent or empty. Every process takes part."""
  directory = check_new_dir(directory, "save_model: model directory")
  if jax.process_count() > 1:   # every process has checked before any writes
    multihost_utils.sync_global_devices("loza_save_model_checked")
  directory.mkdir(parents=True, exist_ok=True)
  # Uncompressed: bf16/fp32 weights barely compress and compression slows the write down.
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, use_compression=False)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(directory / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
  if jax.process_index() == 0:
    save_config(cfg, directory / CONFIG_FILE)
    (directory / MODEL_MARKER).write_text(json.dumps({"format": "loza_jax model",
                                                      "architecture": cfg.model.architecture}) + "\n")
  return directory


def export_model(directory: str | Path, params: Any, cfg: Config) -> Path:
  """Replace `directory` (absent, empty or one of our model directories) with a model directory of
  params/cfg, written beside it and then renamed, so a crash never leaves a half-written model."""
  directory = check_replaceable(directory, "model directory")
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
  """The config.yaml of a model directory; errors name the file."""
  path = Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found; is {directory} a model directory (written by a train stage, "
                            "save_model or `python -m loza_jax.convert import`)?")
  try:
    return from_dict(Config, yaml.safe_load(path.read_text()) or {})
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def load_model(directory: str | Path, abstract_params: Any = None) -> tuple[Any, Config]:
  """(params, cfg) of a model directory. With `abstract_params` (ShapeDtypeStructs carrying
  shardings) the params are checked against it and placed accordingly; else loaded as saved."""
  directory = Path(directory).absolute()
  cfg = load_config_file(directory)
  if not (directory / PARAMS_DIR).is_dir():
    raise FileNotFoundError(f"{directory / PARAMS_DIR} not found; is {directory} a model directory?")
  with ocp.StandardCheckpointer() as ckptr:
    if abstract_params is None:
      return ckptr.restore(directory / PARAMS_DIR), cfg
    check_compatible(abstract_params, ckptr.metadata(directory / PARAMS_DIR).item_metadata.tree, f"model {directory}")
    return ckptr.restore(directory / PARAMS_DIR, abstract_params), cfg

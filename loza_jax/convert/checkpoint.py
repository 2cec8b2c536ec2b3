"""Model-only checkpoints: `<dir>/params` (orbax StandardCheckpointer, nested dict of arrays) + `<dir>/config.yaml`.

The same layout as train/checkpoint.py's save_model/load_model, kept here so the library does not
import the training package.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
import yaml

from loza_jax.config import Config, from_dict, save_config

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
MODEL_MARKER = "loza_model.json"   # the same marker as train/checkpoint.py's save_model


def check_new_dir(directory: str | Path) -> Path:
  """`directory` (absolute) if it is absent or empty; else FileExistsError naming what is there."""
  directory = Path(directory).absolute()
  if (directory / PARAMS_DIR).exists():
    raise FileExistsError(f"save_model: {directory / PARAMS_DIR} already exists; pick a new --out directory")
  if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
    held = _some(directory) if directory.is_dir() else "a file"
    raise FileExistsError(f"save_model: {directory} is not empty ({held}); pick a new or empty --out directory")
  return directory


def save_model(directory: str | Path, params: Any, cfg: Config) -> Path:
  """Write params (numpy or jax arrays), config.yaml and the model marker into `directory`, which
  must be absent or empty."""
  directory = check_new_dir(directory)
  directory.mkdir(parents=True, exist_ok=True)
  # Uncompressed (bf16/fp32 weights barely compress; zstd costs ~25% of the write time); the
  # on-disk format is the one StandardCheckpointer reads.
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, use_compression=False)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(directory / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
  save_config(cfg, directory / CONFIG_FILE)
  (directory / MODEL_MARKER).write_text(json.dumps({"format": "loza_jax model",
                                                    "architecture": cfg.model.architecture}) + "\n")
  return directory


def _some(directory: Path, n: int = 3) -> str:
  names = sorted(p.name for p in directory.iterdir())
  return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def load_config_file(directory: str | Path) -> Config:
  path = Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found; is {directory} a model directory written by "
                            "`python -m loza_jax.convert import` or save_model?")
  try:
    return from_dict(Config, yaml.safe_load(path.read_text()) or {})
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def load_model(directory: str | Path) -> tuple[Any, Config]:
  """(params as saved — host arrays (numpy or CPU jax arrays) —, cfg) from a save_model directory."""
  directory = Path(directory).absolute()
  cfg = load_config_file(directory)
  if not (directory / PARAMS_DIR).is_dir():
    raise FileNotFoundError(f"{directory / PARAMS_DIR} not found; is {directory} a model directory?")
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(directory / PARAMS_DIR)
  return params, cfg

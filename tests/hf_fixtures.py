"""Helpers for the committed HuggingFace fixtures (tests/fixtures/hf, made by tools/make_hf_fixtures.py)."""
from __future__ import annotations

import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from loza_jax.config import Config, replace
from loza_jax.convert.hf import read_hf_config, read_hf_params
from loza_jax.convert.hf_config import config_from_hf
from loza_jax.model import build_model

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = ("longcat_flash_tiny", "deepseek_v3_tiny", "deepseek_v3_tiny_noqlora")
TOLERANCE = 1e-4   # max |ours - transformers| / max |transformers|, fp32


@functools.lru_cache(maxsize=None)
def load(name: str) -> tuple[Config, dict, np.ndarray, np.ndarray]:
  """(cfg, numpy params, tokens [B, T], transformers' logits [B, T, V]) for one fixture."""
  d = FIXTURES / name
  cfg = config_from_hf(read_hf_config(d), source=str(d / "config.json"))
  params, _ = read_hf_params(d, cfg)
  return cfg, params, np.load(d / "tokens.npy"), np.load(d / "logits.npy")


def logits(cfg: Config, params, tokens, **changes) -> np.ndarray:
  cfg = replace(cfg, **changes) if changes else cfg
  return np.asarray(build_model(cfg).apply({"params": params}, jnp.asarray(tokens)))


def rel_err(out, ref) -> float:
  return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())

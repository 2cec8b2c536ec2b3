"""Choosing which attention sublayers become SSA (alpha, random, alternating or manual selection)."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Sequence

import numpy as np

from loza_jax.config import Strategy

STRATEGIES = typing.get_args(Strategy)


@dataclasses.dataclass(frozen=True)
class Selection:
  """Which sublayers are SSA, and why."""
  strategy: str
  ratio: float
  ssa_layers: tuple[int, ...]        # sorted sublayer indices
  num_sublayers: int

  def layer_types(self) -> tuple[str, ...]:
    chosen = set(self.ssa_layers)
    return tuple("ssa" if i in chosen else "full" for i in range(self.num_sublayers))


def num_to_select(ratio: float, n: int) -> int:
  """round(ratio * n) with halves rounded up, validated."""
  if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
    raise ValueError(f"sparsify.ratio must be in [0, 1], got {ratio}")
  return min(n, int(math.floor(ratio * n + 0.5)))


def select_layers(strategy: str, num_sublayers: int, ratio: float = 0.5, *, alphas: Sequence[float] | None = None,
                  seed: int = 0, manual: Sequence[int] | None = None) -> Selection:
  """Pick SSA sublayers: lowest α first (`alpha`), seeded `random`, every other (`alternating`), `manual`."""
  if strategy not in STRATEGIES:
    raise ValueError(f"sparsify.strategy: unknown {strategy!r}; choose one of {STRATEGIES}")
  if num_sublayers < 1:
    raise ValueError(f"the model has no attention sublayers ({num_sublayers})")
  n = num_sublayers
  if strategy == "manual":
    if manual is None:
      raise ValueError("sparsify.layers: the manual strategy needs a list of sublayer indices")
    idx = sorted(set(int(i) for i in manual))
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
      raise ValueError(f"sparsify.layers: indices {bad} out of range for {n} attention sublayers")
    return Selection(strategy, len(idx) / n, tuple(idx), n)
  k = num_to_select(ratio, n)
  if strategy == "alpha":
    if alphas is None:
      raise ValueError("the alpha strategy needs calibrated alphas (calibration.json)")
    a = np.asarray(alphas, np.float64)
    if a.ndim > 1:           # per-head alphas: rank layers by their mean
      a = a.reshape(n, -1).mean(-1)
    if a.shape != (n,):
      raise ValueError(f"got {a.shape[0] if a.ndim else 1} alphas for {n} attention sublayers "
                       "(calibration from a different model?)")
    order = np.argsort(a, kind="stable")      # ties: lower index first
    idx = sorted(int(i) for i in order[:k])
  elif strategy == "random":
    idx = sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=k, replace=False))
  else:  # alternating: odd sublayers first (1, 3, 5, ...), then even ones if ratio > 1/2
    order = list(range(1, n, 2)) + list(range(0, n, 2))
    idx = sorted(order[:k])
  return Selection(strategy, ratio, tuple(idx), n)

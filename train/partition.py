"""Trainable/frozen partition of a parameter tree by 'a/b/c' path, so frozen weights get neither
gradients nor optimizer state."""
from __future__ import annotations

import re
from typing import Any, Callable

from flax import traverse_util

Trainable = Callable[[str], bool] | str | None
"""Predicate on 'a/b/c' param paths, a regex searched in them, or None for all params."""


def flat(params) -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested param dict."""
  return traverse_util.flatten_dict(params, sep="/")


def unflat(flat_params: dict[str, Any]):
  return traverse_util.unflatten_dict(flat_params, sep="/")


def trainable_predicate(trainable: Trainable) -> Callable[[str], bool]:
  """The path predicate for a Trainable: everything for None or '', a regex search for a string."""
  if trainable is None or trainable == "":
    return lambda path: True
  if isinstance(trainable, str):
    pattern = re.compile(trainable)
    return lambda path: pattern.search(path) is not None
  return trainable


def without(params, drop: Callable[[str], bool]):
  """`params` less the leaves whose path `drop` selects."""
  return unflat({k: v for k, v in flat(params).items() if not drop(k)})


def split_params(params, is_trainable: Callable[[str], bool]):
  """(trainable, frozen) nested dicts."""
  leaves = flat(params)
  return (unflat({k: v for k, v in leaves.items() if is_trainable(k)}),
          unflat({k: v for k, v in leaves.items() if not is_trainable(k)}))


def merge_params(trainable, frozen):
  """The inverse of split_params."""
  return unflat({**flat(frozen), **flat(trainable)})

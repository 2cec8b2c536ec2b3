"""The one way the stages get batches: an iterator over this process's rows of the global batches."""
from __future__ import annotations

import atexit
import weakref
from typing import Iterator

import jax
import numpy as np

from loza_jax.config import Config
from train import data as data_lib
from train.data import Split


def process_rows(cfg: Config) -> int:
  """This process's rows of the global batch (train.batch_size split evenly over the processes)."""
  n = jax.process_count()
  if cfg.train.batch_size % n:
    raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {n} processes")
  return cfg.train.batch_size // n


def train_iterator(cfg: Config, *, rows: int | None = None, seed: int | None = None, split: Split = "train",
                   corpus: data_lib.Corpus | None = None, tokenizer: data_lib.Tokenizer | None = None,
                   text_loss: bool = True, per_process: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """Packed batches of `cfg.data` (see data.build_dataset): `rows` rows (default: this process's
  share of train.batch_size) of the `split` documents, sharded over the processes unless
  per_process=False (every process then sees the same rows, as evaluation's held-out rows do)."""
  rows = process_rows(cfg) if rows is None else rows
  shard = dict(process_index=jax.process_index(), process_count=jax.process_count()) if per_process else {}
  it = iter(data_lib.build_dataset(cfg, rows, seed=seed, split=split, corpus=corpus, tokenizer=tokenizer,
                                   text_loss=text_loss, **shard))
  if hasattr(it, "close"):   # a prefetch thread (data.prefetch_batches): stop it before the interpreter tears down
    atexit.register(_close, weakref.ref(it))
  return it


def _close(ref: weakref.ref) -> None:
  it = ref()
  if it is not None:
    it.close()
    # grain's __del__ closes again, during teardown, where the module globals it reads are gone: make that a no-op
    it.close = lambda: None

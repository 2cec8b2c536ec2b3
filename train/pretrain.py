"""Pretrain a model from scratch on the configured corpus (stdlib by default) mixed with retrieval tasks.

python -m train.pretrain --config configs/demo_cpu.yaml [--set key=value ...]
"""
from __future__ import annotations

import json
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from loza_jax.sharding import maybe_initialize_distributed
from train import cli, rundir
from train import data as data_lib
from loza_jax.model_dir import export_model
from train.trainer import Trainer

EVAL_BATCHES = 4
EVAL_SEED_OFFSET = 1_000_003


def eval_batches(cfg, rows: int, n: int = EVAL_BATCHES) -> list[dict[str, np.ndarray]]:
  """n batches of held-out text (data.heldout_every; fixed across runs, never trained on)."""
  it = iter(data_lib.build_dataset(cfg, rows, seed=cfg.data.seed + EVAL_SEED_OFFSET, split="heldout",
                                   process_index=jax.process_index(), process_count=jax.process_count()))
  return [next(it) for _ in range(n)]


def unigram_baseline(batches, vocab_size: int) -> float:
  """Entropy of the loss-weighted target tokens of `batches` over all processes."""
  counts = data_lib.unigram_counts(batches, vocab_size)
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
  return data_lib.entropy(counts)


def main(argv: Sequence[str] | None = None, hooks: Sequence[Callable] = ()) -> int:
  args, cfg = cli.parse(__doc__.splitlines()[0], argv)
  maybe_initialize_distributed(cfg.mesh)
  try:
    with rundir.locked(cfg.train.run_dir):
      return pretrain(cfg, hooks)
  except rundir.RunDirLocked as e:
    raise SystemExit(f"error: {e}") from None


def pretrain(cfg, hooks: Sequence[Callable] = ()) -> int:
  """Train, evaluate on held-out text and export the model; 0 when done, 1 when training stopped early."""
  t0 = time.perf_counter()
  lead = jax.process_index() == 0
  say = tqdm.write if lead else (lambda _: None)
  if cfg.train.batch_size % jax.process_count():
    raise SystemExit(f"error: train.batch_size={cfg.train.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  rows = cfg.train.batch_size // jax.process_count()
  try:
    tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
  except (FileNotFoundError, ImportError) as e:
    raise SystemExit(f"error: {e}") from e
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise SystemExit(f"error: data.tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                     f"{cfg.model.vocab_size}")
  try:
    trainer = Trainer(cfg, hooks=hooks, print_fn=say)
    train_iter = iter(data_lib.build_dataset(cfg, rows, process_index=jax.process_index(),
                                             process_count=jax.process_count(), tokenizer=tokenizer))
    held_out = eval_batches(cfg, rows)
    unigram = unigram_baseline(held_out, cfg.model.vocab_size)
    result = trainer.fit(train_iter)
  except (ValueError, FileNotFoundError, ImportError) as e:   # config, data and checkpoint problems
    raise SystemExit(f"error: {e}") from e
  if result.stopped != "done":
    say(f"stopped at step {result.step}: {result.stopped}")
    return 1
  eval_loss = trainer.evaluate(held_out)
  model_dir = export_model(trainer.run_dir / "model", trainer.state.params, trainer.cfg)
  summary = {"steps": result.step, "final_train_loss": result.last_metrics.get("loss"), "eval_loss": eval_loss,
             "unigram_baseline": unigram, "wall_time_s": time.perf_counter() - t0, "params": trainer.n_params,
             "model_dir": str(model_dir)}
  if lead:
    (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  say(f"done: {result.step} steps in {summary['wall_time_s']:.0f}s | eval loss {eval_loss:.4f} nats/token vs "
      f"unigram baseline {unigram:.4f} on the same {EVAL_BATCHES} held-out batches | model -> {model_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

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

from loza_jax.config import Config
from loza_jax.model_dir import export_model
from loza_jax.sharding import maybe_initialize_distributed
from train import cli, data as data_lib, rundir
from train.iterators import process_rows, train_iterator
from train.metrics import answer_accuracy, logged_steps
from train.trainer import Trainer

EVAL_BATCHES = 4
EVAL_SEED_OFFSET = 1_000_003


def eval_batches(cfg: Config, n: int = EVAL_BATCHES) -> list[dict[str, np.ndarray]]:
  """n batches of held-out text (data.heldout_fraction; fixed across runs, never trained on)."""
  it = train_iterator(cfg, seed=cfg.data.seed + EVAL_SEED_OFFSET, split="heldout")
  return [next(it) for _ in range(n)]


def unigram_baseline(batches, vocab_size: int) -> float:
  """Entropy of the loss-weighted target tokens of `batches` over all processes."""
  counts = data_lib.unigram_counts(batches, vocab_size)
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
  return data_lib.entropy(counts)


def pretrain(cfg: Config, *, hooks: Sequence[Callable] = (), print_fn: Callable[[str], None] | None = None) -> dict:
  """Train, evaluate on held-out text and export the model to <run_dir>/model; returns the summary
  (also written to summary.json), whose `stopped` is "done" or why training stopped early. Bad
  config or data raise ValueError / FileNotFoundError / ImportError."""
  t0 = time.perf_counter()
  lead = jax.process_index() == 0
  say = print_fn or (lambda _: None)
  process_rows(cfg)
  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"data.tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                     f"{cfg.model.vocab_size}")
  trainer = Trainer(cfg, hooks=hooks, print_fn=say if lead else None)
  train_iter = train_iterator(cfg, tokenizer=tokenizer)
  held_out = eval_batches(cfg)
  unigram = unigram_baseline(held_out, cfg.model.vocab_size)
  result = trainer.fit(train_iter)
  summary = {"steps": result.step, "stopped": result.stopped, "final_train_loss": result.last_metrics.get("loss"),
             "answer_acc": answer_accuracy(logged_steps(trainer.run_dir))}
  if result.stopped != "done":
    say(f"stopped at step {result.step}: {result.stopped}")
    return summary
  eval_loss = trainer.evaluate(held_out)
  model_dir = export_model(trainer.run_dir / "model", trainer.state.params, trainer.cfg)
  summary.update(eval_loss=eval_loss, unigram_baseline=unigram, wall_time_s=time.perf_counter() - t0,
                 params=trainer.n_params, model_dir=str(model_dir))
  if lead:
    (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  say(f"done: {result.step} steps in {summary['wall_time_s']:.0f}s | eval loss {eval_loss:.4f} nats/token vs "
      f"unigram baseline {unigram:.4f} on the same {EVAL_BATCHES} held-out batches | model -> {model_dir}")
  return summary


def main(argv: Sequence[str] | None = None, hooks: Sequence[Callable] = ()) -> int:
  """The command line: 0 when done, 1 when training stopped early; bad input exits with its message."""
  _, cfg = cli.parse(__doc__.splitlines()[0], argv)
  maybe_initialize_distributed(cfg.mesh)
  say = tqdm.write if jax.process_index() == 0 else (lambda _: None)
  try:
    with rundir.locked(cfg.train.run_dir):
      summary = pretrain(cfg, hooks=hooks, print_fn=say)
  except (ValueError, FileNotFoundError, ImportError, rundir.RunDirLocked) as e:   # config, data, checkpoints
    raise SystemExit(f"error: {e}") from None
  return 0 if summary["stopped"] == "done" else 1


if __name__ == "__main__":
  sys.exit(main())

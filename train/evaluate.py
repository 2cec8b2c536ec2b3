"""Evaluate: perplexity (overall and by position) and the synthetic long-context suite, side by side.

python -m train.evaluate --config configs/demo_cpu.yaml --set 'evaluate.models=[runs/demo/pretrain/model]'

Retrieval tasks (passkey, multi-key and multi-value needle-in-a-haystack, variable tracking) are
scored on the model's greedy continuation of the question: its argmax tokens over the answer span
up to and including the first wrong token (after that the greedy text would diverge, so nothing
more is credited). "answer-token acc" is the finer teacher-forced share of answer tokens predicted
right, useful while a small model is still learning to retrieve. Writes eval.json, eval.md and plots (accuracy heatmaps, perplexity by
position) to train.run_dir.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from loza_jax.config import Config
from loza_jax.model import build_model
from train import cli
from train import data as data_lib
from train.checkpoint import load_model

LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(tokens [B, T], segment_ids [B, T]) -> logits [B, T, V]."""

HELDOUT_SEED = 99_991


@dataclasses.dataclass(frozen=True)
class Case:
  kind: str
  length: int
  depth: float
  example: data_lib.RetrievalExample
  tokens: np.ndarray          # prompt + answer
  answer_start: int           # index of the first answer token


def model_logits_fn(params, cfg: Config) -> LogitsFn:
  """A jitted forward of the model in `cfg` (positions restart per segment)."""
  model = build_model(cfg)
  fwd = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s))
  return lambda tokens, seg: np.asarray(fwd(params, jnp.asarray(tokens), jnp.asarray(seg)))


def retrieval_cases(cfg: Config, corpus, tokenizer) -> list[Case]:
  """Every (task, length, depth, sample) of the evaluate section, drawn deterministically."""
  e = cfg.evaluate
  cases = []
  for kind in e.tasks:
    for length in e.lengths:
      for di, depth in enumerate(e.depths):
        for s in range(e.samples):
          rng = np.random.default_rng([e.seed, length, di, s, e.tasks.index(kind)])
          ex = data_lib.make_retrieval_example(kind, length, float(depth), rng, corpus, tokenizer)
          prompt = tokenizer.encode(ex.prompt)
          answer = tokenizer.encode(ex.answer)
          cases.append(Case(kind, length, float(depth), ex, np.concatenate([prompt, answer]).astype(np.int32),
                            len(prompt)))
  return cases


def _pad_batch(seqs: Sequence[np.ndarray], multiple: int) -> tuple[np.ndarray, np.ndarray]:
  T = max(len(s) for s in seqs)
  T = -(-T // multiple) * multiple
  tokens = np.zeros((len(seqs), T), np.int32)
  seg = np.zeros((len(seqs), T), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
    seg[i, :len(s)] = 1
  return tokens, seg


def greedy_answer(pred_tokens: np.ndarray, answer_tokens: np.ndarray) -> np.ndarray:
  """The greedy continuation as far as it is known from one teacher-forced pass."""
  wrong = np.nonzero(pred_tokens != answer_tokens)[0]
  return pred_tokens if not len(wrong) else pred_tokens[:wrong[0] + 1]


def score_cases(logits_fn: LogitsFn, cases: Sequence[Case], tokenizer, batch_size: int, multiple: int,
                progress: bool = True) -> list[dict]:
  """Greedy answers and scores for every case."""
  order = sorted(range(len(cases)), key=lambda i: len(cases[i].tokens))   # similar lengths share a batch
  results: dict[int, dict] = {}
  bar = tqdm(total=len(cases), desc="retrieval", disable=not progress, leave=False)
  for b0 in range(0, len(order), batch_size):
    idx = order[b0:b0 + batch_size]
    tokens, seg = _pad_batch([cases[i].tokens for i in idx], multiple)
    pred = np.argmax(logits_fn(tokens, seg), axis=-1)
    for row, i in enumerate(idx):
      c = cases[i]
      a0, a1 = c.answer_start, len(c.tokens)
      greedy = greedy_answer(pred[row, a0 - 1:a1 - 1], c.tokens[a0:a1])
      text = tokenizer.decode(greedy.tolist())
      results[i] = {"kind": c.kind, "length": c.length, "depth": c.depth, "answer": c.example.answer,
                    "generated": text, "score": data_lib.score_answer(c.example, text),
                    "token_acc": float(np.mean(pred[row, a0 - 1:a1 - 1] == c.tokens[a0:a1]))}
    bar.update(len(idx))
  bar.close()
  return [results[i] for i in range(len(cases))]


def heldout_rows(cfg: Config, n_rows: int, corpus=None, tokenizer=None) -> list[dict[str, np.ndarray]]:
  """n_rows packed rows of the held-out text chunks (data.heldout_every), never seen in training."""
  if n_rows == 0:
    return []
  it = iter(data_lib.build_dataset(cfg, 1, seed=cfg.data.seed + HELDOUT_SEED, split="heldout", corpus=corpus,
                                   tokenizer=tokenizer))
  return [next(it) for _ in range(n_rows)]


def perplexity(logits_fn: LogitsFn, rows: Sequence[dict[str, np.ndarray]], buckets: int, seq_len: int) -> dict:
  """Token-weighted NLL overall and per bucket of document position."""
  nll_sum = np.zeros(buckets)
  count = np.zeros(buckets)
  edges = np.linspace(0, seq_len, buckets + 1)
  for row in rows:
    tokens, seg, pos = row["tokens"], row["segment_ids"], row["positions"]
    logits = logits_fn(tokens, seg).astype(np.float64)[:, :-1]
    tgt = tokens[:, 1:]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, tgt[..., None], -1)[..., 0]
    w = np.asarray(data_lib.target_weights(seg, np.ones_like(seg)), np.float64)
    b = np.clip(np.searchsorted(edges, pos[:, 1:], side="right") - 1, 0, buckets - 1)
    for k in range(buckets):
      m = w * (b == k)
      nll_sum[k] += (nll * m).sum()
      count[k] += m.sum()
  total = nll_sum.sum() / max(count.sum(), 1)
  return {"nll": float(total), "ppl": float(np.exp(total)),
          "buckets": [{"from": int(edges[k]), "to": int(edges[k + 1]), "tokens": int(count[k]),
                       "ppl": float(np.exp(nll_sum[k] / count[k])) if count[k] else None} for k in range(buckets)]}


def accuracy_table(scored: Sequence[dict], tasks, lengths, depths) -> dict:
  """Mean score per task and per (task, length, depth) cell; plus overall."""
  by_cell: dict = {}
  for r in scored:
    by_cell.setdefault((r["kind"], r["length"], r["depth"]), []).append(r["score"])
  cells = {f"{k}|{n}|{d}": float(np.mean(v)) for (k, n, d), v in by_cell.items()}
  per_task = {k: float(np.mean([r["score"] for r in scored if r["kind"] == k])) for k in tasks}
  per_length = {str(n): float(np.mean([r["score"] for r in scored if r["length"] == n])) for n in lengths}
  return {"overall": float(np.mean([r["score"] for r in scored])) if scored else None,
          "token_acc": float(np.mean([r.get("token_acc", np.nan) for r in scored])) if scored else None,
          "per_task": per_task, "per_length": per_length, "cells": cells}


def evaluate_logits_fn(logits_fn: LogitsFn, cfg: Config, *, corpus=None, tokenizer=None, progress=True) -> dict:
  """The whole suite for one model given as a logits function."""
  tokenizer = tokenizer or data_lib.load_tokenizer(cfg.data.tokenizer)
  corpus = corpus or data_lib.load_corpus(cfg.data)
  e = cfg.evaluate
  cases = retrieval_cases(cfg, corpus, tokenizer)
  scored = score_cases(logits_fn, cases, tokenizer, e.batch_size, cfg.attention.block_size, progress)
  ppl = perplexity(logits_fn, heldout_rows(cfg, e.ppl_rows, corpus, tokenizer), e.ppl_buckets, cfg.data.seq_len)
  return {"perplexity": ppl, "retrieval": accuracy_table(scored, e.tasks, e.lengths, e.depths), "cases": scored}


def plot_results(results: dict[str, dict], cfg: Config, out_dir: Path) -> list[str]:
  """One accuracy heatmap (length x depth, all tasks averaged) per model + perplexity by position."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  e = cfg.evaluate
  names = list(results)
  fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names) + 1.5, 3.2), squeeze=False, sharey=True)
  for col, (ax, name) in enumerate(zip(axes[0], names)):
    cells = results[name]["retrieval"]["cells"]
    grid = np.array([[np.mean([cells.get(f"{k}|{n}|{float(d)}", np.nan) for k in e.tasks]) for n in e.lengths]
                     for d in e.depths])
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(e.lengths)), [str(n) for n in e.lengths])
    ax.set_yticks(range(len(e.depths)), [f"{d:.2f}" for d in e.depths])
    ax.set_xlabel("context length (tokens)")
    if col == 0:
      ax.set_ylabel("needle depth")
    ax.set_title(name, fontsize=9)
    for i in range(grid.shape[0]):
      for j in range(grid.shape[1]):
        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
  heat = out_dir / "retrieval_heatmap.png"
  fig.savefig(heat, dpi=120, bbox_inches="tight")
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 3.2))
  for name in names:
    b = results[name]["perplexity"]["buckets"]
    if b and any(x["ppl"] for x in b):
      ax.plot([(x["from"] + x["to"]) / 2 for x in b], [x["ppl"] for x in b], marker="o", label=name)
  ax.set_xlabel("position in document (tokens)")
  ax.set_ylabel("perplexity")
  ax.legend(fontsize=7)
  fig.tight_layout()
  pplp = out_dir / "perplexity_by_position.png"
  fig.savefig(pplp, dpi=120)
  plt.close(fig)
  return [heat.name, pplp.name]


def markdown(results: dict[str, dict], cfg: Config) -> str:
  e = cfg.evaluate
  head = ["model", "ppl"] + list(e.tasks) + [f"len {n}" for n in e.lengths] + ["retrieval", "answer-token acc"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results.items():
    rt = r["retrieval"]
    row = [name, f"{r['perplexity']['ppl']:.3f}" if r["perplexity"]["buckets"] and r["perplexity"]["ppl"] else "-"]
    row += [f"{rt['per_task'][k]:.2f}" for k in e.tasks] + [f"{rt['per_length'][str(n)]:.2f}" for n in e.lengths]
    row += [f"{rt['overall']:.2f}", f"{rt['token_acc']:.2f}"]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def evaluate(cfg: Config, models: Sequence[str], names: Sequence[str] | None = None, progress=True) -> dict:
  """Evaluate model directories side by side; writes eval.json, eval.md and plots to train.run_dir."""
  if not models:
    raise ValueError("evaluate.models is empty: give one or more model directories")
  names = list(names or [Path(m).parent.name + "/" + Path(m).name for m in models])
  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
  corpus = data_lib.load_corpus(cfg.data)
  results = {}
  for name, path in zip(names, models):
    params, mcfg = load_model(path)
    run_cfg = dataclasses.replace(cfg, model=mcfg.model, attention=mcfg.attention)
    results[name] = evaluate_logits_fn(model_logits_fn(params, run_cfg), run_cfg, corpus=corpus,
                                       tokenizer=tokenizer, progress=progress)
    results[name]["model_dir"] = str(path)
    results[name]["layer_types"] = list(run_cfg.layer_types)
  out_dir = Path(cfg.train.run_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  plots = plot_results(results, cfg, out_dir)
  md = markdown(results, cfg)
  (out_dir / "eval.json").write_text(json.dumps({"results": results, "plots": plots}, indent=2) + "\n")
  (out_dir / "eval.md").write_text(md)
  return {"results": results, "markdown": md, "plots": plots}


def main(argv: Sequence[str] | None = None) -> int:
  ap = cli.parser(__doc__.splitlines()[0])
  ap.add_argument("--model", action="append", default=[], help="model directory (repeatable; adds to "
                  "evaluate.models)")
  args, cfg = cli.parse(__doc__.splitlines()[0], argv, ap)
  models = list(cfg.evaluate.models) + args.model
  out = cli.run_or_exit(ap, evaluate, cfg, models, cfg.evaluate.names or None, lock=cfg.train.run_dir)
  print(out["markdown"])
  print(f"wrote {Path(cfg.train.run_dir) / 'eval.json'}, eval.md and {', '.join(out['plots'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Evaluate: perplexity (overall and by position) and the synthetic long-context suite, side by side.

python -m train.evaluate --config configs/demo_cpu.yaml --set 'evaluate.models=[runs/demo/pretrain/model]'

Retrieval tasks (passkey, multi-key and multi-value needle-in-a-haystack, variable tracking) are
drawn with haystacks from held-out documents only and scored by exact match of the whole answer
(multi-value answers in any order) on the model's answer text. One callable, `AnswerFn`, turns a
batch of prompts into answer text: with evaluate.answers = generate (the default) the model decodes
greedily through its KV cache (prefill, then one token at a time, as in serving); teacher_forced
reads the greedy continuation off one pass over prompt + reference (argmax over the answer span up
to and including the first wrong token). "answer-token acc" is the finer teacher-forced share of
answer tokens predicted right. Each case records the needle's
actual token depth, its distance to the question and its SSA zone (sink, local, beyond); accuracy
on `beyond` cases is what sparse layers cannot read directly. Perplexity is measured on held-out
text at data.seq_len (packed, by position) and at each evaluate.ppl_lengths on whole-length
pieces of held-out documents. Writes eval.json, eval.md and plots to train.run_dir.
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

from loza_jax import generate as gen
from loza_jax.cache import check_cacheable
from loza_jax.config import Config
from loza_jax.model import build_model
from loza_jax.model_dir import load_config_file, load_model
from train import cli
from train import data as data_lib
from train.iterators import train_iterator

LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(tokens [B, T], segment_ids [B, T]) -> logits [B, T, V]."""

HELDOUT_SEED = 99_991
ZONES = ("sink", "local", "beyond")


@dataclasses.dataclass(frozen=True)
class Answer:
  """The model's answer to one case; token_acc: teacher-forced share of reference tokens right (None: not measured)."""
  text: str
  token_acc: float | None = None


AnswerFn = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], Sequence["Answer | str"]]
"""(prompt tokens per case, reference answer tokens per case) -> the model's answer per case (Answer or text).

A free-running generator uses each reference only for its length (the token budget); the default,
`teacher_forced_answers`, feeds prompt + reference through the model once.
"""


@dataclasses.dataclass(frozen=True)
class Case:
  kind: str
  length: int                 # requested length in tokens; len(tokens) is within one block below it
  depth: float                # requested depth of the answer needle
  example: data_lib.RetrievalExample
  tokens: np.ndarray          # prompt + answer
  answer_start: int           # index of the first answer token
  zone: str = ""              # sink | local | beyond: needle 0 seen from the question's first token by SSA


def model_logits_fn(params, cfg: Config) -> LogitsFn:
  """A jitted forward of the model in `cfg` (positions restart per segment).

  With evaluate.pad_to, rows are padded (segment 0, which no real token attends to) to a multiple of it and the
  logits cut back on the device: every batch up to pad_to tokens runs one compiled program, where one per
  length would cost a compilation each (most of an evaluation's time on a GPU).
  """
  pad, block = cfg.evaluate.pad_to, cfg.attention.block_size
  if pad % block:
    raise ValueError(f"evaluate.pad_to={pad} must be a multiple of attention.block_size={block}")
  model = build_model(cfg)
  fwd = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s))

  def logits_fn(tokens, seg):
    T = tokens.shape[1]
    if pad:
      extra = ((0, 0), (0, -(-T // pad) * pad - T))
      tokens, seg = np.pad(tokens, extra), np.pad(seg, extra)
    return np.asarray(fwd(params, jnp.asarray(tokens), jnp.asarray(seg))[:, :T])
  return logits_fn


def retrieval_cases(cfg: Config, corpus, tokenizer) -> list[Case]:
  """Every (task, length, depth, sample) of the evaluate section, drawn deterministically, haystacks from
  held-out documents (never trained on)."""
  e, a = cfg.evaluate, cfg.attention
  held = data_lib.split_docs(corpus, cfg.data.heldout_fraction, "heldout")
  bpt = data_lib.measure_bytes_per_token(tokenizer, corpus, data_lib.split_docs(corpus, cfg.data.heldout_fraction,
                                                                                  "train"))
  cases = []
  for kind in e.tasks:
    for length in e.lengths:
      for di, depth in enumerate(e.depths):
        for s in range(e.samples):
          rng = np.random.default_rng([e.seed, length, di, s, e.tasks.index(kind)])
          ex = data_lib.make_retrieval_example(kind, length, float(depth), rng, corpus, tokenizer, docs=held,
                                               bytes_per_token=bpt)
          prompt = tokenizer.encode(ex.prompt)
          answer = tokenizer.encode(ex.answer)
          zone = data_lib.needle_zone(ex.needle_ends[0], ex.question_token, a.block_size, a.sink_blocks,
                                      a.local_blocks)
          cases.append(Case(kind, length, float(depth), ex, np.concatenate([prompt, answer]).astype(np.int32),
                            len(prompt), zone))
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


def teacher_forced_answers(logits_fn: LogitsFn, tokenizer, multiple: int) -> AnswerFn:
  """The default AnswerFn: one forward pass over prompt + reference; the greedy answer as far as it is known."""
  def answer_fn(prompts: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> list[Answer]:
    tokens, seg = _pad_batch([np.concatenate([p, r]) for p, r in zip(prompts, refs)], multiple)
    pred = np.argmax(logits_fn(tokens, seg), axis=-1)
    out = []
    for row, (p, r) in enumerate(zip(prompts, refs)):
      guess = pred[row, len(p) - 1:len(p) + len(r) - 1]
      out.append(Answer(tokenizer.decode(greedy_answer(guess, r).tolist()), float(np.mean(guess == r))))
    return out
  return answer_fn


GENERATE_EXTRA = 2   # tokens generated past the reference answer's length (generated_answers)


def check_positions(cfg: Config, model_dir: str | None = None) -> None:
  """ValueError, before any work, when evaluate.answers=generate would decode past model.max_position_embeddings
  at the longest evaluate.lengths (a case of L tokens decodes up to about L + GENERATE_EXTRA positions) and the
  model has no RoPE scaling."""
  m, e = cfg.model, cfg.evaluate
  if e.answers != "generate" or m.rope_scaling is not None or not e.lengths:
    return
  need = max(e.lengths) + GENERATE_EXTRA
  if need > m.max_position_embeddings:
    raise ValueError(f"evaluate.lengths has {max(e.lengths)}: greedy answers decode up to {need} positions, past "
                     f"model.max_position_embeddings={m.max_position_embeddings}"
                     + (f" of {model_dir}" if model_dir else "") + "; use shorter lengths, "
                     "evaluate.answers=teacher_forced, or a model with RoPE scaling")


def generated_answers(params, cfg: Config, tokenizer, logits_fn: LogitsFn | None = None,
                      extra_tokens: int = GENERATE_EXTRA) -> AnswerFn:
  """AnswerFn by free greedy decoding through the KV cache (loza_jax.generate), up to a newline or
  len(reference) + extra_tokens tokens; token_acc from one teacher-forced pass when logits_fn is given."""
  check_cacheable(cfg)
  newline = [int(t) for t in tokenizer.encode("\n")]
  stop = newline[:1] if len(newline) == 1 else []
  cache_dtype = cfg.model.dtype
  forced = None if logits_fn is None else teacher_forced_answers(logits_fn, tokenizer, cfg.attention.block_size)

  def answer_fn(prompts: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> list[Answer]:
    block = cfg.attention.block_size
    longest = -(-max(len(p) for p in prompts) // block) * block
    new = gen.generate(params, cfg, [p.tolist() for p in prompts], max_new_tokens=max(len(r) for r in refs) + extra_tokens,
                       stop_tokens=stop, prefill_chunk=longest, cache_dtype=cache_dtype)
    accs = [None] * len(prompts) if forced is None else [a.token_acc for a in forced(prompts, refs)]
    return [Answer(tokenizer.decode(n.tolist()), acc) for n, acc in zip(new, accs)]
  return answer_fn


def score_cases(logits_fn: LogitsFn | None, cases: Sequence[Case], tokenizer, batch_size: int, multiple: int,
                progress: bool = True, answer_fn: AnswerFn | None = None) -> list[dict]:
  """Answers (from `answer_fn`, default teacher_forced_answers(logits_fn)) and exact-match scores per case."""
  if answer_fn is None:
    if logits_fn is None:
      raise ValueError("score_cases needs a logits_fn or an answer_fn")
    answer_fn = teacher_forced_answers(logits_fn, tokenizer, multiple)
  order = sorted(range(len(cases)), key=lambda i: len(cases[i].tokens))   # similar lengths share a batch
  results: dict[int, dict] = {}
  bar = tqdm(total=len(cases), desc="retrieval", disable=not progress, leave=False)
  for b0 in range(0, len(order), batch_size):
    idx = order[b0:b0 + batch_size]
    answers = answer_fn([cases[i].tokens[:cases[i].answer_start] for i in idx],
                        [cases[i].tokens[cases[i].answer_start:] for i in idx])
    if len(answers) != len(idx):
      raise ValueError(f"answer_fn returned {len(answers)} answers for {len(idx)} prompts")
    for i, ans in zip(idx, answers):
      ans = Answer(ans) if isinstance(ans, str) else ans
      c, ex = cases[i], cases[i].example
      results[i] = {"kind": c.kind, "length": c.length, "tokens": int(len(c.tokens)), "depth": c.depth,
                    "depth_actual": round(ex.depth_actual, 4), "needle_token": int(ex.needle_tokens[0]),
                    "question_token": int(ex.question_token), "distance": int(ex.distance), "zone": c.zone,
                    "answer": ex.answer, "generated": ans.text, "score": data_lib.score_answer(ex, ans.text),
                    "token_acc": ans.token_acc}
    bar.update(len(idx))
  bar.close()
  return [results[i] for i in range(len(cases))]


def heldout_rows(cfg: Config, n_rows: int, corpus=None, tokenizer=None) -> list[dict[str, np.ndarray]]:
  """n_rows packed rows of data.seq_len tokens of held-out documents (data.heldout_fraction), never trained on."""
  if n_rows == 0:
    return []
  it = train_iterator(cfg, rows=1, seed=cfg.data.seed + HELDOUT_SEED, split="heldout", corpus=corpus,
                      tokenizer=tokenizer, per_process=False)
  return [next(it) for _ in range(n_rows)]


def heldout_rows_at(cfg: Config, length: int, n_rows: int, corpus, tokenizer) -> list[dict[str, np.ndarray]]:
  """Up to n_rows single-document rows of exactly `length` held-out tokens (padded to a block multiple)."""
  fraction = cfg.data.heldout_fraction
  bpt = data_lib.measure_bytes_per_token(tokenizer, corpus, data_lib.split_docs(corpus, fraction, "train"))
  pieces = data_lib.full_length_rows(corpus, tokenizer, data_lib.split_docs(corpus, fraction, "heldout"), length,
                                     n_rows, cfg.data.seed + HELDOUT_SEED + length, bpt)
  rows = []
  for p in pieces:
    tokens, seg = _pad_batch([p], cfg.attention.block_size)
    rows.append({"tokens": tokens, "segment_ids": seg, "positions": np.arange(tokens.shape[1])[None] * seg})
  return rows


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
  return {"nll": float(total), "ppl": float(np.exp(total)), "rows": len(rows), "tokens": int(count.sum()),
          "buckets": [{"from": int(edges[k]), "to": int(edges[k + 1]), "tokens": int(count[k]),
                       "ppl": float(np.exp(nll_sum[k] / count[k])) if count[k] else None} for k in range(buckets)]}


def _mean(xs) -> float | None:
  xs = [x for x in xs if x is not None]
  return float(np.mean(xs)) if xs else None


def accuracy_table(scored: Sequence[dict], tasks, lengths, depths) -> dict:
  """Exact-match accuracy overall, per task, length, SSA zone and (task, length, depth) cell; plus mean
  actual depth per (length, depth) and the teacher-forced answer-token share."""
  by_cell: dict = {}
  for r in scored:
    by_cell.setdefault((r["kind"], r["length"], r["depth"]), []).append(r["score"])
  cells = {f"{k}|{n}|{d}": float(np.mean(v)) for (k, n, d), v in by_cell.items()}
  per_task = {k: _mean([r["score"] for r in scored if r["kind"] == k]) for k in tasks}
  per_length = {str(n): _mean([r["score"] for r in scored if r["length"] == n]) for n in lengths}
  per_zone = {z: {"acc": _mean([r["score"] for r in scored if r.get("zone") == z]),
                  "n": sum(r.get("zone") == z for r in scored)} for z in ZONES}
  actual = {f"{n}|{float(d)}": _mean([r.get("depth_actual") for r in scored if r["length"] == n and r["depth"] == d])
            for n in lengths for d in depths}
  actual = {k: None if v is None else round(v, 4) for k, v in actual.items()}
  return {"overall": _mean([r["score"] for r in scored]),
          "token_acc": (float(np.mean([np.nan if r.get("token_acc") is None else r["token_acc"] for r in scored]))
                        if scored else None),
          "per_task": per_task, "per_length": per_length, "per_zone": per_zone, "cells": cells,
          "depth_actual": actual}


def evaluate_logits_fn(logits_fn: LogitsFn, cfg: Config, *, corpus=None, tokenizer=None, progress=True,
                       answer_fn: AnswerFn | None = None) -> dict:
  """The whole suite for one model given as a logits function (answers from `answer_fn` if given)."""
  tokenizer = tokenizer or data_lib.load_tokenizer(cfg.data.tokenizer)
  corpus = corpus or data_lib.load_corpus(cfg.data)
  e = cfg.evaluate
  cases = retrieval_cases(cfg, corpus, tokenizer)
  scored = score_cases(logits_fn, cases, tokenizer, e.batch_size, cfg.attention.block_size, progress, answer_fn)
  ppl = perplexity(logits_fn, heldout_rows(cfg, e.ppl_rows, corpus, tokenizer), e.ppl_buckets, cfg.data.seq_len)
  by_length = {}
  for n in e.ppl_lengths or e.lengths:
    r = perplexity(logits_fn, heldout_rows_at(cfg, n, e.ppl_rows, corpus, tokenizer), e.ppl_buckets, n)
    by_length[str(n)] = {"ppl": r["ppl"] if r["tokens"] else None, "nll": r["nll"] if r["tokens"] else None,
                         "rows": r["rows"], "tokens": r["tokens"], "buckets": r["buckets"]}
  ppl["by_length"] = by_length
  return {"perplexity": ppl, "retrieval": accuracy_table(scored, e.tasks, e.lengths, e.depths), "cases": scored}


def length_label(n: int) -> str:
  """A token count as a short tick label: 8192 -> '8K', 1000 -> '1000' (only exact multiples of 1024 shorten)."""
  return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def line_style(i: int) -> dict:
  """Matplotlib colour and dash for the i-th line: the 10 default colours, then again dashed, then dotted, so
  more than 10 models on one plot stay apart."""
  return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":")[(i // 10) % 3]}


def plot_results(results: dict[str, dict], cfg: Config, out_dir: Path) -> list[str]:
  """One accuracy heatmap (length x requested depth, all tasks averaged, each cell labelled with the mean
  actual token depth of its needles) per model + perplexity by position."""
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
    ax.set_xticks(range(len(e.lengths)), [length_label(n) for n in e.lengths])
    actual = results[name]["retrieval"].get("depth_actual", {})
    ax.set_yticks(range(len(e.depths)), [f"{d:.2f}" for d in e.depths])
    ax.set_xlabel("context length (tokens)")
    if col == 0:
      ax.set_ylabel("requested needle depth")
    ax.set_title(name, fontsize=9)
    for i, d in enumerate(e.depths):
      for j, n in enumerate(e.lengths):
        got = actual.get(f"{n}|{float(d)}")
        label = f"{grid[i, j]:.2f}" + ("" if got is None else f"\nat {got:.2f}")
        ax.text(j, i, label, ha="center", va="center", color="w", fontsize=6)
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
  heat = out_dir / "retrieval_heatmap.png"
  fig.savefig(heat, dpi=120, bbox_inches="tight")
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 3.2))
  for i, name in enumerate(names):
    b = results[name]["perplexity"]["buckets"]
    if b and any(x["ppl"] for x in b):
      ax.plot([(x["from"] + x["to"]) / 2 for x in b], [x["ppl"] for x in b], marker="o", label=name,
              **line_style(i))
  ax.set_xlabel("position in document (tokens)")
  ax.set_ylabel("perplexity")
  ax.legend(fontsize=7)
  fig.tight_layout()
  pplp = out_dir / "perplexity_by_position.png"
  fig.savefig(pplp, dpi=120)
  plt.close(fig)
  return [heat.name, pplp.name]


def _fmt(x, spec=".2f") -> str:
  return "-" if x is None else format(x, spec)


def markdown(results: dict[str, dict], cfg: Config) -> str:
  """Main table (perplexity per length, exact match per task/length, on `beyond` cases, answer-token share)
  and a table of exact match per SSA zone."""
  e = cfg.evaluate
  ppl_lengths = e.ppl_lengths or e.lengths
  head = (["model", f"ppl@{cfg.data.seq_len} packed"] + [f"ppl@{n}" for n in ppl_lengths] + list(e.tasks) +
          [f"len {n}" for n in e.lengths] + ["exact match", "beyond", "answer-token acc"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results.items():
    rt, pp = r["retrieval"], r["perplexity"]
    row = [name, f"{pp['ppl']:.3f}" if pp["buckets"] and pp.get("tokens", 1) else "-"]
    row += [_fmt(pp.get("by_length", {}).get(str(n), {}).get("ppl"), ".3f") for n in ppl_lengths]
    row += [_fmt(rt["per_task"][k]) for k in e.tasks] + [_fmt(rt["per_length"][str(n)]) for n in e.lengths]
    beyond = rt["per_zone"]["beyond"]
    row += [_fmt(rt["overall"]), f"{_fmt(beyond['acc'])} (n={beyond['n']})", _fmt(rt["token_acc"])]
    lines.append("| " + " | ".join(row) + " |")
  zone_head = ["model"] + [f"{z} (n)" for z in ZONES]
  lines += ["", "Exact match by where the answer needle lies for SSA seen from the question (sink: in the first "
            f"{cfg.attention.sink_blocks}x{cfg.attention.block_size} tokens; local: within the "
            f"{cfg.attention.local_blocks} most recent blocks; beyond: neither):", "",
            "| " + " | ".join(zone_head) + " |", "|" + "---|" * len(zone_head)]
  for name, r in results.items():
    z = r["retrieval"]["per_zone"]
    lines.append("| " + " | ".join([name] + [f"{_fmt(z[k]['acc'])} ({z[k]['n']})" for k in ZONES]) + " |")
  return "\n".join(lines) + "\n"


def evaluate(cfg: Config, models: Sequence[str], names: Sequence[str] | None = None, progress=True) -> dict:
  """Evaluate model directories side by side; writes eval.json, eval.md and plots to train.run_dir."""
  if not models:
    raise ValueError("evaluate.models is empty: give one or more model directories")
  names = list(names or [Path(m).parent.name + "/" + Path(m).name for m in models])
  for path in models:   # every model checked before the first is evaluated
    check_positions(dataclasses.replace(cfg, model=load_config_file(path).model), str(path))
  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
  corpus = data_lib.load_corpus(cfg.data)
  results = {}
  for name, path in zip(names, models):
    params, mcfg = load_model(path)
    run_cfg = dataclasses.replace(cfg, model=mcfg.model, attention=mcfg.attention)
    logits_fn = model_logits_fn(params, run_cfg)
    answer_fn = (generated_answers(jax.device_put(params), run_cfg, tokenizer, logits_fn)
                 if cfg.evaluate.answers == "generate" else None)
    results[name] = evaluate_logits_fn(logits_fn, run_cfg, corpus=corpus, tokenizer=tokenizer, progress=progress,
                                       answer_fn=answer_fn)
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

"""The LoZA pipeline end to end: pretrain (or --init) → calibrate → sparsify → mid-train → evaluate.

python -m train.pipeline --config configs/demo_cpu.yaml [--init MODEL_DIR] [--until STAGE] [--set key=value ...]

Everything lands under train.run_dir: pretrain/, calibrate/, the sparse models (sparse/: by α at
sparsify.ratio, sparse-<pct>/: by α at the other pipeline.ratios, random-<seed>/: pipeline.random_seeds
random selections, alternating/), their mid-training runs (midtrain/ for the α selection at
sparsify.ratio, midtrain-<name>/ for the others, all through the same midtrain.stages), eval/ and
report.md. The report compares the full model, the α-selected sparse models before (at sparsify.ratio)
and after mid-training, random selection (mean ± std and min–max over seeds) and alternating selection,
leading with exact match on `beyond` cases; it adds perplexity by position, wall time and TFLOP/s per
device of every training run, and plain checks of the targets.

Resumable: each finished step (a pretraining stage, the calibration, each sparse model, each mid-training
run, each model's evaluation) leaves a marker in <run_dir>/done/, written last, and a later call of the
same command on the same run directory skips it; an unfinished training run resumes from its last
checkpoint. --until STAGE stops after that stage, so a long run can be split over several calls. The full model
is evaluated right after pretraining (its line printed), so the first call already says whether there is
retrieval to keep.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax

import numpy as np
from tqdm.auto import tqdm

from loza_jax import config as config_lib
from loza_jax.config import (Config, MidtrainStage, PretrainStage, RopeScaling, pretrain_stage_data, replace,
                             save_config, to_dict)
from loza_jax.model_dir import SOURCE_FILE, export_model, load_config_file, load_model
from loza_jax.sharding import maybe_initialize_distributed
from loza_jax.sparsity import select_layers
from train import cli
from train import pretrain as pretrain_lib
from train.calibrate import calibrate, markdown as calibration_markdown
from train.evaluate import check_positions, evaluate, length_label, line_style, markdown as eval_markdown, plot_results
from train.metrics import logged_steps
from train.midtrain import midtrain
from train.sparsify import sparsify

STAGES = ("pretrain", "calibrate", "sparsify", "midtrain", "evaluate")
DONE_DIR = "done"
Memo = Callable[[str, Callable[[], dict]], dict]


def _stage_cfg(cfg: Config, run_dir: Path, name: str) -> Config:
  return replace(cfg, **{"train.run_dir": str(run_dir / name)})


# ----------------------------------------------------------------------------------------
# Resuming: one marker per finished step, written last.


def done_marker(run_dir: Path, key: str) -> Path:
  """Where the record of finished step `key` is kept."""
  return run_dir / DONE_DIR / f"{key}.json"


def _write_json(path: Path, obj) -> None:
  """Write JSON beside `path`, then rename it there: a killed write never leaves a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
  os.replace(tmp, path)


def once(run_dir: Path, key: str, fn: Callable[[], dict], say: Callable[[str], None] = print) -> dict:
  """fn()'s record (plus its wall_s) the first time; the stored record on every later call on `run_dir`."""
  path = done_marker(run_dir, key)
  if path.is_file():
    record = json.loads(path.read_text())
    say(f"{key}: done in an earlier call ({record['wall_s']:.0f} s); skipped")
    return record
  t = time.perf_counter()
  record = json.loads(json.dumps(fn(), default=str))   # the same types whether computed or read back
  record["wall_s"] = time.perf_counter() - t
  if jax.process_index() == 0:
    _write_json(path, record)
  return record


def run_now(key: str, fn: Callable[[], dict]) -> dict:
  """A Memo that always runs (no run directory to resume from)."""
  del key
  t = time.perf_counter()
  return dict(json.loads(json.dumps(fn(), default=str)), wall_s=time.perf_counter() - t)


def _first_difference(a, b, key: str = "") -> str | None:
  """The dotted key of the first place where nested dicts `a` and `b` differ; None when equal."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      d = _first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else k)
      if d is not None:
        return d
    return None
  return None if a == b else key or "<root>"


def check_same_run(run_dir: Path, cfg: Config, init: str | None) -> None:
  """Record the config and --init of the run in <run_dir>/done/run.json; ValueError when the directory holds
  finished steps of another config or --init (a resumed run must not mix two runs)."""
  path = done_marker(run_dir, "run")
  mine = json.loads(json.dumps({"config": to_dict(cfg), "init": init}))
  if path.is_file():
    diff = _first_difference(json.loads(path.read_text()), mine)
    if diff is not None:
      raise ValueError(f"{run_dir} holds steps of another run ({diff.removeprefix('config.')} differs); run "
                       "the same command to resume it, or pick a new --run-dir")
  elif jax.process_index() == 0:
    _write_json(path, mine)


# ----------------------------------------------------------------------------------------
# Pretraining.


def pretrain_stage_cfg(cfg: Config, stage: PretrainStage, index: int, run_dir: Path) -> Config:
  """The config of pretraining stage `index`: its data section (own seed), batch, steps, schedule, weight decay and
  run dir."""
  return replace(cfg, **{
      "pipeline.pretrain_stages": (),
      "data": replace(pretrain_stage_data(cfg.data, stage), seed=cfg.data.seed + index),
      "train.steps": stage.steps,
      "train.batch_size": stage.batch_size or cfg.train.batch_size,
      "train.learning_rate": stage.learning_rate or cfg.train.learning_rate,
      "train.warmup_steps": stage.warmup_steps,
      "train.weight_decay": cfg.train.weight_decay if stage.weight_decay is None else stage.weight_decay,
      "train.decay_steps": 0,
      "train.run_dir": str(run_dir),
  })


def _begin_stage(cfg: Config, stage: PretrainStage, index: int, run_dir: Path, print_fn) -> Config:
  """pretrain_stage_cfg, announced: the runs inside number their own stages from 0, so say which this is."""
  scfg = pretrain_stage_cfg(cfg, stage, index, run_dir)
  if print_fn:
    print_fn(f"pretraining stage {index} of {len(cfg.pipeline.pretrain_stages)}: {scfg.train.steps} steps of "
             f"{scfg.train.batch_size} x {scfg.data.seq_len} tokens")
  return scfg


def _pretrain_run(cfg: Config, print_fn) -> dict:
  """train.pretrain on `cfg`; RuntimeError when it stops early."""
  summary = pretrain_lib.pretrain(cfg, print_fn=print_fn)
  if summary["stopped"] != "done":
    raise RuntimeError(f"pretraining ({cfg.train.run_dir}) stopped at step {summary['steps']}: {summary['stopped']}")
  return summary


def _stage_record(index: int, stage: PretrainStage, scfg: Config, loss, answer_acc) -> dict:
  return {"stage": index, "seq_len": stage.seq_len, "steps": stage.steps, "batch_size": scfg.train.batch_size,
          "learning_rate": scfg.train.learning_rate, "final_loss": loss, "answer_acc": answer_acc,
          "run_dir": scfg.train.run_dir}


def pretrain_once(cfg: Config, out: Path, print_fn=None, memo: Memo = run_now) -> tuple[str, dict]:
  """One train.pretrain run of the train and data sections into `out`; (model directory, summary)."""
  summary = memo("pretrain", lambda: _pretrain_run(replace(cfg, **{"train.run_dir": str(out)}), print_fn))
  summary["run_dir"] = str(out)
  return summary["model_dir"], summary


def _first_stage(cfg: Config, stage: PretrainStage, out: Path, print_fn) -> dict:
  """Pretraining stage 0 from scratch: the train.pretrain summary and the stage record."""
  scfg = _begin_stage(cfg, stage, 0, out, print_fn)
  summary = _pretrain_run(scfg, print_fn)
  return dict(summary, record=_stage_record(0, stage, scfg, summary["final_train_loss"], summary.get("answer_acc")))


def _later_stage(cfg: Config, stage: PretrainStage, index: int, out: Path, model: str, print_fn) -> dict:
  """Pretraining stage `index` >= 1: a one-stage mid-training run of the full model with the stage's data."""
  scfg = _begin_stage(cfg, stage, index, out / f"stage-{index}", print_fn)
  one = MidtrainStage(seq_len=stage.seq_len, steps=stage.steps, learning_rate=scfg.train.learning_rate,
                      warmup_steps=stage.warmup_steps, batch_size=scfg.train.batch_size)
  model_dir = str(midtrain(replace(scfg, **{"midtrain.stages": (one,)}), model, print_fn=print_fn))
  done = json.loads((out / f"stage-{index}" / "stages.json").read_text())[-1]
  return {"model_dir": model_dir,
          "record": _stage_record(index, stage, scfg, done.get("final_loss"), done.get("answer_acc"))}


def pretrain_stages(cfg: Config, out: Path, print_fn=None, memo: Memo = run_now) -> tuple[str, dict]:
  """Pretrain through pipeline.pretrain_stages: stage 0 from scratch (train.pretrain), each later stage continues
  the previous model with its own data, batch and schedule (a one-stage mid-training run of the full model).
  Each stage is one step of `memo`. Returns the final model directory and the stage-0 summary with a record
  (wall_s included) per stage."""
  stages = cfg.pipeline.pretrain_stages
  first = memo("pretrain-0", lambda: _first_stage(cfg, stages[0], out, print_fn))
  model = first["model_dir"]
  summary = {k: v for k, v in first.items() if k not in ("record", "wall_s")}
  summary["stages"] = [dict(first["record"], wall_s=first["wall_s"])]
  for i, st in enumerate(stages[1:], 1):
    rec = memo(f"pretrain-{i}", lambda i=i, st=st, model=model: _later_stage(cfg, st, i, out, model, print_fn))
    model = rec["model_dir"]
    summary["stages"].append(dict(rec["record"], wall_s=rec["wall_s"]))
  summary["steps"] = sum(st.steps for st in stages)
  summary["model_dir"] = model
  return model, summary


def random_baseline_seeds(cfg: Config, chosen: Sequence[int], n: int, tries: int = 1000) -> list[int]:
  """The first n seeds from sparsify.seed on whose random selections differ from the calibrated one and from
  each other (a seed that redraws a selection already taken is skipped); fewer when fewer such selections exist."""
  total = cfg.model.num_attention_sublayers
  seeds, taken = [], {tuple(chosen)}
  for seed in range(cfg.sparsify.seed, cfg.sparsify.seed + tries):
    if len(seeds) == n:
      break
    ssa = tuple(select_layers("random", total, cfg.sparsify.ratio, seed=seed).ssa_layers)
    if ssa not in taken:
      seeds.append(seed)
      taken.add(ssa)
  return seeds


def random_baseline_seed(cfg: Config, chosen: Sequence[int], tries: int = 1000) -> int:
  """The first of random_baseline_seeds; sparsify.seed when no other selection exists."""
  return (random_baseline_seeds(cfg, chosen, 1, tries) or [cfg.sparsify.seed])[0]


def spread(values: Sequence[float | None]) -> dict | None:
  """Mean, min, max and population std of the values that are not None; None when there are none."""
  xs = np.asarray([v for v in values if v is not None], np.float64)
  if not len(xs):
    return None
  return {"mean": float(xs.mean()), "min": float(xs.min()), "max": float(xs.max()), "std": float(xs.std()),
          "n": int(len(xs))}


def headline(result: dict, seq_len: int) -> dict:
  """The numbers of one evaluated model the report leads with."""
  rt, pp = result["retrieval"], result["perplexity"]
  zone = lambda z: rt["per_zone"][z]["acc"]
  return {"beyond": zone("beyond"), "local": zone("local"), "sink": zone("sink"),
          "exact_match": rt["overall"],
          "passkey": rt["per_task"].get("passkey"), "token_acc": rt["token_acc"],
          "ppl": pp.get("by_length", {}).get(str(seq_len), {}).get("ppl") or pp["ppl"]}


def beyond_at(cases: Sequence[dict], length: int) -> dict:
  """Exact match on `beyond` cases of one context length (and how many there are)."""
  s = [c["score"] for c in cases if c.get("zone") == "beyond" and c["length"] == length]
  return {"acc": float(np.mean(s)) if s else None, "n": len(s)}


def _cell(x, spec=".2f") -> str:
  return "-" if x is None else format(x, spec)


def _agg_cell(stat: dict | None, spec=".2f") -> str:
  if stat is None:
    return "-"
  if stat["n"] == 1:
    return format(stat["mean"], spec)
  return f"{stat['mean']:{spec}} ± {stat['std']:{spec}} ({stat['min']:{spec}}–{stat['max']:{spec}})"


HEAD_KEYS = ("beyond_train", "beyond", "local", "exact_match", "passkey", "token_acc", "ppl")


def _ssa_layers(result: dict) -> list[int]:
  return [i for i, t in enumerate(result["layer_types"]) if t == "ssa"]


def headline_rows(info: dict, seq_len: int) -> list[tuple[str, str, dict]]:
  """(label, SSA sublayers, headline numbers (and sparsity) or their spread over seeds) per compared model, in
  evaluation order; the random selections share one row where the first of them would be."""
  results = info["evaluation"]["results"]
  row = lambda name: dict(headline(results[name], seq_len), beyond_train=beyond_at(results[name]["cases"],
                                                                                    seq_len)["acc"],
                          sparsity=len(_ssa_layers(results[name])) / len(results[name]["layer_types"]))
  ssa = lambda name: ",".join(str(i) for i in _ssa_layers(results[name])) or "-"
  rnd = [n for n in results if n.startswith("random-")]
  rows = []
  for name in results:
    if name in rnd[1:]:
      continue
    if name in rnd[:1]:
      per = [row(n) for n in rnd]
      agg = {k: spread([p[k] for p in per]) for k in HEAD_KEYS}
      rows.append((f"random-sparse+midtrain ({len(rnd)} seeds)", " / ".join(ssa(n) for n in rnd),
                   dict(agg, sparsity=per[0]["sparsity"])))
    else:
      rows.append((name, ssa(name), row(name)))
  return rows


def headline_markdown(info: dict, seq_len: int) -> str:
  """The comparison table: exact match on `beyond` cases first; random as mean ± std (min–max) over seeds."""
  head = ["model", "SSA sublayers", "sparsity", f"**beyond @ {seq_len}**", "beyond (all lengths)", "local",
          "exact match", "passkey", "answer-token acc", f"ppl@{seq_len}"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, ssa, r in headline_rows(info, seq_len):
    fmt = (lambda k, spec=".2f": _agg_cell(r[k], spec)) if label.startswith("random-") else (
        lambda k, spec=".2f": _cell(r[k], spec))
    lines.append("| " + " | ".join([label, ssa, f"{r['sparsity']:.2f}", f"**{fmt('beyond_train')}**", fmt("beyond"),
                                    fmt("local"), fmt("exact_match"), fmt("passkey"), fmt("token_acc"),
                                    fmt("ppl", ".3f")]) + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# The targets, checked plainly.

KEEP_RETRIEVAL = 0.98       # share of the full model's `beyond` exact match the α selection keeps after mid-training
MAX_PPL_RISE = 0.02         # relative perplexity rise at the training length allowed for it


def target_checks(info: dict, seq_len: int, full_beyond_min: float = 0.95) -> list[str]:
  """One plain sentence per target: met or NOT met, with the numbers it rests on (`full_beyond_min`: the
  bar for the full model, pipeline.target_full_beyond)."""
  rows = {label: r for label, _, r in headline_rows(info, seq_len)}
  full, loza = rows["full"], rows["loza-sparse+midtrain"]
  verdict = lambda ok: "met" if ok else "**NOT met**"
  out = []
  fb = full["beyond_train"]
  out.append(f"Full model, exact match on `beyond` cases at {seq_len}: {_cell(fb)} (target ≥ {full_beyond_min}): "
             f"{verdict(fb is not None and fb >= full_beyond_min)}.")
  lb = loza["beyond_train"]
  kept = None if lb is None or not fb else lb / fb
  kept_ok = kept is not None and kept >= KEEP_RETRIEVAL
  out.append(f"α selection at sparsity {loza['sparsity']:.2f} after mid-training keeps "
             f"{'-' if kept is None else f'{kept:.1%}'} of the full model's `beyond` exact match at {seq_len} "
             f"({_cell(lb)} vs {_cell(fb)}; target ≥ {KEEP_RETRIEVAL:.0%}): {verdict(kept_ok)}.")
  rise = None if loza["ppl"] is None or not full["ppl"] else loza["ppl"] / full["ppl"] - 1
  rise_ok = rise is not None and rise <= MAX_PPL_RISE
  out.append(f"Its perplexity at {seq_len} rises {'-' if rise is None else f'{rise:+.2%}'} "
             f"({_cell(loza['ppl'], '.3f')} vs {_cell(full['ppl'], '.3f')}; target ≤ {MAX_PPL_RISE:.0%}): "
             f"{verdict(rise_ok)}.")
  rnd = next((r for label, r in rows.items() if label.startswith("random-")), None)
  stat = None if rnd is None else rnd["beyond_train"]
  if stat is None or stat["n"] < 2:
    why = ("there are no `beyond` cases at the training length" if stat is None else
           "fewer than two random seeds were evaluated, so their spread is unknown")
    out.append(f"α selection against random selection: {why}: **not decided**.")
  else:
    margin, width = (lb or 0.0) - stat["mean"], stat["max"] - stat["min"]
    beats = lb is not None and margin > width
    out.append(f"α selection beats the random mean (over {stat['n']} seeds) on `beyond` at {seq_len} by "
               f"{margin:+.2f}, against a spread (max − min) over the seeds of {width:.2f}: {verdict(beats)}"
               + ("" if beats else "; α selection does not beat random selection by more than the seeds' spread")
               + ".")
  return out


def comparison_lines(info: dict, cfg: Config, heading: str) -> list[str]:
  """The comparison table, then the targets under a `heading`-level title: report.md's summary and headline.md."""
  seq_len = cfg.data.seq_len
  return [headline_markdown(info, seq_len), f"{heading} Targets (docs/experiment.md)", ""] + [
      f"- {c}" for c in target_checks(info, seq_len, cfg.pipeline.target_full_beyond)]


def headline_report(cfg: Config, results: dict[str, dict]) -> str:
  """headline.md: the comparison table and the targets from the full and the mid-trained models alone. The pipeline
  writes it as soon as mid-training ends, so a run whose device time ends before the remaining evaluations
  (the sparse models before mid-training, YaRN) still has its result."""
  title = f"# LoZA headline: the full model and the mid-trained sparse models at {cfg.data.seq_len}"
  return "\n".join([title, ""] + comparison_lines({"evaluation": {"results": results}}, cfg, "##")) + "\n"


# ----------------------------------------------------------------------------------------
# Throughput and perplexity by position.


def throughput(run_dir: str | Path, start: int = 0, end: int | None = None) -> dict:
  """Median tokens/s, model TFLOP/s per device and share of wall time spent waiting for data of the logged steps
  in (start, end] of a training run's metrics.jsonl, leaving out the first logged window (it holds the
  compilation) unless it is the only one; None when nothing was logged. `logged`: the windows the medians are over."""
  recs = [r for r in logged_steps(run_dir, start, end) if "tokens_per_s" in r]
  recs = recs[1:] or recs
  med = lambda k: float(np.median([r[k] for r in recs if k in r])) if any(k in r for r in recs) else None
  return {"tokens_per_s": med("tokens_per_s"), "tflops_per_device": med("tflops_per_device"),
          "data_share": med("data_share"), "logged": len(recs)}


def training_runs(info: dict) -> list[dict]:
  """Every training run of the pipeline: pretraining stages, calibration and each mid-training stage, with
  seq_len, steps, wall time and throughput."""
  runs = []
  p = info.get("pretrain")
  if p is not None:
    for r in p.get("stages") or [dict(seq_len=None, steps=p["steps"], wall_s=p["wall_s"], run_dir=p["run_dir"],
                                      stage=0)]:
      runs.append(dict(run=f"pretrain {r['stage']}", seq_len=r["seq_len"], steps=r["steps"], wall_s=r["wall_s"],
                       **throughput(r["run_dir"])))
  cal = info["calibration"]
  runs.append(dict(run="calibrate", seq_len=cal["seq_len"], steps=cal["steps"], wall_s=cal["wall_s"],
                   **throughput(cal["run_dir"])))
  for name, m in info["midtrain"].items():
    for s in m["stages"]:
      wall = s["finished_unix"] - s["started_unix"] if "finished_unix" in s else None
      runs.append(dict(run=f"midtrain {name} {s['stage']}", seq_len=s["seq_len"], steps=s["end_step"] - s["start_step"],
                       wall_s=wall, **throughput(m["run_dir"], s["start_step"], s["end_step"])))
  return runs


def throughput_markdown(runs: Sequence[dict]) -> str:
  lines = ["| run | seq_len | steps | wall s | logged windows | tokens/s | TFLOP/s per device | waiting for data |",
           "|---|---|---|---|---|---|---|---|"]
  for r in runs:
    lines.append(f"| {r['run']} | {r['seq_len'] or '-'} | {r['steps']} | {_cell(r['wall_s'], '.0f')} | {r['logged']} | "
                 f"{_cell(r['tokens_per_s'], ',.0f')} | {_cell(r['tflops_per_device'], '.3g')} | "
                 f"{_cell(r.get('data_share'), '.0%')} |")
  return "\n".join(lines) + "\n"


def plot_ppl_by_position(results: dict[str, dict], path: Path, window: int | None = None) -> None:
  """Perplexity per position bucket, one panel per evaluate.ppl_lengths entry, one line per model; a dotted line
  where positions leave the SSA window (`window` tokens)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  lengths = list(next(iter(results.values()))["perplexity"]["by_length"])
  fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.4), squeeze=False)
  for ax, n in zip(axes[0], lengths):
    for i, (name, r) in enumerate(results.items()):
      b = [x for x in r["perplexity"]["by_length"][n]["buckets"] if x["ppl"] is not None]
      if b:
        ax.plot([(x["from"] + x["to"]) / 2 for x in b], [x["ppl"] for x in b], marker="o", label=name,
                **line_style(i))
    if window is not None and window < int(n):
      ax.axvline(window, color="gray", linestyle=":", linewidth=1)
    ax.set_title(f"held-out documents of {length_label(int(n))} tokens", fontsize=9)
    ax.set_xlabel("position (tokens)")
  axes[0][0].set_ylabel("perplexity")
  axes[0][-1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(run_dir: Path, cfg: Config, info: dict) -> str:
  """report.md: what each stage did, with links to its plots."""
  cal, ev = info["calibration"], info["evaluation"]
  lines = [f"# LoZA pipeline report: `{info['config']}`", "",
           f"Run directory `{run_dir}`; {info['devices']}; work time {info['wall_s']:.0f} s, summed over the calls "
           f"that ran it ({', '.join(f'{k} {v:.0f} s' for k, v in info['timings'].items())}).", ""]
  seq_len = cfg.data.seq_len
  n_beyond = beyond_at(ev["results"]["full"]["cases"], seq_len)["n"]
  lines += ["## Summary", "",
            f"Exact match of the whole answer (greedy); **beyond @ {seq_len}**: the {n_beyond} cases at the training "
            f"length whose answer needle lies further back than the SSA window (sink {cfg.attention.sink_blocks} + "
            f"local {cfg.attention.local_blocks} blocks of {cfg.attention.block_size} tokens) from the question. "
            f"Sparse models are chosen by α at sparsities {', '.join(f'{r:.2f}' for r in alpha_ratios(cfg))}; the "
            f"random and alternating baselines at {cfg.sparsify.ratio:.2f}. Every sparse model is mid-trained "
            "through the same stages (steps, seq_len, batch, learning rate, data order); random selection: "
            "mean ± std (min–max) over seeds.", ""] + comparison_lines(info, cfg, "###") + [""]
  if "pretrain" in info and "stages" in info["pretrain"]:
    p = info["pretrain"]
    lines += ["## 1. Pretrain", "",
              f"{p['steps']} steps through {len(p['stages'])} stages (`pipeline.pretrain_stages`); held-out loss "
              f"after stage 0 {p['eval_loss']:.4f} nats/token vs unigram baseline {p['unigram_baseline']:.4f} (the "
              f"final model's perplexity is in the evaluation below). Model: `{p['model_dir']}`.", "",
              "Answer acc: greedy accuracy on retrieval answer tokens over the stage's last 100 logged steps "
              "(training batches; ~0.1 for digits means no retrieval has been learnt).", "",
              "| stage | seq_len | steps | batch | lr | final loss | answer acc | wall s |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['seq_len']} | {r['steps']} | {r['batch_size']} | {r['learning_rate']:g} | "
              f"{_cell(r['final_loss'], '.4f')} | {_cell(r.get('answer_acc'), '.3f')} | {r['wall_s']:.0f} |"
              for r in p["stages"]]
    lines.append("")
  elif "pretrain" in info:
    p = info["pretrain"]
    lines += ["## 1. Pretrain", "",
              f"{p['steps']} steps; held-out loss {p['eval_loss']:.4f} nats/token vs unigram baseline "
              f"{p['unigram_baseline']:.4f}. Model: `{p['model_dir']}`.", ""]
  else:
    source = Path(info["init"]) / SOURCE_FILE
    about = f" {source.read_text().strip()}" if source.is_file() else ""
    lines += ["## 1. Model", "", f"Started from `{info['init']}`.{about}", ""]
  lines += ["## 2. Calibrate", "", calibration_markdown(cal), "![alpha](calibrate/alpha.png)", ""]
  lines += ["## 3. Sparsify", ""]
  for name, sel in info["alpha_selections"].items():
    lines.append(f"- by α ({name}): SSA sublayers {sel['ssa_layers']} (`layer_type` {sel['zigzag_layer_type']}, "
                 f"sparsity {sel['sparsity']:.2f})")
  for rnd in info["random_selections"]:
    lines.append(f"- random, seed {rnd['seed']}: SSA sublayers {rnd['ssa_layers']} (`layer_type` "
                 f"{rnd['zigzag_layer_type']})")
  if info["random_selections"]:
    lines.append(f"  (seeds: the first {len(info['random_selections'])} from sparsify.seed={cfg.sparsify.seed} "
                 "whose selections differ from the calibrated one and from each other)")
  if "alternating_selection" in info:
    alt = info["alternating_selection"]
    lines.append(f"- alternating: SSA sublayers {alt['ssa_layers']} (`layer_type` {alt['zigzag_layer_type']})")
  lines += ["", "## 4. Mid-train", "",
            f"Each sparse model below runs the same {len(info['stages'])} stage(s); final loss and answer accuracy "
            "(last 100 logged steps) per stage.", "",
            "| model | stage | seq_len | steps | final loss | answer acc | rope_scaling | wall s |",
            "|---|---|---|---|---|---|---|---|"]
  for name, stages in info["midtrain"].items():
    for s in stages["stages"]:
      rs = s["rope_scaling"]
      wall = s["finished_unix"] - s["started_unix"] if "finished_unix" in s else None
      lines.append(f"| {name} | {s['stage']} | {s['seq_len']} | {s['start_step']}→{s['end_step']} | "
                   f"{s.get('final_loss', float('nan')):.4f} | {_cell(s.get('answer_acc'), '.3f')} | "
                   f"{'YaRN ×' + str(rs['factor']) if rs else '-'} | "
                   f"{_cell(wall, '.0f')} |")
  yarn = cfg.pipeline.eval_rope_scaling
  lines += ["", "## 5. Evaluate", "",
            "Perplexity on held-out text; retrieval accuracy (greedy answers) per task and context length, "
            "every model. Mid-trained models keep the RoPE scaling of their last mid-training stage"
            + ("" if yarn is None else f"; `+yarn` marks a model evaluated with YaRN ×{yarn.factor:g} (original "
               f"{yarn.original_max_position_embeddings} positions, not trained with it), for lengths past its "
               "training") + ".", "",
            ev["markdown"], ""]
  lines += [f"![{p}](eval/{p})" for p in ev["plots"]]
  lines += ["", "## 6. Throughput", "",
            "Wall time per training run (checkpoints and compilation included) and the median tokens/s and model "
            "TFLOP/s per device over its logged steps, the first logged window (compilation) left out; model FLOPs "
            "from train.metrics.flops_per_token (6 × matmul params + attention over the visible keys).", "",
            throughput_markdown(training_runs(info))]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# The sparse models and their names.


def alpha_ratios(cfg: Config) -> tuple[float, ...]:
  """The ratios of the α-selected sparse models: pipeline.ratios, or sparsify.ratio alone."""
  return cfg.pipeline.ratios or (cfg.sparsify.ratio,)


def alpha_name(cfg: Config, ratio: float) -> str:
  """`loza` at sparsify.ratio (the one the baselines are compared with), `loza-<percent>` at the others."""
  return "loza" if ratio == cfg.sparsify.ratio else f"loza-{round(ratio * 100)}"


def sparse_dir(run_dir: Path, name: str) -> Path:
  """Where sparse model `name` is written: sparse/ for `loza`, sparse-<percent>/ for `loza-<percent>`, else <name>/."""
  if name.startswith("loza"):
    return run_dir / name.replace("loza", "sparse", 1) / "model"
  return run_dir / name / "model"


def midtrain_dir(run_dir: Path, name: str) -> Path:
  """Where sparse model `name` is mid-trained: midtrain/ for the α-selected one, midtrain-<name>/ for the others."""
  return run_dir / ("midtrain" if name == "loza" else f"midtrain-{name}")


def eval_name(name: str) -> str:
  """The label of mid-trained model `name` in the evaluation: loza-sparse+midtrain, loza-25%+midtrain, ..."""
  if name == "loza":
    return "loza-sparse+midtrain"
  return (f"{name}%" if name.startswith("loza-") else name) + "+midtrain"


def sparse_variants(cfg: Config, init: str, run_dir: Path, info: dict, memo: Memo = run_now) -> dict[str, str]:
  """Write the α-selected (at each of alpha_ratios), random (pipeline.random_seeds) and alternating sparse models,
  each one step of `memo`; name -> model dir."""
  cal_path = str(run_dir / "calibrate" / "calibration.json")
  models, info["alpha_selections"] = {}, {}

  info["sparsify_s"] = 0.0

  def one(name, changes):
    rec = memo(f"sparsify-{name}", lambda: dict(zip(("model_dir", "selection"), sparsify(
        replace(cfg, **changes), init, sparse_dir(run_dir, name)))))
    models[name] = rec["model_dir"]
    info["sparsify_s"] += rec["wall_s"]
    return rec["selection"]

  for ratio in sorted(alpha_ratios(cfg), key=lambda r: r != cfg.sparsify.ratio):   # sparsify.ratio's first
    name = alpha_name(cfg, ratio)
    info["alpha_selections"][name] = one(name, {"sparsify.strategy": "alpha", "sparsify.calibration": cal_path,
                                                "sparsify.ratio": ratio})
  info["selection"] = info["alpha_selections"]["loza"]
  info["random_selections"] = []
  for seed in random_baseline_seeds(cfg, info["selection"]["ssa_layers"], cfg.pipeline.random_seeds):
    rec = one(f"random-{seed}", {"sparsify.strategy": "random", "sparsify.seed": seed})
    info["random_selections"].append(dict(rec, seed=seed))
  if cfg.pipeline.alternating:
    info["alternating_selection"] = one("alternating", {"sparsify.strategy": "alternating"})
  return models


def with_rope_scaling(init: str, rope_scaling: RopeScaling, out: Path) -> dict:
  """Write the model in `init` with `rope_scaling` (the same weights) to `out`."""
  params, mcfg = load_model(init)
  return {"model_dir": str(export_model(out, params, replace(mcfg, **{"model.rope_scaling": rope_scaling})))}


def check_pretrain_stages(cfg: Config) -> None:
  """Each stage's data must fit its seq_len and the curriculum must end at data.seq_len, the training length the
  report leads with (ValueError if not)."""
  config_lib.check_pretrain_stages(cfg)
  stages = cfg.pipeline.pretrain_stages
  if stages and stages[-1].seq_len != cfg.data.seq_len:
    raise ValueError(f"pipeline.pretrain_stages: the last stage's seq_len ({stages[-1].seq_len}) must be "
                     f"data.seq_len ({cfg.data.seq_len}), the training length the report leads with")


def check_pipeline(cfg: Config) -> None:
  """check_pretrain_stages and the evaluation's positions (evaluate.check_positions), and pipeline.ratios must hold
  sparsify.ratio (the baselines' ratio) (ValueError if not)."""
  check_pretrain_stages(cfg)
  check_positions(cfg)
  if cfg.pipeline.ratios and cfg.sparsify.ratio not in cfg.pipeline.ratios:
    raise ValueError(f"pipeline.ratios {list(cfg.pipeline.ratios)} must include sparsify.ratio={cfg.sparsify.ratio}, "
                     "the ratio the random and alternating baselines use")
  if not cfg.midtrain.stages:
    raise ValueError("midtrain.stages is empty; the pipeline needs at least one mid-training stage")


# ----------------------------------------------------------------------------------------
# The pipeline.


def _evaluate_one(cfg: Config, name: str, path: str, out: Path) -> dict:
  """train.evaluate on one model, written to `out`."""
  evaluate(replace(cfg, **{"train.run_dir": str(out)}), [path], [name])
  return {"eval_json": str(out / "eval.json")}


def evaluate_model(cfg: Config, name: str, path: str, run_dir: Path, memo: Memo) -> tuple[dict, float]:
  """Evaluate one model into eval/<name>/ (one step of `memo`); (its result, the seconds it took)."""
  slug = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
  sub = run_dir / "eval" / slug
  seconds = memo(f"evaluate-{slug}", lambda: _evaluate_one(cfg, name, path, sub))["wall_s"]
  return json.loads((sub / "eval.json").read_text())["results"][name], seconds


def evaluate_all(cfg: Config, models: dict[str, str], run_dir: Path, memo: Memo) -> dict:
  """Evaluate each model (evaluate_model), then the side-by-side tables and plots in eval/: evaluate's eval.json,
  eval.md and plots, plus perplexity_by_length_position.png. wall_s: the models' evaluation time, summed over
  the calls that ran them."""
  out = run_dir / "eval"
  results = {}
  seconds = 0.0
  for name, path in models.items():
    results[name], took = evaluate_model(cfg, name, path, run_dir, memo)
    seconds += took
  stage_cfg = replace(cfg, **{"train.run_dir": str(out)})
  plots = plot_results(results, stage_cfg, out)
  a = cfg.attention
  plot_ppl_by_position(results, out / "perplexity_by_length_position.png",
                       (a.sink_blocks + a.local_blocks) * a.block_size)
  plots.append("perplexity_by_length_position.png")
  md = eval_markdown(results, stage_cfg)
  (out / "eval.json").write_text(json.dumps({"results": results, "plots": plots}, indent=2) + "\n")
  (out / "eval.md").write_text(md)
  return {"results": results, "markdown": md, "plots": plots, "wall_s": seconds}


class FullModelBelowBar(RuntimeError):
  """The pretrained full model retrieves too little for sparsification to be worth measuring."""


def run_pipeline(cfg: Config, config_path: str, init: str | None = None, until: str | None = None,
                 require_full_beyond: float = 0.0) -> Path | None:
  """Run (or resume) every stage, or up to and including `until`; the report's path, None when stopped early.

  require_full_beyond: FullModelBelowBar right after the full model's evaluation when its exact match on `beyond`
  cases at data.seq_len is lower (nothing after it runs), so a long run stops before spending its budget on
  sparse models of a model that does not retrieve."""
  check_pipeline(cfg)
  if until is not None and until not in STAGES:
    raise ValueError(f"--until {until!r}: choose one of {STAGES}")
  if init is not None:
    load_config_file(init)   # a wrong --init fails here, before any work
  run_dir = Path(cfg.train.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  check_same_run(run_dir, cfg, init)
  save_config(cfg, run_dir / "config.yaml")
  say = tqdm.write
  memo: Memo = lambda key, fn: once(run_dir, key, fn, say)
  timings: dict[str, float] = {}
  info: dict = {"config": config_path, "init": init}
  bar = tqdm(total=len(STAGES), desc="LoZA pipeline", position=0, leave=True)

  def finish(name: str, seconds: float) -> bool:
    timings[name] = seconds
    bar.update(1)
    if name == until:
      bar.close()
      say(f"stopped after {name} (--until); run the same command again to continue")
    return name == until

  bar.set_postfix_str("pretrain")
  if init is None:
    run = pretrain_stages if cfg.pipeline.pretrain_stages else pretrain_once
    init, info["pretrain"] = run(cfg, run_dir / "pretrain", print_fn=say, memo=memo)
  pretrain_s = (sum(r["wall_s"] for r in info["pretrain"].get("stages", [info["pretrain"]]))
                if "pretrain" in info else 0.0)
  full, _ = evaluate_model(cfg, "full", init, run_dir, memo)   # early: is there retrieval to keep?
  beyond = beyond_at(full["cases"], cfg.data.seq_len)
  say(f"full model: exact match on beyond cases at {cfg.data.seq_len} {_cell(beyond['acc'])} (n={beyond['n']}), "
      f"over all cases {_cell(full['retrieval']['overall'])}, answer-token acc {_cell(full['retrieval']['token_acc'])}")
  if require_full_beyond > 0 and (beyond["acc"] is None or beyond["acc"] < require_full_beyond):
    raise FullModelBelowBar(
        f"the full model's exact match on beyond cases at {cfg.data.seq_len} is {_cell(beyond['acc'])} "
        f"(n={beyond['n']}), "
        f"below --require-full-beyond {require_full_beyond}: too little retrieval to keep, so nothing after it runs. "
        f"Its pretraining and evaluation stay in {run_dir} (pretrain/, eval/full/); change the pretraining first")
  if finish("pretrain", pretrain_s):
    return None

  bar.set_postfix_str("calibrate")
  info["calibration"] = memo("calibrate", lambda: calibrate(_stage_cfg(cfg, run_dir, "calibrate"), init,
                                                            print_fn=say))
  info["calibration"]["run_dir"] = str(run_dir / "calibrate")
  if finish("calibrate", info["calibration"]["wall_s"]):
    return None

  bar.set_postfix_str("sparsify")
  sparse = sparse_variants(cfg, init, run_dir, info, memo)
  if finish("sparsify", info.pop("sparsify_s")):
    return None

  bar.set_postfix_str("midtrain")
  info["midtrain"] = {}
  compared = {"full": full}
  for name, model_dir in sparse.items():   # the same stages, steps, batch, learning rates and data order
    out = midtrain_dir(run_dir, name)
    info["midtrain"][name] = memo(f"midtrain-{name}", lambda out=out, model_dir=model_dir: {
        "model_dir": str(midtrain(replace(cfg, **{"train.run_dir": str(out)}), model_dir, print_fn=say)),
        "stages": json.loads((out / "stages.json").read_text()), "run_dir": str(out)})
    # evaluated at once, so a run cut short by its device budget keeps numbers for every model it finished
    compared[eval_name(name)], _ = evaluate_model(cfg, eval_name(name), info["midtrain"][name]["model_dir"], run_dir,
                                                  memo)
  info["stages"] = info["midtrain"]["loza"]["stages"]
  (run_dir / "headline.md").write_text(headline_report(cfg, compared))
  if finish("midtrain", sum(m["wall_s"] for m in info["midtrain"].values())):
    return None

  bar.set_postfix_str("evaluate")
  models = {"full": init}
  if cfg.pipeline.eval_rope_scaling is not None:
    models["full+yarn"] = memo("full-yarn", lambda: with_rope_scaling(init, cfg.pipeline.eval_rope_scaling,
                                                                      run_dir / "full-yarn" / "model"))["model_dir"]
  models["loza-sparse"] = sparse["loza"]
  for name, m in info["midtrain"].items():
    models[eval_name(name)] = m["model_dir"]
    if name == "loza" and cfg.pipeline.eval_rope_scaling is not None and m["stages"][-1]["rope_scaling"] is None:
      models[eval_name(name) + "+yarn"] = memo("loza-yarn", lambda m=m: with_rope_scaling(
          m["model_dir"], cfg.pipeline.eval_rope_scaling, run_dir / "loza-yarn" / "model"))["model_dir"]
  info["evaluation"] = evaluate_all(cfg, models, run_dir, memo)
  finish("evaluate", info["evaluation"]["wall_s"])
  bar.close()

  info["timings"] = timings
  info["wall_s"] = sum(timings.values())
  info["devices"] = f"{jax.device_count()} × {jax.devices()[0].device_kind}"
  (run_dir / "report.md").write_text(report(run_dir, cfg, info))
  summary = {k: v for k, v in info.items() if k != "evaluation"}
  summary["evaluation"] = {n: {"ppl": r["perplexity"]["ppl"], "retrieval": r["retrieval"]["overall"],
                               "beyond": r["retrieval"]["per_zone"]["beyond"],
                               "beyond_at_train_len": beyond_at(r["cases"], cfg.data.seq_len)}
                           for n, r in info["evaluation"]["results"].items()}
  summary["headline"] = [{"model": label, "ssa_layers": ssa, **numbers}
                         for label, ssa, numbers in headline_rows(info, cfg.data.seq_len)]
  summary["targets"] = target_checks(info, cfg.data.seq_len, cfg.pipeline.target_full_beyond)
  summary["throughput"] = training_runs(info)
  (run_dir / "pipeline.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
  return run_dir / "report.md"


def main(argv: Sequence[str] | None = None) -> int:
  ap = cli.parser(__doc__.splitlines()[0])
  ap.add_argument("--init", default=None, help="start from this model directory instead of pretraining")
  ap.add_argument("--until", default=None, choices=STAGES, help="stop after this stage (a later call resumes)")
  ap.add_argument("--require-full-beyond", type=float, default=0.0, metavar="ACC",
                  help="stop (exit 3) after the full model's evaluation when its exact match on beyond cases at "
                       "data.seq_len is below ACC")
  args, cfg = cli.parse(__doc__.splitlines()[0], argv, ap)
  maybe_initialize_distributed(cfg.mesh)
  try:
    path = cli.run_or_exit(ap, run_pipeline, cfg, args.config, args.init, args.until, args.require_full_beyond,
                           lock=cfg.train.run_dir)
  except FullModelBelowBar as e:
    print(f"stopped: {e}", file=sys.stderr)
    return 3
  if path is None:
    print(f"stopped after {args.until}; the same command without --until (or with a later one) continues the run "
          f"in {cfg.train.run_dir}")
    return 0
  print(path.read_text())
  print(f"report -> {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

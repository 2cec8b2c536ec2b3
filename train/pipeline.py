"""The LoZA pipeline end to end: pretrain (or --init) → calibrate → sparsify → mid-train → evaluate.

python -m train.pipeline --config configs/demo_cpu.yaml [--init MODEL_DIR] [--set key=value ...]

Everything lands under train.run_dir: pretrain/, calibrate/, the sparse models (sparse/: by α,
random-<seed>/: pipeline.random_seeds random selections, alternating/), their mid-training runs
(midtrain/ for the α selection, midtrain-<name>/ for the baselines, all through the same
midtrain.stages), eval/ and report.md. The report compares the full model, the α-selected sparse
model before and after mid-training, random selection (mean ± std and min–max over seeds) and
alternating selection at the same ratio, leading with exact match on `beyond` cases.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from loza_jax import config as config_lib
from loza_jax.config import Config, MidtrainStage, PretrainStage, pretrain_stage_data, replace, save_config
from loza_jax.sparsity import select_layers
from train import cli
from train import pretrain as pretrain_lib
from train.calibrate import calibrate, markdown as calibration_markdown
from loza_jax.model_dir import load_config_file
from train.evaluate import evaluate
from train.midtrain import midtrain
from train.sparsify import sparsify

STAGES = ("pretrain", "calibrate", "sparsify", "midtrain", "evaluate")


def _stage_cfg(cfg: Config, run_dir: Path, name: str) -> Config:
  return replace(cfg, **{"train.run_dir": str(run_dir / name)})


def pretrain_stage_cfg(cfg: Config, stage: PretrainStage, index: int, run_dir: Path) -> Config:
  """The config of pretraining stage `index`: its data section (own seed), batch, steps, schedule and run dir."""
  return replace(cfg, **{
      "pipeline.pretrain_stages": (),
      "data": replace(pretrain_stage_data(cfg.data, stage), seed=cfg.data.seed + index),
      "train.steps": stage.steps,
      "train.batch_size": stage.batch_size or cfg.train.batch_size,
      "train.learning_rate": stage.learning_rate or cfg.train.learning_rate,
      "train.warmup_steps": stage.warmup_steps,
      "train.decay_steps": 0,
      "train.run_dir": str(run_dir),
  })


def pretrain_stages(cfg: Config, out: Path, print_fn=None) -> tuple[str, dict]:
  """Pretrain through pipeline.pretrain_stages: stage 0 from scratch (train.pretrain), each later stage continues
  the previous model with its own data, batch and schedule (a one-stage mid-training run of the full model).
  Returns the final model directory and the stage-0 summary with a record per stage."""
  stages = cfg.pipeline.pretrain_stages
  t = time.perf_counter()
  summary = pretrain_lib.pretrain(pretrain_stage_cfg(cfg, stages[0], 0, out), print_fn=print_fn)
  if summary["stopped"] != "done":
    raise RuntimeError(f"pretraining stage 0 stopped at step {summary['steps']}: {summary['stopped']}")
  model = summary["model_dir"]
  record = lambda i, st, scfg, loss, t0: {"stage": i, "seq_len": st.seq_len, "steps": st.steps,
                                          "batch_size": scfg.train.batch_size,
                                          "learning_rate": scfg.train.learning_rate, "final_loss": loss,
                                          "wall_s": time.perf_counter() - t0}
  summary["stages"] = [record(0, stages[0], pretrain_stage_cfg(cfg, stages[0], 0, out), summary["final_train_loss"], t)]
  for i, st in enumerate(stages[1:], 1):
    t = time.perf_counter()
    scfg = pretrain_stage_cfg(cfg, st, i, out / f"stage-{i}")
    one = MidtrainStage(seq_len=st.seq_len, steps=st.steps, learning_rate=scfg.train.learning_rate,
                        warmup_steps=st.warmup_steps, batch_size=scfg.train.batch_size)
    model = str(midtrain(replace(scfg, **{"midtrain.stages": (one,)}), model, print_fn=print_fn))
    done = json.loads((out / f"stage-{i}" / "stages.json").read_text())[-1]
    summary["stages"].append(record(i, st, scfg, done.get("final_loss"), t))
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


def headline_rows(info: dict, seq_len: int) -> list[tuple[str, str, dict]]:
  """(label, SSA sublayers, headline numbers or their spread over seeds) per compared model."""
  results = info["evaluation"]["results"]
  row = lambda name: dict(headline(results[name], seq_len), beyond_train=beyond_at(results[name]["cases"],
                                                                                    seq_len)["acc"])
  layers = lambda name: results[name]["layer_types"]
  ssa = lambda name: ",".join(str(i) for i, t in enumerate(layers(name)) if t == "ssa") or "-"
  rows = [(n, ssa(n), row(n)) for n in ("full", "loza-sparse", "loza-sparse+midtrain")]
  rnd = [n for n in results if n.startswith("random-")]
  if rnd:
    per = [row(n) for n in rnd]
    agg = {k: spread([p[k] for p in per]) for k in HEAD_KEYS}
    rows.append((f"random-sparse+midtrain ({len(rnd)} seeds)", " / ".join(ssa(n) for n in rnd), agg))
  if "alternating+midtrain" in results:
    rows.append(("alternating+midtrain", ssa("alternating+midtrain"), row("alternating+midtrain")))
  return rows


def headline_markdown(info: dict, seq_len: int) -> str:
  """The comparison table: exact match on `beyond` cases first; random as mean ± std (min–max) over seeds."""
  head = ["model", "SSA sublayers", f"**beyond @ {seq_len}**", "beyond (all lengths)", "local", "exact match",
          "passkey", "answer-token acc", f"ppl@{seq_len}"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, ssa, r in headline_rows(info, seq_len):
    fmt = (lambda k, spec=".2f": _agg_cell(r[k], spec)) if label.startswith("random-") else (
        lambda k, spec=".2f": _cell(r[k], spec))
    lines.append("| " + " | ".join([label, ssa, f"**{fmt('beyond_train')}**", fmt("beyond"), fmt("local"),
                                    fmt("exact_match"), fmt("passkey"), fmt("token_acc"), fmt("ppl", ".3f")]) + " |")
  return "\n".join(lines) + "\n"


def report(run_dir: Path, cfg: Config, info: dict) -> str:
  """report.md: what each stage did, with links to its plots."""
  cal, ev = info["calibration"], info["evaluation"]
  lines = [f"# LoZA pipeline report: `{info['config']}`", "",
           f"Run directory `{run_dir}`; wall time {info['wall_s']:.0f} s "
           f"({', '.join(f'{k} {v:.0f} s' for k, v in info['timings'].items())}).", ""]
  seq_len = cfg.data.seq_len
  n_beyond = beyond_at(ev["results"]["full"]["cases"], seq_len)["n"]
  lines += ["## Summary", "",
            f"Exact match of the whole answer (greedy); **beyond @ {seq_len}**: the {n_beyond} cases at the training "
            f"length whose answer needle lies further back than the SSA window (sink {cfg.attention.sink_blocks} + "
            f"local {cfg.attention.local_blocks} blocks of {cfg.attention.block_size} tokens) from the question. "
            f"Every sparse model has sparsity {info['selection']['sparsity']:.2f} and is mid-trained through the same "
            "stages (steps, seq_len, batch, learning rate, data order); random selection: mean ± std (min–max) over "
            "seeds.", "", headline_markdown(info, seq_len)]
  if "pretrain" in info and "stages" in info["pretrain"]:
    p = info["pretrain"]
    lines += ["## 1. Pretrain", "",
              f"{p['steps']} steps through {len(p['stages'])} stages (`pipeline.pretrain_stages`); held-out loss "
              f"after stage 0 {p['eval_loss']:.4f} nats/token vs unigram baseline {p['unigram_baseline']:.4f} (the "
              f"final model's perplexity is in the evaluation below). Model: `{p['model_dir']}`.", "",
              "| stage | seq_len | steps | batch | lr | final loss | wall s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['seq_len']} | {r['steps']} | {r['batch_size']} | {r['learning_rate']:g} | "
              f"{_cell(r['final_loss'], '.4f')} | {r['wall_s']:.0f} |" for r in p["stages"]]
    lines.append("")
  elif "pretrain" in info:
    p = info["pretrain"]
    lines += ["## 1. Pretrain", "",
              f"{p['steps']} steps; held-out loss {p['eval_loss']:.4f} nats/token vs unigram baseline "
              f"{p['unigram_baseline']:.4f}. Model: `{p['model_dir']}`.", ""]
  else:
    lines += ["## 1. Model", "", f"Started from `{info['init']}`.", ""]
  lines += ["## 2. Calibrate", "", calibration_markdown(cal), "![alpha](calibrate/alpha.png)", ""]
  sel = info["selection"]
  lines += ["## 3. Sparsify", "",
            f"- by α: SSA sublayers {sel['ssa_layers']} (`layer_type` {sel['zigzag_layer_type']}, "
            f"sparsity {sel['sparsity']:.2f})"]
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
            f"Each sparse model below runs the same {len(info['stages'])} stage(s); final loss per stage.", "",
            "| model | stage | seq_len | steps | final loss | rope_scaling | wall s |", "|---|---|---|---|---|---|---|"]
  for name, stages in info["midtrain"].items():
    for s in stages["stages"]:
      rs = s["rope_scaling"]
      lines.append(f"| {name} | {s['stage']} | {s['seq_len']} | {s['start_step']}→{s['end_step']} | "
                   f"{s.get('final_loss', float('nan')):.4f} | {'YaRN ×' + str(rs['factor']) if rs else '-'} | "
                   f"{stages['wall_s']:.0f} |")
  lines += ["", "## 5. Evaluate", "",
            "Perplexity on held-out text; retrieval accuracy (greedy answers) per task and context length, "
            "every model.", "", ev["markdown"], ""]
  lines += [f"![{p}](eval/{p})" for p in ev["plots"]]
  return "\n".join(lines) + "\n"


def sparse_variants(cfg: Config, init: str, run_dir: Path, info: dict) -> dict[str, Path]:
  """Write the α-selected, random (pipeline.random_seeds) and alternating sparse models; name -> model dir."""
  cal_path = str(run_dir / "calibrate" / "calibration.json")
  sp_cfg = replace(cfg, **{"sparsify.strategy": "alpha", "sparsify.calibration": cal_path})
  models = {}
  models["loza"], info["selection"] = sparsify(sp_cfg, init, run_dir / "sparse" / "model")
  info["random_selections"] = []
  for seed in random_baseline_seeds(cfg, info["selection"]["ssa_layers"], cfg.pipeline.random_seeds):
    rnd_cfg = replace(cfg, **{"sparsify.strategy": "random", "sparsify.seed": seed})
    models[f"random-{seed}"], rec = sparsify(rnd_cfg, init, run_dir / f"random-{seed}" / "model")
    info["random_selections"].append(dict(rec, seed=seed))
  if cfg.pipeline.alternating:
    alt_cfg = replace(cfg, **{"sparsify.strategy": "alternating"})
    models["alternating"], info["alternating_selection"] = sparsify(alt_cfg, init, run_dir / "alternating" / "model")
  return models


def midtrain_dir(run_dir: Path, name: str) -> Path:
  """Where sparse model `name` is mid-trained: midtrain/ for the α-selected one, midtrain-<name>/ for baselines."""
  return run_dir / ("midtrain" if name == "loza" else f"midtrain-{name}")


def check_pretrain_stages(cfg: Config) -> None:
  """Each stage's data must fit its seq_len and the curriculum must end at data.seq_len, the training length the
  report leads with (ValueError if not)."""
  config_lib.check_pretrain_stages(cfg)
  stages = cfg.pipeline.pretrain_stages
  if stages and stages[-1].seq_len != cfg.data.seq_len:
    raise ValueError(f"pipeline.pretrain_stages: the last stage's seq_len ({stages[-1].seq_len}) must be "
                     f"data.seq_len ({cfg.data.seq_len}), the training length the report leads with")


def run_pipeline(cfg: Config, config_path: str, overrides: Sequence[str], init: str | None = None) -> Path:
  check_pretrain_stages(cfg)
  if init is not None:
    load_config_file(init)   # a wrong --init fails here, before any work
  run_dir = Path(cfg.train.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  save_config(cfg, run_dir / "config.yaml")
  timings: dict[str, float] = {}
  info: dict = {"config": config_path, "init": init}
  t_all = time.perf_counter()
  bar = tqdm(total=len(STAGES), desc="LoZA pipeline", position=0, leave=True)

  def stage(name):
    bar.set_postfix_str(name)
    return time.perf_counter()

  t = stage("pretrain")
  if init is None and cfg.pipeline.pretrain_stages:
    init, info["pretrain"] = pretrain_stages(cfg, run_dir / "pretrain", print_fn=tqdm.write)
  elif init is None:
    argv = ["--config", config_path, *sum((["--set", o] for o in overrides), []),
            "--set", f"train.run_dir={run_dir / 'pretrain'}"]
    if pretrain_lib.main(argv) != 0:
      raise RuntimeError("pretraining stopped early; see the log above")
    info["pretrain"] = json.loads((run_dir / "pretrain" / "summary.json").read_text())
    init = str(run_dir / "pretrain" / "model")
  timings["pretrain"] = time.perf_counter() - t
  bar.update(1)

  t = stage("calibrate")
  info["calibration"] = calibrate(_stage_cfg(cfg, run_dir, "calibrate"), init, print_fn=tqdm.write)
  timings["calibrate"] = time.perf_counter() - t
  bar.update(1)

  t = stage("sparsify")
  sparse = sparse_variants(cfg, init, run_dir, info)
  timings["sparsify"] = time.perf_counter() - t
  bar.update(1)

  t = stage("midtrain")
  mid, info["midtrain"] = {}, {}
  for name, model_dir in sparse.items():   # the same stages, steps, batch, learning rates and data order
    t_model = time.perf_counter()
    out = midtrain_dir(run_dir, name)
    mid[name] = midtrain(replace(cfg, **{"train.run_dir": str(out)}), model_dir, print_fn=tqdm.write)
    info["midtrain"][name] = {"stages": json.loads((out / "stages.json").read_text()),
                              "wall_s": time.perf_counter() - t_model}
  info["stages"] = info["midtrain"]["loza"]["stages"]
  timings["midtrain"] = time.perf_counter() - t
  bar.update(1)

  t = stage("evaluate")
  models = {"full": init, "loza-sparse": str(sparse["loza"]), "loza-sparse+midtrain": str(mid["loza"])}
  models.update({f"{name}+midtrain": str(mid[name]) for name in sparse if name != "loza"})
  info["evaluation"] = evaluate(_stage_cfg(cfg, run_dir, "eval"), list(models.values()), list(models))
  timings["evaluate"] = time.perf_counter() - t
  bar.update(1)
  bar.close()

  info["timings"] = timings
  info["wall_s"] = time.perf_counter() - t_all
  (run_dir / "report.md").write_text(report(run_dir, cfg, info))
  summary = {k: v for k, v in info.items() if k != "evaluation"}
  summary["evaluation"] = {n: {"ppl": r["perplexity"]["ppl"], "retrieval": r["retrieval"]["overall"],
                               "beyond": r["retrieval"]["per_zone"]["beyond"],
                               "beyond_at_train_len": beyond_at(r["cases"], cfg.data.seq_len)}
                           for n, r in info["evaluation"]["results"].items()}
  summary["headline"] = [{"model": label, "ssa_layers": ssa, **numbers}
                         for label, ssa, numbers in headline_rows(info, cfg.data.seq_len)]
  (run_dir / "pipeline.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
  return run_dir / "report.md"


def main(argv: Sequence[str] | None = None) -> int:
  ap = cli.parser(__doc__.splitlines()[0])
  ap.add_argument("--init", default=None, help="start from this model directory instead of pretraining")
  args, cfg = cli.parse(__doc__.splitlines()[0], argv, ap)
  overrides = list(args.set) + ([f"train.run_dir={args.run_dir}"] if args.run_dir else [])
  if not cfg.midtrain.stages:
    ap.exit(2, "error: midtrain.stages is empty; the pipeline needs at least one mid-training stage\n")
  path = cli.run_or_exit(ap, run_pipeline, cfg, args.config, overrides, args.init, lock=cfg.train.run_dir)
  print(path.read_text())
  print(f"report -> {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

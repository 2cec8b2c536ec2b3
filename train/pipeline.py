"""The LoZA pipeline end to end: pretrain (or --init) → calibrate → sparsify → mid-train → evaluate.

python -m train.pipeline --config configs/demo_cpu.yaml [--init MODEL_DIR] [--set key=value ...]

Everything lands under train.run_dir: pretrain/, calibrate/, sparse/, random/, midtrain/, eval/ and
report.md, which compares the full model, the sparse model before and after mid-training, and a
random-selection baseline at the same ratio.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from loza_jax.config import Config, replace, save_config
from loza_jax.sparsity import select_layers
from train import cli
from train import pretrain as pretrain_lib
from train.calibrate import calibrate, markdown as calibration_markdown
from train.checkpoint import load_config_file
from train.evaluate import evaluate
from train.midtrain import midtrain
from train.sparsify import sparsify

STAGES = ("pretrain", "calibrate", "sparsify", "midtrain", "evaluate")


def _stage_cfg(cfg: Config, run_dir: Path, name: str) -> Config:
  return replace(cfg, **{"train.run_dir": str(run_dir / name)})


def random_baseline_seed(cfg: Config, chosen: Sequence[int], tries: int = 1000) -> int:
  """The first seed from sparsify.seed on whose random selection differs from the calibrated one
  (comparing a model with itself says nothing); sparsify.seed when no other selection exists."""
  n = cfg.model.num_attention_sublayers
  for seed in range(cfg.sparsify.seed, cfg.sparsify.seed + tries):
    if list(select_layers("random", n, cfg.sparsify.ratio, seed=seed).ssa_layers) != list(chosen):
      return seed
  return cfg.sparsify.seed


def report(run_dir: Path, cfg: Config, info: dict) -> str:
  """report.md: what each stage did, with links to its plots."""
  cal, ev = info["calibration"], info["evaluation"]
  lines = [f"# LoZA pipeline report: `{info['config']}`", "",
           f"Run directory `{run_dir}`; wall time {info['wall_s']:.0f} s "
           f"({', '.join(f'{k} {v:.0f} s' for k, v in info['timings'].items())}).", ""]
  if "pretrain" in info:
    p = info["pretrain"]
    lines += ["## 1. Pretrain", "",
              f"{p['steps']} steps; held-out loss {p['eval_loss']:.4f} nats/token vs unigram baseline "
              f"{p['unigram_baseline']:.4f}. Model: `{p['model_dir']}`.", ""]
  else:
    lines += ["## 1. Model", "", f"Started from `{info['init']}`.", ""]
  lines += ["## 2. Calibrate", "", calibration_markdown(cal), "![alpha](calibrate/alpha.png)", ""]
  sel, rnd = info["selection"], info["random_selection"]
  lines += ["## 3. Sparsify", "",
            f"- by α: SSA sublayers {sel['ssa_layers']} (`layer_type` {sel['zigzag_layer_type']}, "
            f"sparsity {sel['sparsity']:.2f})",
            f"- random baseline (seed {rnd['seed']}, the first from sparsify.seed={cfg.sparsify.seed} whose "
            f"selection differs from the calibrated one): SSA sublayers {rnd['ssa_layers']} "
            f"(`layer_type` {rnd['zigzag_layer_type']})", ""]
  lines += ["## 4. Mid-train", "", "| stage | seq_len | steps | final loss | rope_scaling |", "|---|---|---|---|---|"]
  for s in info["stages"]:
    rs = s["rope_scaling"]
    lines.append(f"| {s['stage']} | {s['seq_len']} | {s['start_step']}→{s['end_step']} | "
                 f"{s.get('final_loss', float('nan')):.4f} | {'YaRN ×' + str(rs['factor']) if rs else '-'} |")
  lines += ["", "## 5. Evaluate", "",
            "Perplexity on held-out text; retrieval accuracy (greedy answers) per task and context length.", "",
            ev["markdown"], ""]
  lines += [f"![{p}](eval/{p})" for p in ev["plots"]]
  return "\n".join(lines) + "\n"


def run_pipeline(cfg: Config, config_path: str, overrides: Sequence[str], init: str | None = None) -> Path:
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
  if init is None:
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
  cal_path = str(run_dir / "calibrate" / "calibration.json")
  sp_cfg = replace(cfg, **{"sparsify.strategy": "alpha", "sparsify.calibration": cal_path})
  sparse_dir, info["selection"] = sparsify(sp_cfg, init, run_dir / "sparse" / "model")
  seed = random_baseline_seed(cfg, info["selection"]["ssa_layers"])
  rnd_cfg = replace(cfg, **{"sparsify.strategy": "random", "sparsify.seed": seed})
  random_dir, info["random_selection"] = sparsify(rnd_cfg, init, run_dir / "random" / "model")
  info["random_selection"]["seed"] = seed
  timings["sparsify"] = time.perf_counter() - t
  bar.update(1)

  t = stage("midtrain")
  mid_dir = midtrain(_stage_cfg(cfg, run_dir, "midtrain"), sparse_dir, print_fn=tqdm.write)
  info["stages"] = json.loads((run_dir / "midtrain" / "stages.json").read_text())
  timings["midtrain"] = time.perf_counter() - t
  bar.update(1)

  t = stage("evaluate")
  models = [init, str(random_dir), str(sparse_dir), str(mid_dir)]
  names = ["full", "random-sparse", "loza-sparse", "loza-sparse+midtrain"]
  info["evaluation"] = evaluate(_stage_cfg(cfg, run_dir, "eval"), models, names)
  timings["evaluate"] = time.perf_counter() - t
  bar.update(1)
  bar.close()

  info["timings"] = timings
  info["wall_s"] = time.perf_counter() - t_all
  (run_dir / "report.md").write_text(report(run_dir, cfg, info))
  summary = {k: v for k, v in info.items() if k != "evaluation"}
  summary["evaluation"] = {n: {"ppl": r["perplexity"]["ppl"], "retrieval": r["retrieval"]["overall"]}
                           for n, r in info["evaluation"]["results"].items()}
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

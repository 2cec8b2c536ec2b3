"""Calibrate: make every attention sublayer a blend α·full + (1−α)·SSA and train only α.

python -m train.calibrate --config configs/demo_cpu.yaml --set calibrate.init=runs/demo/pretrain/model

Writes to train.run_dir: calibration.json (α per sublayer, ranking, the layers chosen for
calibrate.ratio, α trajectory), alpha.png, TensorBoard α curves, and prints a markdown summary.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from tqdm.auto import tqdm

from loza_jax.config import Config, replace
from loza_jax.model import alpha_paths, build_model
from loza_jax.sparsity import select_layers
from train import cli
from train import data as data_lib
from train.checkpoint import check_compatible, load_model
from train.trainer import Trainer, make_distill_loss, make_lm_loss, make_optimizer, without

ALPHA = "alpha"


def model_fingerprint(cfg: Config) -> dict:
  """What identifies a model's attention stack; sparsify refuses calibrations of another model."""
  m = cfg.model
  return {"architecture": m.architecture, "num_hidden_layers": m.num_hidden_layers, "hidden_size": m.hidden_size,
          "num_attention_heads": m.num_attention_heads, "num_attention_sublayers": m.num_attention_sublayers,
          "vocab_size": m.vocab_size}


def calibration_config(stage_cfg: Config, model_cfg: Config) -> Config:
  """The run config: the loaded model, every sublayer `blend`, train settings from `calibrate`."""
  c = stage_cfg.calibrate
  n = model_cfg.model.num_attention_sublayers
  return replace(stage_cfg, **{
      "model": model_cfg.model,
      "attention.layer_types": ("blend",) * n,
      "data.seq_len": c.seq_len or stage_cfg.data.seq_len,
      "train.batch_size": c.batch_size or stage_cfg.train.batch_size,
      "train.steps": c.steps,
      "train.learning_rate": c.learning_rate,
      "train.warmup_steps": c.warmup_steps,
      "train.min_lr_ratio": 1.0,             # constant after warm-up, as in DuoAttention
      "train.weight_decay": 0.0,
      "train.trainable": f"(^|/){ALPHA}$",
  })


def is_alpha(path: str) -> bool:
  """Whether an 'a/b/c' parameter path names a blend α."""
  return path.split("/")[-1] == ALPHA


def clipped_alphas(params) -> jax.Array:
  """[n_sublayers] or [n_sublayers, H] α clipped to [0, 1] (what the blend uses), in sublayer order."""
  flat = traverse_util.flatten_dict(nn.unbox(params))
  return jnp.stack([jnp.clip(flat[path], 0.0, 1.0) for path in alpha_paths(params)])


def project_to_unit_box() -> optax.GradientTransformation:
  """Turn updates u into clip(p + u, 0, 1) − p: α stays in [0, 1] after every step."""
  def update(updates, state, params):
    return jax.tree.map(lambda u, p: jnp.clip(p + u, 0.0, 1.0) - p, updates, params), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_calibration_loss(cfg: Config, objective: str, alpha_l1: float):
  """distill (MSE to the frozen full model's final hidden states) or lm, plus alpha_l1 · mean(α)."""
  student = build_model(cfg)
  if objective == "distill":
    teacher = build_model(replace(cfg, **{"attention.layer_types": ("full",) * cfg.model.num_attention_sublayers}))
    fit_fn = make_distill_loss(student, teacher)   # the teacher is the same weights without α
  else:
    fit_fn = make_lm_loss(student)

  def loss_fn(params, batch, rng):
    fit, aux = fit_fn(params, batch, rng)
    a = clipped_alphas(params)
    loss = fit + alpha_l1 * jnp.mean(a)
    per_layer = a if a.ndim == 1 else a.mean(-1)
    metrics = {objective: fit, "alpha_mean": jnp.mean(a), "weight": aux["weight"]}
    metrics.update({f"alpha/{i:03d}": per_layer[i] for i in range(per_layer.shape[0])})
    return loss, metrics

  return loss_fn


def with_alphas(model_params, cfg: Config):
  """The loaded model's params plus α = 1 for every blend sublayer (shapes checked)."""
  tokens = jnp.zeros((1, cfg.attention.block_size), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(lambda: build_model(cfg).init(jax.random.PRNGKey(0), tokens)["params"]))
  check_compatible(without(abstract, is_alpha), nn.unbox(model_params), "calibrate.init")
  flat = traverse_util.flatten_dict(nn.unbox(model_params), sep="/")
  for k, v in traverse_util.flatten_dict(abstract, sep="/").items():
    if is_alpha(k):
      flat[k] = jnp.ones(v.shape, v.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def trajectory(run_dir: Path, n: int) -> dict:
  """α per logged step from the run's metrics.jsonl."""
  path = run_dir / "metrics.jsonl"
  steps, values = [], []
  if path.is_file():
    for line in path.read_text().splitlines():
      rec = json.loads(line)
      if f"alpha/{0:03d}" in rec:
        steps.append(rec["step"])
        values.append([rec[f"alpha/{i:03d}"] for i in range(n)])
  return {"steps": steps, "alpha": values}


def summarise(cfg: Config, alphas: np.ndarray, traj: dict, init: str, final_metrics: dict) -> dict:
  per_layer = alphas if alphas.ndim == 1 else alphas.mean(-1)
  n = per_layer.shape[0]
  sel = select_layers("alpha", n, cfg.calibrate.ratio, alphas=per_layer)
  ranking = [int(i) for i in np.argsort(per_layer, kind="stable")]
  first = traj["alpha"][0] if traj["alpha"] else [1.0] * n
  return {
      "model": str(init), "model_fingerprint": model_fingerprint(cfg),
      "objective": cfg.calibrate.objective, "alpha_l1": cfg.calibrate.alpha_l1, "steps": cfg.calibrate.steps,
      "seq_len": cfg.data.seq_len, "granularity": cfg.attention.granularity,
      "ssa": {"block_size": cfg.attention.block_size, "sink_blocks": cfg.attention.sink_blocks,
              "local_blocks": cfg.attention.local_blocks},
      "alpha": [{"sublayer": i, "layer": i // cfg.model.attention_sublayers_per_layer,
                 "alpha": float(per_layer[i]), "rank": ranking.index(i)} for i in range(n)],
      "alpha_per_head": alphas.tolist() if alphas.ndim == 2 else None,
      "ranking": ranking,
      "ratio": cfg.calibrate.ratio, "selected_ssa": list(sel.ssa_layers),
      "trajectory": {"steps": traj["steps"], "alpha": traj["alpha"], "first_logged": first,
                     "final": per_layer.tolist(),
                     "change": [float(b - a) for a, b in zip(first, per_layer)]},
      "final_metrics": final_metrics,
  }


def plot_alphas(summary: dict, path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  a = [r["alpha"] for r in summary["alpha"]]
  chosen = set(summary["selected_ssa"])
  fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(a) + 2), 3.4))
  colors = ["tab:orange" if i in chosen else "tab:blue" for i in range(len(a))]
  ax.bar(range(len(a)), a, color=colors)
  ax.set_ylim(0, 1.05)
  ax.set_xlabel("attention sublayer")
  ax.set_ylabel("α (1 = full, 0 = SSA)")
  ax.set_title(f"calibrated α per attention sublayer\norange: the {len(chosen)} of {len(a)} chosen as SSA "
               f"(ratio {summary['ratio']})", fontsize=10)
  ax.set_xticks(range(len(a)))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(summary: dict) -> str:
  rows = ["| sublayer | α | rank | SSA? |", "|---:|---:|---:|:---:|"]
  chosen = set(summary["selected_ssa"])
  for r in summary["alpha"]:
    rows.append(f"| {r['sublayer']} | {r['alpha']:.3f} | {r['rank']} | {'yes' if r['sublayer'] in chosen else ''} |")
  return (f"## Calibration ({summary['objective']}, λ={summary['alpha_l1']}, {summary['steps']} steps, "
          f"seq_len {summary['seq_len']})\n\n" + "\n".join(rows) +
          f"\n\nSSA at ratio {summary['ratio']}: sublayers {summary['selected_ssa']}\n")


def calibrate(stage_cfg: Config, init: str | Path, *, print_fn=None, return_params: bool = False):
  """Run calibration from the model in `init`; returns the summary written to calibration.json
  (and the final params, α included, with return_params=True)."""
  model_params, model_cfg = load_model(init)
  cfg = calibration_config(stage_cfg, model_cfg)
  run_dir = Path(cfg.train.run_dir)
  params = with_alphas(model_params, cfg)
  tx = optax.chain(make_optimizer(cfg), project_to_unit_box())
  trainer = Trainer(cfg, loss_fn=make_calibration_loss(cfg, cfg.calibrate.objective, cfg.calibrate.alpha_l1),
                    init_params=params, tx=tx, print_fn=print_fn)
  rows = cfg.train.batch_size // jax.process_count()
  data_iter = iter(data_lib.build_dataset(cfg, rows, process_index=jax.process_index(),
                                          process_count=jax.process_count()))
  result = trainer.fit(data_iter)
  if result.stopped != "done":
    raise RuntimeError(f"calibration stopped at step {result.step}: {result.stopped}")
  alphas = np.asarray(jax.device_get(clipped_alphas(trainer.state.params)))
  n = cfg.model.num_attention_sublayers
  summary = summarise(cfg, alphas, trajectory(run_dir, n), str(init), result.last_metrics)
  if jax.process_index() == 0:
    (run_dir / "calibration.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_alphas(summary, run_dir / "alpha.png")
    (run_dir / "calibration.md").write_text(markdown(summary))
  return (summary, jax.device_get(trainer.state.params)) if return_params else summary


def main(argv: Sequence[str] | None = None) -> int:
  ap, _, cfg, init = cli.parse_stage(__doc__.splitlines()[0], argv, "calibrate", "model directory to calibrate")
  summary = cli.run_or_exit(ap, calibrate, cfg, init, print_fn=tqdm.write, lock=cfg.train.run_dir)
  print(markdown(summary))
  print(f"wrote {Path(cfg.train.run_dir) / 'calibration.json'} and alpha.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())

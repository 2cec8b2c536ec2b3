"""Calibrate: make every attention sublayer a blend α·full + (1−α)·SSA and train only α.

python -m train.calibrate --config configs/demo_cpu.yaml --set calibrate.init=runs/demo/pretrain/model

Calibration batches are mostly retrieval tasks (calibrate.retrieval_fraction) of calibrate.seq_len
tokens; with calibrate.loss_mask=answer the fit (distill MSE or lm loss) is averaged only over the
positions that predict a retrieval answer token, as in DuoAttention; with `all` over every
non-padding position. Writes to train.run_dir: calibration.json (α per sublayer, ranking, the
layers chosen for calibrate.ratio, the α separation at that boundary, α trajectory), alpha.png,
calibration.md, TensorBoard α curves. A NaN α is an error.
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
from loza_jax.model_dir import check_compatible, load_model
from loza_jax.sparsity import select_layers
from train import cli, data as data_lib
from train.iterators import train_iterator
from train.losses import lm_loss_terms
from train.partition import without
from train.trainer import Trainer

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
      "data.retrieval_fraction": c.retrieval_fraction,
      "data.retrieval_lengths": (c.seq_len or stage_cfg.data.seq_len,),
      "data.retrieval_loss": "answer",
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


def calibration_weights(batch, loss_mask: str) -> jax.Array:
  """[B, T] weights of the positions the calibration fit averages over.

  answer: positions whose next token is a retrieval answer token (loss_mask `data.ANSWER`) of the same document,
  whatever data.retrieval_loss puts on the prompt; all: every non-padding position.
  """
  seg = batch["segment_ids"]
  if loss_mask == "all":
    return (seg != 0).astype(jnp.float32)
  if loss_mask != "answer":
    raise ValueError(f"calibrate.loss_mask: {loss_mask!r} is not 'answer' or 'all'")
  w = data_lib.target_weights(seg, batch["loss_mask"] == data_lib.ANSWER).astype(jnp.float32)
  return jnp.pad(w, ((0, 0), (0, 1)))


def make_calibration_loss(cfg: Config, objective: str, alpha_l1: float, loss_mask: str = "all"):
  """distill (MSE to the frozen full model's final hidden states) or lm, on the positions of
  calibration_weights(loss_mask), plus alpha_l1 · mean(α)."""
  student = build_model(cfg)
  teacher = build_model(replace(cfg, **{"attention.layer_types": ("full",) * cfg.model.num_attention_sublayers}))

  def fit_fn(params, batch):
    args = (batch["tokens"], batch["segment_ids"], batch["positions"])
    w = calibration_weights(batch, loss_mask)
    if objective == "lm":
      logits = student.apply({"params": params}, *args)
      shifted = jnp.concatenate([jnp.zeros_like(w[:, :1]), w[:, :-1]], axis=1)   # position t-1 -> target t
      return lm_loss_terms(logits, dict(batch, loss_mask=(shifted > 0).astype(jnp.int32)))
    h_s = student.apply({"params": params}, *args, return_hidden=True).astype(jnp.float32)
    h_t = teacher.apply({"params": jax.lax.stop_gradient(without(params, is_alpha))}, *args, return_hidden=True)
    n = jnp.maximum(w.sum() * h_s.shape[-1], 1.0)
    mse = (((h_s - h_t.astype(jnp.float32)) ** 2) * w[..., None]).sum() / n
    return mse, {"mse": mse, "weight": w.sum()}

  def loss_fn(params, batch, rng):
    del rng
    fit, aux = fit_fn(params, batch)
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


def check_finite_alphas(alphas: Sequence, where: str) -> None:
  """ValueError naming the sublayers whose α is not a finite number (NaN, Inf, null)."""
  ok = lambda x: isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and bool(np.isfinite(x))
  bad = [i for i, x in enumerate(alphas) if not ok(x)]
  if bad:
    raise ValueError(f"{where}: α of sublayers {bad} is not a finite number ({[alphas[i] for i in bad]}); the "
                     "calibration diverged: lower calibrate.learning_rate or check the model")


def alpha_separation(per_layer: np.ndarray, selected) -> dict:
  """α just inside the selection (highest α made SSA), just outside (lowest α kept full) and their gap."""
  chosen = set(int(i) for i in selected)
  inside = [float(per_layer[i]) for i in chosen]
  outside = [float(per_layer[i]) for i in range(len(per_layer)) if i not in chosen]
  hi, lo = (max(inside) if inside else None), (min(outside) if outside else None)
  return {"highest_ssa_alpha": hi, "lowest_full_alpha": lo,
          "gap": None if hi is None or lo is None else lo - hi}


def summarise(cfg: Config, alphas: np.ndarray, traj: dict, init: str, final_metrics: dict) -> dict:
  per_layer = alphas if alphas.ndim == 1 else alphas.mean(-1)
  check_finite_alphas(per_layer, "calibrate")
  n = per_layer.shape[0]
  sel = select_layers("alpha", n, cfg.calibrate.ratio, alphas=per_layer)
  ranking = [int(i) for i in np.argsort(per_layer, kind="stable")]
  first = traj["alpha"][0] if traj["alpha"] else [1.0] * n
  return {
      "model": str(init), "model_fingerprint": model_fingerprint(cfg),
      "objective": cfg.calibrate.objective, "alpha_l1": cfg.calibrate.alpha_l1, "steps": cfg.calibrate.steps,
      "loss_mask": cfg.calibrate.loss_mask, "retrieval_fraction": cfg.calibrate.retrieval_fraction,
      "seq_len": cfg.data.seq_len, "granularity": cfg.attention.granularity,
      "ssa": {"block_size": cfg.attention.block_size, "sink_blocks": cfg.attention.sink_blocks,
              "local_blocks": cfg.attention.local_blocks},
      "alpha": [{"sublayer": i, "layer": i // cfg.model.attention_sublayers_per_layer,
                 "alpha": float(per_layer[i]), "rank": ranking.index(i)} for i in range(n)],
      "alpha_per_head": alphas.tolist() if alphas.ndim == 2 else None,
      "ranking": ranking,
      "ratio": cfg.calibrate.ratio, "selected_ssa": list(sel.ssa_layers),
      "separation": alpha_separation(per_layer, sel.ssa_layers),
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
  # the value above each bar and the chosen sublayers' numbers in orange: an α of 0 draws no bar at all
  for i, v in enumerate(a):
    ax.text(i, v + 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=7, color=colors[i])
  ax.set_ylim(0, 1.12)
  ax.set_xlabel("attention sublayer")
  ax.set_ylabel("α (1 = full, 0 = SSA)")
  ax.set_title(f"calibrated α per attention sublayer\norange: the {len(chosen)} of {len(a)} chosen as SSA "
               f"(ratio {summary['ratio']})", fontsize=10)
  ax.set_xticks(range(len(a)))
  for i, label in enumerate(ax.get_xticklabels()):
    label.set_color(colors[i])
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(summary: dict) -> str:
  rows = ["| sublayer | α | rank | SSA? |", "|---:|---:|---:|:---:|"]
  chosen = set(summary["selected_ssa"])
  for r in summary["alpha"]:
    rows.append(f"| {r['sublayer']} | {r['alpha']:.3f} | {r['rank']} | {'yes' if r['sublayer'] in chosen else ''} |")
  sep = summary.get("separation") or {}
  gap = ("-" if sep.get("gap") is None else
         f"{sep['gap']:.3f} (highest SSA α {sep['highest_ssa_alpha']:.3f}, "
         f"lowest full α {sep['lowest_full_alpha']:.3f})")
  return (f"## Calibration ({summary['objective']} on {summary.get('loss_mask', 'all')} tokens, "
          f"λ={summary['alpha_l1']}, {summary['steps']} steps, seq_len {summary['seq_len']})\n\n" + "\n".join(rows) +
          f"\n\nSSA at ratio {summary['ratio']}: sublayers {summary['selected_ssa']}\n"
          f"α separation at that boundary: {gap}\n")


def calibrate(stage_cfg: Config, init: str | Path, *, print_fn=None, return_params: bool = False):
  """Run calibration from the model in `init`; returns the summary written to calibration.json
  (and the final params, α included, with return_params=True)."""
  model_params, model_cfg = load_model(init)
  cfg = calibration_config(stage_cfg, model_cfg)
  run_dir = Path(cfg.train.run_dir)
  params = with_alphas(model_params, cfg)
  c = cfg.calibrate
  trainer = Trainer(cfg, loss_fn=make_calibration_loss(cfg, c.objective, c.alpha_l1, c.loss_mask),
                    init_params=params, post_update=project_to_unit_box(), print_fn=print_fn)
  result = trainer.fit(train_iterator(cfg, text_loss=c.loss_mask == "all"))
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

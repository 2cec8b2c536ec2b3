"""Sparsify: choose the SSA sublayers and write the sparse model (same weights, new layer_types).

python -m train.sparsify --config configs/demo_cpu.yaml --set sparsify.init=runs/demo/pretrain/model \
    --set sparsify.calibration=runs/demo/calibrate/calibration.json [--set sparsify.ratio=0.5]

Strategies (sparsify.strategy): alpha (lowest calibrated α first), random (seeded), alternating,
manual (sparsify.layers). Writes the model to sparsify.out (default <train.run_dir>/model) with
selection.json beside it.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax

from loza_jax.config import Config, replace
from loza_jax.model_dir import check_distinct, check_replaceable, export_model, load_model
from loza_jax.sparsity import Selection, select_layers
from train import cli
from train.calibrate import is_alpha, model_fingerprint
from train.partition import without


def read_calibration(path: str | Path, model_cfg: Config) -> dict:
  """calibration.json, checked against the model it is applied to."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"sparsify.calibration: {path} not found (run train.calibrate first, or use "
                            "sparsify.strategy=random|alternating|manual)")
  try:
    cal = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"sparsify.calibration: {path} is not valid JSON ({e})") from None
  if not isinstance(cal, dict) or not isinstance(cal.get("model_fingerprint", {}), dict):
    raise ValueError(f"sparsify.calibration: {path} is not a calibration.json object (written by train.calibrate)")
  want = model_fingerprint(model_cfg)
  got = cal.get("model_fingerprint", {})
  diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
  if diff:
    detail = ", ".join(f"{k}: calibration {a!r} vs model {b!r}" for k, (a, b) in diff.items())
    raise ValueError(f"sparsify.calibration: {path} was made for a different model ({detail})")
  rows = cal.get("alpha")
  bad = [i for i, r in enumerate(rows if isinstance(rows, list) else [])   # a diverged calibration
         if isinstance(r, dict) and isinstance(r.get("alpha"), float) and not abs(r["alpha"]) < float("inf")]
  if bad:
    raise ValueError(f"sparsify.calibration: {path}: α of sublayers {bad} is NaN or infinite (the calibration "
                     "diverged); re-run train.calibrate")
  return cal


def calibration_alphas(cal: dict, path: str | Path, n: int) -> list[float]:
  """The finite α in [0, 1] of each of the n sublayers from calibration.json's `alpha` records;
  ValueError naming the file and the entry otherwise."""
  records = cal.get("alpha")
  if not isinstance(records, list) or len(records) != n:
    got = f"{len(records)} entries" if isinstance(records, list) else repr(records)[:60]
    raise ValueError(f"sparsify.calibration: {path}: key 'alpha' must list {n} records "
                     f"{{sublayer, alpha}}, got {got}; re-run train.calibrate")
  alphas = []
  for i, rec in enumerate(records):
    a = rec.get("alpha") if isinstance(rec, dict) else None
    if isinstance(a, bool) or not isinstance(a, (int, float)):
      raise ValueError(f"sparsify.calibration: {path}: alpha[{i}].alpha must be a number, got {a!r}"
                       + ("" if isinstance(rec, dict) else f" (entry {rec!r} is not an object)"))
    if not math.isfinite(a) or not 0.0 <= a <= 1.0:
      raise ValueError(f"sparsify.calibration: {path}: alpha[{i}].alpha = {a} is not a finite value in [0, 1] "
                       "(calibration diverged?); re-run train.calibrate")
    alphas.append(float(a))
  return alphas


def choose(cfg: Config, model_cfg: Config) -> Selection:
  s = cfg.sparsify
  n = model_cfg.model.num_attention_sublayers
  alphas = None
  if s.strategy == "alpha":
    if not s.calibration:
      raise ValueError("sparsify.calibration: strategy 'alpha' needs the calibration.json written by train.calibrate")
    cal = read_calibration(s.calibration, model_cfg)
    alphas = calibration_alphas(cal, s.calibration, n)
    geom = cal.get("ssa", {})
    mine = {"block_size": cfg.attention.block_size, "sink_blocks": cfg.attention.sink_blocks,
            "local_blocks": cfg.attention.local_blocks}
    if geom and geom != mine:
      raise ValueError(f"sparsify: the calibration used SSA {geom} but this config asks for {mine}; "
                       "calibrate with the SSA geometry you deploy")
  if s.strategy == "manual" and not s.layers:
    raise ValueError("sparsify.layers: strategy 'manual' needs a list of sublayer indices")
  return select_layers(s.strategy, n, s.ratio, alphas=alphas, seed=s.seed, manual=s.layers or None)


def zigzag_layer_string(layer_types: Sequence[str]) -> str:
  """One '0'/'1' per attention sublayer, '1' = SSA (LongCat ZigZag `layer_type`)."""
  return "".join("1" if t == "ssa" else "0" for t in layer_types)


def sparse_config(cfg: Config, model_cfg: Config, selection: Selection) -> Config:
  """The model's config with the chosen layer_types and this config's SSA geometry."""
  return replace(model_cfg, **{
      "attention.layer_types": selection.layer_types(),
      "attention.block_size": cfg.attention.block_size,
      "attention.sink_blocks": cfg.attention.sink_blocks,
      "attention.local_blocks": cfg.attention.local_blocks,
  })


def sparsify(cfg: Config, init: str | Path, out: str | Path) -> tuple[Path, dict]:
  """Write the sparse model for `init` to `out`; returns (out, selection record). `out` must not be or
  overlap `init`, and must be absent, empty or one of our model directories."""
  check_distinct(init, out, "sparsify.out")
  check_replaceable(out, "sparsify.out")
  params, model_cfg = load_model(init)
  if model_cfg.attention.layer_types and "blend" in model_cfg.attention.layer_types:
    model_cfg = replace(model_cfg, **{"attention.layer_types": None})
  selection = choose(cfg, model_cfg)
  new_cfg = sparse_config(cfg, model_cfg, selection)
  out = export_model(out, without(nn.unbox(params), is_alpha), new_cfg)
  record = {"init": str(init), "strategy": selection.strategy, "ratio": selection.ratio,
            "ssa_layers": list(selection.ssa_layers), "layer_types": list(selection.layer_types()),
            "zigzag_layer_type": zigzag_layer_string(selection.layer_types()),
            "sparsity": len(selection.ssa_layers) / selection.num_sublayers,
            "calibration": cfg.sparsify.calibration or None}
  if jax.process_index() == 0:
    (out / "selection.json").write_text(json.dumps(record, indent=2) + "\n")
  return out, record


def main(argv: Sequence[str] | None = None) -> int:
  ap, _, cfg, init = cli.parse_stage(__doc__.splitlines()[0], argv, "sparsify", "model directory to sparsify")
  out, rec = cli.run_or_exit(ap, sparsify, cfg, init, cfg.sparsify.out or str(Path(cfg.train.run_dir) / "model"))
  print(f"sparse model -> {out}: strategy {rec['strategy']}, ratio {rec['ratio']}, SSA sublayers "
        f"{rec['ssa_layers']} (layer_type {rec['zigzag_layer_type']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())

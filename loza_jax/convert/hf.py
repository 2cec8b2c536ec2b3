"""HuggingFace safetensors import/export for deepseek_v3 and longcat_flash models.

Import streams one tensor at a time (safetensors safe_open) into preallocated host arrays, so
peak host memory is the model once plus its largest tensor. Export writes one shard at a time.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util
import flax.linen as nn
from safetensors import safe_open
from safetensors.numpy import save_file

from loza_jax.config import Config, apply_overrides, from_dict, to_dict
from loza_jax.convert.checkpoint import load_model, save_model
from loza_jax.convert.hf_config import config_from_hf, config_to_hf
from loza_jax.convert.names import TensorSpec, ignore_rule, tensor_specs, zero_expert_specs

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
MAX_LISTED = 12


@dataclasses.dataclass(frozen=True)
class Stats:
  """What a conversion moved and how long it took (seconds, wall clock)."""
  tensors: int
  bytes: int
  seconds: float
  skipped: dict[str, int]

  @property
  def gb_per_s(self) -> float:
    return self.bytes / 1e9 / max(self.seconds, 1e-9)


def _listing(names: list[str]) -> str:
  more = f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
  return ", ".join(names[:MAX_LISTED]) + more


def read_hf_config(hf_dir: Path) -> dict:
  path = hf_dir / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found; --hf must be a HuggingFace model directory (config.json + "
                            "*.safetensors)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from None


def checkpoint_files(hf_dir: Path) -> dict[Path, list[str]]:
  """safetensors file -> its tensor names, from model.safetensors.index.json or the files themselves."""
  index = hf_dir / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' mapping tensor names to files")
    files: dict[Path, list[str]] = collections.defaultdict(list)
    for name, fname in weight_map.items():
      files[hf_dir / fname].append(name)
    absent = sorted(str(f.name) for f in files if not f.is_file())
    if absent:
      raise FileNotFoundError(f"{index} names files that are missing in {hf_dir}: {_listing(absent)}")
    return dict(files)
  paths = sorted(hf_dir.glob("*.safetensors"))
  if not paths:
    raise FileNotFoundError(f"no *.safetensors (and no {INDEX_FILE}) in {hf_dir}; .bin / .pt checkpoints are not "
                            "supported, re-save with safetensors")
  out = {}
  for p in paths:
    with safe_open(p, "numpy") as f:
      out[p] = list(f.keys())
  return out


def expected_params(cfg: Config) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of the model's params (no allocation)."""
  from loza_jax.model import init_params
  abstract = jax.eval_shape(lambda: nn.unbox(init_params(cfg, jax.random.PRNGKey(0))))
  return traverse_util.flatten_dict(abstract)


def hf_shape(spec: TensorSpec, ours: tuple[int, ...]) -> tuple[int, ...]:
  shape = ours[1:] if spec.expert is not None else ours
  return tuple(reversed(shape)) if spec.kind == "linear" else tuple(shape)


def _check_spec_coverage(specs: list[TensorSpec], expected: dict) -> None:
  covered = {s.path for s in specs}
  params = {p for p in expected if p[-1] != "alpha"}
  if covered != params:
    raise RuntimeError(f"name table out of step with the model: params without HF name "
                       f"{sorted(params - covered)[:5]}, names without param {sorted(covered - params)[:5]}")


def _cfg_with_overrides(cfg: Config, overrides: tuple[str, ...]) -> Config:
  if not overrides:
    return cfg
  return from_dict(Config, apply_overrides(to_dict(cfg), list(overrides)))


def read_hf_params(hf_dir: str | Path, cfg: Config, mtp_layers: int = 0) -> tuple[dict, Stats]:
  """Nested numpy params for `cfg` from the safetensors in `hf_dir`; one ValueError lists every
  missing, unexpected and wrongly shaped tensor before any data is read."""
  hf_dir = Path(hf_dir)
  t0 = time.perf_counter()
  files = checkpoint_files(hf_dir)
  specs = tensor_specs(cfg)
  by_name = {s.hf_name: s for s in specs}
  expected = expected_params(cfg)
  _check_spec_coverage(specs, expected)
  ignore = ignore_rule(cfg, mtp_layers)

  found: dict[str, Path] = {}
  unexpected, wrong, skipped = [], [], collections.Counter()
  for path, names in files.items():
    with safe_open(path, "numpy") as f:
      present = set(f.keys())
      for name in names:
        if name not in present:
          raise ValueError(f"{hf_dir / INDEX_FILE} maps {name!r} to {path.name}, which does not contain it")
        found[name] = path
        spec = by_name.get(name)
        if spec is None:
          reason = ignore(name)
          if reason is None:
            unexpected.append(name)
          else:
            skipped[reason] += 1
          continue
        want = hf_shape(spec, expected[spec.path].shape)
        have = tuple(f.get_slice(name).get_shape())
        if have != want:
          wrong.append(f"{name} {list(have)} (expected {list(want)})")
  missing = [s.hf_name for s in specs if s.hf_name not in found]
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {_listing(unexpected)}")
  if wrong:
    problems.append(f"wrong shapes ({len(wrong)}): {_listing(wrong)}")
  if problems:
    raise ValueError(f"{hf_dir}: the checkpoint does not match its config.json ({cfg.model.architecture}):\n  - "
                     + "\n  - ".join(problems))

  flat = {p: (np.ones if p[-1] == "alpha" else np.empty)(s.shape, s.dtype) for p, s in expected.items()}
  nbytes = 0
  for path, names in files.items():
    with safe_open(path, "numpy") as f:
      for name in names:
        spec = by_name.get(name)
        if spec is None:
          continue
        t = f.get_tensor(name)
        nbytes += t.nbytes
        dest = flat[spec.path] if spec.expert is None else flat[spec.path][spec.expert]
        dest[...] = t.T if spec.kind == "linear" else t
        del t
  for reason, n in skipped.items():
    log.info("skipped %d tensors: %s", n, reason)
  stats = Stats(len(specs), nbytes, time.perf_counter() - t0, dict(skipped))
  return traverse_util.unflatten_dict(flat), stats


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, overrides: tuple[str, ...] = (),
              ignore_config_keys: tuple[str, ...] = (), block_size: int | None = None) -> tuple[Config, Stats]:
  """HF directory -> our model directory (orbax params + config.yaml). Returns the config and timing."""
  hf_dir = Path(hf_dir)
  t0 = time.perf_counter()
  hf = read_hf_config(hf_dir)
  cfg = config_from_hf(hf, ignore_keys=ignore_config_keys, block_size=block_size, source=str(hf_dir / "config.json"))
  cfg = _cfg_with_overrides(cfg, overrides)
  mtp = int(hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0)
  params, stats = read_hf_params(hf_dir, cfg, mtp)
  save_model(out_dir, params, cfg)
  return cfg, dataclasses.replace(stats, seconds=time.perf_counter() - t0)


def _flat_params(params: Any) -> dict[tuple[str, ...], np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def hf_tensors(params: Any, cfg: Config, zero_expert_weights: str = "omit") -> list[tuple[str, int, Callable]]:
  """[(hf name, nbytes, make the array)] for a model; checks the params tree against the config."""
  if zero_expert_weights not in ("omit", "zeros"):
    raise ValueError(f"zero_expert_weights must be 'omit' or 'zeros', got {zero_expert_weights!r}")
  flat = _flat_params(params)
  specs = tensor_specs(cfg)
  expected = expected_params(cfg)
  _check_spec_coverage(specs, expected)
  want = {p: tuple(s.shape) for p, s in expected.items() if p[-1] != "alpha"}
  problems = [f"missing {'/'.join(p)}" for p in want if p not in flat]
  problems += [f"unexpected {'/'.join(p)}" for p in flat if p not in want]
  problems += [f"{'/'.join(p)} has shape {list(flat[p].shape)}, expected {list(s)}" for p, s in want.items()
               if p in flat and tuple(flat[p].shape) != s]
  if problems:
    raise ValueError("params do not match config.yaml: " + _listing(problems))

  def make(spec: TensorSpec):
    def produce():
      arr = flat[spec.path] if spec.expert is None else flat[spec.path][spec.expert]
      return np.ascontiguousarray(arr.T if spec.kind == "linear" else arr)
    return produce

  out = []
  for spec in specs:
    arr = flat[spec.path]
    n = arr.nbytes // (arr.shape[0] if spec.expert is not None else 1)
    out.append((spec.hf_name, n, make(spec)))
  if zero_expert_weights == "zeros":
    gate = flat[("layers_0", "mlp", "experts", "gate_proj")]
    shape, dtype = gate.shape[1:][::-1], gate.dtype
    for name in zero_expert_specs(cfg):
      out.append((name, int(np.prod(shape)) * dtype.itemsize, lambda: np.zeros(shape, dtype)))
  return out


def parse_size(text: str) -> int:
  """'5GB' / '500MB' / '100KB' / '123' -> bytes."""
  units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
  t = str(text).strip().upper()
  for unit, mult in units.items():
    if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
      return int(float(t[:-len(unit)]) * mult)
  if t.isdigit():
    return int(t)
  raise ValueError(f"size {text!r}: expected a number with an optional unit, e.g. 5GB, 500MB")


def write_hf(params: Any, cfg: Config, out_dir: str | Path, *, max_shard_size: str | int = "5GB",
             zero_expert_weights: str = "omit") -> Stats:
  """config.json + model-0000i-of-0000N.safetensors + model.safetensors.index.json into `out_dir`."""
  t0 = time.perf_counter()
  out_dir = Path(out_dir)
  hf_cfg = config_to_hf(cfg)
  tensors = hf_tensors(params, cfg, zero_expert_weights)
  limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
  shards: list[list] = [[]]
  size = 0
  for item in tensors:
    if shards[-1] and size + item[1] > limit:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += item[1]
  out_dir.mkdir(parents=True, exist_ok=True)
  stale = sorted(p.name for p in out_dir.glob("*.safetensors"))
  if stale:
    raise FileExistsError(f"{out_dir} already holds {_listing(stale)}; export into an empty directory")
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    arrays = {name: produce() for name, _, produce in shard}
    save_file(arrays, str(out_dir / fname), metadata={"format": "pt"})
    for name, n, _ in shard:
      weight_map[name] = fname
      total += n
    del arrays
  (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2) + "\n")
  (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
  return Stats(len(tensors), total, time.perf_counter() - t0, {})


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, *, max_shard_size: str | int = "5GB",
              zero_expert_weights: str = "omit") -> tuple[Config, Stats]:
  """Our model directory -> HF directory (see write_hf)."""
  t0 = time.perf_counter()
  params, cfg = load_model(ckpt_dir)
  stats = write_hf(params, cfg, out_dir, max_shard_size=max_shard_size, zero_expert_weights=zero_expert_weights)
  return cfg, dataclasses.replace(stats, seconds=time.perf_counter() - t0)

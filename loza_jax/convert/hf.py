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

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from loza_jax.config import Config, apply_overrides, from_dict, to_dict
from loza_jax.convert.hf_config import config_from_hf, config_to_hf
from loza_jax.convert.names import TensorSpec, ignore_rule, tensor_specs, zero_expert_specs
from loza_jax.model_dir import check_new_dir, load_model, save_model

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


def open_safetensors(path: Path):
  """safe_open(path) whose errors (truncated or damaged file) name the file."""
  try:
    return safe_open(path, "numpy")
  except SafetensorError as e:
    size = path.stat().st_size if path.is_file() else 0
    raise ValueError(f"{path}: not a readable .safetensors file ({e}; {size:,} bytes on disk): the file is "
                     "truncated or damaged, download or copy it again") from None


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
    with open_safetensors(p) as f:
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


_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_TILE = 128


def _tiled_copy(dest: np.ndarray, src: np.ndarray) -> None:
  """dest[...] = src in 128x128 tiles: a transposed view copies faster that way than in one strided pass
  (tools/bench_convert.py measures the conversion)."""
  if src.ndim != 2 or src.flags.c_contiguous:
    dest[...] = src
    return
  n, m = dest.shape
  for i in range(0, n, _TILE):
    for j in range(0, m, _TILE):
      dest[i:i + _TILE, j:j + _TILE] = src[i:i + _TILE, j:j + _TILE]


def _copy_into(dest: np.ndarray, src: np.ndarray) -> None:
  """dest[...] = src; same-dtype copies go through an unsigned-int view (numpy's fast copy loops,
  which extension dtypes such as bfloat16 do not get), bit for bit."""
  if src.dtype == dest.dtype and src.dtype.itemsize in _RAW:
    raw = _RAW[src.dtype.itemsize]
    _tiled_copy(dest.view(raw), src.view(raw))
  else:
    dest[...] = src


def _contiguous(arr: np.ndarray) -> np.ndarray:
  """A C-contiguous copy of `arr` (or `arr` itself when it already is one)."""
  if arr.flags.c_contiguous:
    return arr
  out = np.empty(arr.shape, arr.dtype)
  _copy_into(out, arr)
  return out


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
    with open_safetensors(path) as f:
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
    with open_safetensors(path) as f:
      for name in names:
        spec = by_name.get(name)
        if spec is None:
          continue
        try:
          t = f.get_tensor(name)
        except SafetensorError as e:
          raise ValueError(f"{path}: cannot read tensor {name!r} ({e}): the file is damaged") from None
        nbytes += t.nbytes
        dest = flat[spec.path] if spec.expert is None else flat[spec.path][spec.expert]
        _copy_into(dest, t.T if spec.kind == "linear" else t)
        del t
  for reason, n in skipped.items():
    log.info("skipped %d tensors: %s", n, reason)
  stats = Stats(len(specs), nbytes, time.perf_counter() - t0, dict(skipped))
  return traverse_util.unflatten_dict(flat), stats


def to_jax_arrays(params: dict) -> dict:
  """Numpy leaves -> jax arrays one at a time, dropping each numpy leaf (orbax writes jax arrays
  without an extra host copy; handing it numpy doubles peak memory and write time)."""
  flat = traverse_util.flatten_dict(params)
  params.clear()
  for k in list(flat):
    flat[k] = jax.device_put(flat[k])
  return traverse_util.unflatten_dict(flat)


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, overrides: tuple[str, ...] = (),
              ignore_config_keys: tuple[str, ...] = (), block_size: int | None = None) -> tuple[Config, Stats]:
  """HF directory -> our model directory (orbax params + config.yaml). Returns the config and timing."""
  hf_dir = Path(hf_dir)
  t0 = time.perf_counter()
  check_new_dir(out_dir, "--out")   # before reading anything: never write into the input or a used directory
  hf = read_hf_config(hf_dir)
  cfg = config_from_hf(hf, ignore_keys=ignore_config_keys, block_size=block_size, source=str(hf_dir / "config.json"))
  cfg = _cfg_with_overrides(cfg, overrides)
  mtp = int(hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0)
  params, stats = read_hf_params(hf_dir, cfg, mtp)
  save_model(out_dir, to_jax_arrays(params), cfg)
  return cfg, dataclasses.replace(stats, seconds=time.perf_counter() - t0)


def _flat_params(params: Any) -> dict[tuple[str, ...], np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """One tensor to export: its HF name, shape and dtype, and a function making the contiguous array."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  make: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def hf_tensors(params: Any, cfg: Config, zero_expert_weights: str = "omit") -> list[HFTensor]:
  """The HF tensors of a model, in checkpoint order; checks the params tree against the config."""
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
      return _contiguous(arr.T if spec.kind == "linear" else arr)
    return produce

  out = []
  for spec in specs:
    arr = flat[spec.path]
    out.append(HFTensor(spec.hf_name, hf_shape(spec, arr.shape), arr.dtype, make(spec)))
  zero_names = zero_expert_specs(cfg) if zero_expert_weights == "zeros" else []
  if zero_names:   # LongCat-Flash only (every layer has experts); other architectures have no zero experts
    gate = next(v for k, v in flat.items() if k[-2:] == ("experts", "gate_proj"))
    shape, dtype = tuple(gate.shape[1:][::-1]), gate.dtype
    for name in zero_names:
      out.append(HFTensor(name, shape, dtype, lambda: np.zeros(shape, dtype)))
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


SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int32": "I32",
                      "int64": "I64", "uint8": "U8", "int8": "I8", "bool": "BOOL"}


def write_safetensors(path: Path, tensors: list[HFTensor], metadata: dict) -> None:
  """Write a .safetensors file one tensor at a time (peak extra memory: one tensor)."""
  header: dict[str, Any] = {"__metadata__": metadata}
  offset = 0
  for t in tensors:
    dtype_name = np.dtype(t.dtype).name
    if dtype_name not in SAFETENSORS_DTYPES:
      raise ValueError(f"{t.name}: dtype {dtype_name} cannot be stored in safetensors")
    header[t.name] = {"dtype": SAFETENSORS_DTYPES[dtype_name], "shape": list(t.shape),
                      "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for t in tensors:
      arr = t.make()
      if tuple(arr.shape) != tuple(t.shape) or arr.dtype != t.dtype:
        raise RuntimeError(f"{t.name}: made {arr.dtype}{list(arr.shape)}, announced {t.dtype}{list(t.shape)}")
      f.write(memoryview(arr.view(_RAW.get(arr.dtype.itemsize, np.uint8)).reshape(-1)))
      del arr


def write_hf(params: Any, cfg: Config, out_dir: str | Path, *, max_shard_size: str | int = "5GB",
             zero_expert_weights: str = "omit") -> Stats:
  """config.json + model-0000i-of-0000N.safetensors + model.safetensors.index.json into `out_dir`."""
  t0 = time.perf_counter()
  out_dir = Path(out_dir)
  hf_cfg = config_to_hf(cfg)
  tensors = hf_tensors(params, cfg, zero_expert_weights)
  limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
  shards: list[list[HFTensor]] = [[]]
  size = 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  check_new_dir(out_dir, "--out")   # export never overwrites
  out_dir.mkdir(parents=True, exist_ok=True)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(out_dir / fname, shard, {"format": "pt"})
    for t in shard:
      weight_map[t.name] = fname
      total += t.nbytes
  (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2) + "\n")
  (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
  return Stats(len(tensors), total, time.perf_counter() - t0, {})


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, *, max_shard_size: str | int = "5GB",
              zero_expert_weights: str = "omit") -> tuple[Config, Stats]:
  """Our model directory -> HF directory (see write_hf)."""
  t0 = time.perf_counter()
  if Path(out_dir).resolve() == Path(ckpt_dir).resolve():
    raise ValueError(f"--out {out_dir} is the --ckpt directory; export into a new directory")
  check_new_dir(out_dir, "--out")   # before loading: fail fast
  params, cfg = load_model(ckpt_dir)
  stats = write_hf(params, cfg, out_dir, max_shard_size=max_shard_size, zero_expert_weights=zero_expert_weights)
  return cfg, dataclasses.replace(stats, seconds=time.perf_counter() - t0)

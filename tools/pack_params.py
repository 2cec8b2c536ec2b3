"""Pack a model directory's parameters, rounded to bf16, into compressed parts small enough to travel,
and unpack them into a model directory again.

A GPU machine's disk goes with the machine, and files brought back from it (and sent to it) are size-capped,
so a pretrained model that must outlive one lease travels as these parts (docs/experiment.md):

  python tools/pack_params.py pack MODEL_DIR PACK_DIR [--part-mib 15] [--source "how the model was made"]
  python tools/pack_params.py unpack PACK_DIR MODEL_DIR

Each parameter is rounded to bf16 (the compute dtype of the configs that use this); the high and low bytes
of all of them are stored apart, so the exponent-heavy high bytes compress (zlib) and the near-random low
bytes cost what they must. `manifest.json` names each parameter's path, shape and saved dtype, the
config, the parts and the sha256 of the packed payload; unpack checks it and restores each parameter in
its saved dtype (with the bf16 rounding).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import yaml

from loza_jax.config import Config, from_dict, to_dict
from loza_jax.model_dir import SOURCE_FILE, load_model, save_model
from train.partition import flat, unflat

MANIFEST = "manifest.json"


def pack(model_dir: str | Path, pack_dir: str | Path, part_mib: float = 15.0, source: str = "") -> dict:
  """Write PACK_DIR/manifest.json and params.NNN parts (each ≤ part_mib MiB); returns the manifest.
  `source` (how the model was made: command, commit, date) is kept in the manifest."""
  params, cfg = load_model(model_dir)
  items = [(name, np.asarray(x)) for name, x in flat(params).items()]
  bits = np.concatenate([x.astype(ml_dtypes.bfloat16).reshape(-1).view(np.uint16) for _, x in items])
  raw = (bits >> 8).astype(np.uint8).tobytes() + (bits & 0xFF).astype(np.uint8).tobytes()
  blob = zlib.compress(raw, 6)
  out = Path(pack_dir)
  out.mkdir(parents=True, exist_ok=True)
  step = int(part_mib * 2**20)
  parts = []
  for i in range(0, len(blob), step):
    name = f"params.{len(parts):03d}"
    (out / name).write_bytes(blob[i:i + step])
    parts.append(name)
  manifest = {"format": "loza_jax packed params (bf16, high/low bytes, zlib)", "source": source,
              "params": [{"name": n, "shape": list(x.shape), "dtype": str(x.dtype)} for n, x in items],
              "values": int(bits.size), "sha256": hashlib.sha256(raw).hexdigest(), "parts": parts,
              "compressed_bytes": len(blob), "config": to_dict(cfg)}
  (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
  return manifest


def unpack(pack_dir: str | Path, model_dir: str | Path) -> Path:
  """Rebuild a model directory from a pack; errors name the missing part or the checksum that differs."""
  src = Path(pack_dir)
  if not (src / MANIFEST).is_file():
    raise FileNotFoundError(f"{src / MANIFEST} not found; is {src} a directory written by `pack`?")
  manifest = json.loads((src / MANIFEST).read_text())
  missing = [p for p in manifest["parts"] if not (src / p).is_file()]
  if missing:
    raise FileNotFoundError(f"{src}: part(s) {', '.join(missing)} missing")
  try:
    raw = zlib.decompress(b"".join((src / p).read_bytes() for p in manifest["parts"]))
  except zlib.error as e:
    raise ValueError(f"{src}: the parts do not decompress ({e}): a part is damaged or from another pack") from None
  if hashlib.sha256(raw).hexdigest() != manifest["sha256"]:
    raise ValueError(f"{src}: payload checksum differs from {MANIFEST}'s: a part is damaged or from another pack")
  n = manifest["values"]
  hi, lo = np.frombuffer(raw[:n], np.uint8), np.frombuffer(raw[n:], np.uint8)
  bits = (hi.astype(np.uint16) << 8) | lo
  items, at = [], 0
  for p in manifest["params"]:
    size = int(np.prod(p["shape"], dtype=np.int64))
    x = bits[at:at + size].view(ml_dtypes.bfloat16).reshape(p["shape"]).astype(p["dtype"])
    items.append((p["name"], x))
    at += size
  cfg = from_dict(Config, yaml.safe_load(yaml.safe_dump(manifest["config"])))
  out = save_model(model_dir, unflat(dict(items)), cfg)
  if manifest.get("source"):
    (Path(out) / SOURCE_FILE).write_text(manifest["source"] + "\n")
  return out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("pack", help="model directory -> compressed bf16 parts")
  p.add_argument("model_dir")
  p.add_argument("pack_dir")
  p.add_argument("--part-mib", type=float, default=15.0)
  p.add_argument("--source", default="", help="how the model was made (kept in manifest.json)")
  u = sub.add_parser("unpack", help="compressed parts -> model directory")
  u.add_argument("pack_dir")
  u.add_argument("model_dir")
  args = ap.parse_args(argv)
  if args.cmd == "pack":
    m = pack(args.model_dir, args.pack_dir, args.part_mib, args.source)
    print(f"{len(m['params'])} parameters, {m['values']:,} values -> {len(m['parts'])} parts, "
          f"{m['compressed_bytes'] / 2**20:.1f} MiB; sha256 {m['sha256'][:16]}")
  else:
    print(f"wrote {unpack(args.pack_dir, args.model_dir)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

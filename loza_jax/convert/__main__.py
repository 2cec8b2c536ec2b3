"""CLI: `python -m loza_jax.convert import --hf DIR --out CKPT` / `export --ckpt CKPT --out DIR`."""
from __future__ import annotations

import argparse
import logging
import sys

from loza_jax.convert.hf import export_hf, import_hf


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m loza_jax.convert", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HuggingFace directory -> loza_jax model directory (orbax + config.yaml)")
  imp.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
  imp.add_argument("--out", required=True, help="new model directory")
  imp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. attention.layer_types=[full,ssa] or model.param_dtype=bfloat16")
  imp.add_argument("--ignore-config-keys", default="", help="comma-separated config.json keys to accept unread")
  imp.add_argument("--block-size", type=int, default=None,
                   help="SSA block size for a config with streaming_sparse_attention (default: 128 if it fits)")
  exp = sub.add_parser("export", help="loza_jax model directory -> HuggingFace directory (+ ZigZag sparsity)")
  exp.add_argument("--ckpt", required=True, help="model directory written by import (or save_model)")
  exp.add_argument("--out", required=True, help="output directory (no *.safetensors in it yet)")
  exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
  exp.add_argument("--zero-expert-weights", choices=("omit", "zeros"), default="omit",
                   help="LongCat-Flash: omit zero-expert tensors (release layout, default) or write zero gate/up "
                        "placeholders (what transformers >= 5 needs to load the model)")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    if args.command == "import":
      keys = tuple(k.strip() for k in args.ignore_config_keys.split(",") if k.strip())
      cfg, stats = import_hf(args.hf, args.out, overrides=tuple(args.set), ignore_config_keys=keys,
                             block_size=args.block_size)
      what = f"imported {args.hf} -> {args.out}"
    else:
      cfg, stats = export_hf(args.ckpt, args.out, max_shard_size=args.max_shard_size,
                             zero_expert_weights=args.zero_expert_weights)
      what = f"exported {args.ckpt} -> {args.out}"
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  skipped = "".join(f"; skipped {n} ({r})" for r, n in stats.skipped.items())
  print(f"{what}: {cfg.model.architecture}, {stats.tensors} tensors, {stats.bytes / 1e9:.3f} GB in "
        f"{stats.seconds:.2f} s ({stats.gb_per_s:.2f} GB/s){skipped}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

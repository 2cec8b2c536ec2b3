"""Shared command line for the stages: `--config X.yaml [--set key=value ...] [--run-dir DIR]`."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from loza_jax.config import Config, load_config
from train import rundir


def parser(description: str) -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument("--config", required=True, help="YAML config, e.g. configs/demo_cpu.yaml")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="override a config value (YAML syntax), e.g. --set train.steps=50; repeatable")
  ap.add_argument("--run-dir", default=None, help="shorthand for --set train.run_dir=DIR")
  ap.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
  return ap


def setup_logging(level: str = "INFO") -> None:
  logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stderr)
  for noisy in ("absl", "jax._src.xla_bridge", "orbax", "jax._src.distributed"):
    logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))


def parse(description: str, argv: Sequence[str] | None = None,
          ap: argparse.ArgumentParser | None = None) -> tuple[argparse.Namespace, Config]:
  """Parse argv, set up logging and load the config; config errors exit with their message."""
  ap = ap or parser(description)
  args = ap.parse_args(argv)
  setup_logging(args.log_level)
  overrides = list(args.set) + ([f"train.run_dir={args.run_dir}"] if args.run_dir else [])
  try:
    cfg = load_config(args.config, overrides)
  except (ValueError, FileNotFoundError) as e:
    ap.exit(2, f"error: {e}\n")
  return args, cfg


def parse_stage(description: str, argv: Sequence[str] | None, section: str, what: str):
  """parse() plus `--init DIR` (overriding `<section>.init`); exits when no model is given.

  Returns (parser, args, cfg, init).
  """
  ap = parser(description)
  ap.add_argument("--init", default=None, help=f"{what} (overrides {section}.init)")
  args, cfg = parse(description, argv, ap)
  init = args.init or getattr(cfg, section).init
  if not init:
    ap.exit(2, f"error: no {what} given: pass --init DIR or --set {section}.init=DIR\n")
  return ap, args, cfg, init


def run_or_exit(ap: argparse.ArgumentParser, fn, *args, lock: str | None = None, **kwargs):
  """fn(*args, **kwargs) holding the lock of run directory `lock` (when given); bad input
  (ValueError, FileNotFoundError, FileExistsError) and a busy run directory exit 2 with the message."""
  try:
    with rundir.locked(lock):
      return fn(*args, **kwargs)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    ap.exit(2, f"error: {e}\n")

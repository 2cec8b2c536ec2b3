"""Tiny configs and helpers shared by the trainer, data, checkpoint and sharding tests."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from loza_jax.config import Config, apply_overrides, from_dict

TINY = {
    "model": {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
              "v_head_dim": 8, "max_position_embeddings": 256, "tie_word_embeddings": True},
    "attention": {"layer_types": ["full", "full"], "block_size": 16, "sink_blocks": 1, "local_blocks": 2,
                  "impl": "xla"},
    "data": {"source": "stdlib", "seq_len": 64, "retrieval_fraction": 0.0},
    "train": {"steps": 4, "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 1, "log_every": 1,
              "checkpoint_every": 2, "progress": False, "tensorboard": False, "async_checkpointing": False},
}


def tiny_dict(overrides=()) -> dict:
  return apply_overrides(copy.deepcopy(TINY), list(overrides))


def tiny_cfg(run_dir=None, overrides=()) -> Config:
  extra = [f"train.run_dir={run_dir}"] if run_dir is not None else []
  return from_dict(Config, tiny_dict(list(overrides) + extra))


def write_tiny_yaml(path: Path, overrides=()) -> Path:
  path.write_text(yaml.safe_dump(tiny_dict(overrides)))
  return path


def write_jsonl(path: Path, texts) -> Path:
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  return path


def read_metrics(run_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]

"""Tiny configs and helpers shared by the trainer, data, checkpoint, sharding and context-parallel tests."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import yaml

from loza_jax import sharding as shd
from loza_jax.config import Config, MeshConfig, apply_overrides, from_dict
from train import data
from train.trainer import Trainer

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


def one_device_vs_sharded_step(cfg: Config):
  """One step on the same global batch from the same initial params, on one device and on cfg.mesh (all
  devices): (one-device trainer, sharded trainer, metrics of each on the host, the initial params)."""
  batch = next(iter(data.build_dataset(cfg, cfg.train.batch_size)))
  one = Trainer(cfg, mesh=shd.make_mesh(MeshConfig(data=1), jax.devices()[:1]))
  one.state = one.init_state()
  params0 = jax.device_get(one.state.params)
  metrics_one = jax.device_get(one.step(batch))
  sharded = Trainer(cfg, init_params=params0)
  metrics_sharded = jax.device_get(sharded.step(batch))
  return one, sharded, metrics_one, metrics_sharded, params0

"""Smoke demo: build the configured model, run a forward pass and one AdamW step, print what happened.

python -m train.demo --config configs/demo_cpu.yaml [--set key=value ...]
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from loza_jax.config import load_config
from loza_jax.model import build_model


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  args = ap.parse_args(argv)
  cfg = load_config(args.config, args.set)
  m, a = cfg.model, cfg.attention
  print(f"config {args.config}: {m.num_hidden_layers} layers, width {m.hidden_size}, {m.num_attention_heads} heads, "
        f"layer_types {list(cfg.layer_types)}, SSA block {a.block_size} sink {a.sink_blocks} local {a.local_blocks}")
  model = build_model(cfg)
  B, T = cfg.train.batch_size, cfg.data.seq_len
  # Bytes of this very file as a stand-in corpus until the data pipeline lands.
  data = np.frombuffer(open(__file__, "rb").read(), np.uint8).astype(np.int32)
  idx = np.random.default_rng(cfg.train.seed).integers(0, len(data) - T - 1, B)
  batch = np.stack([data[i:i + T + 1] for i in idx])
  inputs, targets = jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:])
  params = nn.unbox(model.init(jax.random.PRNGKey(cfg.train.seed), inputs[:1])["params"])
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"initialised {n_params:,} parameters on {jax.default_backend()}")

  def loss_fn(p):
    logits = model.apply({"params": p}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  opt = optax.adamw(cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
  opt_state = opt.init(params)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss, optax.global_norm(g)

  t0 = time.perf_counter()
  logits = jax.jit(lambda p: model.apply({"params": p}, inputs))(params)
  print(f"forward: tokens {tuple(inputs.shape)} -> logits {tuple(logits.shape)} "
        f"({time.perf_counter() - t0:.1f}s incl. compile)")
  t0 = time.perf_counter()
  params2, opt_state, loss, gnorm = step(params, opt_state)
  loss_after = jax.jit(loss_fn)(params2)
  print(f"train step: loss {float(loss):.4f} (uniform would be {np.log(m.vocab_size):.4f}), grad norm "
        f"{float(gnorm):.3f}, loss after the step {float(loss_after):.4f} ({time.perf_counter() - t0:.1f}s incl. compile)")


if __name__ == "__main__":
  main()

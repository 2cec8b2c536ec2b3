"""Context parallelism on simulated CPU devices: collective bytes and temp memory per device vs context=1.

Usage: python -m benchmarks.context_parallel [--devices 8] [--seq-len 8192] [--run]
Compiles a loss+grad step of the demo model (configs/demo_cpu.yaml, layer types full, full, ssa, ssa)
on one device and with mesh.context = devices, and prints one JSON line: bytes through collectives
(from the compiled HLO), temp bytes per device (compiled.memory_analysis()), and with --run both losses.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
_COLLECTIVES = ("collective-permute", "all-gather", "all-reduce", "all-to-all", "reduce-scatter")
_OP = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of every collective's result in compiled HLO text, summed per collective kind."""
  out = {k: 0 for k in _COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m or "-done" in line:
      continue
    shapes = _SHAPE.findall(m.group(1))
    if m.group(3):   # async start: (operand, result, ...) tuple; count the result once
      shapes = shapes[1:2]
    for dtype, dims in shapes:
      if dtype in _DTYPE_BYTES:
        n = 1
        for d in filter(None, dims.split(",")):
          n *= int(d)
        out[m.group(2)] += n * _DTYPE_BYTES[dtype]
  return out


# ----------------------------------------------------------------------------------------
# The analytic model for the LongCat-Flash geometry (docs/context_parallel.md).

LONGCAT = dict(hidden=6144, layers=28, heads=64, kv_lora=512, rope=64, qk=192, v=128, block=128, sink=1, local=7)


def comm_per_layer(T: int, C: int, g=LONGCAT, bytes_per=2) -> dict:
  """Bytes one device receives per attention sublayer in the forward (the backward sends as much back)."""
  if C == 1:
    return {"ssa_halo": 0, "ssa_sink": 0, "full_latent": 0, "full_expanded_kv": 0}
  lat = (g["kv_lora"] + g["rope"]) * bytes_per
  W, NS = (g["local"] - 1) * g["block"], g["sink"] * g["block"]
  shifts = math.ceil(math.log2(2 * C)) + 2                 # Hillis–Steele rounds + exclusive + halo-distance shift
  return {"ssa_halo": 2 * W * lat, "ssa_sink": 2 * shifts * NS * lat,   # two zig-zag chunks per device
          "full_latent": T * (C - 1) // C * lat,
          "full_expanded_kv": T * (C - 1) // C * g["heads"] * (g["qk"] + g["v"]) * bytes_per}


def activation_bytes(T: int, C: int, g=LONGCAT, working_per_token=400e3, full_form="latent", tensor=8) -> float:
  """Per-device activation bytes with per-layer remat: layer-input checkpoints and one layer's working set per
  local token, plus, for the whole sequence, the Full layer's all-gathered latents (bf16) and their fp32 gradient,
  and with full_form="kernel" (the prefix-kernel path of kernel impls) the expanded K/V of the device's heads
  (heads / tensor) and their gradients, bf16."""
  local = T / C
  checkpoints = g["layers"] * g["hidden"] * 2
  gathered = 0 if C == 1 else T * (g["kv_lora"] + g["rope"]) * (2 + 4)
  if C > 1 and full_form == "kernel":
    gathered += T * g["heads"] // tensor * (g["qk"] + g["v"]) * 2 * 2
  return local * (checkpoints + working_per_token) + gathered


def longest_context(C: int, budget=100e9, block=128, full_form="latent") -> int:
  """Longest T (a multiple of 2·C·block) whose activations fit `budget` bytes per device."""
  step = 2 * C * block
  fits = lambda T: activation_bytes(T, C, full_form=full_form) <= budget
  lo = step
  while fits(2 * lo):
    lo *= 2
  hi = 2 * lo
  while hi - lo > step:
    mid = (lo + hi) // 2 // step * step
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def _setup(devices: int) -> None:
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"


def measure(devices: int, seq_len: int, run: bool) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from loza_jax import sharding as shd
  from loza_jax.config import MeshConfig, load_config
  from loza_jax.model import build_model

  cfg = load_config("configs/demo_cpu.yaml", ["attention.layer_types=[full, full, ssa, ssa]", "attention.impl=xla",
                                              f"model.max_position_embeddings={seq_len}"])
  model = build_model(cfg)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, (1, seq_len)), jnp.int32)
  seg = jnp.asarray(np.repeat(np.arange(1, 9), seq_len // 8)[None], jnp.int32)   # 8 documents
  params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens[:, :64])["params"])

  def loss(p, tokens, seg):
    logp = jax.nn.log_softmax(model.apply({"params": p}, tokens, seg)[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  step = jax.jit(jax.value_and_grad(loss))
  result = {"devices": devices, "seq_len": seq_len, "model": "demo_cpu, layer types full,full,ssa,ssa"}
  for name, mcfg in (("context1", None), (f"context{devices}", MeshConfig(data=1, context=devices))):
    if mcfg is None:
      compiled = step.lower(params, tokens, seg).compile()
      args = (params, tokens, seg)
    else:
      mesh = shd.make_mesh(mcfg)
      with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_AXIS_RULES):
        args = (jax.device_put(params, jax.NamedSharding(mesh, jax.P())),
                jax.device_put(tokens, shd.batch_sharding(mesh)), jax.device_put(seg, shd.batch_sharding(mesh)))
        compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    coll = collective_bytes(compiled.as_text())
    result[name] = {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
                    "collective_bytes": coll, "collective_total": sum(coll.values())}
    if run:
      ctx = jax.set_mesh(mesh) if mcfg else _null()
      with ctx:
        result[name]["loss"] = float(compiled(*args)[0])
  c1, cn = result["context1"], result[f"context{devices}"]
  result["temp_ratio"] = cn["temp_bytes"] / c1["temp_bytes"]
  result["collective_MiB"] = cn["collective_total"] / 2**20
  return result


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--seq-len", type=int, default=8192)
  ap.add_argument("--run", action="store_true", help="also run both steps and report the losses")
  ap.add_argument("--model", action="store_true", help="print the LongCat-Flash communication/memory model instead")
  args = ap.parse_args(argv)
  if args.model:
    for C in (1, 8, 64):
      print(f"C={C}: longest context {longest_context(C):,} tokens (XLA Full form), "
            f"{longest_context(C, full_form='kernel'):,} (prefix-kernel Full form); per-layer bytes at T=131072: "
            + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in comm_per_layer(131072, C).items()))
    return
  _setup(args.devices)
  import json
  print(json.dumps(measure(args.devices, args.seq_len, args.run)))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()

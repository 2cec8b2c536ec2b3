"""One SSA forward+backward at B=1, H=16, D=192, E=128, bf16, for profiling with ncu:

ncu --clock-control none --target-processes all \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    python3 -m benchmarks.profile_ssa [--seq 32768] [--forward mosaic] [--backward mosaic]
"""
import argparse

import jax
import jax.numpy as jnp

from kernels_pallas import flash, flash_attention


def main(argv=None, H: int = 16, D: int = 192, E: int = 128):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, default=32768)
  p.add_argument("--forward", choices=flash.FORWARDS, default="triton")
  p.add_argument("--backward", choices=flash.BACKWARDS, default="triton")
  args = p.parse_args(argv)
  T = args.seq
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, T, H, D), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, T, H, D), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, T, H, E), jnp.bfloat16)
  attn = lambda q, k, v: flash_attention(q, k, v, scale=D ** -0.5, block_size=128, sink_blocks=1, local_blocks=7,
                                         forward=args.forward, backward=args.backward)[0].astype(jnp.float32).sum()
  grads = jax.jit(jax.grad(attn, argnums=(0, 1, 2)))(q, k, v)
  jax.block_until_ready(grads)
  print("done", [g.shape for g in grads])


if __name__ == "__main__":
  main()

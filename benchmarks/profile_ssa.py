"""One SSA forward+backward at B=1, T=32K, H=16, D=192, E=128, bf16, for profiling with ncu:

ncu --clock-control none --target-processes all -k regex:"ssa_attention_fwd|attention_bwd" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    python3 -m benchmarks.profile_ssa
"""
import jax
import jax.numpy as jnp

from kernels_pallas import flash_attention


def main(T: int = 32768, H: int = 16, D: int = 192, E: int = 128):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, T, H, D), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, T, H, D), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, T, H, E), jnp.bfloat16)
  attn = lambda q, k, v: flash_attention(q, k, v, scale=D ** -0.5, block_size=128, sink_blocks=1,
                                         local_blocks=7)[0].astype(jnp.float32).sum()
  grads = jax.jit(jax.grad(attn, argnums=(0, 1, 2)))(q, k, v)
  jax.block_until_ready(grads)
  print("done", [g.shape for g in grads])


if __name__ == "__main__":
  main()

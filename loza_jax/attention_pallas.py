"""Registry adapters from loza_jax.attention to the Pallas kernels of kernels_pallas/.

`pallas_triton` runs the Triton kernels forward and backward; `pallas_mosaic` runs the Mosaic GPU
forward (Hopper) with the BACKWARD choice of backward kernels (kernels_pallas/README.md compares
them). Both take `interpret=` (Pallas interpret mode, CPU; the registry's "<name>_interpret").

The kernels derive document positions from the segment ids, which is what the attention API uses
by default; the impls are registered with custom_positions=False, so explicit `positions` raise
before reaching them. SSA runs on tiles of its block size, Full on FULL_TILE tokens (smaller in
interpret mode), so documents must start at multiples of that tile.
"""
from __future__ import annotations

import jax

from kernels_pallas import mosaic_fwd
from kernels_pallas.flash import flash_attention, input_problem
from loza_jax.attention import SSA, Full

FULL_TILE = 128
TRITON_FULL_TILE_INTERPRET = 16
MOSAIC_FULL_TILE_INTERPRET = 64
# pallas_mosaic's backward: the Mosaic dQ with the Triton dK/dV and sink kernels. The all-Mosaic "mosaic" choice
# (4.6% faster at 128K) gave a wrong dK on an H100 for SSA(128, 1, 1), D = E = 64, GQA 6/2 (kernels_pallas/README.md,
# "Tests"), so it stays opt-in until that is understood.
BACKWARD = "mosaic_dq"


def tile_args(pattern, full_tile: int) -> dict:
  """flash_attention's block arguments for a pattern; Full runs on tiles of `full_tile`."""
  if isinstance(pattern, SSA):
    return dict(block_size=pattern.block_size, sink_blocks=pattern.sink_blocks, local_blocks=pattern.local_blocks)
  if isinstance(pattern, Full):
    return dict(block_size=full_tile, sink_blocks=0, local_blocks=None)
  raise ValueError(f"pattern must be Full() or SSA(...), got {pattern!r}")


def _full_tile(interpret: bool, interpret_tile: int) -> int:
  return interpret_tile if interpret else FULL_TILE


# ----------------------------------------------------------------------------------------
# pallas_triton


def triton_reason(pattern, q, k, v, *, interpret: bool = False) -> str | None:
  """Why the Triton kernels cannot run this call, or None."""
  if not isinstance(pattern, (SSA, Full)):
    return f"pattern {pattern!r} is not Full() or SSA(...)"
  block = tile_args(pattern, _full_tile(interpret, TRITON_FULL_TILE_INTERPRET))["block_size"]
  problem = input_problem(q, k, v, block)
  return f"pallas_triton kernels: {problem}" if problem else None


def triton_impl(q, k, v, *, pattern, segment_ids, positions, scale, interpret: bool = False):
  """(o_BTHE, lse_BHT) from the Triton kernels."""
  del positions  # the defaults (custom_positions=False): derived from segment_ids
  return flash_attention(q, k, v, segment_ids, scale=scale, interpret=interpret,
                         **tile_args(pattern, _full_tile(interpret, TRITON_FULL_TILE_INTERPRET)))


# ----------------------------------------------------------------------------------------
# pallas_mosaic


def mosaic_reason(pattern, q, k, v, *, interpret: bool = False) -> str | None:
  """Why the Mosaic forward cannot run this call (compiled: on this machine), or None."""
  if not interpret:
    cc = str(getattr(jax.devices()[0], "compute_capability", ""))
    if not cc.startswith("9"):
      return f"pallas_mosaic needs a Hopper GPU (compute capability 9.x), found {cc or 'unknown'}"
  if not isinstance(pattern, (SSA, Full)):
    return f"pattern {pattern!r} is not Full() or SSA(...)"
  block = tile_args(pattern, _full_tile(interpret, MOSAIC_FULL_TILE_INTERPRET))["block_size"]
  problem = input_problem(q, k, v, block) or mosaic_fwd.input_problem(q, k, v, block)
  return f"pallas_mosaic kernels: {problem}" if problem else None


def mosaic_impl(q, k, v, *, pattern, segment_ids, positions, scale, interpret: bool = False,
                backward: str = BACKWARD):
  """(o_BTHE, lse_BHT): the Mosaic GPU forward, `backward` (one of flash.BACKWARDS) for the gradients."""
  del positions  # the defaults (custom_positions=False): derived from segment_ids
  return flash_attention(q, k, v, segment_ids, scale=scale, interpret=interpret, forward="mosaic", backward=backward,
                         **tile_args(pattern, _full_tile(interpret, MOSAIC_FULL_TILE_INTERPRET)))

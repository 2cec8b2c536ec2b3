"""Adapters from loza_jax.attention's impl registry to the Mosaic GPU kernels.

`pallas_mosaic` runs the forward pass with kernels_pallas/mosaic_fwd.py (Hopper wgmma, warp
specialised) and the backward pass with BACKWARD = "mosaic": the Mosaic dQ kernel and the
Mosaic dK/dV kernel, which also takes the sink visits (mosaic_bwd.py). On an H100 at T=128K,
SSA fwd+bwd took 12.72 ms this way, 13.30 ms with Mosaic dQ + Triton dK/dV and sink kernels
("mosaic_dq") and 14.42 ms with the Triton backward, in one run (kernels_pallas/README.md).
Tiles are the SSA block (Full: FULL_TILE). Interpret mode runs on CPU with Full on 64-row tiles.
Positions come from the segment ids; the impls are registered with custom_positions=False, so an
explicit `positions` argument to attention() raises for them instead of being ignored.
"""
from __future__ import annotations

import jax

from loza_jax.attention import SSA, Full

from kernels_pallas import mosaic_fwd
from kernels_pallas.flash import flash_attention, input_problem
from kernels_pallas.triton_attention import FULL_TILE, tile_args

FULL_TILE_INTERPRET = 64
BACKWARD = "mosaic"        # Mosaic dQ and dK/dV, sink items included (kernels_pallas/README.md)


def _tile_args(pattern, interpret: bool) -> dict:
  return tile_args(pattern, FULL_TILE_INTERPRET if interpret else FULL_TILE)


def _problem(pattern, q, k, v, interpret: bool) -> str | None:
  if not isinstance(pattern, (SSA, Full)):
    return f"pattern {pattern!r} is not Full() or SSA(...)"
  block = _tile_args(pattern, interpret)["block_size"]
  problem = input_problem(q, k, v, block) or mosaic_fwd.input_problem(q, k, v, block)
  return f"pallas_mosaic kernels: {problem}" if problem else None


def unsupported_reason(pattern, q, k, v) -> str | None:
  """Why the Mosaic forward cannot run this call on this machine, or None."""
  cc = str(getattr(jax.devices()[0], "compute_capability", ""))
  if not cc.startswith("9"):
    return f"pallas_mosaic needs a Hopper GPU (compute capability 9.x), found {cc or 'unknown'}"
  return _problem(pattern, q, k, v, interpret=False)


def unsupported_reason_interpret(pattern, q, k, v) -> str | None:
  return _problem(pattern, q, k, v, interpret=True)


def run(q, k, v, *, pattern, segment_ids, positions, scale, interpret: bool, backward: str = "triton"):
  """flash_attention with the Mosaic forward and the given backward (one of flash.BACKWARDS)."""
  del positions  # the defaults (custom_positions=False): derived from segment_ids, as in triton_attention
  return flash_attention(q, k, v, segment_ids, scale=scale, interpret=interpret, forward="mosaic",
                         backward=backward, **_tile_args(pattern, interpret))


def attention_impl(q, k, v, *, pattern, segment_ids, positions, scale):
  """(o_BTHE, lse_BHT): Mosaic GPU forward, BACKWARD for the gradients."""
  return run(q, k, v, pattern=pattern, segment_ids=segment_ids, positions=positions, scale=scale,
             interpret=False, backward=BACKWARD)


def attention_impl_interpret(q, k, v, *, pattern, segment_ids, positions, scale):
  """Same kernels in interpret mode (CPU; slow, for tests)."""
  return run(q, k, v, pattern=pattern, segment_ids=segment_ids, positions=positions, scale=scale,
             interpret=True, backward=BACKWARD)

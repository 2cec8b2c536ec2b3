"""Adapters from loza_jax.attention's impl registry to the Pallas (Triton lowering) kernels.

The kernels derive document positions from the segment ids (position = token index minus its
document's first index), which is what the attention API uses by default. The impls are
registered with custom_positions=False, so `attention(..., positions=X)` with an explicit X
raises for them (and impl="auto" skips them); the `positions` reaching these adapters are
always the default ones. Full attention runs on tiles of FULL_TILE tokens (FULL_TILE_INTERPRET in
interpret mode), so documents must start at multiples of that tile; SSA uses its block size.
"""
from __future__ import annotations

from loza_jax.attention import SSA, Full

from kernels_pallas.flash import flash_attention, input_problem

FULL_TILE = 128
FULL_TILE_INTERPRET = 16


def tile_args(pattern, full_tile: int) -> dict:
  """flash_attention's block arguments for a pattern; Full runs on tiles of `full_tile`."""
  if isinstance(pattern, SSA):
    return dict(block_size=pattern.block_size, sink_blocks=pattern.sink_blocks,
                local_blocks=pattern.local_blocks)
  if isinstance(pattern, Full):
    return dict(block_size=full_tile, sink_blocks=0, local_blocks=None)
  raise ValueError(f"pattern must be Full() or SSA(...), got {pattern!r}")


def _tile_args(pattern, interpret: bool) -> dict:
  return tile_args(pattern, FULL_TILE_INTERPRET if interpret else FULL_TILE)


def unsupported_reason(pattern, q, k, v) -> str | None:
  """Why the Triton kernels cannot run this call, or None."""
  if not isinstance(pattern, (SSA, Full)):
    return f"pattern {pattern!r} is not Full() or SSA(...)"
  problem = input_problem(q, k, v, _tile_args(pattern, interpret=False)["block_size"])
  return f"pallas_triton kernels: {problem}" if problem else None


def _run(q, k, v, *, pattern, segment_ids, positions, scale, interpret):
  del positions  # the defaults (custom_positions=False): derived from segment_ids, see module docstring
  return flash_attention(q, k, v, segment_ids, scale=scale, interpret=interpret, **_tile_args(pattern, interpret))


def attention_impl(q, k, v, *, pattern, segment_ids, positions, scale):
  """(o_BTHE, lse_BHT) on GPU through the Triton lowering."""
  return _run(q, k, v, pattern=pattern, segment_ids=segment_ids, positions=positions, scale=scale,
              interpret=False)


def attention_impl_interpret(q, k, v, *, pattern, segment_ids, positions, scale):
  """Same kernels in Pallas interpret mode (runs on CPU; slow, for tests)."""
  return _run(q, k, v, pattern=pattern, segment_ids=segment_ids, positions=positions, scale=scale,
              interpret=True)

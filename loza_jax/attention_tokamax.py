"""tokamax's Mosaic GPU (Hopper wgmma) causal attention as an optional impl for Full layers.

impl="auto" prefers it for unpacked Full attention when tokamax is installed (measurements in
benchmarks/results/) and rows hold one document each (segment_ids=None: its public API cannot
express packed documents). It returns no lse.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from loza_jax.attention import Full


def unsupported_reason(pattern, q, k, v) -> str | None:
  """Why tokamax cannot run this call, or None."""
  if not isinstance(pattern, Full):
    return "tokamax serves Full() only (no sink block for SSA)"
  try:
    import tokamax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    return f"tokamax is not installed ({e}); pip install tokamax"
  cc = getattr(jax.devices()[0], "compute_capability", "")
  if not str(cc).startswith("9"):
    return f"tokamax's Mosaic GPU kernel needs a Hopper GPU (compute capability 9.x), found {cc or 'unknown'}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"tokamax mosaic runs bf16/fp16, got {q.dtype}"
  if q.shape[-1] % 64 or v.shape[-1] % 64 or q.shape[-1] > 256 or v.shape[-1] > 256:
    return f"tokamax mosaic needs head dims that are multiples of 64 up to 256, got D={q.shape[-1]}, E={v.shape[-1]}"
  return None


def attention_impl(q, k, v, *, pattern, segment_ids, positions, scale):
  """(o_BTHE, None): causal attention over each row (one document per row, checked by the registry)."""
  del pattern, segment_ids, positions   # rows are single documents; causal order by index
  import tokamax  # pylint: disable=import-outside-toplevel
  return tokamax.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="mosaic"), None

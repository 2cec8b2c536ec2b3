"""Inference caches for MLA models: the latent per token (full sublayers) or a fixed ring (SSA sublayers).

A cache is an explicit pytree, passed into a cached model call and returned updated:
- `lengths_B`: tokens already in the cache, per row (rows may hold prompts of different lengths);
- `layers`: one entry per attention sublayer, in sublayer order:
  - full: `ckv_BSC` (normalised kv latent, C = kv_lora_rank) and `krope_BSR` (the shared RoPE key,
    rotated at its absolute position), S = the cache's capacity; never per-head K/V;
  - ssa: the same two arrays over W = (sink_blocks + local_blocks)·block_size slots, plus `pos_BW`,
    the position each slot holds (−1 = empty). Slot of position p: p if p < sink·block, else
    sink·block + (p − sink·block) mod (local·block). Its size does not depend on the context length.

Cached calls come in two kinds (`Step`): a prefill chunk of T tokens at the same static offset in
every row (right-padded prompts), or one decode token per row at position `lengths_B`.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from loza_jax.attention import _MASK_VALUE, NEG_INF, SSA, Full, pattern_allows
from loza_jax.config import Config


class Cache(NamedTuple):
  """Per-row lengths and one dict of arrays per attention sublayer (see the module docstring)."""
  lengths_B: jax.Array
  layers: tuple[dict[str, jax.Array], ...]


@dataclasses.dataclass(frozen=True)
class Step:
  """Where a cached call's tokens go: a prefill chunk at `start` (static, all rows), or decode (start=None).

  `lengths_B`: decode — tokens already cached per row (the new token's position); prefill — the
  rows' prompt lengths (positions at or past it are padding, never written into an SSA ring).
  """
  start: int | None
  lengths_B: jax.Array

  @property
  def decode(self) -> bool:
    return self.start is None


def ssa_slots(cfg: Config) -> int:
  """Ring size of an SSA sublayer: (sink_blocks + local_blocks) · block_size."""
  a = cfg.attention
  return (a.sink_blocks + a.local_blocks) * a.block_size


def check_cacheable(cfg: Config) -> None:
  """Caches hold full and ssa sublayers only; a blend model must be sparsified first."""
  blends = [i for i, t in enumerate(cfg.layer_types) if t == "blend"]
  if blends:
    raise ValueError(f"attention.layer_types has 'blend' sublayers {blends}: a calibration model cannot be "
                     "served; run train.sparsify to turn it into full/ssa sublayers first")


def init_cache(cfg: Config, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens (full sublayers; SSA rings are fixed).

  Full capacity is rounded up to a multiple of 128 so attention can visit it in equal key chunks.
  """
  check_cacheable(cfg)
  if batch < 1 or max_len < 1:
    raise ValueError(f"init_cache: batch and max_len must be >= 1, got batch={batch}, max_len={max_len}")
  max_len = -(-max_len // 128) * 128
  m = cfg.model
  C, R = m.kv_lora_rank, m.qk_rope_head_dim
  layers = []
  for t in cfg.layer_types:
    S = max_len if t == "full" else ssa_slots(cfg)
    entry = {"ckv": jnp.zeros((batch, S, C), dtype), "krope": jnp.zeros((batch, S, R), dtype)}
    if t == "ssa":
      entry["pos"] = jnp.full((batch, S), -1, jnp.int32)
    layers.append(entry)
  return Cache(jnp.zeros((batch,), jnp.int32), tuple(layers))


def cache_bytes(cache: Cache, row: bool = True) -> int:
  """Bytes held by the cache's arrays (per row when `row`)."""
  total = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(cache))
  return total // cache.lengths_B.shape[0] if row else total


# ----------------------------------------------------------------------------------------
# Writing.


def ring_slot(pos, sink: int, local: int):
  """The SSA ring slot of absolute position `pos` (sink = sink_blocks·block, local = local_blocks·block)."""
  return jnp.where(pos < sink, pos, sink + jnp.mod(pos - sink, local))


def ring_positions(last_B1, W: int, sink: int, local: int):
  """[B, W]: the newest position <= last_B1 that each ring slot holds (may be < 0 or not a ring
  position of that slot's kind: callers mask what they cannot use)."""
  w = jnp.arange(W)[None, :]
  return jnp.where(w < sink, w, last_B1 - jnp.mod(last_B1 - w, local))


def write_full(entry, ckv_BTC, krope_BTR, step: Step):
  """Full sublayer: the chunk goes to [start, start+T) (prefill) or each row's one token to lengths_B."""
  new = {}
  for name, x in (("ckv", ckv_BTC), ("krope", krope_BTR)):
    buf = entry[name]
    x = x.astype(buf.dtype)
    if step.decode:
      new[name] = buf.at[jnp.arange(buf.shape[0]), step.lengths_B].set(x[:, 0])
    else:
      new[name] = jax.lax.dynamic_update_slice_in_dim(buf, x, step.start, axis=1)
  return new


def write_ring(entry, ckv_BTC, krope_BTR, step: Step, sink: int, local: int):
  """SSA sublayer: each slot takes the newest real position of this call that maps to it."""
  B, T = ckv_BTC.shape[:2]
  if step.decode:
    lengths_B = step.lengths_B
    slot_B = ring_slot(lengths_B, sink, local)
    rows = jnp.arange(B)
    return {"ckv": entry["ckv"].at[rows, slot_B].set(ckv_BTC[:, 0].astype(entry["ckv"].dtype)),
            "krope": entry["krope"].at[rows, slot_B].set(krope_BTR[:, 0].astype(entry["krope"].dtype)),
            "pos": entry["pos"].at[rows, slot_B].set(lengths_B)}
  start = step.start
  w = jnp.arange(sink + local)[None, :]
  last_B1 = jnp.minimum(start + T, step.lengths_B)[:, None] - 1    # newest real position per row
  p_BW = ring_positions(last_B1, sink + local, sink, local)
  ok_BW = (p_BW >= start) & (p_BW <= last_B1) & ((w < sink) | (p_BW >= sink))
  idx_BW = jnp.clip(p_BW - start, 0, T - 1)
  take = lambda x: jnp.take_along_axis(x, idx_BW[:, :, None], axis=1)
  keep = ok_BW[:, :, None]
  return {"ckv": jnp.where(keep, take(ckv_BTC).astype(entry["ckv"].dtype), entry["ckv"]),
          "krope": jnp.where(keep, take(krope_BTR).astype(entry["krope"].dtype), entry["krope"]),
          "pos": jnp.where(ok_BW, p_BW, entry["pos"])}


# ----------------------------------------------------------------------------------------
# Attention over cached latents (MLA's absorbed form).


def key_chunk_for(S: int, rows: int, budget_bytes: int = 1 << 30) -> int:
  """Keys per online-softmax step: all S if rows·S fp32 scores fit the budget, else the largest
  divisor of S that does (so no padded copy of the cache is ever made)."""
  most = max(1, budget_bytes // (4 * rows))
  if S <= most:
    return S
  return max(d for d in range(1, most + 1) if S % d == 0)


def latent_impl(impl: str) -> str | None:
  """Which latent-attention form an attention impl name selects: "kernel" (Pallas split-K, on GPU),
  "interpret" (the same kernel interpreted, for CPU tests) or None (XLA). `xla*` names keep XLA;
  any other name runs the kernel where a GPU is the default backend, XLA elsewhere."""
  if impl.startswith("xla"):
    return None
  if "interpret" in impl:
    return "interpret"
  return "kernel" if jax.default_backend() == "gpu" else None


def latent_attention(q_lat_BTHC, q_rope_BTHR, ckv_BSC, krope_BSR, q_pos_BT, k_pos_BS, pattern, scale: float,
                     key_chunk: int | None = None, impl: str = "xla"):
  """Softmax attention of latent-space queries over cached latents; fp32; (o_lat_BTHC, lse_BHT).

  Scores are q_lat·ckv + q_rope·krope (the key's nope part is W_uk·ckv, absorbed into q_lat).
  A key is visible iff k_pos >= 0 and the pattern allows (q_pos, k_pos); a Full cache's k_pos is
  its index. `impl` (the attention impl name, see `latent_impl`) picks the Pallas split-K kernel
  or this XLA form, which visits keys in chunks (`key_chunk`, a divisor of S; default:
  key_chunk_for) with an online softmax, so memory is O(T·H·key_chunk).
  """
  kernel = latent_impl(impl)
  if kernel is not None:
    from kernels_pallas import decode
    window = None if isinstance(pattern, Full) else (pattern.block_size, pattern.sink_blocks, pattern.local_blocks)
    return decode.latent_attention(q_lat_BTHC, q_rope_BTHR, ckv_BSC, krope_BSR, q_pos_BT, k_pos_BS, scale=scale,
                                   window=window, interpret=kernel == "interpret")
  B, T, H, C = q_lat_BTHC.shape
  S = ckv_BSC.shape[1]
  Kc = key_chunk or key_chunk_for(S, B * H * T)
  if S % Kc:
    raise ValueError(f"latent_attention: key_chunk {Kc} must divide the cache length {S}")
  n = S // Kc
  f32 = jnp.float32

  def scores(ckv, krope, kpos):
    s = (jnp.einsum("bthc,bsc->bhts", q_lat_BTHC, ckv.astype(q_lat_BTHC.dtype), preferred_element_type=f32)
         + jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, krope.astype(q_rope_BTHR.dtype), preferred_element_type=f32))
    mask = (kpos[:, None, :] >= 0) & pattern_allows(pattern, q_pos_BT[:, :, None], kpos[:, None, :])
    return jnp.where(mask[:, None], s * scale, _MASK_VALUE), mask[:, None]

  def body(carry, j):
    m, l, acc = carry
    sl = lambda x: x if n == 1 else jax.lax.dynamic_slice_in_dim(x, j * Kc, Kc, axis=1)   # static j: a slice
    ckv = sl(ckv_BSC)
    s, mask = scores(ckv, sl(krope_BSR), sl(k_pos_BS))
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + p.sum(-1)
    acc = acc * corr[..., None] + jnp.einsum("bhts,bsc->bhtc", p.astype(ckv.dtype), ckv, preferred_element_type=f32)
    return (m_new, l, acc), None

  init = (jnp.full((B, H, T), _MASK_VALUE, f32), jnp.zeros((B, H, T), f32), jnp.zeros((B, H, T, C), f32))
  if n <= 64:
    # Static slices, unrolled: a while loop would hold the cache as a loop operand and make XLA copy
    # it before the in-place cache update that follows.
    carry = init
    for j in range(n):
      carry, _ = body(carry, j)
    m, l, acc = carry
  else:
    (m, l, acc), _ = jax.lax.scan(body, init, jnp.arange(n))
  ok = l > 0
  o = acc / jnp.where(ok, l, 1.0)[..., None]
  lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)
  return jnp.transpose(o, (0, 2, 1, 3)), lse


def merge_with_lse(o1_BTHE, lse1_BHT, o2_BTHE, lse2_BHT):
  """Combine two attentions over disjoint key sets by their log-sum-exps -> (o_BTHE, lse_BHT), fp32."""
  m = jnp.maximum(lse1_BHT, lse2_BHT)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w1 = jnp.exp(lse1_BHT - m)                      # exp(-inf) = 0 for an empty side
  w2 = jnp.exp(lse2_BHT - m)
  tot = w1 + w2
  lse = jnp.where(tot > 0, m + jnp.log(jnp.where(tot > 0, tot, 1.0)), NEG_INF)
  w1, w2 = (jnp.where(tot > 0, w / jnp.where(tot > 0, tot, 1.0), 0.0) for w in (w1, w2))
  t = lambda w: jnp.transpose(w, (0, 2, 1))[..., None]
  return o1_BTHE.astype(jnp.float32) * t(w1) + o2_BTHE.astype(jnp.float32) * t(w2), lse


def merge(o1_BTHE, lse1_BHT, o2_BTHE, lse2_BHT):
  """Combine two attentions over disjoint key sets by their log-sum-exps (fp32)."""
  return merge_with_lse(o1_BTHE, lse1_BHT, o2_BTHE, lse2_BHT)[0]


def expanded_past_attention(q_BTHD, ckv_BSC, krope_BSR, expand, start: int, scale: float, interpret: bool):
  """A prefill chunk's queries over the `start` cached tokens before it (every one visible: prompts are
  right-padded, so a real query's earlier keys are real), in the expanded form through the prefix kernel.

  `expand(ckv_BKC, krope_BKR) -> (k_BKHD, v_BKHE)` makes per-head keys and values; it runs on at most
  T tokens (the chunk's length, in whole 128s) at a time, so the extra memory is that of the chunk's own
  keys. MLA's expanded form costs (D + E) = 320 multiply-adds per (query, key, head) at the paper's
  geometry against C + R + C = 1088 for the absorbed form. -> (o_BTHE fp32, lse_BHT)."""
  from kernels_pallas import prefix
  T = q_BTHD.shape[1]
  step = -(-T // 128) * 128
  o = lse = None
  for a in range(0, start, step):
    b = min(a + step, start)
    k, v = expand(ckv_BSC[:, a:b], krope_BSR[:, a:b])
    # offset `step` >= b - a: every key of the block lies before every query (any such offset will do)
    o_i, lse_i = prefix.prefix_attention(q_BTHD, k.astype(q_BTHD.dtype), v.astype(q_BTHD.dtype),
                                         offset=step, scale=scale, interpret=interpret)
    o, lse = (o_i, lse_i) if o is None else merge_with_lse(o, lse, o_i, lse_i)
  return o.astype(jnp.float32), lse


def chunk_pattern(pattern, start: int):
  """The pattern a prefill chunk applies to its own keys with chunk-relative positions.

  Causal and the SSA window are shift-invariant when `start` is a multiple of the block size;
  the sink lies in earlier chunks once start > 0 (those keys come from the cache instead).
  """
  if isinstance(pattern, Full) or start == 0:
    return pattern
  return SSA(pattern.block_size, 0, pattern.local_blocks)


def check_prefill_start(cfg: Config, start: int) -> None:
  a = cfg.attention
  if start % a.block_size or (0 < start < a.sink_blocks * a.block_size):
    raise ValueError(f"prefill chunk start {start} must be a multiple of attention.block_size={a.block_size} "
                     f"and 0 or >= the sink ({a.sink_blocks * a.block_size} tokens); pick prefill_chunk accordingly")

"""XLA attention implementations: `xla_dense` (materialised mask, the oracle; small sizes only) and
`xla` (memory-linear on any backend: a blockwise gather for SSA, a flash-style chunked online
softmax with a hand-written backward for Full). Both follow the contract of loza_jax.attention.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from loza_jax.attention import _MASK_VALUE, NEG_INF, SSA, visible


def finish_softmax(m, l):
  """(l with empty rows set to 1, lse) from a row max m and a row sum l; empty rows get lse = -inf."""
  ok = l > 0
  l_safe = jnp.where(ok, l, 1.0)
  return l_safe, jnp.where(ok, m + jnp.log(l_safe), NEG_INF)


def masked_softmax(s, mask):
  """Softmax over the last (key) axis where `mask` (broadcasting), fp32: (p, lse). A row with no
  visible key gets p = 0 and lse = -inf, so its output is 0 and its gradients are finite."""
  s = jnp.where(mask, s, _MASK_VALUE)
  # The row max only keeps exp in range; the result does not depend on it, so no gradient flows through it
  # (differentiating the max costs a compare and select over every score).
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  e = jnp.exp(s - m)                  # exactly 0 at hidden keys of a row with a visible one; 1 in an empty row
  row_ok = m > _MASK_VALUE / 2        # the row has a visible key; empty rows are zeroed per row, not per score
  l_safe, lse = finish_softmax(m, jnp.where(row_ok, jnp.sum(e, axis=-1, keepdims=True), 0.0))
  return e * (row_ok / l_safe), lse[..., 0]


# ----------------------------------------------------------------------------------------
# xla_dense: the oracle. Materialises the [B, K, G, T, S] scores; small sizes only.


def xla_dense(q, k, v, *, pattern, segment_ids, positions, scale):
  """Reference attention with a materialised mask; any segmentation and positions."""
  B, T, H, D = q.shape
  G = H // k.shape[2]
  # [B, H, T, D] operands (each key head repeated for its G query heads): 4-d contractions with heads
  # before tokens, whose scores the softmax fusions read in order (the demo's whole CPU training step takes
  # ~12% less time than with [B, T, K, G, D] operands: benchmarks/results/2026-12-07-cpu-demo-speed.md).
  q_BHTD, k_BHSD, v_BHSE = (jnp.swapaxes(jnp.repeat(x.astype(jnp.float32), r, axis=2), 1, 2)
                            for x, r in ((q, 1), (k, G), (v, G)))
  s = jnp.einsum("bhtd,bhsd->bhts", q_BHTD, k_BHSD) * scale
  mask = visible(pattern, segment_ids[:, :, None], positions[:, :, None],
                 segment_ids[:, None, :], positions[:, None, :])
  p, lse = masked_softmax(s, mask[:, None])
  o = jnp.swapaxes(jnp.einsum("bhts,bhse->bhte", p, v_BHSE), 1, 2)
  return o.astype(q.dtype), lse


# ----------------------------------------------------------------------------------------
# xla SSA: per query chunk, gather only the sink and the local keys. O(T * max_keys).


def _ssa_blockwise(q, k, v, *, pattern: SSA, segment_ids, positions, scale):
  """Blockwise SSA. Assumes positions step by one inside a document (the default ones do)."""
  B, T, H, D = q.shape
  K, E = k.shape[2], v.shape[3]
  C = pattern.block_size                    # query chunk
  W = pattern.local_blocks * C              # local keys a chunk may need, before the chunk
  NS = pattern.sink_blocks * C              # sink keys
  n = -(-T // C)
  Tp = n * C
  pad = Tp - T
  pad_t = lambda x, val=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=val)
  q, seg, pos = pad_t(q), pad_t(segment_ids), pad_t(positions)
  # Keys: W zero rows in front, so every chunk's window [c0 - W, c0 + C) is a static-size slice.
  kp = jnp.pad(pad_t(k), [(0, 0), (W, 0), (0, 0), (0, 0)])
  vp = jnp.pad(pad_t(v), [(0, 0), (W, 0), (0, 0), (0, 0)])
  segp = jnp.pad(seg, [(0, 0), (W, 0)])      # padded rows get segment 0: never visible

  c0 = jnp.arange(n) * C                                            # chunk starts [n]
  win_idx = c0[:, None] + jnp.arange(W + C)[None, :]                # into padded keys [n, W+C]
  # Sink of the document holding each chunk's first query (other documents of the chunk
  # start inside it, so their sinks already lie in the local window).
  doc0 = c0[None, :] - pos[:, c0]                                   # [B, n] physical doc start
  sink_raw = doc0[:, :, None] + jnp.arange(NS)[None, None, :]       # [B, n, NS]
  sink_ok = (sink_raw >= 0) & (sink_raw < c0[None, :, None] - W)    # in range, not in window
  sink_idx = jnp.clip(sink_raw, 0, T - 1)

  take = lambda x, idx: jax.vmap(lambda xb, ib: xb[ib])(x, idx)     # per-batch gather
  k_win = kp[:, win_idx]                                            # [B, n, W+C, K, D]
  v_win = vp[:, win_idx]
  k_sink = take(k, sink_idx)                                        # [B, n, NS, K, D]
  v_sink = take(v, sink_idx)
  seg_keys = jnp.concatenate([jnp.where(sink_ok, take(segment_ids, sink_idx), 0), segp[:, win_idx]], -1)
  pos_keys = jnp.concatenate([take(positions, sink_idx), (jnp.pad(pos, [(0, 0), (W, 0)]))[:, win_idx]], -1)
  k_all = jnp.concatenate([k_sink, k_win], axis=2).astype(jnp.float32)
  v_all = jnp.concatenate([v_sink, v_win], axis=2).astype(jnp.float32)

  q_c = q.reshape(B, n, C, K, H // K, D).astype(jnp.float32)
  s = jnp.einsum("bnckgd,bnskd->bnkgcs", q_c, k_all) * scale
  mask = visible(pattern, seg.reshape(B, n, C, 1), pos.reshape(B, n, C, 1),
                 seg_keys[:, :, None, :], pos_keys[:, :, None, :])          # [B, n, C, NS+W+C]
  p, lse = masked_softmax(s, mask[:, :, None, None])                         # lse [B, n, K, G, C]
  o = jnp.einsum("bnkgcs,bnske->bnckge", p, v_all)
  o = o.reshape(B, Tp, H, E)[:, :T].astype(q.dtype)
  lse = jnp.moveaxis(lse, 1, 3).reshape(B, H, Tp)[:, :, :T]
  return o, lse


# ----------------------------------------------------------------------------------------
# xla Full: flash-style chunked online softmax with a hand-written backward, so neither
# direction materialises a T x S matrix.


def _pad_to(x, Tp, axis=1, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, Tp - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


class _Chunked(NamedTuple):
  """Inputs padded to n chunks of C tokens, fp32: q [B,n,C,K,G,D], k/v [B,n,C,K,·], seg/pos [B,n,C]."""
  n: int
  C: int
  q: jax.Array
  k: jax.Array
  v: jax.Array
  seg: jax.Array
  pos: jax.Array


def _chunked(q, k, v, seg, pos, chunk: int) -> _Chunked:
  B, T, H, D = q.shape
  K, E = k.shape[2], v.shape[3]
  C = min(chunk, T)
  n = -(-T // C)
  Tp = n * C
  f32 = jnp.float32
  return _Chunked(n, C, _pad_to(q, Tp).astype(f32).reshape(B, n, C, K, H // K, D),
                  _pad_to(k, Tp).astype(f32).reshape(B, n, C, K, D), _pad_to(v, Tp).astype(f32).reshape(B, n, C, K, E),
                  _pad_to(seg, Tp).reshape(B, n, C), _pad_to(pos, Tp).reshape(B, n, C))


def _flash_scores(q_c, k_c, qs, qp, ks, kp, pattern, scale):
  """Scores and mask for one (query chunk, key chunk) pair; q_c [B,C,K,G,D], k_c [B,C,K,D]."""
  s = jnp.einsum("bckgd,bskd->bkgcs", q_c, k_c) * scale
  mask = visible(pattern, qs[:, :, None], qp[:, :, None], ks[:, None, :], kp[:, None, :])[:, None, None]
  return jnp.where(mask, s, _MASK_VALUE), mask


def _flash_fwd_impl(q, k, v, seg, pos, pattern, scale, chunk):
  B, T, H, D = q.shape
  K, E = k.shape[2], v.shape[3]
  G = H // K
  n, C, qc, kc, vc, sc, pc = _chunked(q, k, v, seg, pos, chunk)
  Tp = n * C

  def per_q(i):
    def body(carry, j):
      m, l, acc = carry
      s, mask = _flash_scores(qc[:, i], kc[:, j], sc[:, i], pc[:, i], sc[:, j], pc[:, j], pattern, scale)
      m_new = jnp.maximum(m, jnp.max(s, -1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + jnp.sum(p, -1)
      acc = acc * corr[..., None] + jnp.einsum("bkgcs,bske->bkgce", p, vc[:, j])
      return (m_new, l, acc), None
    init = (jnp.full((B, K, G, C), _MASK_VALUE, jnp.float32), jnp.zeros((B, K, G, C), jnp.float32),
            jnp.zeros((B, K, G, C, E), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(body, init, jnp.arange(n))
    l_safe, lse = finish_softmax(m, l)
    return acc / l_safe[..., None], lse                                                    # [B,K,G,C,E], [B,K,G,C]

  o, lse = jax.lax.map(per_q, jnp.arange(n))                         # [n, B, K, G, C, (E)]
  o = jnp.moveaxis(o, 0, 3).reshape(B, K, G, Tp, E)[:, :, :, :T]
  o = jnp.moveaxis(o, 3, 1).reshape(B, T, H, E)
  lse = jnp.moveaxis(lse, 0, 3).reshape(B, H, Tp)[:, :, :T]
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, seg, pos, pattern, scale, chunk):
  o, lse = _flash_fwd_impl(q, k, v, seg, pos, pattern, scale, chunk)
  return o.astype(q.dtype), lse


def _flash_fwd(q, k, v, seg, pos, pattern, scale, chunk):
  o, lse = _flash_fwd_impl(q, k, v, seg, pos, pattern, scale, chunk)
  o = o.astype(q.dtype)
  return (o, lse), (q, k, v, seg, pos, o, lse)


def _flash_bwd(pattern, scale, chunk, res, cot):
  q, k, v, seg, pos, o, lse = res
  do, dlse = cot
  B, T, H, D = q.shape
  K, E = k.shape[2], v.shape[3]
  G = H // K
  n, C, qc, kc, vc, sc, pc = _chunked(q, k, v, seg, pos, chunk)
  Tp = n * C
  f32 = jnp.float32
  doc = _pad_to(do, Tp).astype(f32).reshape(B, n, C, K, G, E)
  lse_p = _pad_to(lse, Tp, axis=2, value=NEG_INF).reshape(B, K, G, n, C)
  dlse_p = _pad_to(dlse.astype(f32), Tp, axis=2).reshape(B, K, G, n, C)
  # delta = rowsum(dO * O) - dlse: the lse cotangent enters as a shift of dS.
  delta = jnp.einsum("bnckge,bnckge->bkgnc", doc, _pad_to(o, Tp).astype(f32).reshape(B, n, C, K, G, E)) - dlse_p
  lse_safe = jnp.where(jnp.isfinite(lse_p), lse_p, 0.0)

  def probs(i, j):
    s, mask = _flash_scores(qc[:, i], kc[:, j], sc[:, i], pc[:, i], sc[:, j], pc[:, j], pattern, scale)
    p = jnp.where(mask, jnp.exp(s - lse_safe[:, :, :, i, :, None]), 0.0)
    dp = jnp.einsum("bckge,bske->bkgcs", doc[:, i], vc[:, j])
    ds = p * (dp - delta[:, :, :, i, :, None])
    return p, ds

  def dq_chunk(i):
    def body(acc, j):
      _, ds = probs(i, j)
      return acc + jnp.einsum("bkgcs,bskd->bckgd", ds, kc[:, j]) * scale, None
    acc, _ = jax.lax.scan(body, jnp.zeros((B, C, K, G, D), f32), jnp.arange(n))
    return acc

  def dkv_chunk(j):
    def body(carry, i):
      dk, dv = carry
      p, ds = probs(i, j)
      dv = dv + jnp.einsum("bkgcs,bckge->bske", p, doc[:, i])
      dk = dk + jnp.einsum("bkgcs,bckgd->bskd", ds, qc[:, i]) * scale
      return (dk, dv), None
    init = (jnp.zeros((B, C, K, D), f32), jnp.zeros((B, C, K, E), f32))
    (dk, dv), _ = jax.lax.scan(body, init, jnp.arange(n))
    return dk, dv

  dq = jax.lax.map(dq_chunk, jnp.arange(n))                           # [n, B, C, K, G, D]
  dk, dv = jax.lax.map(dkv_chunk, jnp.arange(n))
  dq = jnp.moveaxis(dq, 0, 1).reshape(B, Tp, H, D)[:, :T].astype(q.dtype)
  dk = jnp.moveaxis(dk, 0, 1).reshape(B, Tp, K, D)[:, :T].astype(k.dtype)
  dv = jnp.moveaxis(dv, 0, 1).reshape(B, Tp, K, E)[:, :T].astype(v.dtype)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def xla(q, k, v, *, pattern, segment_ids, positions, scale, chunk: int = 512):
  """Memory-linear XLA attention: blockwise gather for SSA, flash-style chunks for Full."""
  if isinstance(pattern, SSA):
    return _ssa_blockwise(q, k, v, pattern=pattern, segment_ids=segment_ids, positions=positions, scale=scale)
  return _flash(q, k, v, segment_ids, positions, pattern, float(scale), chunk)

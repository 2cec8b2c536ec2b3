"""Attention API: one entry point, pattern dataclasses, XLA reference implementations, impl registry.

Shapes: q_BTHD, k_BSKD, v_BSKE -> o_BTHE (H query heads, K kv heads, K divides H).
Patterns: `Full()` is causal attention within each document; `SSA(...)`
lets the query at document position t see key s iff s <= t and (s//B < sink_blocks or
s//B >= t//B - (local_blocks - 1)).

Every implementation returns (o_BTHE, lse_BHT) in fp32 softmax arithmetic; queries with no
visible key (padding, segment id 0) produce o = 0 and lse = -inf.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

NEG_INF = float("-inf")
_MASK_VALUE = -1e30  # finite stand-in for -inf inside the softmax to keep gradients NaN-free


@dataclasses.dataclass(frozen=True)
class Full:
  """Causal attention over the whole document."""


@dataclasses.dataclass(frozen=True)
class SSA:
  """Streaming sparse attention: `sink_blocks` first blocks + `local_blocks` most recent blocks."""
  block_size: int = 128
  sink_blocks: int = 1
  local_blocks: int = 7

  def __post_init__(self):
    for name in ("block_size", "sink_blocks", "local_blocks"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"SSA.{name} must be an int, got {value!r}")
    if self.block_size < 1 or self.local_blocks < 1 or self.sink_blocks < 0:
      raise ValueError(f"SSA needs block_size >= 1, local_blocks >= 1, sink_blocks >= 0; got {self}")

  @property
  def max_keys(self) -> int:
    """Most keys any query can see: (sink + local) * block_size."""
    return (self.sink_blocks + self.local_blocks) * self.block_size


Pattern = Full | SSA


# ----------------------------------------------------------------------------------------
# Masks and input normalisation.


def default_positions(segment_ids_BT: jax.Array) -> jax.Array:
  """Document-relative positions: index minus the index where the token's segment starts."""
  T = segment_ids_BT.shape[1]
  idx = jnp.arange(T, dtype=jnp.int32)[None, :]
  is_start = jnp.concatenate(
      [jnp.ones_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)
  return (idx - start).astype(jnp.int32)


def document_positions(tokens_BT, segment_ids_BT=None, positions_BT=None):
  """Given positions, else document-relative ones from segment_ids, else 0..T-1.

  segment_ids stay None when not given: attention then knows every row is one document, which
  lets implementations that cannot express packing (e.g. tokamax) run.
  """
  if positions_BT is not None:
    return positions_BT
  if segment_ids_BT is not None:
    return default_positions(segment_ids_BT)
  return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)


def pattern_allows(pattern: Pattern, q_pos, k_pos):
  """Position part of the mask (broadcasting): does document position q_pos see k_pos?"""
  causal = k_pos <= q_pos
  if isinstance(pattern, Full):
    return causal
  B = pattern.block_size
  qb, kb = q_pos // B, k_pos // B
  return causal & ((kb < pattern.sink_blocks) | (kb >= qb - (pattern.local_blocks - 1)))


def visible(pattern: Pattern, q_seg, q_pos, k_seg, k_pos):
  """Full mask (broadcasting): same non-padding segment and allowed by the pattern."""
  return (q_seg == k_seg) & (k_seg != 0) & pattern_allows(pattern, q_pos, k_pos)


def _check_inputs(q, k, v, segment_ids, positions):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects q_BTHD, k_BSKD, v_BSKE (rank 4); got {q.shape}, {k.shape}, {v.shape}")
  Bq, T, H, D = q.shape
  Bk, S, K, Dk = k.shape
  if (Bk, S, K) != v.shape[:3] or Bq != Bk:
    raise ValueError(f"batch/length/kv-head dims disagree: q {q.shape}, k {k.shape}, v {v.shape}")
  if Dk != D:
    raise ValueError(f"q and k head dims differ: q {q.shape} vs k {k.shape}")
  if H % K:
    raise ValueError(f"kv heads K={K} must divide query heads H={H} (q {q.shape}, k {k.shape})")
  if S != T:
    raise ValueError(f"self-attention needs equal query and key lengths; got T={T}, S={S}")
  for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
    if arr is not None and tuple(arr.shape) != (Bq, T):
      raise ValueError(f"{name} must have shape [B, T] = {(Bq, T)}, got {tuple(arr.shape)}")
  _check_dtypes(q=q, k=k, v=v, segment_ids=segment_ids, positions=positions)


def _check_dtypes(**arrays) -> None:
  """q/k/v floating point, segment_ids/positions integer: ValueError naming the argument otherwise."""
  for name, arr in arrays.items():
    if arr is None:
      continue
    dtype = jnp.result_type(arr)
    if name in ("q", "k", "v") and not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"attention: {name} has dtype {dtype}; q, k and v must be floating point (bf16/fp16/fp32)")
    if name in ("segment_ids", "positions") and not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"attention: {name} has dtype {dtype}; it must be an integer array (e.g. int32)")


def _normalise(q, segment_ids, positions):
  B, T = q.shape[:2]
  if segment_ids is None:
    segment_ids = jnp.ones((B, T), jnp.int32)
  segment_ids = segment_ids.astype(jnp.int32)
  if positions is None:
    positions = default_positions(segment_ids)
  return segment_ids, positions.astype(jnp.int32)


def _group(q_BTHD, K):
  B, T, H, D = q_BTHD.shape
  return q_BTHD.reshape(B, T, K, H // K, D)


# ----------------------------------------------------------------------------------------
# xla_dense: the oracle. Materialises the [B, K, G, T, S] scores; small sizes only.


def _masked_softmax_attend(s_BKGTS, mask_BTS, v_BSKE):
  """Softmax over keys with a boolean mask, fp32; fully masked rows give o=0, lse=-inf."""
  s = jnp.where(mask_BTS[:, None, None], s_BKGTS, _MASK_VALUE)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(mask_BTS[:, None, None], jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  any_visible = l > 0
  o = jnp.einsum("bkgts,bske->btkge", p / jnp.where(any_visible, l, 1.0), v_BSKE)
  lse = jnp.where(any_visible, m + jnp.log(jnp.where(any_visible, l, 1.0)), NEG_INF)[..., 0]
  return o, lse  # o_BTKGE, lse_BKGT


def xla_dense(q, k, v, *, pattern, segment_ids, positions, scale):
  """Reference attention with a materialised mask; any segmentation and positions."""
  B, T, H, D = q.shape
  K = k.shape[2]
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  s = jnp.einsum("btkgd,bskd->bkgts", _group(qf, K), kf) * scale
  mask = visible(pattern, segment_ids[:, :, None], positions[:, :, None],
                 segment_ids[:, None, :], positions[:, None, :])
  o, lse = _masked_softmax_attend(s, mask, vf)
  return o.reshape(B, T, H, -1).astype(q.dtype), lse.reshape(B, H, T)


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
  s = jnp.where(mask[:, :, None, None], s, _MASK_VALUE)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(mask[:, :, None, None], jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  ok = l > 0
  o = jnp.einsum("bnkgcs,bnske->bnckge", p / jnp.where(ok, l, 1.0), v_all)
  lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)[..., 0]   # [B, n, K, G, C]
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
    ok = l > 0
    o = acc / jnp.where(ok, l, 1.0)[..., None]
    lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)
    return o, lse                                                    # [B,K,G,C,E], [B,K,G,C]

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


# ----------------------------------------------------------------------------------------
# Registry and dispatch.


@dataclasses.dataclass(frozen=True)
class Impl:
  """A registered implementation. `fn` may be a callable or a lazy "module:attr" string."""
  name: str
  fn: Callable | str
  platforms: tuple[str, ...]
  priority: int = 0                     # higher wins under impl="auto"
  check: Callable | None = None         # (pattern, q, k, v) -> None or a reason it cannot run
  returns_lse: bool = True              # False: returns (o, None); attention_with_lse cannot use it
  packed_documents: bool = True         # False: only for segment_ids=None (one document per row)
  custom_positions: bool = True         # False: derives document positions itself (positions=None only)

  def load(self) -> Callable:
    if callable(self.fn):
      return self.fn
    module, attr = self.fn.split(":")
    return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Impl] = {}


def register(impl: Impl) -> None:
  """Add (or replace) an implementation in the registry."""
  _REGISTRY[impl.name] = impl


def registered() -> dict[str, Impl]:
  return dict(_REGISTRY)


register(Impl("xla_dense", xla_dense, platforms=("cpu", "gpu", "tpu"), priority=-10))
register(Impl("xla", xla, platforms=("cpu", "gpu", "tpu"), priority=0))
register(Impl("pallas_triton", "kernels_pallas.triton_attention:attention_impl", platforms=("gpu",),
              priority=10, check="kernels_pallas.triton_attention:unsupported_reason", custom_positions=False))
register(Impl("tokamax", "loza_jax.attention_tokamax:attention_impl", platforms=("gpu",), priority=20,
              check="loza_jax.attention_tokamax:unsupported_reason", returns_lse=False, packed_documents=False,
              custom_positions=False))
register(Impl("pallas_mosaic", "kernels_pallas.mosaic_attention:attention_impl", platforms=("gpu",),
              priority=15, check="kernels_pallas.mosaic_attention:unsupported_reason", custom_positions=False))
register(Impl("pallas_mosaic_interpret", "kernels_pallas.mosaic_attention:attention_impl_interpret",
              platforms=("cpu", "gpu"), priority=-20,
              check="kernels_pallas.mosaic_attention:unsupported_reason_interpret", custom_positions=False))
register(Impl("pallas_triton_interpret", "kernels_pallas.triton_attention:attention_impl_interpret",
              platforms=("cpu", "gpu"), priority=-20,
              check="kernels_pallas.triton_attention:unsupported_reason", custom_positions=False))


def _reason(impl: Impl, pattern, q, k, v, platform: str, packed: bool = True, need_lse: bool = False,
            positions: bool = False) -> str | None:
  if platform not in impl.platforms:
    return f"impl {impl.name!r} runs on {impl.platforms}, not on platform {platform!r}"
  if packed and not impl.packed_documents:
    return f"impl {impl.name!r} cannot express packed documents: call it with segment_ids=None"
  if positions and not impl.custom_positions:
    return (f"impl {impl.name!r} ignores `positions` (it derives document positions from segment_ids): call it "
            "with positions=None, or use impl='xla'")
  if need_lse and not impl.returns_lse:
    return f"impl {impl.name!r} returns no log-sum-exp; use attention() instead of attention_with_lse()"
  if impl.check is None:
    return None
  try:
    check = impl.check if callable(impl.check) else Impl(impl.name, impl.check, ()).load()
  except ImportError as e:
    return f"impl {impl.name!r} is not importable: {e}"
  return check(pattern, q, k, v)


@functools.cache
def _log_choice(platform: str, pattern_kind: str, name: str) -> None:
  log.info("attention impl='auto' on %s for %s: using %r", platform, pattern_kind, name)


def resolve_impl(impl: str, pattern, q, k, v, *, packed: bool = True, need_lse: bool = False,
                 positions: bool = False) -> Impl:
  """The implementation that will run: `impl` itself (raising if it cannot) or the auto choice.

  packed: whether segment_ids were given (documents may be packed in a row); positions: whether
  positions were given (only impls registered with custom_positions=True honour them).
  """
  platform = jax.default_backend()
  if impl != "auto":
    if impl not in _REGISTRY:
      raise ValueError(f"unknown attention impl {impl!r}; registered: {sorted(_REGISTRY)} or 'auto'")
    chosen = _REGISTRY[impl]
    reason = _reason(chosen, pattern, q, k, v, platform, packed, need_lse, positions)
    if reason:
      raise ValueError(f"attention impl {impl!r} cannot run here: {reason}")
    return chosen
  candidates = sorted(_REGISTRY.values(), key=lambda i: -i.priority)
  for cand in candidates:
    if cand.priority < 0:
      continue  # oracles and interpreters are never chosen automatically
    if _reason(cand, pattern, q, k, v, platform, packed, need_lse, positions) is None:
      _log_choice(platform, f"{type(pattern).__name__}{' packed' if packed else ''}", cand.name)
      return cand
  raise ValueError(f"no attention impl can run {pattern} on {platform}")


def _dispatch(q, k, v, pattern, segment_ids, positions, scale, impl, need_lse):
  if not isinstance(pattern, (Full, SSA)):
    raise ValueError(f"pattern must be Full() or SSA(...), got {pattern!r}")
  _check_inputs(q, k, v, segment_ids, positions)
  chosen = resolve_impl(impl, pattern, q, k, v, packed=segment_ids is not None, need_lse=need_lse,
                        positions=positions is not None)
  segment_ids, positions = _normalise(q, segment_ids, positions)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  return chosen.load()(q, k, v, pattern=pattern, segment_ids=segment_ids, positions=positions, scale=scale)


def attention_with_lse(q_BTHD, k_BSKD, v_BSKE, *, pattern: Pattern, segment_ids=None, positions=None,
                       scale: float | None = None, impl: str = "auto"):
  """Like `attention` but also returns lse_BHT (fp32), for merging partial results."""
  return _dispatch(q_BTHD, k_BSKD, v_BSKE, pattern, segment_ids, positions, scale, impl, need_lse=True)


def attention(q_BTHD, k_BSKD, v_BSKE, *, pattern: Pattern, segment_ids=None, positions=None,
              scale: float | None = None, impl: str = "auto"):
  """Attention (the README's "Attention API"). segment_ids: int [B,T], 0 = padding; positions: document-relative.

  `impl`: "auto" | "xla_dense" | "xla" | "pallas_triton" | "pallas_mosaic" | "tokamax" | any
  registered name. An explicit impl that cannot run raises ValueError; "auto" logs its choice
  once per platform/pattern.
  segment_ids=None means one document per row (no padding), which some impls require.
  positions=None means document-relative positions; explicit positions run only on impls that
  honour them (xla, xla_dense): the Pallas kernels and tokamax derive positions themselves, so an
  explicit request for them raises and "auto" skips them.
  """
  o, _ = _dispatch(q_BTHD, k_BSKD, v_BSKE, pattern, segment_ids, positions, scale, impl, need_lse=False)
  return o

"""Context parallelism over the `context` mesh axis: SSA halo exchange and Full latent all-gather.

Each row's sequence is cut into N = C·P chunks of Tc tokens (C devices on `context`, P chunks
per device): P = 1 is the contiguous layout (device d holds chunk d), P = 2 the zig-zag layout
(device d holds chunks d and 2C−1−d, which balances causal Full attention). Inside
`jax.shard_map` a device sees its chunks as [B, P, Tc, ...] arrays (suffix P).

SSA: a chunk receives the latents of the (local_blocks − 1)·block_size tokens before it (the
halo, by `ppermute`) and the sink of the document still open at the halo's start (a prefix scan
of per-chunk "last document start" states, log2(N) `ppermute`s of sink-sized buffers); bytes
per layer do not depend on T. Full: the latents and RoPE keys of every token are all-gathered
(kv_lora_rank + qk_rope_head_dim values per token), expanded on each device and attended by the
local queries (an XLA chunked online softmax that skips key chunks after the query chunk).

SSA under context parallelism assumes every document starts at a multiple of block_size (the
packer guarantees it; the Pallas kernels need it anyway).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kernels_pallas import tiling
from loza_jax import attention as attn, cache

AXIS = "context"
BATCH_AXES = ("data", "fsdp")
_LAYOUT = contextvars.ContextVar("loza_context_layout", default="contiguous")
_FORCE = contextvars.ContextVar("loza_context_force", default=False)


# ----------------------------------------------------------------------------------------
# Layout: which global chunk each (device, slot) holds.


@dataclasses.dataclass(frozen=True)
class Layout:
  """C devices on the context axis, P chunk slots per device; `kind` contiguous (P=1) or zigzag (P=2)."""
  C: int
  kind: str = "contiguous"

  @property
  def P(self) -> int:
    return 2 if self.kind == "zigzag" else 1

  @property
  def n(self) -> int:
    return self.C * self.P

  def chunk(self, d: int, p: int) -> int:
    """Global chunk index held by device d in slot p."""
    return d if p == 0 else 2 * self.C - 1 - d

  def place(self, v: int) -> tuple[int, int]:
    """(device, slot) holding global chunk v."""
    if self.kind == "contiguous":
      return v, 0
    return (v, 0) if v < self.C else (2 * self.C - 1 - v, 1)

  def order(self) -> list[int]:
    """Global chunk indices in device-major storage order."""
    return [self.chunk(d, p) for d in range(self.C) for p in range(self.P)]


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value):
  token = var.set(value)
  try:
    yield
  finally:
    var.reset(token)


def use_layout(kind: str):
  """Inside this block MLA assumes the sequence is stored in `kind` layout (the Transformer sets zigzag)."""
  return _setting(_LAYOUT, kind)


def current_layout_kind() -> str:
  return _LAYOUT.get()


def context_size() -> int:
  """Size of the `context` axis of the active mesh (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[AXIS]


def force_shard_map():
  """Inside this block the model takes the `shard_map` path even when `context` has size 1 (the mesh must
  still name the axis): to measure that path's cost against the plain one, and to test it. The path is chosen
  when a function is traced and jit keeps one trace per function, so trace a fresh function inside the block."""
  return _setting(_FORCE, True)


def active() -> bool:
  """Whether attention goes through the context-parallel (`shard_map`) path."""
  return context_size() > 1 or _FORCE.get()


def check_split(T: int, layout: Layout, block_size: int | None = None, sink_tokens: int = 0) -> int:
  """Chunk length Tc = T / (C·P); ValueError naming the sizes when T cannot be split into whole blocks."""
  if T % layout.n:
    raise ValueError(f"context parallelism: sequence length T={T} is not divisible into {layout.n} chunks "
                     f"(mesh.context={layout.C}, {layout.kind} layout with {layout.P} chunk(s) per device)")
  Tc = T // layout.n
  if block_size and Tc % block_size:
    raise ValueError(f"context parallelism: T={T} over {layout.n} chunks (mesh.context={layout.C}, {layout.kind}) "
                     f"gives chunks of {Tc} tokens, not a multiple of attention.block_size={block_size}; "
                     f"use T a multiple of {layout.n * block_size}")
  if sink_tokens > Tc:
    raise ValueError(f"context parallelism: the SSA sink ({sink_tokens} tokens) is longer than a chunk of {Tc} "
                     f"tokens (T={T}, {layout.n} chunks); use fewer context shards or a longer sequence")
  return Tc


def documents_aligned(segment_ids_BT, block_size: int) -> jax.Array:
  """SSA's halo and sink exchange assume every document starts at a multiple of the block (as the
  packer lays them out). Concrete ids that break this raise ValueError; traced ones log the error
  and return False, which the model turns into NaN outputs (a raising callback would hang the other
  devices of the step)."""
  misaligned_B, _ = tiling.misaligned_starts(segment_ids_BT, block_size)

  def message(misaligned_B) -> str | None:
    for b, t in enumerate(np.asarray(misaligned_B).tolist()):
      if t >= 0:
        return (f"context parallelism: row {b} has a document starting at token {t}, not a multiple of "
                f"attention.block_size={block_size}; SSA under mesh.context > 1 needs block-aligned documents "
                "(the packer aligns them) or mesh.context=1")
    return None

  if not isinstance(misaligned_B, jax.core.Tracer):
    msg = message(misaligned_B)
    if msg:
      raise ValueError(msg)
    return jnp.asarray(True)

  def log(misaligned_B):
    msg = message(misaligned_B)
    if msg:
      logging.getLogger(__name__).error(msg + " (outputs set to NaN)")

  jax.debug.callback(log, misaligned_B)
  return jnp.all(misaligned_B < 0)


# ----------------------------------------------------------------------------------------
# Chunk movement inside shard_map: x_BP... -> for each slot, the data of another global chunk.


def _chunk_ids(layout: Layout) -> jax.Array:
  """Global chunk index of this device's slots, [P] int32 (traced device index)."""
  table = jnp.asarray([[layout.chunk(d, p) for p in range(layout.P)] for d in range(layout.C)], jnp.int32)
  return table[jax.lax.axis_index(AXIS)]


def move(x_BP, layout: Layout, source: Callable[[int], int | None]):
  """Slot holding chunk v receives chunk source(v) (zeros where None); ppermutes, one per slot pair."""
  parts = []
  for p_dst in range(layout.P):
    acc = None
    for p_src in range(layout.P):
      pairs = []
      for d_dst in range(layout.C):
        v_src = source(layout.chunk(d_dst, p_dst))
        if v_src is None or not 0 <= v_src < layout.n:
          continue
        d_src, s = layout.place(v_src)
        if s == p_src:
          pairs.append((d_src, d_dst))
      if not pairs:
        continue
      x = x_BP[:, p_src]
      if all(a == b for a, b in pairs) and len(pairs) == layout.C:
        y = x
      else:
        y = jax.lax.ppermute(x, AXIS, pairs)
      acc = y if acc is None else acc + y
    parts.append(jnp.zeros_like(x_BP[:, p_dst]) if acc is None else acc)
  return jnp.stack(parts, axis=1)


def shift(x_BP, layout: Layout, h: int):
  """Each chunk v receives chunk v − h (zeros for v < h)."""
  return move(x_BP, layout, lambda v: v - h)


# ----------------------------------------------------------------------------------------
# Sink prefix scan. A state summarises a token range: the last document starting in it (its
# first tokens, up to NS) and the range's first NS tokens (to complete a sink cut by a chunk end).


class SinkState(NamedTuple):
  present: jax.Array   # [B, P] bool: a real range (False: the identity, e.g. shifted-in zeros)
  has: jax.Array       # [B, P] bool: a document starts in the range
  n: jax.Array         # [B, P] int32: tokens of that document's sink held in buf (<= NS)
  seg: jax.Array       # [B, P] int32: that document's segment id
  buf_BPSF: jax.Array  # its first tokens
  head_BPSF: jax.Array  # the range's first NS tokens


def _fill(buf_BPSF, n_BP, head_BPSF):
  """Slots k < n keep buf; slots k >= n take head[k − n]."""
  NS = buf_BPSF.shape[2]
  k = jnp.arange(NS)
  idx = jnp.clip(k[None, None, :] - n_BP[..., None], 0, NS - 1)
  shifted = jnp.take_along_axis(head_BPSF, idx[..., None], axis=2)
  return jnp.where((k[None, None, :] < n_BP[..., None])[..., None], buf_BPSF, shifted)


def combine(L: SinkState, R: SinkState, r_len: int) -> SinkState:
  """State of range L followed by range R (R holds r_len tokens, or at least NS when r_len is large)."""
  NS = L.buf_BPSF.shape[2]
  n_cont = jnp.where(L.has, jnp.minimum(NS, L.n + r_len), 0)
  filled = _fill(L.buf_BPSF, L.n, R.head_BPSF)
  w = lambda c, a, b: jnp.where(c.reshape(c.shape + (1,) * (a.ndim - c.ndim)), a, b)
  return SinkState(
      present=L.present | R.present, has=L.has | R.has,
      n=jnp.where(R.has, R.n, n_cont).astype(jnp.int32), seg=jnp.where(R.has, R.seg, L.seg),
      buf_BPSF=w(R.has, R.buf_BPSF, filled), head_BPSF=w(L.present, L.head_BPSF, R.head_BPSF))


def local_state(lat_BPTF, seg_BPT, start_BPT, r: int, NS: int) -> SinkState:
  """State of each chunk's first r tokens."""
  B, Pn, Tc = seg_BPT.shape
  t = jnp.arange(Tc)
  a = jnp.max(jnp.where(start_BPT & (t < r), t, -1), axis=-1)                 # [B, P]
  has = a >= 0
  idx = jnp.clip(jnp.maximum(a, 0)[..., None] + jnp.arange(NS), 0, Tc - 1)   # [B, P, NS]
  buf = jnp.take_along_axis(lat_BPTF, idx[..., None], axis=2)
  seg = jnp.take_along_axis(seg_BPT, jnp.maximum(a, 0)[..., None], axis=2)[..., 0]
  n = jnp.where(has, jnp.clip(r - a, 0, NS), 0).astype(jnp.int32)
  return SinkState(jnp.ones((B, Pn), bool), has, n, seg, buf, lat_BPTF[:, :, :NS])


def _shift_state(s: SinkState, layout: Layout, h: int, heads: bool = True) -> SinkState:
  """Shift a state by h chunks; heads=False keeps the heads local (never read when sinks fit in a block)."""
  moved = SinkState(*(shift(x, layout, h) for x in s[:-1]), s.head_BPSF)
  return moved._replace(head_BPSF=shift(s.head_BPSF, layout, h)) if heads else moved


def exclusive_scan(s: SinkState, layout: Layout, heads: bool = True) -> SinkState:
  """Per chunk v: the state of chunks 0..v−1 (Hillis–Steele over the N chunks, log2 N shifts)."""
  d = 1
  while d < layout.n:
    s = combine(_shift_state(s, layout, d, heads), s, r_len=1 << 30)
    d *= 2
  return _shift_state(s, layout, 1, heads)


# ----------------------------------------------------------------------------------------
# SSA: extended chunks [sink (NS) | halo (W) | own tokens (Tc)].


def _ssa_extend(lat_BPTF, seg_BPT, layout: Layout, pattern: attn.SSA):
  """Per chunk, the latents and segment ids of [sink | halo | chunk], sink and halo from earlier chunks."""
  B, Pn, Tc, F = lat_BPTF.shape
  NS, W = pattern.sink_blocks * pattern.block_size, (pattern.local_blocks - 1) * pattern.block_size
  nh = -(-W // Tc)
  tail = lambda h: Tc - min(Tc, W - (h - 1) * Tc)      # hop h sends only the tokens the halo keeps
  halo_lat = [shift(lat_BPTF[:, :, tail(h):], layout, h) for h in range(nh, 0, -1)] or [lat_BPTF[:, :, :0]]
  halo_seg = [shift(seg_BPT[:, :, tail(h):], layout, h) for h in range(nh, 0, -1)] or [seg_BPT[:, :, :0]]
  halo_lat, halo_seg = jnp.concatenate(halo_lat, axis=2), jnp.concatenate(halo_seg, axis=2)
  prev_seg = shift(seg_BPT[:, :, -1:], layout, 1)
  start_BPT = seg_BPT != jnp.concatenate([prev_seg, seg_BPT[:, :, :-1]], axis=2)
  if NS == 0:
    return (jnp.concatenate([halo_lat, lat_BPTF], 2), jnp.concatenate([halo_seg, seg_BPT], 2))
  r = nh * Tc - W
  full = local_state(lat_BPTF, seg_BPT, start_BPT, Tc, NS)
  part = local_state(lat_BPTF, seg_BPT, start_BPT, r, NS)
  # A document's sink crosses a chunk end only if it is longer than one block (documents start on blocks).
  prefix = combine(exclusive_scan(full, layout, heads=pattern.sink_blocks > 1), part, r_len=r)
  sink = _shift_state(prefix, layout, nh, heads=False)
  # Right-align the n sink tokens; keep them only if their document continues at the halo start.
  k = jnp.arange(NS)
  off = NS - sink.n
  sink_lat = jnp.take_along_axis(sink.buf_BPSF, jnp.clip(k - off[..., None], 0, NS - 1)[..., None], axis=2)
  nxt = (halo_seg if W else seg_BPT)[:, :, 0]
  keep = sink.present & sink.has & (sink.seg == nxt) & (sink.seg != 0)
  valid = keep[..., None] & (k >= off[..., None])
  sink_seg = jnp.where(valid, sink.seg[..., None], 0)
  sink_lat = jnp.where(valid[..., None], sink_lat, 0)
  return (jnp.concatenate([sink_lat, halo_lat, lat_BPTF], 2), jnp.concatenate([sink_seg, halo_seg, seg_BPT], 2))


# ----------------------------------------------------------------------------------------
# Full: local queries against every token's latent. Key chunks are expanded from the latent one
# at a time (outer loop), so no device holds per-head K/V for the whole sequence; the local
# queries' online-softmax state is the carry. Custom VJP: one backward pass over key chunks.


class Expand(NamedTuple):
  """How latents [.., Cl + R] become keys and values: kv = ckv @ w in `dtype`, k = [kv[:Dn], rope], v = kv[Dn:]."""
  kv_heads: int
  nope_dim: int
  dtype: jnp.dtype


def expand_chunk(lat_BCF, w_CX, ex: Expand, out_dtype=jnp.float32):
  """Latents of one key chunk -> (k_BCKD, v_BCKE) in out_dtype."""
  B, c, F = lat_BCF.shape
  Cl = w_CX.shape[0]
  kv = jnp.dot(lat_BCF[..., :Cl].astype(ex.dtype), w_CX.astype(ex.dtype)).reshape(B, c, ex.kv_heads, -1)
  rope = jnp.broadcast_to(lat_BCF[:, :, None, Cl:], (B, c, ex.kv_heads, F - Cl)).astype(kv.dtype)
  k = jnp.concatenate([kv[..., :ex.nope_dim], rope], axis=-1)
  return k.astype(out_dtype), kv[..., ex.nope_dim:].astype(out_dtype)


def _blocks(x, c: int, axis: int = 1):
  """Pad `axis` to a multiple of c and split it into [n, c]."""
  n = -(-x.shape[axis] // c)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n * c - x.shape[axis])
  x = jnp.pad(x, pad)
  return x.reshape(x.shape[:axis] + (n, c) + x.shape[axis + 1:])


def _pair(q_c, k_c, qs, qi, ks, ki, scale):
  """Masked scores [B, K, G, cq, ck] and mask: same non-padding document, key index <= query index."""
  s = jnp.einsum("bqkgd,bskd->bkgqs", q_c, k_c) * scale
  mask = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0) & (ki[None, None, :] <= qi[:, :, None])
  mask = mask[:, None, None]
  return jnp.where(mask, s, attn._MASK_VALUE), mask


class _Prep(NamedTuple):
  cq: int
  ck: int
  q: jax.Array      # [nq, B, cq, K, G, D] fp32
  qs: jax.Array     # [nq, B, cq]
  qi: jax.Array     # [nq, B, cq] (-1 for padding)
  q_max: jax.Array  # [nq]
  lat: jax.Array    # [nk, B, ck, F]
  ks: jax.Array     # [nk, B, ck]
  ki: jax.Array     # [nk, ck]


def _prep(q, lat, qs, qi, ks, ki, K, chunk) -> _Prep:
  B, Tq, H, D = q.shape
  cq, ck = min(chunk, Tq), min(chunk, lat.shape[1])
  lead = lambda x: jnp.moveaxis(x, 1, 0)
  qic = jnp.where(_blocks(jnp.ones_like(qi, bool), cq), _blocks(qi, cq), -1)
  return _Prep(cq, ck, lead(_blocks(q.astype(jnp.float32).reshape(B, Tq, K, H // K, D), cq)), lead(_blocks(qs, cq)),
               lead(qic), jnp.max(qic, axis=(0, 2)), lead(_blocks(lat, ck)), lead(_blocks(ks, ck)),
               _blocks(ki, ck, axis=0))


def _latent_fwd_impl(q, lat, w, qs, qi, ks, ki, scale, chunk, ex: Expand):
  B, Tq, H, D = q.shape
  K, G = ex.kv_heads, H // ex.kv_heads
  E = w.shape[1] // K - ex.nope_dim
  pr = _prep(q, lat, qs, qi, ks, ki, K, chunk)
  nq = pr.q.shape[0]

  def per_key_chunk(state, j):
    k, v = expand_chunk(pr.lat[j], w, ex)

    def per_q(_, xs):
      m, l, acc, q_i, qs_i, qi_i, q_max = xs

      def step(c):
        m, l, acc = c
        s, mask = _pair(q_i, k, qs_i, qi_i, pr.ks[j], pr.ki[j], scale)
        m_new = jnp.maximum(m, jnp.max(s, -1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        return m_new, l * corr + jnp.sum(p, -1), acc * corr[..., None] + jnp.einsum("bkgqs,bske->bkgqe", p, v)
      return None, jax.lax.cond(pr.ki[j, 0] <= q_max, step, lambda c: c, (m, l, acc))

    _, state = jax.lax.scan(per_q, None, (*state, pr.q, pr.qs, pr.qi, pr.q_max))
    return state, None

  init = (jnp.full((nq, B, K, G, pr.cq), attn._MASK_VALUE, jnp.float32), jnp.zeros((nq, B, K, G, pr.cq), jnp.float32),
          jnp.zeros((nq, B, K, G, pr.cq, E), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(per_key_chunk, init, jnp.arange(pr.lat.shape[0]))
  ok = l > 0
  o = acc / jnp.where(ok, l, 1.0)[..., None]                                   # [nq, B, K, G, cq, E]
  lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), attn.NEG_INF)        # [nq, B, K, G, cq]
  o = jnp.moveaxis(o, 0, 3).reshape(B, K, G, nq * pr.cq, E)[:, :, :, :Tq]
  o = jnp.moveaxis(o, 3, 1).reshape(B, Tq, H, E)
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def latent_attention(q, lat, w, qs, qi, ks, ki, scale, chunk, ex: Expand):
  """Causal attention of queries q_BTHD (global indices qi) to keys expanded from lat_BSF (indices ki) -> o_BTHE."""
  return _latent_fwd_impl(q, lat, w, qs, qi, ks, ki, scale, chunk, ex)[0].astype(q.dtype)


def _latent_fwd(q, lat, w, qs, qi, ks, ki, scale, chunk, ex):
  o, lse = _latent_fwd_impl(q, lat, w, qs, qi, ks, ki, scale, chunk, ex)
  o = o.astype(q.dtype)
  return o, (q, lat, w, qs, qi, ks, ki, o, lse)


def _latent_bwd(scale, chunk, ex, res, do):
  q, lat, w, qs, qi, ks, ki, o, lse = res
  B, Tq, H, D = q.shape
  K, G, Dn = ex.kv_heads, H // ex.kv_heads, ex.nope_dim
  Cl, S = w.shape[0], lat.shape[1]
  f32 = jnp.float32
  pr = _prep(q, lat, qs, qi, ks, ki, K, chunk)
  nq = pr.q.shape[0]
  lead = lambda x: jnp.moveaxis(x, 1, 0)
  doc = lead(_blocks(do.astype(f32).reshape(B, Tq, K, G, -1), pr.cq))                     # [nq, B, cq, K, G, E]
  delta = jnp.einsum("nbqkge,nbqkge->nbkgq", doc, lead(_blocks(o.astype(f32).reshape(B, Tq, K, G, -1), pr.cq)))
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def per_key_chunk(carry, j):
    dq, dw = carry
    k, v = expand_chunk(pr.lat[j], w, ex)

    def per_q(c, xs):
      q_i, do_i, lse_i, delta_i, dq_i, qs_i, qi_i, q_max = xs

      def step(c_dq):
        (dk, dv), dq_i = c_dq
        s, mask = _pair(q_i, k, qs_i, qi_i, pr.ks[j], pr.ki[j], scale)
        p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
        ds = p * (jnp.einsum("bqkge,bske->bkgqs", do_i, v) - delta_i[..., None])
        return ((dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, q_i) * scale, dv + jnp.einsum("bkgqs,bqkge->bske", p, do_i)),
                dq_i + jnp.einsum("bkgqs,bskd->bqkgd", ds, k) * scale)
      c, dq_i = jax.lax.cond(pr.ki[j, 0] <= q_max, step, lambda x: x, (c, dq_i))
      return c, dq_i

    zeros = (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    (dk, dv), dq = jax.lax.scan(per_q, zeros, (pr.q, doc, lse_safe, delta, dq, pr.qs, pr.qi, pr.q_max))
    dkv = jnp.concatenate([dk[..., :Dn], dv], axis=-1).reshape(B, pr.ck, -1)           # [B, ck, K·(Dn+E)]
    lat_j = pr.lat[j]
    dlat_j = jnp.concatenate([dkv @ w.astype(f32).T, jnp.sum(dk[..., Dn:], axis=2)], axis=-1)
    dw = dw + jnp.einsum("bcl,bcx->lx", lat_j[..., :Cl].astype(f32), dkv)
    return (dq, dw), dlat_j

  init = (jnp.zeros(pr.q.shape, f32), jnp.zeros(w.shape, f32))
  (dq, dw), dlat = jax.lax.scan(per_key_chunk, init, jnp.arange(pr.lat.shape[0]))
  dq = jnp.moveaxis(dq, 0, 1).reshape(B, nq * pr.cq, H, D)[:, :Tq]
  dlat = jnp.moveaxis(dlat, 0, 1).reshape(B, -1, lat.shape[2])[:, :S]
  return dq.astype(q.dtype), dlat.astype(lat.dtype), dw.astype(w.dtype), None, None, None, None


latent_attention.defvjp(_latent_fwd, _latent_bwd)


# ----------------------------------------------------------------------------------------
# shard_map wrappers: global arrays in, global arrays out (sequence dim sharded over `context`).


def _mesh_axis(name: str) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.shape[name] if name in mesh.axis_names else 1


def batch_spec(B: int):
  """Rows over data × fsdp when they divide B, else replicated."""
  dp = math.prod(_mesh_axis(a) for a in BATCH_AXES)
  return BATCH_AXES if B % dp == 0 else None


def heads_spec(*heads: int):
  """Heads over `tensor` when every head count divides, else replicated."""
  tp = _mesh_axis("tensor")
  return "tensor" if all(h % tp == 0 for h in heads) else None


def _to_slots(x_BT, P_: int):
  """Local [B, P·Tc, ...] -> [B, P, Tc, ...]."""
  return x_BT.reshape(x_BT.shape[0], P_, x_BT.shape[1] // P_, *x_BT.shape[2:])


def _from_slots(x_BP):
  return x_BP.reshape(x_BP.shape[0], -1, *x_BP.shape[3:])


def ssa_exchange(lat_BTF, seg_BT, layout: Layout, pattern: attn.SSA):
  """Global [B, T, F] latents -> [B, C·P·(NS+W+Tc), F] extended chunks (and their segment ids), sharded on context."""
  bs = batch_spec(lat_BTF.shape[0])

  def local(lat, seg):
    ext_lat, ext_seg = _ssa_extend(_to_slots(lat, layout.P), _to_slots(seg, layout.P), layout, pattern)
    return _from_slots(ext_lat), _from_slots(ext_seg)

  return jax.shard_map(local, in_specs=(P(bs, AXIS, None), P(bs, AXIS)),
                       out_specs=(P(bs, AXIS, None), P(bs, AXIS)))(lat_BTF, seg_BT)


def ssa_attention(q_BTHD, k_BXKD, v_BXKE, seg_BX, layout: Layout, pattern: attn.SSA, scale: float, impl: str):
  """SSA of local queries over their extended chunks (any registered impl, run per chunk) -> o_BTHE."""
  bs = batch_spec(q_BTHD.shape[0])
  hs = heads_spec(q_BTHD.shape[2], k_BXKD.shape[2])

  def local(q, k, v, seg):
    B, Pn = q.shape[0], layout.P
    qs, ks, vs, ss = (_to_slots(x, Pn) for x in (q, k, v, seg))
    Tc, X = qs.shape[2], ks.shape[2]
    flat = lambda x: x.reshape(B * Pn, *x.shape[2:])
    q_ext = jnp.concatenate([jnp.zeros((B, Pn, X - Tc) + qs.shape[3:], qs.dtype), qs], axis=2)
    o = attn.attention(flat(q_ext), flat(ks), flat(vs), pattern=pattern, segment_ids=flat(ss), scale=scale, impl=impl)
    return _from_slots(o.reshape(B, Pn, X, *o.shape[2:])[:, :, X - Tc:])

  spec = P(bs, AXIS, hs, None)
  return jax.shard_map(local, in_specs=(spec, spec, spec, P(bs, AXIS)), out_specs=spec, check_vma=False)(
      q_BTHD, k_BXKD, v_BXKE, seg_BX)


def full_attention(q_BTHD, lat_BTF, seg_BT, w_CX, ex: Expand, layout: Layout, scale: float, chunk: int = 512,
                   impl: str = "xla"):
  """Causal Full attention of the local queries to every token -> o_BTHE (context-sharded).

  The latents lat_BTF (kv_lora_rank + rope values per token) are all-gathered, so the backward returns a
  latent reduce-scatter. `impl` (an attention impl name) picks the form: kernel impls on a GPU (and their
  "_interpret" names) expand every token's keys and values in the model dtype and run the prefix kernel per
  local chunk at its offset (kernels_pallas/prefix.py, with its backward); XLA impls expand one key chunk
  at a time inside an fp32 online softmax (`latent_attention`), so no device holds per-head keys and values
  for the whole sequence.
  """
  bs = batch_spec(q_BTHD.shape[0])
  hs = heads_spec(q_BTHD.shape[2], ex.kv_heads)
  inv = jnp.asarray([layout.order().index(v) for v in range(layout.n)])
  gather = lambda x: _from_slots(jax.lax.all_gather(_to_slots(x, layout.P), AXIS, axis=1, tiled=True)[:, inv])

  mode = cache.latent_impl(impl)

  def local(q, lat, seg, w):
    Tc = q.shape[1] // layout.P
    lat_all, seg_all = gather(lat), gather(seg)
    ex_local = ex._replace(kv_heads=q.shape[2] * ex.kv_heads // q_BTHD.shape[2])
    if mode is not None:
      from kernels_pallas import prefix
      k, v = expand_chunk(lat_all, w, ex_local, q.dtype)
      ids = _chunk_ids(layout)
      return jnp.concatenate([prefix.prefix_attention(
          q[:, p * Tc:(p + 1) * Tc], k, v, offset=ids[p] * Tc, scale=float(scale), segment_ids_BS=seg_all,
          interpret=mode == "interpret")[0] for p in range(layout.P)], axis=1)
    qi = (_chunk_ids(layout)[:, None] * Tc + jnp.arange(Tc)[None, :]).reshape(-1)
    return latent_attention(q, lat_all, w, seg, jnp.broadcast_to(qi, seg.shape), seg_all,
                            jnp.arange(lat_all.shape[1]), float(scale), chunk, ex_local)

  qspec = P(bs, AXIS, hs, None)
  return jax.shard_map(local, in_specs=(qspec, P(bs, AXIS, None), P(bs, AXIS), P(None, hs)), out_specs=qspec,
                       check_vma=False)(q_BTHD, lat_BTF, seg_BT, w_CX)


def relayout(x_BT, src: Layout, dst: Layout):
  """Move a context-sharded [B, T, ...] array from layout `src` to layout `dst` (same C)."""
  bs = batch_spec(x_BT.shape[0])
  rest = (None,) * (x_BT.ndim - 2)
  Pmax = max(src.P, dst.P)

  def local(x):
    # View both layouts at the finer granularity: chunks of T / (C·Pmax) tokens, Pmax per device.
    xs = _to_slots(x, Pmax)
    s_fine, d_fine = _fine_layout(src, Pmax), _fine_layout(dst, Pmax)
    return _from_slots(_move_between(xs, s_fine, d_fine))

  return jax.shard_map(local, in_specs=P(bs, AXIS, *rest), out_specs=P(bs, AXIS, *rest))(x_BT)


def _fine_layout(L: Layout, Pn: int) -> list[list[int]]:
  """Table [device][slot] -> global chunk of T/(C·Pn) tokens."""
  if L.P == Pn:
    return [[L.chunk(d, p) for p in range(Pn)] for d in range(L.C)]
  return [[d * Pn + p for p in range(Pn)] for d in range(L.C)]    # contiguous, split into Pn sub-chunks


def _move_between(x_BP, src: list[list[int]], dst: list[list[int]]):
  """Slots hold chunks per `src`; return slots holding chunks per `dst`."""
  C, Pn = len(src), len(src[0])
  where = {v: (d, p) for d in range(C) for p in range(Pn) for v in [src[d][p]]}
  parts = []
  for p_dst in range(Pn):
    acc = None
    for p_src in range(Pn):
      pairs = [(where[dst[d][p_dst]][0], d) for d in range(C) if where[dst[d][p_dst]][1] == p_src]
      if not pairs:
        continue
      x = x_BP[:, p_src]
      y = x if all(a == b for a, b in pairs) and len(pairs) == C else jax.lax.ppermute(x, AXIS, pairs)
      acc = y if acc is None else acc + y
    parts.append(acc)
  return jnp.stack(parts, axis=1)

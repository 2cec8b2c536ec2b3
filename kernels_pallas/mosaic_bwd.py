"""Backward kernels for Hopper through Mosaic GPU: dQ and the local-window dK/dV.

Same structure as the forward (mosaic_fwd.py): persistent CTAs loop over work items; compute
warpgroups with resident 64-row tiles and a producer warpgroup that streams 64-row tiles by
TMA into a ring of shared-memory slots.

- dq: items (batch row, head, query block), one compute warpgroup per 64 query rows. Resident:
  q, dO, O, lse and dlse of the rows; streamed: the key/value half-blocks of the forward's visit
  list (sink blocks, local blocks, diagonal block masked). dS = P·(dP − delta) and dQ += dS·K
  stay in registers.
- dkv: items (batch row, kv head, 64 keys), two compute warpgroups with a one-way hand-off.
  Resident: the keys and values; streamed: q, dO, lse and delta tiles of every query head of
  the group and every query block that sees the keys through its local window. With
  with_sink, sink items follow: a 64-key tile of a document's sink block and the query blocks
  of one chunk (ssa_bwd.sink_chunk) past its window, each writing an fp32 partial in the
  layout of the Triton sink kernel, which the caller sums (ssa_bwd.add_sink_partials).
  Warpgroup 0 computes Sᵀ, dPᵀ, Pᵀ, dSᵀ and dV; warpgroup 1 accumulates dK from dSᵀ, which
  it receives through shared memory. (Versions that kept all of dK and dV in each warpgroup, or
  exchanged Pᵀ and dSᵀ both ways, were slower: kernels_pallas/NOTES.md has the times.)

delta = rowsum(dO·O) − dlse is computed by the dQ kernel (from its resident O and dO tiles)
and returned for the dK/dV kernels. lse is fp32, natural log, +inf on rows
that see nothing (so P = 0 there). Interpret mode stages register operands of wgmma in shared
memory, as in the forward.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.mosaic_fwd import ROWS_PER_WG, MosaicConfig, _ctas, _item, _loop_items, _smem, _visits
from kernels_pallas.ssa_bwd import sink_chunk
from kernels_pallas.tile_io import LOG2E

HALF = 64                      # streamed tile rows (half a 128 block): keeps S and dP at 32 regs


def _tiles(cfg: MosaicConfig, n: int, rows: int, E: int, dtype):
  """Shared-memory tiles of `rows` rows, n of each: the head-dim parts of D, then one of width E."""
  return [_smem((n, rows, size), dtype) for _, size in cfg.d_parts], _smem((n, rows, E), dtype)


def _stage(cfg: MosaicConfig, dtype):
  """Interpret mode only: a tile per compute warpgroup to pass register operands to wgmma."""
  return _smem((cfg.compute_wgs, ROWS_PER_WG, HALF), dtype) if cfg.interpret else None


def _mma(acc, a, b_ref, scratch, interpret: bool):
  """acc + a @ b_ref, a in registers (the GPU interpreter needs it in shared memory: `scratch`)."""
  if interpret:
    scratch[...] = a
  return _wgmma(acc, [(a, scratch, b_ref)], interpret)


def _zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _issue(acc_ref, terms, interpret: bool):
  """wgmma acc_ref += a @ b for each term (a_regs, a_ref, b_ref): the left operand from
  registers (a_regs) where given, else from shared memory (a_ref). The GPU interpreter takes
  operands from shared memory only, so there a_ref must hold a."""
  for a_regs, a_ref, b in terms:
    plgpu.wgmma(acc_ref, a_ref if interpret or a_regs is None else a_regs, b)


def _products(shape, groups, interpret: bool):
  """One fresh fp32 product per group of terms (see _issue), all issued before one wait."""
  def body(*accs):
    for r, terms in zip(accs, groups):
      _issue(r, terms, interpret)
    return tuple(r[...] for r in accs)
  return pl.run_scoped(body, *[plgpu.ACC(shape, jnp.float32) for _ in groups])


def _wgmma_all(accs, term_groups, interpret: bool):
  """[acc + the sum of its group's products (see _issue)], all issued before one wait."""
  if interpret:                             # the interpreter has no run_state
    return [a + _products(a.shape, [t], True)[0] for a, t in zip(accs, term_groups)]
  body = lambda refs: [_issue(r, t, False) for r, t in zip(refs, term_groups)]
  return list(pl.run_state(body)(tuple(plgpu.ACC.init(a) for a in accs)))


def _wgmma(acc, terms, interpret: bool):
  """acc + the sum of the terms' products (see _issue)."""
  return _wgmma_all([acc], [terms], interpret)[0]


def _diag_mask(x, row_tile, col_tile, transposed: bool, only_if=None):
  """Zero x outside the causal mask inside the diagonal block: x's rows are 64-row tile
  `row_tile` and its columns 64-row tile `col_tile` of the block (queries are rows unless
  `transposed`). `only_if`: a scalar; where False, x passes unmasked."""
  rows = plgpu.broadcasted_iota(jnp.int32, x.shape, 0, layout=plgpu.Layout.WGMMA) + row_tile * ROWS_PER_WG
  cols = plgpu.broadcasted_iota(jnp.int32, x.shape, 1, layout=plgpu.Layout.WGMMA) + col_tile * HALF
  ok = cols >= rows if transposed else rows >= cols
  if only_if is not None:
    ok = ok | jnp.logical_not(only_if)
  return jnp.where(ok, x, 0.0)


def _roles(cfg: MosaicConfig, items: int, free, compute_item, produce_item, after_compute=None, cwg=None):
  """Run the warpgroups: compute_item(wg, w, g) on the compute warpgroups and
  produce_item(w, g) on the producer, for this CTA's work items w; g counts the streamed
  steps so far (its ring slot is g mod slots). Each returns g plus its item's steps.
  after_compute(wg, total) runs on the compute warpgroups after their last item."""
  wg = lax.axis_index("wg")
  cwg, S = cwg or cfg.compute_wgs, cfg.slots

  @pl.when(wg < cwg)
  def _():
    plgpu.set_max_registers(232 if cwg == 2 else 240, action="increase")
    total = _loop_items(functools.partial(compute_item, wg), items, jnp.int32(0))
    if after_compute is not None:
      after_compute(wg, total)

  @pl.when(wg == cwg)
  def _():
    plgpu.set_max_registers(40, action="decrease")
    total = _loop_items(produce_item, items, jnp.int32(0))

    @pl.loop(jnp.maximum(total - S, 0), total)     # drain: see the last release of every slot
    def _(g):
      plgpu.barrier_wait(free.at[_slot(cfg, g)])


def _slot(cfg: MosaicConfig, g):
  return lax.rem(g, jnp.int32(cfg.slots))


def _stream(cfg: MosaicConfig, g, steps, free, copy_step):
  """Producer loop of one item: copy_step(j, slot) for its steps, each once its slot is free."""
  @pl.loop(0, steps)
  def _(j):
    slot = _slot(cfg, g + j)

    @pl.when(g + j >= cfg.slots)
    def _():
      plgpu.barrier_wait(free.at[slot])
    copy_step(j, slot)
  return g + steps


def _launch(body, cfg: MosaicConfig, items: int, out_type, scratch, resident_copies: int,
            streamed_copies: int, *args, name: str, cwg=None):
  """plgpu.kernel over persistent CTAs with `cwg` compute warpgroups (default: one per 64 rows
  of the tile) + 1 producer. Barriers: one per compute warpgroup for its resident tiles, one
  per ring slot for the streamed tiles, one per slot for its release by the compute warpgroups."""
  cwg, S = cwg or cfg.compute_wgs, cfg.slots

  def entry(*refs):
    barriers = (plgpu.Barrier(num_arrivals=resident_copies, num_barriers=cwg),
                plgpu.Barrier(num_arrivals=streamed_copies, num_barriers=S),
                plgpu.Barrier(num_arrivals=cwg, num_barriers=S))
    pl.run_scoped(lambda *a: body(*refs, a, cfg=cfg), scratch, barriers, collective_axes="wg")

  return plgpu.kernel(
      entry, out_type=out_type, grid=(_ctas(cfg, items),), grid_names=("cta",),
      num_threads=cwg + 1, thread_name="wg", kernel_name=name,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
  )(*args)


# ------------------------------------------------------------------------------------------
# dQ


def _dq_kernel(start_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dlse_ref, dq_ref, delta_ref, scoped, *,
               cfg: MosaicConfig):
  (q_smem, do_smem, o_smem, lse_smem, delta_smem, k_smem, v_smem, scratch), (res_bar, in_bar, free) = scoped
  B, T, H, _ = q_ref.shape
  bk, parts, subs = cfg.tile, cfg.d_parts, cfg.tile // HALF
  n_blocks = T // bk
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  c = cfg.scale * LOG2E

  def compute_item(wg, w, g):
    q_parts = [q_smem[p].at[wg] for p in range(len(parts))]
    stage = scratch.at[wg] if cfg.interpret else None
    b, i, h = _item(w, n_blocks, H)
    n, _ = _visits(cfg, i, start_ref[b, i])
    steps = n * subs
    rows = pl.ds(i * bk + wg * ROWS_PER_WG, ROWS_PER_WG)
    for p, (off, size) in enumerate(parts):
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h, pl.ds(off, size)], q_parts[p], res_bar.at[wg])
    plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[wg], res_bar.at[wg])
    plgpu.copy_gmem_to_smem(o_ref.at[b, rows, h], o_smem.at[wg], res_bar.at[wg])
    plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[wg], res_bar.at[wg])
    plgpu.copy_gmem_to_smem(dlse_ref.at[b, h, rows], delta_smem.at[wg], res_bar.at[wg])
    plgpu.barrier_wait(res_bar.at[wg])
    lse2 = plgpu.load(lse_smem.at[wg], layout=row_layout) * LOG2E
    # delta = rowsum(dO·O) − dlse, also an output: the dK/dV kernels need it. 64 columns at a
    # time to bound the fp32 registers it takes (ncu counted the same spills either way).
    delta = -plgpu.load(delta_smem.at[wg], layout=row_layout)
    for col in range(0, o_ref.shape[3], HALF):
      part = lambda ref: plgpu.load(ref.at[wg, :, pl.ds(col, HALF)], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
      delta = delta + (part(do_smem) * part(o_smem)).sum(axis=1)
    acc = [_zeros((ROWS_PER_WG, size)) for _, size in parts]

    def step(j, acc, masked):
      slot = _slot(cfg, g + j)
      plgpu.barrier_wait(in_bar.at[slot])
      s, = _products((ROWS_PER_WG, HALF), [[(None, q_parts[p], k_smem[p].at[slot].transpose((1, 0)))
                                            for p in range(len(parts))]], cfg.interpret)
      dp, = _products((ROWS_PER_WG, HALF), [[(None, do_smem.at[wg], v_smem.at[slot].transpose((1, 0)))]],
                      cfg.interpret)
      p = jnp.exp2(s * c - lax.broadcast_in_dim(lse2, s.shape, [0]))
      if masked:
        p = _diag_mask(p, wg, lax.rem(j, jnp.int32(subs)), transposed=False)
      ds = (p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))).astype(q_ref.dtype)
      acc = [_mma(a, ds, k_smem[p].at[slot], stage, cfg.interpret) for p, a in enumerate(acc)]
      plgpu.barrier_arrive(free.at[slot])
      return acc

    first_diag = jnp.maximum(steps - subs, 0)
    acc = lax.fori_loop(0, first_diag, functools.partial(step, masked=False), acc)
    acc = lax.fori_loop(first_diag, steps, functools.partial(step, masked=True), acc)
    for p, a in enumerate(acc):
      q_parts[p][...] = (a * cfg.scale).astype(dq_ref.dtype)
    delta_smem.at[wg][...] = delta
    plgpu.commit_smem()
    for p, (off, size) in enumerate(parts):
      plgpu.copy_smem_to_gmem(q_parts[p], dq_ref.at[b, rows, h, pl.ds(off, size)])
    plgpu.copy_smem_to_gmem(delta_smem.at[wg], delta_ref.at[b, h, rows])
    plgpu.wait_smem_to_gmem(0)
    return g + steps

  def produce_item(w, g):
    b, i, h = _item(w, n_blocks, H)
    n, block_of = _visits(cfg, i, start_ref[b, i])
    kh = lax.div(h, jnp.int32(cfg.groups))

    def copy_step(j, slot):
      rows = pl.ds(block_of(lax.div(j, jnp.int32(subs))) * bk + lax.rem(j, jnp.int32(subs)) * HALF, HALF)
      for p, (off, size) in enumerate(parts):
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kh, pl.ds(off, size)], k_smem[p].at[slot], in_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kh], v_smem.at[slot], in_bar.at[slot])
    return _stream(cfg, g, n * subs, free, copy_step)

  _roles(cfg, B * H * n_blocks, free, compute_item, produce_item)


def dq(q_BTHD, k_BTKD, v_BTKE, o_BTHE, do_BTHE, lse_BHT, dlse_BHT, start_BN, cfg: MosaicConfig):
  """(dQ [B, T, H, D] in the input dtype, delta [B, H, T] fp32 = rowsum(dO·O) − dlse)."""
  B, T, H, D = q_BTHD.shape
  E = v_BTKE.shape[3]
  dt = q_BTHD.dtype
  S, cwg, parts = cfg.slots, cfg.compute_wgs, cfg.d_parts
  rows_f32 = plgpu.SMEM((cwg, ROWS_PER_WG), jnp.float32)
  scratch = (*_tiles(cfg, cwg, ROWS_PER_WG, E, dt), _smem((cwg, ROWS_PER_WG, E), dt), rows_f32, rows_f32,
             *_tiles(cfg, S, HALF, E, dt), _stage(cfg, dt))
  out_type = (jax.ShapeDtypeStruct((B, T, H, D), dt), jax.ShapeDtypeStruct((B, H, T), jnp.float32))
  return _launch(_dq_kernel, cfg, B * H * (T // cfg.tile), out_type, scratch, len(parts) + 4, len(parts) + 1,
                 start_BN, q_BTHD, k_BTKD, v_BTKE, o_BTHE, do_BTHE, lse_BHT, dlse_BHT, name="mosaic_attention_bwd_dq")


# ------------------------------------------------------------------------------------------
# dK / dV (local window, and the sink visits as extra items)


def _query_blocks(cfg: MosaicConfig, kb, end):
  """Query blocks seeing key block kb through their local window: kb .. kb + n - 1."""
  last = end if cfg.local is None else jnp.minimum(end, kb + cfg.local - 1)
  return jnp.where(end >= 0, last - kb + 1, 0)


def _sink_chunks(cfg: MosaicConfig, T: int) -> int:
  """Query-block chunks of the sink split (as the Triton sink kernel's)."""
  return -(-(T // cfg.tile) // sink_chunk(cfg))


def _sink_items(cfg: MosaicConfig, B: int, T: int, K: int) -> int:
  """Sink work items of the dK/dV kernel: (row, chunk, sink block, 64 keys, kv head)."""
  if cfg.local is None or cfg.sink == 0:
    return 0
  return B * _sink_chunks(cfg, T) * cfg.sink * (cfg.tile // ROWS_PER_WG) * K


def _sink_item(cfg: MosaicConfig, ws, start_ref, end_ref, K: int, chunks: int):
  """(b, c, r, sub, kh, first key row, first query block, query blocks) of sink item ws: the
  queries of chunk c past the local window of sink block r of the chunk's document (as the
  Triton sink kernel, ssa_bwd._sink_kernel; none if the document has no block r)."""
  subs, C = cfg.tile // ROWS_PER_WG, sink_chunk(cfg)
  sub = lax.rem(ws, jnp.int32(subs))
  r = lax.rem(lax.div(ws, jnp.int32(subs)), jnp.int32(cfg.sink))
  kh = lax.rem(lax.div(ws, jnp.int32(subs * cfg.sink)), jnp.int32(K))
  c = lax.rem(lax.div(ws, jnp.int32(subs * cfg.sink * K)), jnp.int32(chunks))
  b = lax.div(ws, jnp.int32(subs * cfg.sink * K * chunks))
  first = c * C
  start, end = start_ref[b, first], end_ref[b, first]
  exists = (start >= 0) & (start + r <= end)
  lo = jnp.maximum(first, start + cfg.local + r)
  hi = jnp.minimum(first + C - 1, end)
  nq = jnp.where(exists, jnp.maximum(hi - lo + 1, 0), 0)
  k0 = jnp.where(exists, start + r, 0) * cfg.tile + sub * ROWS_PER_WG
  return b, c, r, sub, kh, k0, lo, nq


def _dkv_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *rest,
                cfg: MosaicConfig, sink_items: int):
  """Items of 64 keys, two compute warpgroups with a one-way hand-off. Warpgroup 0 computes
  Sᵀ, dPᵀ, Pᵀ and dSᵀ and accumulates dV; it passes dSᵀ (double-buffered) through shared memory
  to warpgroup 1, which only accumulates dK. Neither holds all of dK and dV (160 fp32
  registers per thread at D=192, E=128), and warpgroup 1's dK wgmma fill the tensor cores
  while warpgroup 0 computes the softmax terms of the next tile. (Other splits, measured
  slower on an H100: kernels_pallas/NOTES.md.)

  The first items are the local ones (a key tile, the query blocks seeing it through their
  local window); then come `sink_items` sink items (a sink key tile, the query blocks of one
  chunk past its window), whose fp32 partials go straight from registers to pk_ref, pv_ref."""
  *partials, scoped = rest
  smem, (res_bar, in_bar, free) = scoped
  k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, p16_smem, (ds_bar, ds_free, sync_bar) = smem
  B, T, K, _ = k_ref.shape
  bk, G, parts, R = cfg.tile, cfg.groups, cfg.d_parts, ROWS_PER_WG
  subs = bk // R                            # 64-row tiles per pattern block
  local_items = B * K * (T // R)
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  c = cfg.scale * LOG2E
  interp = cfg.interpret

  def info(w):
    """(b, kh, first key row, first query block, query blocks, steps, is_local, sink ids)."""
    b, kt, kh = _item(jnp.minimum(w, local_items - 1), T // R, K)   # (decoded in range for sink items too)
    kb = lax.div(kt, jnp.int32(subs))
    nq = _query_blocks(cfg, kb, end_ref[b, kb])
    if not sink_items:
      return b, kh, kt * R, kb, nq, G * nq * subs, True, None
    is_local = w < local_items
    sb, sc, sr, ssub, skh, sk0, slo, snq = _sink_item(cfg, jnp.maximum(w - local_items, 0), start_ref, end_ref, K,
                                                      _sink_chunks(cfg, T))
    pick = lambda x, y: jnp.where(is_local, x, y)
    nq = pick(nq, snq)
    return (pick(b, sb), pick(kh, skh), pick(kt * R, sk0), pick(kb, slo), nq, G * nq * subs, is_local,
            (sc, sr, ssub))

  def sync():
    plgpu.barrier_arrive(sync_bar)
    plgpu.barrier_wait(sync_bar)

  def store(pairs):
    """Epilogue: write each (shared-memory tile, value, global view) and wait for the stores."""
    for tile, val, _ in pairs:
      tile[...] = val
    plgpu.commit_smem()
    for tile, _, dst in pairs:
      plgpu.copy_smem_to_gmem(tile, dst)
    plgpu.wait_smem_to_gmem(0)

  def epilogue(is_local, sink_ids, bf16_pairs, partial_pairs):
    """Local items: bf16 results through shared memory (bf16_pairs); sink items: fp32
    partials from registers into partial_pairs' (value, global view)."""
    if sink_ids is None:
      store(bf16_pairs)
      return

    @pl.when(is_local)
    def _():
      store(bf16_pairs)

    @pl.when(jnp.logical_not(is_local))
    def _():
      for val, dst in partial_pairs:
        dst[...] = val

  def parity(g):
    return lax.rem(g, jnp.int32(2))

  def compute_item(wg, w, g):
    b, kh, k0, q0, nq, steps, is_local, sink_ids = info(w)
    rows = pl.ds(k0, R)
    row_tile = lax.rem(lax.div(k0, jnp.int32(R)), jnp.int32(subs))
    sink_rows = None if sink_ids is None else (b, kh, sink_ids[0], sink_ids[1], pl.ds(sink_ids[2] * R, R))

    @pl.when(wg == 0)
    def _():
      for p, (off, size) in enumerate(parts):
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kh, pl.ds(off, size)], k_smem[p], res_bar.at[0])
      plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kh], v_smem, res_bar.at[0])
    plgpu.barrier_wait(res_bar.at[0])

    @pl.when(wg == 0)
    def _scores():
      v_regs = None if interp else plgpu.load(v_smem, layout=plgpu.Layout.WGMMA)

      def step(j, dv):
        slot, e = _slot(cfg, g + j), parity(g + j)
        plgpu.barrier_wait(in_bar.at[slot])
        st, dpt = _products(
            (R, R), [[(None, k_smem[p], q_smem[p].at[slot].transpose((1, 0))) for p in range(len(parts))],
                     [(v_regs, v_smem, do_smem.at[slot].transpose((1, 0)))]], interp)
        lse2 = plgpu.load(lse_smem.at[slot], layout=col_layout) * LOG2E
        delta = plgpu.load(delta_smem.at[slot], layout=col_layout)
        # Causal mask only in a local item's own (diagonal) query block, the first of each head's.
        diag = is_local & (lax.rem(lax.div(j, jnp.int32(subs)), nq) == 0)
        pt = _diag_mask(jnp.exp2(st * c - lax.broadcast_in_dim(lse2, st.shape, [1])), row_tile,
                        lax.rem(j, jnp.int32(subs)), transposed=True, only_if=diag)
        ds16 = (pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, [1]))).astype(q_ref.dtype)
        p16 = pt.astype(q_ref.dtype)

        @pl.when(g + j >= 2)
        def _():
          plgpu.barrier_wait(ds_free.at[e])  # warpgroup 1's dK wgmma two tiles back is done
        ds_smem.at[e][...] = ds16
        plgpu.commit_smem()
        plgpu.barrier_arrive(ds_bar.at[e])
        if interp:
          p16_smem[...] = p16
        dv = _wgmma(dv, [(p16, p16_smem, do_smem.at[slot])], interp)
        plgpu.barrier_arrive(free.at[slot])
        return dv

      dv = lax.fori_loop(0, steps, step, _zeros((R, v_ref.shape[3])))
      sync()                                # both warpgroups are done with this item's K and V
      epilogue(is_local, sink_ids, [(v_smem, dv.astype(dv_ref.dtype), dv_ref.at[b, rows, kh])],
               None if sink_ids is None else [(dv, partials[1].at[sink_rows])])
      sync()

    @pl.when(wg == 1)
    def _dk():
      def step(j, dks):
        slot, e = _slot(cfg, g + j), parity(g + j)
        plgpu.barrier_wait(in_bar.at[slot])
        plgpu.barrier_wait(ds_bar.at[e])
        dks = _wgmma_all(dks, [[(None, ds_smem.at[e], q_smem[p].at[slot])] for p in range(len(parts))], interp)
        plgpu.barrier_arrive(ds_free.at[e])
        plgpu.barrier_arrive(free.at[slot])
        return dks

      dks = lax.fori_loop(0, steps, step, [_zeros((R, size)) for _, size in parts])
      dks = [a * cfg.scale for a in dks]
      sync()
      epilogue(is_local, sink_ids,
               [(k_smem[p], a.astype(dk_ref.dtype), dk_ref.at[b, rows, kh, pl.ds(off, size)])
                for p, (a, (off, size)) in enumerate(zip(dks, parts))],
               None if sink_ids is None else
               [(a, partials[0].at[(*sink_rows, pl.ds(off, size))]) for a, (off, size) in zip(dks, parts)])
      sync()
    return g + steps

  def after_compute(wg, total):             # observe warpgroup 1's last releases of dSᵀ
    for back in (1, 2):
      @pl.when((total >= back) & (wg == 0))
      def _():
        plgpu.barrier_wait(ds_free.at[parity(total - back)])

  def produce_item(w, g):
    b, kh, _, q0, nq, steps, _, _ = info(w)

    def copy_step(j, slot):
      t = lax.div(j, jnp.int32(subs))
      h = kh * G + lax.div(t, nq)
      rows = pl.ds((q0 + lax.rem(t, nq)) * bk + lax.rem(j, jnp.int32(subs)) * R, R)
      for p, (off, size) in enumerate(parts):
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h, pl.ds(off, size)], q_smem[p].at[slot], in_bar.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], in_bar.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], in_bar.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot], in_bar.at[slot])
    return _stream(cfg, g, steps, free, copy_step)

  _roles(cfg, local_items + sink_items, free, compute_item, produce_item, after_compute, cwg=2)


def dkv(q_BTHD, k_BTKD, v_BTKE, do_BTHE, lse_BHT, delta_BHT, start_BN, end_BN, cfg: MosaicConfig,
        with_sink: bool = False):
  """(dK [B, T, K, D], dV [B, T, K, E]) in the input dtype from the local-window visits, and
  with_sink: also the fp32 sink partials (dK [B, K, chunks, sink, tile, D], dV [..., E]) in
  the layout of ssa_bwd.sink_partials, from the same launch."""
  B, T, K, D = k_BTKD.shape
  E = v_BTKE.shape[3]
  dt = q_BTHD.dtype
  cfg = dataclasses.replace(cfg, slots=cfg.dkv_slots)
  S, R, parts = cfg.slots, ROWS_PER_WG, cfg.d_parts
  sink_items = _sink_items(cfg, B, T, K) if with_sink else 0
  rows_f32 = plgpu.SMEM((S, R), jnp.float32)
  one = lambda n=1: plgpu.Barrier(num_arrivals=n)
  two = plgpu.Barrier(num_arrivals=1, num_barriers=2)
  scratch = ([_smem((R, size), dt) for _, size in parts], _smem((R, E), dt), *_tiles(cfg, S, R, E, dt),
             rows_f32, rows_f32, _smem((2, R, R), dt), _smem((R, R), dt) if cfg.interpret else None,
             (two, two, one(2)))
  out_type = (jax.ShapeDtypeStruct((B, T, K, D), dt), jax.ShapeDtypeStruct((B, T, K, E), dt))
  if sink_items:
    shape = (B, K, _sink_chunks(cfg, T), cfg.sink, cfg.tile)
    out_type += tuple(jax.ShapeDtypeStruct((*shape, X), jnp.float32) for X in (D, E))
  kernel = functools.partial(_dkv_kernel, sink_items=sink_items)
  outs = _launch(kernel, cfg, B * K * (T // R) + sink_items, out_type, scratch, len(parts) + 1, len(parts) + 3,
                 start_BN, end_BN, q_BTHD, k_BTKD, v_BTKE, do_BTHE, lse_BHT, delta_BHT,
                 name="mosaic_attention_bwd_dkv", cwg=2)
  return tuple(outs[:2]), (tuple(outs[2:]) if sink_items else None)

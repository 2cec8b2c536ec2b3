"""Forward kernel for Hopper through Mosaic GPU: warp-specialised wgmma online softmax.

Work items are (batch row, head, pattern block) of `tile` query rows; a grid of persistent
CTAs (one per SM by default) loops over them. Each CTA runs two compute warpgroups of 64
query rows and one producer warpgroup that streams key/value tiles with TMA into a ring of
shared-memory slots, running ahead into the next item while the compute warpgroups finish
the current one. The visit list is the Triton forward's (the document's sink blocks before
the local window, then the local blocks, the last one causal), so both compute warpgroups
take the same steps. A schedule barrier alternates them, so one's softmax runs while the
other's matmuls occupy the tensor cores.

The qk head dim is split into parts of 128 and 64 columns (one wgmma each into one
accumulator); the output tile is staged in the first query part's shared memory, so E must
equal that part's width (MLA's D=192, E=128; D=E=64; D=E=128). In interpret mode (CPU) the
P·V product reads P from shared memory, since the GPU interpreter has no register operands.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.tile_io import LN2, LOG2E, visit_ranges

ROWS_PER_WG = 64            # wgmma M per warpgroup
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Static parameters of one forward (or backward: mosaic_bwd.py) call."""
  scale: float
  tile: int                  # pattern block = query rows per work item = key rows per step
  sink: int                  # sink blocks (0 for Full)
  local: int | None          # local blocks; None = causal Full
  d_parts: tuple             # ((offset, size), ...) of the qk head dim, sizes 128 or 64
  groups: int                # query heads per kv head
  slots: int = 2             # key/value ring depth (forward, dQ)
  dkv_slots: int = 3         # query/dO ring depth of the dK/dV kernel
  ctas: int | None = None    # CTAs, each looping over work items; None: one per SM for SSA
                             # (persistent), one per item for Full (uneven items balance better)
  rowsum_first: bool = True  # add P's row sum to l before (True) or after waiting for the tensor cores
  interpret: bool = False
  padded: bool = False       # segment ids were given: the caller zeroes padding rows

  @property
  def compute_wgs(self) -> int:
    return self.tile // ROWS_PER_WG


def d_parts(dim: int) -> tuple:
  """Split a head dim into (offset, size) parts of 128 then 64 columns."""
  parts, off = [], 0
  while dim - off >= 128:
    parts.append((off, 128))
    off += 128
  if dim - off == 64:
    parts.append((off, 64))
    off += 64
  return tuple(parts) if off == dim else ()


def input_problem(q_BTHD, k_BTKD, v_BTKE, block: int) -> str | None:
  """Why the Mosaic kernels (this forward and mosaic_bwd.py) cannot take these inputs, or None."""
  B, T, H, D = q_BTHD.shape
  E = v_BTKE.shape[3]
  if q_BTHD.dtype not in SUPPORTED_DTYPES or len({q_BTHD.dtype, k_BTKD.dtype, v_BTKE.dtype}) != 1:
    return f"mosaic kernels run bf16/fp16 inputs of one dtype, got {q_BTHD.dtype}, {k_BTKD.dtype}, {v_BTKE.dtype}"
  if block not in (64, 128):
    return f"mosaic kernels need block size 64 or 128, got {block}"
  if T % block:
    return f"mosaic kernels need T a multiple of the block size {block}, got T={T}"
  parts = d_parts(D)
  if not parts:
    return f"mosaic kernels need the qk head dim to be a multiple of 64, got D={D}"
  if E != parts[0][1]:
    return f"mosaic kernels stage outputs in the first 128/64-column part of D: need E == {parts[0][1]}, got E={E}"
  if H % k_BTKD.shape[2]:
    return f"kv heads {k_BTKD.shape[2]} do not divide query heads {H}"
  return None


def _smem(shape, dtype):
  """A shared-memory tile in the layout wgmma and TMA take: (8, 64) tiles, 128-byte swizzle."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _visits(cfg: MosaicConfig, i, start):
  """(n, block_of): the CTA for pattern block i visits key blocks block_of(j), j in [0, n),
  as the Triton forward does (tile_io.visit_ranges); the last one is the diagonal block."""
  s0, s1, lo = visit_ranges(cfg, i, start)
  n_sink = s1 - s0
  return n_sink + (i - lo) + 1, lambda j: jnp.where(j < n_sink, s0 + j, lo + (j - n_sink))


def _item(w, n_blocks: int, heads: int, reverse: bool = False):
  """(b, i, h) of work item w: block index fastest, so CTAs running side by side share the
  key/value tiles of neighbouring blocks in L2; `reverse` takes the last blocks first."""
  i = lax.rem(w, jnp.int32(n_blocks))
  h = lax.rem(lax.div(w, jnp.int32(n_blocks)), jnp.int32(heads))
  b = lax.div(w, jnp.int32(n_blocks * heads))
  if reverse:
    i = n_blocks - 1 - i
  return b, i, h


def _loop_items(body, items: int, init):
  """Run body(w, carry) over this CTA's work items w = cta, cta + ctas, ... below `items`."""
  cta, ctas = lax.axis_index("cta"), lax.axis_size("cta")
  mine = pl.cdiv(items - cta, ctas)
  return lax.fori_loop(0, mine, lambda k, c: body(cta + k * ctas, c), init)


def _kernel(start_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped, *, cfg: MosaicConfig):
  (q_smem, k_smem, v_smem, lse_smem, p_smem), (q_bar, k_bar, v_bar), (k_free, v_free), sched = scoped
  B, T, H, _ = q_ref.shape
  E = v_ref.shape[3]
  bk, S, cwg = cfg.tile, cfg.slots, cfg.compute_wgs
  n_blocks = T // bk
  items = B * H * n_blocks
  wg = lax.axis_index("wg")
  slot_of = lambda g: lax.rem(g, jnp.int32(S))

  def work(w):
    b, i, h = _item(w, n_blocks, H, reverse=cfg.local is None)   # Full: longest rows first
    n, block_of = _visits(cfg, i, start_ref[b, i])
    return b, i, h, n, block_of

  def sched_sync():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  @pl.when(wg < cwg)
  def _compute():
    plgpu.set_max_registers(232 if cwg == 2 else 240, action="increase")
    q_parts = [q_smem[p].at[wg] for p in range(len(cfg.d_parts))]
    qk_scale = cfg.scale * LOG2E
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def one_item(w, g):                     # g: key/value steps taken so far by this CTA
      b, i, h, n, _ = work(w)
      r0 = i * bk + wg * ROWS_PER_WG
      for p, (off, size) in enumerate(cfg.d_parts):
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(r0, ROWS_PER_WG), h, pl.ds(off, size)], q_parts[p],
                                q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      m = plgpu.layout_cast(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32), row_layout)
      l = plgpu.layout_cast(jnp.full((ROWS_PER_WG,), 0.0, jnp.float32), row_layout)
      acc = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG, E), jnp.float32), plgpu.Layout.WGMMA)

      @pl.when(n > 0)
      def _():
        plgpu.barrier_wait(k_bar.at[slot_of(g)])

      if cwg == 2:
        pl.when(wg == 1)(sched_sync)

      def step(j, carry, masked):
        acc, m, l = carry
        slot = slot_of(g + j)

        def qk(acc_ref):
          for p in range(len(cfg.d_parts)):
            plgpu.wgmma(acc_ref, q_parts[p], k_smem[p].at[slot].transpose((1, 0)))
          if cwg == 2:
            sched_sync()
          return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((ROWS_PER_WG, bk), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        s = s * qk_scale
        if masked:                          # the diagonal block: causal within the block
          rows = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA) + wg * ROWS_PER_WG
          cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
          s = jnp.where(rows >= cols, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l = l * alpha
        p16 = p.astype(q_ref.dtype)
        if cfg.rowsum_first:
          l = l + p.sum(axis=1)
        if cwg == 2:
          plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(v_bar.at[slot])
        if cwg == 2:
          plgpu.barrier_wait(sched)
        if not cfg.rowsum_first:
          l = l + p.sum(axis=1)

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

          @pl.when(j + 1 < n)
          def _():
            plgpu.barrier_wait(k_bar.at[slot_of(g + j + 1)])
        if cfg.interpret:
          # The GPU interpreter takes wgmma operands from shared memory only and has no
          # run_state: stage P in shared memory and accumulate into a fresh tile.
          p_smem.at[wg][...] = p16
          p16 = p_smem.at[wg]
          acc = acc + pl.run_scoped(lambda acc_ref: (pv(acc_ref), acc_ref[...])[1],
                                    plgpu.ACC((ROWS_PER_WG, E), jnp.float32))
        else:
          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      last = jnp.maximum(n - 1, 0)
      carry = lax.fori_loop(0, last, functools.partial(step, masked=False), (acc, m, l))
      acc, m, l = lax.fori_loop(last, n, functools.partial(step, masked=True), carry)
      if cwg == 2:
        pl.when(wg == 0)(sched_sync)

      l_safe = jnp.maximum(l, 1e-30)
      out = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
      o_smem = q_parts[0]                   # the query tile is dead after the last QK wgmma
      o_smem[...] = out.astype(o_ref.dtype)
      lse_smem.at[wg][...] = jnp.where(l > 0, m * LN2 + jnp.log(l_safe), -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, pl.ds(r0, ROWS_PER_WG), h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(r0, ROWS_PER_WG)])
      plgpu.wait_smem_to_gmem(0)            # before the next item's query load overwrites it
      return g + n

    _loop_items(one_item, items, jnp.int32(0))

  @pl.when(wg == cwg)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def one_item(w, g):
      b, _, h, n, block_of = work(w)
      kh = lax.div(h, jnp.int32(cfg.groups))

      @pl.loop(0, n)
      def _(j):
        slot = slot_of(g + j)
        rows = pl.ds(block_of(j) * bk, bk)

        @pl.when(g + j >= S)
        def _():
          plgpu.barrier_wait(k_free.at[slot])
        for p, (off, size) in enumerate(cfg.d_parts):
          plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kh, pl.ds(off, size)], k_smem[p].at[slot], k_bar.at[slot])

        @pl.when(g + j >= S)
        def _():
          plgpu.barrier_wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kh], v_smem.at[slot], v_bar.at[slot])
      return g + n

    total = _loop_items(one_item, items, jnp.int32(0))

    @pl.loop(jnp.maximum(total - S, 0), total)   # drain: see the last release of every slot
    def _(g):
      plgpu.barrier_wait(k_free.at[slot_of(g)])
      plgpu.barrier_wait(v_free.at[slot_of(g)])


def _ctas(cfg: MosaicConfig, items: int) -> int:
  """Grid size: persistent CTAs (one per SM) for SSA, one CTA per item for Full, as measured faster
  by benchmarks/mosaic_tune.py (numbers in kernels_pallas/NOTES.md)."""
  if cfg.ctas:
    return min(cfg.ctas, items)
  if cfg.local is None:
    return items
  return min(int(getattr(jax.devices()[0], "core_count", 0) or 132), items)


def forward(q_BTHD, k_BTKD, v_BTKE, start_BN, cfg: MosaicConfig):
  """(o_BTHE in the input dtype, lse_BHT fp32); start_BN[b, i] is the first block of the
  document holding block i (-1: a padding block). Rows of padding get finite garbage: the
  caller masks them (flash.py does when segment ids are given)."""
  B, T, H, D = q_BTHD.shape
  E = v_BTKE.shape[3]
  dt = q_BTHD.dtype
  S, cwg, bk = cfg.slots, cfg.compute_wgs, cfg.tile
  smem = lambda shape: _smem(shape, dt)
  n_parts = len(cfg.d_parts)

  def entry(start_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
    scratch = (
        [smem((cwg, ROWS_PER_WG, size)) for _, size in cfg.d_parts],
        [smem((S, bk, size)) for _, size in cfg.d_parts],
        smem((S, bk, E)),
        plgpu.SMEM((cwg, ROWS_PER_WG), jnp.float32),
        smem((cwg, ROWS_PER_WG, bk)) if cfg.interpret else None,
    )
    barriers = (plgpu.Barrier(num_arrivals=n_parts, num_barriers=cwg),
                plgpu.Barrier(num_arrivals=n_parts, num_barriers=S),
                plgpu.Barrier(num_barriers=S))
    free = (plgpu.Barrier(num_arrivals=cwg, num_barriers=S),) * 2
    pl.run_scoped(lambda *a: _kernel(start_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, a, cfg=cfg),
                  scratch, barriers, free, plgpu.Barrier(num_arrivals=cwg), collective_axes="wg")

  kernel = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((B, T, H, E), dt), jax.ShapeDtypeStruct((B, H, T), jnp.float32)),
      grid=(_ctas(cfg, B * H * (T // bk)),), grid_names=("cta",),
      num_threads=cwg + 1, thread_name="wg", kernel_name="mosaic_attention_fwd",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
  )
  return kernel(start_BN, q_BTHD, k_BTKD, v_BTKE)

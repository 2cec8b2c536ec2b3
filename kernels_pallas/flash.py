"""flash_attention: SSA / causal attention kernels behind one function with a custom VJP."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import mosaic_bwd, mosaic_fwd, ssa_bwd, ssa_fwd, tiling
from kernels_pallas.tile_io import KernelConfig, Tiles

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def input_problem(q_BTHD, k_BTKD, v_BTKE, block_size: int) -> str | None:
  """Why the kernels cannot take these inputs (shapes, dtypes, head dims, tile), or None."""
  if q_BTHD.ndim != 4 or k_BTKD.ndim != 4 or v_BTKE.ndim != 4:
    return f"expected rank-4 q, k, v; got {q_BTHD.shape}, {k_BTKD.shape}, {v_BTKE.shape}"
  B, T, H, D = q_BTHD.shape
  if k_BTKD.shape[:2] != (B, T) or v_BTKE.shape[:3] != k_BTKD.shape[:3] or k_BTKD.shape[3] != D:
    return f"shapes disagree: q {q_BTHD.shape}, k {k_BTKD.shape}, v {v_BTKE.shape}"
  if H % k_BTKD.shape[2]:
    return f"kv heads {k_BTKD.shape[2]} do not divide query heads {H}"
  dtypes = {jnp.dtype(x.dtype) for x in (q_BTHD, k_BTKD, v_BTKE)}
  if len(dtypes) != 1:
    return f"q, k, v must share one dtype, got {sorted(str(d) for d in dtypes)}"
  if dtypes.pop() not in {jnp.dtype(d) for d in SUPPORTED_DTYPES}:
    return f"dtype {q_BTHD.dtype} is not one of bfloat16, float16, float32"
  for name, dim in (("qk head dim D", D), ("v head dim E", v_BTKE.shape[3])):
    problem = tiling.head_dim_problem(dim)
    if problem:
      return f"{name}: {problem}"
  if block_size < 16 or block_size > 128 or block_size & (block_size - 1):
    return f"block size {block_size} is not a power of two in [16, 128]"
  return None


def default_tiles(block_size: int, interpret: bool, full: bool = False, dtype=jnp.bfloat16,
                  head_dims: int = 320) -> dict:
  """Per-kernel launch shapes (picked with benchmarks/attention_tune.py on an H100 at
  D=192, E=128; see kernels_pallas/NOTES.md). Interpret mode uses whole blocks (fewest grid
  steps on CPU); fp32 inputs use smaller tiles so that fp32 operands fit in shared memory."""
  if interpret or block_size < 32:
    whole = Tiles(block_size, block_size, 4, 2)
    return dict(fwd=whole, dq=whole, dkv=whole)
  b = lambda n: min(n, block_size)
  if jnp.dtype(dtype) == jnp.float32:
    small = Tiles(b(64), b(32), 4, 2)
    return dict(fwd=small, dq=small, dkv=Tiles(b(32), b(32), 4, 2))
  w = 8 if b(128) >= 128 else 4
  if full or head_dims > 320:     # wide heads: 128-key tiles would not fit two stages in shared memory
    fwd = Tiles(b(128), b(64), w, 3 if head_dims <= 320 else 2)
  else:
    fwd = Tiles(b(128), b(128), w, 2)
  small = Tiles(b(64), b(32), 4, 3)
  return dict(fwd=fwd, dq=small, dkv=small)


def tiles_problem(tiles: dict, block_size: int) -> str | None:
  """Why a per-kernel tile choice cannot work with this block size, or None."""
  for name in ("fwd", "dq", "dkv"):
    t = tiles.get(name)
    if not isinstance(t, Tiles):
      return f"tiles[{name!r}] must be a Tiles, got {t!r}"
    for what, n in (("rows", t.rows), ("cols", t.cols)):
      if n < 16 or n & (n - 1) or block_size % n:
        return f"tiles[{name!r}].{what}={n} must be a power of two >= 16 dividing block size {block_size}"
  return None


FORWARDS = ("triton", "mosaic")
BACKWARDS = ("triton", "mosaic", "mosaic_dq")   # mosaic_dq: Mosaic dQ, Triton dK/dV and sink


def make_config(q_BTHD, k_BTKD, v_BTKE, *, scale, block_size, sink_blocks, local_blocks, interpret,
                tiles=None, forward="triton", backward="triton", padded=False) -> KernelConfig:
  """Static kernel parameters for these inputs."""
  T, H, D = q_BTHD.shape[1:]
  tiles = {**default_tiles(block_size, interpret, local_blocks is None, q_BTHD.dtype,
                           q_BTHD.shape[3] + v_BTKE.shape[3]), **(tiles or {})}
  problem = tiles_problem(tiles, block_size)
  if problem:
    raise ValueError(f"flash_attention: {problem}")
  precision = jax.lax.Precision.HIGHEST if q_BTHD.dtype == jnp.float32 else None
  for name, choice, allowed in (("forward", forward, FORWARDS), ("backward", backward, BACKWARDS)):
    if choice not in allowed:
      raise ValueError(f"flash_attention: {name} must be one of {allowed}, got {choice!r}")
  mosaic = None
  if forward == "mosaic" or backward != "triton":
    problem = mosaic_fwd.input_problem(q_BTHD, k_BTKD, v_BTKE, block_size)
    if problem:
      raise ValueError(f"flash_attention: {problem}")
    mosaic = mosaic_fwd.MosaicConfig(
        scale=float(scale), tile=block_size, sink=sink_blocks if local_blocks is not None else 0,
        local=local_blocks, d_parts=mosaic_fwd.d_parts(D), groups=H // k_BTKD.shape[2],
        interpret=interpret, padded=padded)
  return KernelConfig(
      scale=float(scale), tile=block_size, sink=sink_blocks if local_blocks is not None else 0,
      local=local_blocks, seq_len=T, n_tiles=-(-T // block_size), d_parts=tiling.head_parts(D),
      e_parts=tiling.head_parts(v_BTKE.shape[3]), groups=H // k_BTKD.shape[2], interpret=interpret,
      fwd=tiles["fwd"], dq=tiles["dq"], dkv=tiles["dkv"], precision=precision, mosaic=mosaic,
      mosaic_fwd=forward == "mosaic", mosaic_dq=backward != "triton", mosaic_dkv=backward == "mosaic")


def flash_attention(q_BTHD, k_BTKD, v_BTKE, segment_ids_BT=None, *, scale: float, block_size: int = 128,
                    sink_blocks: int = 1, local_blocks: int | None = 7, interpret: bool = False,
                    check_layout: bool = True, tiles: dict | None = None, forward: str = "triton",
                    backward: str = "triton"):
  """SSA (local_blocks set) or causal Full (local_blocks=None) attention -> (o_BTHE, lse_BHT).

  segment_ids_BT: int [B, T], 0 = padding; None = one document per row. Every document must
  start at a multiple of `block_size` and be one contiguous run of its id; this is checked
  eagerly for concrete ids and by a jax.debug.callback under tracing (check_layout=False
  skips it). Document positions are derived from the segment ids. `tiles` overrides the
  per-kernel launch shapes ({"fwd" | "dq" | "dkv": Tiles}). forward="mosaic" / backward="mosaic"
  run that pass with the Mosaic GPU kernels (Hopper; mosaic_fwd.input_problem lists their
  limits); backward="mosaic_dq" runs only dQ on Mosaic (and the sink's dK/dV partials on the
  Triton sink kernel; "mosaic" runs them inside its dK/dV kernel).
  """
  problem = input_problem(q_BTHD, k_BTKD, v_BTKE, block_size)
  if problem:
    raise ValueError(f"flash_attention: {problem}")
  if local_blocks is not None and (local_blocks < 1 or sink_blocks < 0):
    raise ValueError(f"flash_attention needs local_blocks >= 1 and sink_blocks >= 0, got "
                     f"local_blocks={local_blocks}, sink_blocks={sink_blocks}")
  B, T = q_BTHD.shape[:2]
  cfg = make_config(q_BTHD, k_BTKD, v_BTKE, scale=scale, block_size=block_size, sink_blocks=sink_blocks,
                    local_blocks=local_blocks, interpret=interpret, tiles=tiles, forward=forward,
                    backward=backward, padded=segment_ids_BT is not None)
  if segment_ids_BT is None:
    seg_BT = jnp.ones((B, T), jnp.int32)
    start_BN = jnp.zeros((B, cfg.n_tiles), jnp.int32)
    end_BN = jnp.full((B, cfg.n_tiles), cfg.n_tiles - 1, jnp.int32)
  else:
    if tuple(segment_ids_BT.shape) != (B, T):
      raise ValueError(f"segment_ids must have shape {(B, T)}, got {tuple(segment_ids_BT.shape)}")
    seg_BT = jnp.asarray(segment_ids_BT).astype(jnp.int32)
    if check_layout:
      if isinstance(segment_ids_BT, jax.core.Tracer):
        tiling.check_layout_traced(seg_BT, block_size)
      else:
        tiling.check_layout_eager(seg_BT, block_size)
    start_BN, end_BN = tiling.tile_layout(seg_BT, block_size)
  return _attention(q_BTHD, k_BTKD, v_BTKE, seg_BT, start_BN, end_BN, cfg)


def _forward(q, k, v, seg, start, cfg: KernelConfig):
  if not cfg.mosaic_fwd:
    return ssa_fwd.forward(q, k, v, seg, start, cfg)
  o, lse = mosaic_fwd.forward(q, k, v, start, cfg.mosaic)
  if cfg.mosaic.padded:                     # padding rows: output 0, lse -inf (as the Triton kernel)
    valid_BT = seg != 0
    o = jnp.where(valid_BT[:, :, None, None], o, jnp.zeros((), o.dtype))
    lse = jnp.where(valid_BT[:, None, :], lse, -jnp.inf)
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, seg, start, end, cfg):
  return _forward(q, k, v, seg, start, cfg)


def _attention_fwd(q, k, v, seg, start, end, cfg):
  o, lse = _forward(q, k, v, seg, start, cfg)
  return (o, lse), (q, k, v, start, end, o, lse)


def needs_sink_pass(cfg: KernelConfig) -> bool:
  """Some query tile reaches past its local window to a sink tile."""
  return cfg.local is not None and cfg.sink > 0 and cfg.n_tiles > cfg.local


def _attention_bwd(cfg, res, cot):
  q, k, v, start, end, o, lse = res
  do, dlse = cot
  do = do.astype(q.dtype)
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)          # rows that see nothing: p = 0
  if cfg.mosaic_dq:
    dq, delta = mosaic_bwd.dq(q, k, v, o, do, lse, dlse.astype(jnp.float32), start, cfg.mosaic)
  else:
    dq, delta = ssa_bwd.dq(q, k, v, o, do, lse, dlse.astype(jnp.float32), start, cfg)
  if cfg.mosaic_dkv:                       # one launch for the local and the sink visits
    (dk, dv), sink = mosaic_bwd.dkv(q, k, v, do, lse, delta, start, end, cfg.mosaic, with_sink=needs_sink_pass(cfg))
  else:
    dk, dv = ssa_bwd.dkv(q, k, v, do, lse, delta, end, cfg)
    sink = ssa_bwd.sink_partials(q, k, v, do, lse, delta, start, end, cfg) if needs_sink_pass(cfg) else None
  if sink is not None:
    pk, pv = sink
    dk = ssa_bwd.add_sink_partials(dk, pk, start, end, cfg)
    dv = ssa_bwd.add_sink_partials(dv, pv, start, end, cfg)
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)

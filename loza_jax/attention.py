"""Attention API: one entry point, pattern dataclasses, masks, and the registry of implementations
(XLA ones in attention_xla.py, Pallas kernel adapters in attention_pallas.py, tokamax in
attention_tokamax.py). The contract is in docs/design.md.

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
from typing import Callable

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


# ----------------------------------------------------------------------------------------
# Registry and dispatch.

INTERPRET_SUFFIX = "_interpret"   # "<impl>_interpret": an interpretable impl in Pallas interpret mode


@dataclasses.dataclass(frozen=True)
class Impl:
  """A registered implementation. `fn` and `check` may be callables or lazy "module:attr" strings.

  fn(q, k, v, *, pattern, segment_ids, positions, scale) -> (o_BTHE, lse_BHT or None); an
  `interpretable` impl's fn and check also take `interpret=`, and the name "<name>_interpret"
  selects it in interpret mode (CPU as well; slow, for tests; never chosen by "auto").
  """
  name: str
  fn: Callable | str
  platforms: tuple[str, ...]
  priority: int = 0                     # higher wins under impl="auto"; negative: never chosen by "auto"
  check: Callable | str | None = None   # (pattern, q, k, v) -> None or a reason it cannot run
  returns_lse: bool = True              # False: returns (o, None); attention_with_lse cannot use it
  packed_documents: bool = True         # False: only for segment_ids=None (one document per row)
  custom_positions: bool = True         # False: derives document positions itself (positions=None only)
  interpretable: bool = False           # fn and check take `interpret=` (Pallas interpret mode)
  interpret: bool = False               # this instance runs in interpret mode

  def interpreted(self) -> Impl:
    """This impl in interpret mode: runs on CPU too, named "<name>_interpret", never auto-chosen."""
    if not self.interpretable:
      raise ValueError(f"impl {self.name!r} has no interpret mode")
    return dataclasses.replace(self, name=self.name + INTERPRET_SUFFIX, platforms=("cpu", "gpu"), priority=-20,
                               interpret=True)

  def load(self) -> Callable:
    return self._bind(self.fn)

  def load_check(self) -> Callable | None:
    return None if self.check is None else self._bind(self.check)

  def _bind(self, target: Callable | str) -> Callable:
    if not callable(target):
      module, attr = target.split(":")
      target = getattr(importlib.import_module(module), attr)
    return functools.partial(target, interpret=self.interpret) if self.interpretable else target


_REGISTRY: dict[str, Impl] = {}


def register(impl: Impl) -> None:
  """Add (or replace) an implementation in the registry."""
  _REGISTRY[impl.name] = impl


def registered() -> dict[str, Impl]:
  return dict(_REGISTRY)


def lookup(name: str) -> Impl:
  """The Impl a name selects: a registered one, or "<name>_interpret" for an interpretable one."""
  if name in _REGISTRY:
    return _REGISTRY[name]
  base = _REGISTRY.get(name.removesuffix(INTERPRET_SUFFIX)) if name.endswith(INTERPRET_SUFFIX) else None
  if base is not None and base.interpretable:
    return base.interpreted()
  interpreted = sorted(n + INTERPRET_SUFFIX for n, i in _REGISTRY.items() if i.interpretable)
  raise ValueError(f"unknown attention impl {name!r}; registered: {sorted(_REGISTRY)}, interpret mode: "
                   f"{interpreted}, or 'auto'")


register(Impl("xla_dense", "loza_jax.attention_xla:xla_dense", platforms=("cpu", "gpu", "tpu"), priority=-10))
register(Impl("xla", "loza_jax.attention_xla:xla", platforms=("cpu", "gpu", "tpu"), priority=0))
register(Impl("pallas_triton", "loza_jax.attention_pallas:triton_impl", platforms=("gpu",), priority=10,
              check="loza_jax.attention_pallas:triton_reason", custom_positions=False, interpretable=True))
register(Impl("pallas_mosaic", "loza_jax.attention_pallas:mosaic_impl", platforms=("gpu",), priority=15,
              check="loza_jax.attention_pallas:mosaic_reason", custom_positions=False, interpretable=True))
register(Impl("pallas_tpu", "kernels_pallas.tpu_attention:attention_impl", platforms=("tpu",), priority=30,
              check="kernels_pallas.tpu_attention:unsupported_reason", custom_positions=False, interpretable=True))
register(Impl("tokamax", "loza_jax.attention_tokamax:attention_impl", platforms=("gpu",), priority=20,
              check="loza_jax.attention_tokamax:unsupported_reason", returns_lse=False, packed_documents=False,
              custom_positions=False))


def reason(impl: Impl | str, pattern, q, k, v, platform: str | None = None, packed: bool = True,
           need_lse: bool = False, positions: bool = False) -> str | None:
  """Why `impl` cannot take this call, or None when it can.

  platform: default the current backend; packed: segment_ids were given; need_lse: the caller
  wants the log-sum-exp; positions: explicit positions were given.
  """
  impl = lookup(impl) if isinstance(impl, str) else impl
  platform = platform or jax.default_backend()
  if platform not in impl.platforms:
    return f"impl {impl.name!r} runs on {impl.platforms}, not on platform {platform!r}"
  if packed and not impl.packed_documents:
    return f"impl {impl.name!r} cannot express packed documents: call it with segment_ids=None"
  if positions and not impl.custom_positions:
    return (f"impl {impl.name!r} ignores `positions` (it derives document positions from segment_ids): call it "
            "with positions=None, or use impl='xla'")
  if need_lse and not impl.returns_lse:
    return f"impl {impl.name!r} returns no log-sum-exp; use attention() instead of attention_with_lse()"
  try:
    check = impl.load_check()
  except ImportError as e:
    return f"impl {impl.name!r} is not importable: {e}"
  return None if check is None else check(pattern, q, k, v)


_reason = reason   # the former private name


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
    chosen = lookup(impl)
    why = reason(chosen, pattern, q, k, v, platform, packed, need_lse, positions)
    if why:
      raise ValueError(f"attention impl {impl!r} cannot run here: {why}")
    return chosen
  for cand in sorted(_REGISTRY.values(), key=lambda i: -i.priority):
    if cand.priority < 0:
      continue  # oracles and interpreters are never chosen automatically
    if reason(cand, pattern, q, k, v, platform, packed, need_lse, positions) is None:
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
  """Attention (the contract: docs/design.md). segment_ids: int [B,T], 0 = padding; positions: document-relative.

  `impl`: "auto" | "xla_dense" | "xla" | "pallas_triton" | "pallas_mosaic" | "tokamax" | any
  registered name, or "<name>_interpret" for an interpretable one (e.g. "pallas_triton_interpret").
  An explicit impl that cannot run raises ValueError; "auto" logs its choice once per platform/pattern.
  segment_ids=None means one document per row (no padding), which some impls require.
  positions=None means document-relative positions; explicit positions run only on impls that
  honour them (xla, xla_dense): the Pallas kernels and tokamax derive positions themselves, so an
  explicit request for them raises and "auto" skips them.
  """
  o, _ = _dispatch(q_BTHD, k_BSKD, v_BSKE, pattern, segment_ids, positions, scale, impl, need_lse=False)
  return o

"""Multi-head Latent Attention (DeepSeek-V3 / LongCat-Flash) with full, SSA or blended attention."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from loza_jax import attention as attn, cache as kv_cache, context, rope
from loza_jax.config import AttentionConfig, ModelConfig
from loza_jax.layers import Dense, RMSNorm, constrain, dtype_of


def ssa_pattern(acfg: AttentionConfig) -> attn.SSA:
  return attn.SSA(acfg.block_size, acfg.sink_blocks, acfg.local_blocks)


class MLA(nn.Module):
  """MLA sublayer. `layer_type`: full | ssa | blend (α·full + (1−α)·ssa, α = clip(alpha, 0, 1))."""
  cfg: ModelConfig
  acfg: AttentionConfig
  layer_type: str = "full"
  q_latent_scale: float = 1.0    # LongCat-Flash scales the q and kv LoRA latents
  kv_latent_scale: float = 1.0

  @nn.compact
  def __call__(self, x_BTM, segment_ids_BT, positions_BT, kv=None, step=None):
    """Training/eval forward -> [B, T, M]; with a cache entry `kv` and a `Step` -> ([B, T, M], new kv)."""
    c = self.cfg
    B, T, _ = x_BTM.shape
    H, K = c.num_attention_heads, c.kv_heads
    Dn, R, E = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
    kw = dict(dtype=dt, param_dtype=pdt, init_std=c.initializer_range)
    latent_eps = c.rms_norm_eps if c.latent_norm_eps is None else c.latent_norm_eps
    norm = lambda name: RMSNorm(latent_eps, dt, pdt, axis_name="norm", name=name)

    if c.q_lora_rank:
      q_lat = Dense(c.q_lora_rank, ("embed", "q_lora"), name="q_a_proj", **kw)(x_BTM)
      q_lat = norm("q_a_layernorm")(q_lat) * self.q_latent_scale
      q = Dense(H * c.qk_head_dim, ("q_lora", "heads"), name="q_b_proj", **kw)(q_lat)
    else:
      q = Dense(H * c.qk_head_dim, ("embed", "heads"), name="q_proj", **kw)(x_BTM)
    q_BTHD = q.reshape(B, T, H, c.qk_head_dim)

    kv_a = Dense(c.kv_lora_rank + R, ("embed", "kv_lora"), name="kv_a_proj_with_mqa", **kw)(x_BTM)
    kv_lat, k_rope_BTR = kv_a[..., :c.kv_lora_rank], kv_a[..., c.kv_lora_rank:]
    ckv_BTC = norm("kv_a_layernorm")(kv_lat) * self.kv_latent_scale
    kv_b = Dense(K * (Dn + E), ("kv_lora", "kv_heads"), name="kv_b_proj", **kw)

    inv_freq, att_factor = rope.inv_frequencies(R, c.rope_theta, c.rope_scaling)
    q_rope_BTHR = rope.apply_rope(q_BTHD[..., Dn:], positions_BT, inv_freq, att_factor, c.rope_interleave)
    k_rope_BT1R = rope.apply_rope(k_rope_BTR[:, :, None, :], positions_BT, inv_freq, att_factor, c.rope_interleave)
    scale = rope.softmax_scale(c.qk_head_dim, c.rope_scaling)
    o_proj = Dense(x_BTM.shape[-1], ("heads", "embed"), name="o_proj", **kw)

    if kv is not None:
      o_BTHE, kv = self._cached(q_BTHD[..., :Dn], q_rope_BTHR, ckv_BTC, k_rope_BT1R, kv_b, positions_BT, scale,
                                kv, step)
      return o_proj(o_BTHE.astype(dt).reshape(B, T, H * E)), kv

    if context.active() and not self.is_initializing():
      run = self._context_parallel(q_BTHD[..., :Dn], q_rope_BTHR, ckv_BTC, k_rope_BT1R, kv_b, segment_ids_BT, scale)
    else:
      q_BTHD, k_BTKD, v_BTKE = expand_qkv(q_BTHD[..., :Dn], q_rope_BTHR, ckv_BTC, k_rope_BT1R, kv_b, K)
      q_BTHD = constrain(q_BTHD, ("batch", "length", "act_heads", None))
      k_BTKD = constrain(k_BTKD, ("batch", "length", "act_kv_heads", None))
      v_BTKE = constrain(v_BTKE, ("batch", "length", "act_kv_heads", None))
      run = lambda pattern: attn.attention(q_BTHD, k_BTKD, v_BTKE, pattern=pattern, segment_ids=segment_ids_BT,
                                           positions=None, scale=scale, impl=self.acfg.impl)
    if self.layer_type == "full":
      o_BTHE = run(attn.Full())
    elif self.layer_type == "ssa":
      o_BTHE = run(ssa_pattern(self.acfg))
    elif self.layer_type == "blend":
      shape = () if self.acfg.granularity == "layer" else (H,)
      axes = () if self.acfg.granularity == "layer" else ("alpha_heads",)
      alpha = self.param("alpha", nn.with_logical_partitioning(nn.initializers.ones, axes), shape, jnp.float32)
      a = jnp.clip(alpha, 0.0, 1.0)
      a = a if a.ndim == 0 else a[:, None]
      o_full = run(attn.Full()).astype(jnp.float32)
      o_ssa = run(ssa_pattern(self.acfg)).astype(jnp.float32)
      o_BTHE = (a * o_full + (1.0 - a) * o_ssa).astype(dt)
    else:
      raise ValueError(f"layer_type must be one of full|ssa|blend, got {self.layer_type!r}")
    o_BTHE = constrain(o_BTHE, ("batch", "length", "act_heads", None))
    return o_proj(o_BTHE.reshape(B, T, H * E))

  def _context_parallel(self, q_nope_BTHD, q_rope_BTHR, ckv_BTC, k_rope_BT1R, kv_b, segment_ids_BT, scale):
    """pattern -> o_BTHE with the sequence split over the `context` mesh axis (loza_jax/context.py)."""
    B, T, H, _ = q_nope_BTHD.shape
    K, Cl, a = self.cfg.kv_heads, ckv_BTC.shape[-1], self.acfg
    layout = context.Layout(context.context_size(), context.current_layout_kind())
    if self.layer_type in ("ssa", "blend"):
      context.check_split(T, layout, a.block_size, a.sink_blocks * a.block_size)
    else:
      context.check_split(T, layout)
    seg_BT = jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    q_BTHD = jnp.concatenate([q_nope_BTHD, q_rope_BTHR], axis=-1)
    lat_BTF = jnp.concatenate([ckv_BTC, k_rope_BT1R[:, :, 0].astype(ckv_BTC.dtype)], axis=-1)
    expand = lambda lat: expand_kv(lat[..., :Cl], lat[..., None, Cl:], kv_b, K, q_nope_BTHD.shape[-1])

    def run(pattern):
      if isinstance(pattern, attn.Full):
        w_CX = nn.unbox(kv_b.variables["params"]["kernel"])
        ex = context.Expand(K, q_nope_BTHD.shape[-1], kv_b.dtype)
        return context.full_attention(q_BTHD, lat_BTF, seg_BT, w_CX, ex, layout, scale, impl=a.impl)
      ext_BXF, seg_BX = context.ssa_exchange(lat_BTF, seg_BT, layout, pattern)
      k_BXKD, v_BXKE = expand(ext_BXF)
      return context.ssa_attention(q_BTHD, k_BXKD, v_BXKE, seg_BX, layout, pattern, scale, a.impl)
    return run

  def _cached(self, q_nope_BTHD, q_rope_BTHR, ckv_BTC, k_rope_BT1R, kv_b, positions_BT, scale, kv, step):
    """Attention through the cache: prefill chunks use the attention kernels for their own keys and, for
    earlier ones, the expanded form through the prefix kernel (full sublayers, kernel impls) or the absorbed
    form (XLA impls, and the SSA ring); decode uses the absorbed form over the whole cache."""
    c, a = self.cfg, self.acfg
    B, T, H, Dn = q_nope_BTHD.shape
    K, E = c.kv_heads, c.v_head_dim
    if self.layer_type not in ("full", "ssa"):
      raise ValueError(f"a {self.layer_type!r} sublayer cannot be served from a cache: sparsify the model first")
    pattern = attn.Full() if self.layer_type == "full" else ssa_pattern(a)
    sink, local = a.sink_blocks * a.block_size, a.local_blocks * a.block_size
    krope_BTR = k_rope_BT1R[:, :, 0]
    if self.layer_type == "full":
      new_kv = kv_cache.write_full(kv, ckv_BTC, krope_BTR, step)
    else:
      new_kv = kv_cache.write_ring(kv, ckv_BTC, krope_BTR, step, sink, local)

    # Absorbed projections: W_uk [C, H, Dn] maps queries into the latent space, W_uv [C, H, E] maps back.
    w = nn.unbox(kv_b.variables["params"]["kernel"]).astype(q_nope_BTHD.dtype)
    w = jnp.repeat(w.reshape(-1, K, Dn + E), H // K, axis=1)
    w_uk, w_uv = w[..., :Dn], w[..., Dn:]
    latent = lambda entry, k_pos_BS: kv_cache.latent_attention(
        jnp.einsum("bthd,chd->bthc", q_nope_BTHD, w_uk), q_rope_BTHR, entry["ckv"], entry["krope"],
        positions_BT, k_pos_BS, pattern, scale, impl=a.impl)
    key_pos = lambda entry: (entry["pos"] if "pos" in entry
                             else jnp.broadcast_to(jnp.arange(entry["ckv"].shape[1]), entry["ckv"].shape[:2]))
    to_heads = lambda o_lat: jnp.einsum("bthc,che->bthe", o_lat, w_uv.astype(jnp.float32))

    if step.decode:
      o_lat, _ = latent(new_kv, key_pos(new_kv))
      return to_heads(o_lat), new_kv

    q, k, v = expand_qkv(q_nope_BTHD, q_rope_BTHR, ckv_BTC, k_rope_BT1R, kv_b, K)
    own = kv_cache.chunk_pattern(pattern, step.start)
    if step.start == 0:
      return attn.attention(q, k, v, pattern=own, scale=scale, impl=a.impl), new_kv
    o_own, lse_own = attn.attention_with_lse(q, k, v, pattern=own, scale=scale, impl=a.impl)
    mode = kv_cache.latent_impl(a.impl)
    if self.layer_type == "full" and mode is not None:   # kernels: the expanded form, ~3.4x fewer FLOPs
      o_past, lse_past = kv_cache.expanded_past_attention(
          q, kv["ckv"], kv["krope"], lambda c, r: expand_kv(c.astype(ckv_BTC.dtype), r[:, :, None], kv_b, K, Dn),
          step.start, scale, interpret=mode == "interpret")
      return kv_cache.merge(o_own, lse_own, o_past, lse_past), new_kv
    past = kv if self.layer_type == "ssa" else {n: x[:, :step.start] for n, x in kv.items()}
    o_lat, lse_past = latent(past, key_pos(past))
    return kv_cache.merge(o_own, lse_own, to_heads(o_lat), lse_past), new_kv


def expand_qkv(q_nope_BTHD, q_rope_BTHR, ckv_BTC, k_rope_BT1R, kv_b: Dense, K: int):
  """Per-head (q, k, v) from the latent: k = [kv_b(ckv) key half, the shared RoPE key], v = value half."""
  q = jnp.concatenate([q_nope_BTHD, q_rope_BTHR], axis=-1)
  return (q,) + expand_kv(ckv_BTC, k_rope_BT1R, kv_b, K, q_nope_BTHD.shape[-1])


def expand_kv(ckv_BTC, k_rope_BT1R, kv_b, K: int, Dn: int):
  """Per-head (k, v) from the latent and the shared RoPE key."""
  B, T, _ = ckv_BTC.shape
  kv = kv_b(ckv_BTC).reshape(B, T, K, -1)
  R = k_rope_BT1R.shape[-1]
  k = jnp.concatenate([kv[..., :Dn], jnp.broadcast_to(k_rope_BT1R, (B, T, K, R)).astype(kv.dtype)], -1)
  return k, kv[..., Dn:]


def attend(mla: MLA, h_BTM, segment_ids_BT, positions_BT, kv, step):
  """Run one MLA sublayer with or without its cache entry; kv is a 1-tuple of entries or None.

  Returns (output [B, T, M], (new entry,) or None), so layers thread caches without branching.
  """
  if kv is None:
    return mla(h_BTM, segment_ids_BT, positions_BT), None
  o, entry = mla(h_BTM, segment_ids_BT, positions_BT, kv[0], step)
  return o, (entry,)

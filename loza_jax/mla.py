"""Multi-head Latent Attention (DeepSeek-V3 / LongCat-Flash) with full, SSA or blended attention."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from loza_jax import attention as attn
from loza_jax import rope
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
  def __call__(self, x_BTM, segment_ids_BT, positions_BT):
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
    kv_lat = norm("kv_a_layernorm")(kv_lat) * self.kv_latent_scale
    kv = Dense(K * (Dn + E), ("kv_lora", "kv_heads"), name="kv_b_proj", **kw)(kv_lat).reshape(B, T, K, Dn + E)
    k_nope_BTKD, v_BTKE = kv[..., :Dn], kv[..., Dn:]

    inv_freq, att_factor = rope.inv_frequencies(R, c.rope_theta, c.rope_scaling)
    q_rope = rope.apply_rope(q_BTHD[..., Dn:], positions_BT, inv_freq, att_factor, c.rope_interleave)
    k_rope = rope.apply_rope(k_rope_BTR[:, :, None, :], positions_BT, inv_freq, att_factor, c.rope_interleave)
    q_BTHD = jnp.concatenate([q_BTHD[..., :Dn], q_rope], axis=-1)
    k_BTKD = jnp.concatenate([k_nope_BTKD, jnp.broadcast_to(k_rope, (B, T, K, R)).astype(k_nope_BTKD.dtype)], -1)
    q_BTHD = constrain(q_BTHD, ("batch", "length", "act_heads", None))
    k_BTKD = constrain(k_BTKD, ("batch", "length", "act_kv_heads", None))
    v_BTKE = constrain(v_BTKE, ("batch", "length", "act_kv_heads", None))

    scale = rope.softmax_scale(c.qk_head_dim, c.rope_scaling)
    run = lambda pattern: attn.attention(q_BTHD, k_BTKD, v_BTKE, pattern=pattern, segment_ids=segment_ids_BT,
                                         positions=positions_BT, scale=scale, impl=self.acfg.impl)
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
    return Dense(x_BTM.shape[-1], ("heads", "embed"), name="o_proj", **kw)(o_BTHE.reshape(B, T, H * E))

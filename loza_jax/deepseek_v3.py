"""DeepSeek-V3 decoder layer (architecture `deepseek_v3`): MLA, first-k dense layers, then MoE with shared experts."""
from __future__ import annotations

import flax.linen as nn

from loza_jax.config import Config, ModelConfig
from loza_jax.layers import RMSNorm, SwiGLU, constrain, dtype_of
from loza_jax.mla import MLA, attend
from loza_jax.moe import MoE


def lora_scales(c: ModelConfig) -> tuple[float, float]:
  """(q, kv) latent multipliers: sqrt(hidden/rank) where LongCat's mla_scale_*_lora is on, else 1."""
  q = (c.hidden_size / c.q_lora_rank) ** 0.5 if c.mla_scale_q_lora and c.q_lora_rank else 1.0
  kv = (c.hidden_size / c.kv_lora_rank) ** 0.5 if c.mla_scale_kv_lora else 1.0
  return q, kv


class DeepseekV3Layer(nn.Module):
  """x + MLA(norm(x)), then x + MLP(norm(x)) with a dense SwiGLU (first k layers) or the MoE."""
  config: Config
  layer_types: tuple[str]
  index: int

  @nn.compact
  def __call__(self, x_BTM, segment_ids_BT, positions_BT, kv=None, step=None):
    c = self.config.model
    dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
    h = RMSNorm(c.rms_norm_eps, dt, pdt, name="input_layernorm")(x_BTM)
    q_scale, kv_scale = lora_scales(c)
    mla = MLA(c, self.config.attention, self.layer_types[0], q_scale, kv_scale, name="self_attn")
    o, kv = attend(mla, h, segment_ids_BT, positions_BT, kv, step)
    x_BTM = x_BTM + o
    h = RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x_BTM)
    if self.index >= c.first_k_dense_replace:
      x_BTM = x_BTM + MoE(c, "grouped_sigmoid", name="mlp")(h)
    else:
      x_BTM = x_BTM + SwiGLU(c.intermediate_size, dt, pdt, c.initializer_range, name="mlp")(h)
    return constrain(x_BTM, ("batch", "length", "act_embed")), kv

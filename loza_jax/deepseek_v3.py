"""DeepSeek-V3 decoder (architecture `deepseek_v3`): MLA, first-k dense layers, then MoE with shared experts."""
from __future__ import annotations

import flax.linen as nn

from loza_jax.attention import document_positions
from loza_jax.config import Config, ModelConfig
from loza_jax.layers import RMSNorm, SwiGLU, check_architecture, constrain, dtype_of, embed_tokens, final_output
from loza_jax.mla import MLA
from loza_jax.moe import MoE


def lora_scales(c: ModelConfig) -> tuple[float, float]:
  """(q, kv) latent multipliers: sqrt(hidden/rank) where LongCat's mla_scale_*_lora is on, else 1."""
  q = (c.hidden_size / c.q_lora_rank) ** 0.5 if c.mla_scale_q_lora and c.q_lora_rank else 1.0
  kv = (c.hidden_size / c.kv_lora_rank) ** 0.5 if c.mla_scale_kv_lora else 1.0
  return q, kv


class DeepseekV3Layer(nn.Module):
  """x + MLA(norm(x)), then x + MLP(norm(x)) with a dense SwiGLU or the MoE."""
  config: Config
  layer_type: str
  use_moe: bool

  @nn.compact
  def __call__(self, x_BTM, segment_ids_BT, positions_BT):
    c = self.config.model
    dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
    h = RMSNorm(c.rms_norm_eps, dt, pdt, name="input_layernorm")(x_BTM)
    q_scale, kv_scale = lora_scales(c)
    x_BTM = x_BTM + MLA(c, self.config.attention, self.layer_type, q_scale, kv_scale, name="self_attn")(
        h, segment_ids_BT, positions_BT)
    h = RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x_BTM)
    if self.use_moe:
      x_BTM = x_BTM + MoE(c, "grouped_sigmoid", name="mlp")(h)
    else:
      x_BTM = x_BTM + SwiGLU(c.intermediate_size, dt, pdt, c.initializer_range, name="mlp")(h)
    return constrain(x_BTM, ("batch", "length", "act_embed"))


class DeepseekV3Transformer(nn.Module):
  """tokens [B, T] -> logits [B, T, V] (or final normed hidden states with return_hidden=True)."""
  config: Config

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, return_hidden: bool = False):
    cfg = self.config
    c = cfg.model
    check_architecture(c.architecture, "deepseek_v3")
    positions_BT = document_positions(tokens_BT, segment_ids_BT, positions_BT)
    embed = embed_tokens(c)
    x_BTM = constrain(embed(tokens_BT), ("batch", "length", "act_embed"))
    layer_cls = nn.remat(DeepseekV3Layer) if c.remat else DeepseekV3Layer
    for i, layer_type in enumerate(cfg.layer_types):
      x_BTM = layer_cls(cfg, layer_type, i >= c.first_k_dense_replace, name=f"layers_{i}")(
          x_BTM, segment_ids_BT, positions_BT)
    return final_output(self, embed, x_BTM, c, return_hidden)

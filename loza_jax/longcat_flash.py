"""LongCat-Flash decoder (architecture `longcat_flash`).

Each layer: two MLA sublayers (attention sublayer index 2·layer + i), two dense SwiGLU MLPs, and a
shortcut-connected MoE fed by the first post-attention norm and added at the end of the layer.
"""
from __future__ import annotations

import flax.linen as nn

from loza_jax.attention import document_positions
from loza_jax.config import Config
from loza_jax.deepseek_v3 import lora_scales
from loza_jax.layers import RMSNorm, SwiGLU, check_architecture, constrain, dtype_of, embed_tokens, final_output
from loza_jax.mla import MLA
from loza_jax.moe import MoE


class LongcatFlashLayer(nn.Module):
  """Two (norm, MLA, norm, MLP) halves; the MoE reads the first post-attention norm's output."""
  config: Config
  layer_types: tuple[str, str]

  @nn.compact
  def __call__(self, x_BTM, segment_ids_BT, positions_BT):
    c = self.config.model
    dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
    q_scale, kv_scale = lora_scales(c)
    moe_BTM = None
    for i, layer_type in enumerate(self.layer_types):
      h = RMSNorm(c.rms_norm_eps, dt, pdt, name=f"input_layernorm_{i}")(x_BTM)
      x_BTM = x_BTM + MLA(c, self.config.attention, layer_type, q_scale, kv_scale, name=f"self_attn_{i}")(
          h, segment_ids_BT, positions_BT)
      h = RMSNorm(c.rms_norm_eps, dt, pdt, name=f"post_attention_layernorm_{i}")(x_BTM)
      if i == 0:
        moe_BTM = MoE(c, "softmax", name="mlp")(h)
      x_BTM = x_BTM + SwiGLU(c.intermediate_size, dt, pdt, c.initializer_range, name=f"mlps_{i}")(h)
    return constrain(x_BTM + moe_BTM, ("batch", "length", "act_embed"))


class LongcatFlashTransformer(nn.Module):
  """tokens [B, T] -> logits [B, T, V] (or final normed hidden states with return_hidden=True)."""
  config: Config

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, return_hidden: bool = False):
    cfg = self.config
    c = cfg.model
    check_architecture(c.architecture, "longcat_flash")
    positions_BT = document_positions(tokens_BT, segment_ids_BT, positions_BT)
    embed = embed_tokens(c)
    x_BTM = constrain(embed(tokens_BT), ("batch", "length", "act_embed"))
    types = cfg.layer_types
    layer_cls = nn.remat(LongcatFlashLayer) if c.remat else LongcatFlashLayer
    for i in range(c.num_hidden_layers):
      x_BTM = layer_cls(cfg, (types[2 * i], types[2 * i + 1]), name=f"layers_{i}")(x_BTM, segment_ids_BT, positions_BT)
    return final_output(self, embed, x_BTM, c, return_hidden)

"""LongCat-Flash decoder layer (architecture `longcat_flash`).

Each layer: two MLA sublayers (attention sublayer index 2·layer + i), two dense SwiGLU MLPs, and a
shortcut-connected MoE fed by the first post-attention norm and added at the end of the layer.
"""
from __future__ import annotations

import flax.linen as nn

from loza_jax.config import Config
from loza_jax.deepseek_v3 import lora_scales
from loza_jax.layers import RMSNorm, SwiGLU, constrain, dtype_of
from loza_jax.mla import MLA, attend
from loza_jax.moe import MoE


class LongcatFlashLayer(nn.Module):
  """Two (norm, MLA, norm, MLP) halves; the MoE reads the first post-attention norm's output."""
  config: Config
  layer_types: tuple[str, str]
  index: int

  @nn.compact
  def __call__(self, x_BTM, segment_ids_BT, positions_BT, kv=None, step=None):
    c = self.config.model
    dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
    q_scale, kv_scale = lora_scales(c)
    moe_BTM = None
    new_kv = []
    for i, layer_type in enumerate(self.layer_types):
      h = RMSNorm(c.rms_norm_eps, dt, pdt, name=f"input_layernorm_{i}")(x_BTM)
      mla = MLA(c, self.config.attention, layer_type, q_scale, kv_scale, name=f"self_attn_{i}")
      o, entry = attend(mla, h, segment_ids_BT, positions_BT, None if kv is None else kv[i:i + 1], step)
      new_kv += entry or []
      x_BTM = x_BTM + o
      h = RMSNorm(c.rms_norm_eps, dt, pdt, name=f"post_attention_layernorm_{i}")(x_BTM)
      if i == 0:
        moe_BTM = MoE(c, "softmax", name="mlp")(h)
      x_BTM = x_BTM + SwiGLU(c.intermediate_size, dt, pdt, c.initializer_range, name=f"mlps_{i}")(h)
    return constrain(x_BTM + moe_BTM, ("batch", "length", "act_embed")), (None if kv is None else tuple(new_kv))

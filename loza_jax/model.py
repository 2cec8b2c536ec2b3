"""The decoder-only MLA language model (architecture `loza`): embed, N x (MLA + SwiGLU), norm, head."""
from __future__ import annotations

import re

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from loza_jax.attention import document_positions
from loza_jax.config import Config
from loza_jax.layers import RMSNorm, SwiGLU, check_architecture, constrain, dtype_of, embed_tokens, final_output
from loza_jax.mla import MLA


class DecoderLayer(nn.Module):
  """Pre-norm residual block: x + MLA(norm(x)), then x + MLP(norm(x))."""
  config: Config
  layer_type: str

  @nn.compact
  def __call__(self, x_BTM, segment_ids_BT, positions_BT):
    c = self.config.model
    dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
    h = RMSNorm(c.rms_norm_eps, dt, pdt, name="input_layernorm")(x_BTM)
    x_BTM = x_BTM + MLA(c, self.config.attention, self.layer_type, name="self_attn")(h, segment_ids_BT, positions_BT)
    h = RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x_BTM)
    x_BTM = x_BTM + SwiGLU(c.intermediate_size, dt, pdt, c.initializer_range, name="mlp")(h)
    return constrain(x_BTM, ("batch", "length", "act_embed"))


class Transformer(nn.Module):
  """tokens [B, T] -> logits [B, T, V] (or final normed hidden states with return_hidden=True)."""
  config: Config

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, return_hidden: bool = False):
    cfg = self.config
    c = cfg.model
    check_architecture(c.architecture, "loza")
    positions_BT = document_positions(tokens_BT, segment_ids_BT, positions_BT)
    embed = embed_tokens(c)
    x_BTM = constrain(embed(tokens_BT), ("batch", "length", "act_embed"))
    layer_cls = nn.remat(DecoderLayer) if c.remat else DecoderLayer
    for i, layer_type in enumerate(cfg.layer_types):
      x_BTM = layer_cls(cfg, layer_type, name=f"layers_{i}")(x_BTM, segment_ids_BT, positions_BT)
    return final_output(self, embed, x_BTM, c, return_hidden)


def build_model(cfg: Config) -> nn.Module:
  """The Linen module for cfg.model.architecture."""
  if cfg.model.architecture == "loza":
    return Transformer(cfg)
  if cfg.model.architecture == "deepseek_v3":
    from loza_jax.deepseek_v3 import DeepseekV3Transformer
    return DeepseekV3Transformer(cfg)
  if cfg.model.architecture == "longcat_flash":
    from loza_jax.longcat_flash import LongcatFlashTransformer
    return LongcatFlashTransformer(cfg)
  raise ValueError(f"model.architecture {cfg.model.architecture!r} is not implemented yet")


def init_params(cfg: Config, rng: jax.Array, seq_len: int = 8):
  """Boxed (logically partitioned) params for cfg; unbox with nn.unbox / nn.meta.unbox."""
  model = build_model(cfg)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return model.init(rng, tokens)["params"]


def alpha_paths(params) -> list[tuple[str, ...]]:
  """Paths of all blend alpha parameters, in attention-sublayer order.

  Ordered by the numbers in the path (layers_2 before layers_10; LongCat's layers_i/self_attn_j
  as 2i + j), not by dict order: pytrees come back from jit and orbax with sorted string keys.
  """
  flat = traverse_util.flatten_dict(nn.unbox(params))
  numbers = lambda path: [int(n) for part in path for n in re.findall(r"\d+", str(part))]
  return sorted((k for k in flat if k[-1] == "alpha"), key=numbers)

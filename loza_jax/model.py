"""The decoder-only MLA language model: one stack for every architecture (`loza`, `deepseek_v3`, `longcat_flash`)."""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from loza_jax import context
from loza_jax.attention import document_positions
from loza_jax.cache import Cache, Step
from loza_jax.config import Config
from loza_jax.deepseek_v3 import DeepseekV3Layer
from loza_jax.layers import RMSNorm, SwiGLU, constrain, dtype_of, embed_tokens, final_output
from loza_jax.longcat_flash import LongcatFlashLayer
from loza_jax.mla import MLA, attend


class DecoderLayer(nn.Module):
  """Pre-norm residual block (architecture `loza`): x + MLA(norm(x)), then x + MLP(norm(x))."""
  config: Config
  layer_types: tuple[str]
  index: int

  @nn.compact
  def __call__(self, x_BTM, segment_ids_BT, positions_BT, kv=None, step=None):
    c = self.config.model
    dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
    h = RMSNorm(c.rms_norm_eps, dt, pdt, name="input_layernorm")(x_BTM)
    mla = MLA(c, self.config.attention, self.layer_types[0], name="self_attn")
    o, kv = attend(mla, h, segment_ids_BT, positions_BT, kv, step)
    x_BTM = x_BTM + o
    h = RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x_BTM)
    x_BTM = x_BTM + SwiGLU(c.intermediate_size, dt, pdt, c.initializer_range, name="mlp")(h)
    return constrain(x_BTM, ("batch", "length", "act_embed")), kv


LAYERS = {"loza": DecoderLayer, "deepseek_v3": DeepseekV3Layer, "longcat_flash": LongcatFlashLayer}


class Transformer(nn.Module):
  """The decoder stack of every architecture: embed, N layers (`LAYERS[architecture]`), norm, head.

  tokens [B, T] -> logits [B, T, V] (or final normed hidden states with return_hidden=True).
  With a `cache` (loza_jax.cache.Cache) the call is a prefill chunk at `prefill_start` of
  prompts with `prompt_lengths_B` real tokens, or (prefill_start=None) one decode token per row;
  it then returns (logits, new cache). `logits_at_B` keeps one position per row ([B, 1, V]).
  """
  config: Config

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, return_hidden: bool = False,
               cache: Cache | None = None, prefill_start: int | None = None, prompt_lengths_B=None,
               logits_at_B=None):
    cfg = self.config
    c = cfg.model
    layer_cls = LAYERS.get(c.architecture)
    if layer_cls is None:
      raise ValueError(f"model.architecture {c.architecture!r} is not implemented yet")
    step = None
    if cache is not None:
      step, positions_BT = _cache_step(tokens_BT, segment_ids_BT, positions_BT, cache, prefill_start,
                                       prompt_lengths_B)
    positions_BT = document_positions(tokens_BT, segment_ids_BT, positions_BT)
    zigzag = _zigzag_layout(tokens_BT.shape[1]) if cache is None and not self.is_initializing() else None
    aligned = None
    if zigzag:   # context parallelism: every layer sees the balanced zig-zag order, undone before the head
      if segment_ids_BT is not None and any(t in ("ssa", "blend") for t in cfg.layer_types):
        aligned = context.documents_aligned(segment_ids_BT, cfg.attention.block_size)
      to_zz = lambda x: None if x is None else context.relayout(x, context.Layout(zigzag.C), zigzag)
      tokens_BT, segment_ids_BT, positions_BT = to_zz(tokens_BT), to_zz(segment_ids_BT), to_zz(positions_BT)
    embed = embed_tokens(c)
    x_BTM = constrain(embed(tokens_BT), ("batch", "length", "act_embed"))
    if aligned is not None:
      x_BTM = jnp.where(aligned, x_BTM, jnp.nan)
    if c.remat and cache is None:
      layer_cls = nn.remat(layer_cls)
    n = c.attention_sublayers_per_layer
    new_layers = []
    with context.use_layout(zigzag.kind if zigzag else "contiguous"):
      for i in range(c.num_hidden_layers):
        layer = layer_cls(cfg, cfg.layer_types[n * i:n * (i + 1)], i, name=f"layers_{i}")
        if cache is None:
          x_BTM, _ = layer(x_BTM, segment_ids_BT, positions_BT)
        else:
          x_BTM, kv = layer(x_BTM, segment_ids_BT, positions_BT, cache.layers[n * i:n * (i + 1)], step)
          new_layers += kv
    if zigzag:
      x_BTM = context.relayout(x_BTM, zigzag, context.Layout(zigzag.C))
    if logits_at_B is not None:
      x_BTM = jnp.take_along_axis(x_BTM, logits_at_B[:, None, None], axis=1)
    out = final_output(self, embed, x_BTM, c, return_hidden)
    if cache is None:
      return out
    if step.decode:
      lengths_B = cache.lengths_B + 1
    else:
      lengths_B = jnp.maximum(cache.lengths_B, jnp.minimum(prompt_lengths_B, prefill_start + tokens_BT.shape[1]))
    return out, Cache(lengths_B.astype(jnp.int32), tuple(new_layers))


def _zigzag_layout(T: int) -> context.Layout | None:
  """The zig-zag layout when the sequence goes through the context-parallel path, else None."""
  if not context.active():
    return None
  layout = context.Layout(context.context_size(), "zigzag")
  context.check_split(T, layout)
  return layout


def _cache_step(tokens_BT, segment_ids_BT, positions_BT, cache: Cache, start, prompt_lengths_B):
  """The Step and absolute positions of a cached call (prefill chunk or decode token)."""
  B, T = tokens_BT.shape
  if segment_ids_BT is not None or positions_BT is not None:
    raise ValueError("a cached call takes no segment_ids or positions: rows are single right-padded prompts")
  if cache.lengths_B.shape != (B,):
    raise ValueError(f"cache holds {cache.lengths_B.shape[0]} rows but tokens have shape {tokens_BT.shape}")
  if start is None:
    if T != 1:
      raise ValueError(f"a decode call takes one token per row, got tokens of shape {tokens_BT.shape}")
    return Step(None, cache.lengths_B), cache.lengths_B[:, None]
  if prompt_lengths_B is None:
    raise ValueError("a prefill call needs prompt_lengths_B (real prompt tokens per row)")
  positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
  return Step(start, jnp.asarray(prompt_lengths_B, jnp.int32)), positions


def build_model(cfg: Config) -> nn.Module:
  """The Linen module for cfg.model.architecture."""
  if cfg.model.architecture not in LAYERS:
    raise ValueError(f"model.architecture {cfg.model.architecture!r} is not implemented yet")
  return Transformer(cfg)


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

"""Small Linen building blocks: RMSNorm, SwiGLU MLP, dense projections with logical axes."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from loza_jax.config import ModelConfig


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def constrain(x, axes: Sequence[str | None]):
  """Logical sharding annotation on an activation (a no-op outside a logical-rules context)."""
  return nn.with_logical_constraint(x, tuple(axes))


class RMSNorm(nn.Module):
  """RMS normalisation in fp32 with a learned scale (init 1)."""
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Dense(nn.Module):
  """Bias-free projection from the last dim to `features`, with logical axis names for its kernel."""
  features: int
  axes: tuple[str, str]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class SwiGLU(nn.Module):
  """gate/up/down MLP with SiLU gating (LLaMA / DeepSeek dense MLP)."""
  intermediate_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x_BTM):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std)
    gate = Dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x_BTM)
    up = Dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x_BTM)
    h = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return Dense(x_BTM.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(h)


def embed_tokens(c: ModelConfig) -> nn.Embed:
  """The token embedding [V, M] named `embed_tokens`; call from inside a compact __call__."""
  return nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype),
                  name="embed_tokens", embedding_init=nn.with_logical_partitioning(
                      nn.initializers.normal(c.initializer_range), ("vocab", "embed")))


def output_logits(module: nn.Module, embed: nn.Embed, x_BTM, c: ModelConfig):
  """Final hidden states -> fp32 logits [B, T, V] (tied embedding or `lm_head` [M, V]); call inside __call__."""
  dt = dtype_of(c.dtype)
  if c.tie_word_embeddings:
    logits = embed.attend(x_BTM)
  else:
    kernel = module.param("lm_head", nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range),
                                                                  ("embed", "vocab")),
                          (c.hidden_size, c.vocab_size), dtype_of(c.param_dtype))
    logits = jnp.dot(x_BTM.astype(dt), kernel.astype(dt))
  return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def final_output(module: nn.Module, embed: nn.Embed, x_BTM, c: ModelConfig, return_hidden: bool):
  """Final RMSNorm `norm`, then the hidden states (return_hidden) or fp32 logits; call inside __call__."""
  x_BTM = RMSNorm(c.rms_norm_eps, dtype_of(c.dtype), dtype_of(c.param_dtype), name="norm")(x_BTM)
  return x_BTM if return_hidden else output_logits(module, embed, x_BTM, c)


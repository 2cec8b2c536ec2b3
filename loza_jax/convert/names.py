"""The one table of HF tensor names <-> our parameter paths, used by both import and export.

A torch Linear weight [out, in] is our Dense kernel [in, out] ("linear": transpose); norms, the
embedding and the router's correction bias copy as they are. Experts are stacked in our tree
([X, ...]); each HF expert tensor fills one slice.
"""
from __future__ import annotations

import dataclasses
import re

from loza_jax.config import Config, ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """HF tensor `hf_name` is slice `expert` (None = whole) of our param `path`, transposed if kind == 'linear'."""
  hf_name: str
  path: Path
  kind: str                  # "linear" | "copy"
  expert: int | None = None


def _linear(hf: str, path: Path) -> TensorSpec:
  return TensorSpec(f"{hf}.weight", path + ("kernel",), "linear")


def _norm(hf: str, path: Path) -> TensorSpec:
  return TensorSpec(f"{hf}.weight", path + ("scale",), "copy")


def _mla(hf: str, path: Path, c: ModelConfig) -> list[TensorSpec]:
  specs = []
  if c.q_lora_rank:
    specs += [_linear(f"{hf}.q_a_proj", path + ("q_a_proj",)), _norm(f"{hf}.q_a_layernorm", path + ("q_a_layernorm",)),
              _linear(f"{hf}.q_b_proj", path + ("q_b_proj",))]
  else:
    specs.append(_linear(f"{hf}.q_proj", path + ("q_proj",)))
  return specs + [_linear(f"{hf}.kv_a_proj_with_mqa", path + ("kv_a_proj_with_mqa",)),
                  _norm(f"{hf}.kv_a_layernorm", path + ("kv_a_layernorm",)),
                  _linear(f"{hf}.kv_b_proj", path + ("kv_b_proj",)), _linear(f"{hf}.o_proj", path + ("o_proj",))]


def _mlp(hf: str, path: Path) -> list[TensorSpec]:
  return [_linear(f"{hf}.{p}", path + (p,)) for p in ("gate_proj", "up_proj", "down_proj")]


def _experts(hf: str, path: Path, c: ModelConfig) -> list[TensorSpec]:
  return [TensorSpec(f"{hf}.{e}.{p}.weight", path + (p,), "linear", e)
          for e in range(c.n_routed_experts) for p in ("gate_proj", "up_proj", "down_proj")]


def tensor_specs(cfg: Config) -> list[TensorSpec]:
  """Every HF tensor of a deepseek_v3 / longcat_flash model, in checkpoint order."""
  c = cfg.model
  specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), "copy")]
  for i in range(c.num_hidden_layers):
    hf, us = f"model.layers.{i}", (f"layers_{i}",)
    if c.architecture == "deepseek_v3":
      specs += [_norm(f"{hf}.input_layernorm", us + ("input_layernorm",))]
      specs += _mla(f"{hf}.self_attn", us + ("self_attn",), c)
      specs += [_norm(f"{hf}.post_attention_layernorm", us + ("post_attention_layernorm",))]
      if i < c.first_k_dense_replace:
        specs += _mlp(f"{hf}.mlp", us + ("mlp",))
      else:
        specs += [TensorSpec(f"{hf}.mlp.gate.weight", us + ("mlp", "router", "kernel"), "linear"),
                  TensorSpec(f"{hf}.mlp.gate.e_score_correction_bias",
                             us + ("mlp", "router", "e_score_correction_bias"), "copy")]
        specs += _experts(f"{hf}.mlp.experts", us + ("mlp", "experts"), c)
        if c.n_shared_experts:
          specs += _mlp(f"{hf}.mlp.shared_experts", us + ("mlp", "shared_experts"))
    elif c.architecture == "longcat_flash":
      for j in (0, 1):
        specs += [_norm(f"{hf}.input_layernorm.{j}", us + (f"input_layernorm_{j}",))]
        specs += _mla(f"{hf}.self_attn.{j}", us + (f"self_attn_{j}",), c)
        specs += [_norm(f"{hf}.post_attention_layernorm.{j}", us + (f"post_attention_layernorm_{j}",))]
        specs += _mlp(f"{hf}.mlps.{j}", us + (f"mlps_{j}",))
      specs += [TensorSpec(f"{hf}.mlp.router.classifier.weight", us + ("mlp", "router", "kernel"), "linear"),
                TensorSpec(f"{hf}.mlp.router.e_score_correction_bias",
                           us + ("mlp", "router", "e_score_correction_bias"), "copy")]
      specs += _experts(f"{hf}.mlp.experts", us + ("mlp", "experts"), c)
    else:
      raise ValueError(f"model.architecture {c.architecture!r} has no HuggingFace tensor layout "
                       "(deepseek_v3 or longcat_flash)")
  specs.append(TensorSpec("model.norm.weight", ("norm", "scale"), "copy"))
  if not c.tie_word_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head",), "linear"))
  return specs


def zero_expert_specs(cfg: Config) -> list[str]:
  """Names transformers >= 5 writes for LongCat's zero experts (gate/up rows it never reads)."""
  c = cfg.model
  if c.architecture != "longcat_flash":
    return []
  return [f"model.layers.{i}.mlp.experts.{e}.{p}.weight" for i in range(c.num_hidden_layers)
          for e in range(c.n_routed_experts, c.n_routed_experts + c.zero_expert_num) for p in ("gate_proj", "up_proj")]


_MTP_LONGCAT = re.compile(r"^model\.mtp\.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_ROTARY = re.compile(r"\.rotary_emb\.inv_freq$")


def ignore_rule(cfg: Config, mtp_layers: int = 0):
  """f(name) -> why a checkpoint tensor that no spec names is safe to skip, or None if it is unexpected."""
  c = cfg.model
  zero_names = frozenset(zero_expert_specs(cfg))

  def reason(name: str) -> str | None:
    if _ROTARY.search(name):
      return "RoPE buffer (recomputed)"
    if c.architecture == "longcat_flash" and _MTP_LONGCAT.match(name):
      return "multi-token-prediction head (not used by the causal LM)"
    if name in zero_names:
      return "zero-expert gate/up placeholder (identity experts have no weights)"
    m = _LAYER.match(name)
    if (c.architecture == "deepseek_v3" and m and mtp_layers
        and c.num_hidden_layers <= int(m.group(1)) < c.num_hidden_layers + mtp_layers):
      return "multi-token-prediction layer (not used by the causal LM)"
    return None
  return reason

"""HuggingFace config.json <-> loza_jax Config for DeepSeek-V3 and LongCat-Flash (+ LongCat ZigZag sparsity).

Every key of an imported config.json is either mapped, checked against the one value we support,
or known to leave the forward pass unchanged; anything else is reported in one ValueError.
"""
from __future__ import annotations

import math
from typing import Any

from loza_jax.config import DTYPES, AttentionConfig, Config, ModelConfig, RopeScaling

HF_LATENT_NORM_EPS = 1e-6     # transformers builds q_a_layernorm / kv_a_layernorm with the default eps
ZIGZAG_BLOCK_SIZE = 128       # the LongCat ZigZag release's SSA block size

ARCHITECTURES = {  # HF model_type -> (our architecture, HF class)
    "deepseek_v3": ("deepseek_v3", "DeepseekV3ForCausalLM"),
    "longcat_flash": ("longcat_flash", "LongcatFlashForCausalLM"),
}
DEFAULT_THETA = {"deepseek_v3": 10000.0, "longcat_flash": 10000000.0}

# Keys that do not change the forward pass (metadata, generation, training-only or parallelism hints).
IGNORED = {"_name_or_path", "architectures", "model_type", "transformers_version", "auto_map", "bos_token_id",
           "eos_token_id", "pad_token_id", "use_cache", "output_router_logits", "router_aux_loss_coef",
           "aux_loss_alpha", "seq_aux", "ep_size", "pretraining_tp", "num_nextn_predict_layers", "num_mtp_layers",
           "nextn_use_scmoe", "router_dtype", "params_dtype", "tokenizer_class", "return_dict", "disable_quant_module"}
COMMON = {"vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank",
          "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "qk_head_dim", "head_dim", "max_position_embeddings",
          "rms_norm_eps", "tie_word_embeddings", "initializer_range", "rope_theta", "rope_scaling", "rope_parameters",
          "torch_dtype", "dtype", "hidden_act", "attention_bias", "attention_dropout", "n_routed_experts",
          "routed_scaling_factor", "streaming_sparse_attention"}
MAPPED = {
    "deepseek_v3": COMMON | {"num_hidden_layers", "intermediate_size", "moe_intermediate_size", "n_shared_experts",
                             "n_group", "topk_group", "num_experts_per_tok", "first_k_dense_replace",
                             "norm_topk_prob", "rope_interleave", "topk_method", "scoring_func", "moe_layer_freq"},
    "longcat_flash": COMMON | {"num_layers", "num_hidden_layers", "ffn_hidden_size", "expert_ffn_hidden_size",
                               "moe_topk", "zero_expert_num", "zero_expert_type", "mla_scale_q_lora",
                               "mla_scale_kv_lora", "router_bias", "attention_method", "norm_topk_prob"},
}
ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor"}


def _yarn_mscale(scale: float, mscale: float) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_from_hf(hf: dict, model_type: str, problems: list[str]) -> tuple[float, RopeScaling | None]:
  """(rope_theta, YaRN scaling or None) from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling`."""
  params = dict(hf.get("rope_scaling") or {})
  params.update(hf.get("rope_parameters") or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", DEFAULT_THETA[model_type])))
  unknown = sorted(set(params) - ROPE_KEYS)
  if unknown:
    problems.append(f"rope parameters {unknown} are not supported (known: {sorted(ROPE_KEYS)})")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    problems.append(f"rope partial_rotary_factor={params['partial_rotary_factor']} is not supported (need 1.0)")
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind != "yarn":
    problems.append(f"rope_type {kind!r} is not supported (default or yarn)")
    return theta, None
  if "original_max_position_embeddings" not in params:
    problems.append("yarn rope needs original_max_position_embeddings")
    return theta, None
  orig = int(params["original_max_position_embeddings"])
  factor = params.get("factor") or hf.get("max_position_embeddings", orig) / orig
  mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim") or 0.0
  return theta, RopeScaling(
      factor=float(factor), original_max_position_embeddings=orig,
      beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
      mscale=float(mscale) if mscale else 0.0, mscale_all_dim=float(mscale_all_dim),
      attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
      truncate=bool(params.get("truncate", True)))


def rope_to_hf(scaling: RopeScaling | None) -> dict | None:
  """Legacy `rope_scaling` dict (read by transformers 4.x/5.x, vLLM and SGLang alike)."""
  if scaling is None:
    return None
  out = {"type": "yarn", "rope_type": "yarn", "factor": scaling.factor,
         "original_max_position_embeddings": scaling.original_max_position_embeddings,
         "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow, "mscale": scaling.mscale,
         "mscale_all_dim": scaling.mscale_all_dim}
  if scaling.attention_factor is not None:
    out["attention_factor"] = scaling.attention_factor
  if not scaling.truncate:
    out["truncate"] = False
  return out


def _require(hf: dict, key: str, allowed: tuple, problems: list[str]) -> None:
  if key in hf and hf[key] not in allowed:
    problems.append(f"{key}={hf[key]!r} is not supported (supported: {list(allowed)})")


def attention_from_zigzag(ssa: dict, n_sublayers: int, block_size: int | None, problems: list[str]) -> AttentionConfig:
  """AttentionConfig from `streaming_sparse_attention` = {layer_type '0'/'1' per sublayer, sink_size, recent_size}."""
  lt = str(ssa.get("layer_type", ""))
  if len(lt) != n_sublayers or set(lt) - {"0", "1"}:
    problems.append(f"streaming_sparse_attention.layer_type={lt!r} must have one '0'/'1' per attention sublayer "
                    f"({n_sublayers})")
    return AttentionConfig()
  sink, recent = int(ssa.get("sink_size", 0)), int(ssa.get("recent_size", 0))
  if block_size is None:
    block_size = next((b for b in (ZIGZAG_BLOCK_SIZE, sink) if b > 0 and sink % b == 0 and recent % b == 0), 0)
  if block_size < 1 or sink % block_size or recent % block_size or recent < block_size:
    problems.append(f"streaming_sparse_attention sink_size={sink}, recent_size={recent} are not whole numbers of "
                    f"blocks of {block_size or ZIGZAG_BLOCK_SIZE} (pass --block-size)")
    return AttentionConfig()
  return AttentionConfig(layer_types=tuple("ssa" if ch == "1" else "full" for ch in lt), block_size=block_size,
                         sink_blocks=sink // block_size, local_blocks=recent // block_size)


def config_from_hf(hf: dict, *, ignore_keys: tuple[str, ...] = (), block_size: int | None = None,
                   source: str = "config.json") -> Config:
  """Our Config for an HF DeepSeek-V3 / LongCat-Flash config.json dict; one ValueError lists every problem."""
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    archs = hf.get("architectures")
    raise ValueError(f"{source}: model_type {model_type!r} (architectures {archs}) is not supported; "
                     f"supported: {sorted(ARCHITECTURES)} ({[a[1] for a in ARCHITECTURES.values()]})")
  problems: list[str] = []
  unknown = sorted(set(hf) - MAPPED[model_type] - IGNORED - set(ignore_keys))
  if unknown:
    problems.append(f"unsupported config fields {unknown} (pass --ignore-config-keys if they do not change the "
                    "forward pass)")
  if "quantization_config" in hf:
    problems.append("quantization_config: quantized (e.g. fp8) checkpoints are not supported; dequantize to "
                    "bf16/fp32 first")
  _require(hf, "hidden_act", ("silu",), problems)
  _require(hf, "attention_bias", (False,), problems)
  _require(hf, "attention_dropout", (0, 0.0), problems)
  heads = int(hf["num_attention_heads"])
  if hf.get("num_key_value_heads") not in (None, heads):
    problems.append(f"num_key_value_heads={hf['num_key_value_heads']} != num_attention_heads={heads}: MLA expands "
                    "its latent to every head")
  rope_dim = int(hf["qk_rope_head_dim"])
  if hf.get("qk_head_dim") not in (None, int(hf["qk_nope_head_dim"]) + rope_dim):
    problems.append(f"qk_head_dim={hf['qk_head_dim']} != qk_nope_head_dim + qk_rope_head_dim")
  if hf.get("head_dim") not in (None, rope_dim):
    problems.append(f"head_dim={hf['head_dim']} must equal qk_rope_head_dim={rope_dim} (transformers sizes RoPE "
                    "by head_dim)")
  theta, scaling = rope_from_hf(hf, model_type, problems)
  dtype = hf.get("torch_dtype", hf.get("dtype")) or "float32"
  if dtype not in DTYPES:
    problems.append(f"torch_dtype {dtype!r} is not one of {DTYPES}")
    dtype = "float32"
  common = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_attention_heads=heads,
      q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
      qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=rope_dim, v_head_dim=hf["v_head_dim"],
      rope_theta=theta, rope_scaling=scaling, max_position_embeddings=hf.get("max_position_embeddings", 4096),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      initializer_range=float(hf.get("initializer_range", 0.02)), dtype=dtype, param_dtype=dtype,
      n_routed_experts=hf.get("n_routed_experts", 0), routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
      latent_norm_eps=HF_LATENT_NORM_EPS)
  if model_type == "deepseek_v3":
    _require(hf, "topk_method", ("noaux_tc",), problems)
    _require(hf, "scoring_func", ("sigmoid",), problems)
    _require(hf, "moe_layer_freq", (1,), problems)
    fields = dict(
        architecture="deepseek_v3", num_hidden_layers=hf["num_hidden_layers"],
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"], n_shared_experts=hf.get("n_shared_experts") or 0,
        n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
        num_experts_per_tok=hf["num_experts_per_tok"], first_k_dense_replace=hf.get("first_k_dense_replace") or 0,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)), rope_interleave=bool(hf.get("rope_interleave", True)))
  else:
    _require(hf, "zero_expert_type", (None, "identity"), problems)
    _require(hf, "router_bias", (False,), problems)
    _require(hf, "attention_method", ("MLA",), problems)
    _require(hf, "norm_topk_prob", (False, None), problems)
    layers = hf.get("num_layers")
    if layers is None:
      problems.append("num_layers is missing (LongCat-Flash counts decoder layers of two attention sublayers)")
      layers = 1
    if hf.get("num_hidden_layers") not in (None, layers, 2 * layers):
      problems.append(f"num_hidden_layers={hf['num_hidden_layers']} is neither num_layers nor 2*num_layers")
    fields = dict(
        architecture="longcat_flash", num_hidden_layers=layers, intermediate_size=hf["ffn_hidden_size"],
        moe_intermediate_size=hf["expert_ffn_hidden_size"], num_experts_per_tok=hf["moe_topk"],
        zero_expert_num=hf.get("zero_expert_num") or 0, rope_interleave=True,
        # transformers always applies the LoRA scales; the original release reads these flags.
        mla_scale_q_lora=bool(hf.get("mla_scale_q_lora", True)),
        mla_scale_kv_lora=bool(hf.get("mla_scale_kv_lora", True)))
  if problems:
    raise ValueError(f"{source}: cannot import this {model_type} config:\n  - " + "\n  - ".join(problems))
  try:
    model = ModelConfig(**common, **fields)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None
  n_sub = model.num_attention_sublayers
  attention = AttentionConfig()
  if hf.get("streaming_sparse_attention"):
    attention = attention_from_zigzag(hf["streaming_sparse_attention"], n_sub, block_size, problems)
    if problems:
      raise ValueError(f"{source}: " + "; ".join(problems))
  return Config(model=model, attention=attention)


def zigzag_from_attention(cfg: Config) -> dict | None:
  """`streaming_sparse_attention` for a model with any SSA sublayer (None if all full); blend is refused."""
  types = cfg.layer_types
  blend = [i for i, t in enumerate(types) if t == "blend"]
  if blend:
    raise ValueError(f"attention.layer_types has 'blend' at sublayers {blend}: run the sparsify stage (which turns "
                     "each blend sublayer into full or ssa) before exporting")
  if "ssa" not in types:
    return None
  a = cfg.attention
  return {"layer_type": "".join("1" if t == "ssa" else "0" for t in types),
          "sink_size": a.sink_blocks * a.block_size, "recent_size": a.local_blocks * a.block_size,
          "sparsity": sum(t == "ssa" for t in types) / len(types)}


def config_to_hf(cfg: Config) -> dict[str, Any]:
  """config.json dict for transformers' DeepseekV3ForCausalLM / LongcatFlashForCausalLM (+ ZigZag sparsity)."""
  c = cfg.model
  if c.architecture not in ("deepseek_v3", "longcat_flash"):
    raise ValueError(f"model.architecture {c.architecture!r} has no HuggingFace counterpart; export supports "
                     "deepseek_v3 and longcat_flash")
  latent_eps = c.rms_norm_eps if c.latent_norm_eps is None else c.latent_norm_eps
  if latent_eps != HF_LATENT_NORM_EPS:
    raise ValueError(f"model.latent_norm_eps={latent_eps}: transformers fixes the latent norms' eps at "
                     f"{HF_LATENT_NORM_EPS}")
  if c.kv_heads != c.num_attention_heads:
    raise ValueError("model.num_key_value_heads must equal num_attention_heads for an HF MLA export")
  out: dict[str, Any] = {
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
      "num_key_value_heads": c.num_attention_heads, "kv_lora_rank": c.kv_lora_rank,
      "qk_nope_head_dim": c.qk_nope_head_dim, "qk_rope_head_dim": c.qk_rope_head_dim, "v_head_dim": c.v_head_dim,
      "head_dim": c.qk_rope_head_dim, "n_routed_experts": c.n_routed_experts,
      "routed_scaling_factor": c.routed_scaling_factor, "max_position_embeddings": c.max_position_embeddings,
      "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_word_embeddings,
      "initializer_range": c.initializer_range, "rope_theta": c.rope_theta, "rope_scaling": rope_to_hf(c.rope_scaling),
      "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": c.param_dtype}
  if c.architecture == "deepseek_v3":
    if c.zero_expert_num or c.mla_scale_q_lora or c.mla_scale_kv_lora:
      raise ValueError("deepseek_v3 export: zero experts and mla_scale_*_lora are LongCat-Flash features")
    out.update({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "num_hidden_layers": c.num_hidden_layers, "intermediate_size": c.intermediate_size,
        "moe_intermediate_size": c.moe_intermediate_size, "n_shared_experts": c.n_shared_experts,
        "q_lora_rank": c.q_lora_rank or None, "n_group": c.n_group, "topk_group": c.topk_group,
        "num_experts_per_tok": c.num_experts_per_tok, "first_k_dense_replace": c.first_k_dense_replace,
        "norm_topk_prob": c.norm_topk_prob, "rope_interleave": c.rope_interleave, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "num_nextn_predict_layers": 0})
  else:
    if c.n_shared_experts or c.first_k_dense_replace or c.n_group != 1 or c.norm_topk_prob or not c.rope_interleave:
      raise ValueError("longcat_flash export: shared experts, first_k_dense_replace, n_group > 1, norm_topk_prob and "
                       "non-interleaved RoPE are not part of LongCat-Flash")
    out.update({
        "architectures": ["LongcatFlashForCausalLM"], "model_type": "longcat_flash",
        "num_layers": c.num_hidden_layers, "ffn_hidden_size": c.intermediate_size,
        "expert_ffn_hidden_size": c.moe_intermediate_size, "moe_topk": c.num_experts_per_tok,
        "q_lora_rank": c.q_lora_rank, "zero_expert_num": c.zero_expert_num, "zero_expert_type": "identity",
        "mla_scale_q_lora": c.mla_scale_q_lora, "mla_scale_kv_lora": c.mla_scale_kv_lora, "router_bias": False,
        "attention_method": "MLA"})
  ssa = zigzag_from_attention(cfg)
  if ssa is not None:
    out["streaming_sparse_attention"] = ssa
  return dict(sorted(out.items()))

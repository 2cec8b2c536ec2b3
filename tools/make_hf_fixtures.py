"""Build tiny random HuggingFace LongCat-Flash / DeepSeek-V3 models and record their logits as test fixtures.

Runs in a separate PyTorch environment, never in the project's .venv:

  /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 transformers safetensors
  /tmp/torchenv/bin/python tools/make_hf_fixtures.py            # build + check exports
  /tmp/torchenv/bin/python tools/make_hf_fixtures.py --check-only

Made with torch 2.13.0 (CPU) and transformers 5.24.0, which provides both
LongcatFlashForCausalLM and DeepseekV3ForCausalLM (native, no remote code).

Per fixture, tests/fixtures/hf/<name>/ holds the save_pretrained output (config.json,
safetensors, index when sharded), tokens.npy [B, T] int32 and logits.npy [B, T, V] float32
from the eager fp32 forward. The export check then converts every fixture with the
project's own CLI (.venv, `python -m loza_jax.convert import/export`), once with all
attention sublayers full and once with some SSA, loads each exported config.json in
transformers' config class, loads the full-attention export as a transformers model and
compares its logits with logits.npy, and writes the results to export_check.json together
with the exported config.json files that were checked (the CI test compares the current
exporter's output with those).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LongcatFlashConfig, LongcatFlashForCausalLM

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "hf"
VENV_PY = ROOT / ".venv" / "bin" / "python"
BATCH, SEQ = 2, 40

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}


def longcat_flash_tiny():
  """Two decoder layers (four MLA sublayers), 4 routed + 2 zero experts, q LoRA (always on), YaRN."""
  cfg = LongcatFlashConfig(
      vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=96,
      q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8, v_head_dim=16,
      moe_topk=3, n_routed_experts=4, zero_expert_num=2, expert_ffn_hidden_size=32, routed_scaling_factor=2.5,
      rms_norm_eps=1e-5, max_position_embeddings=64, rope_theta=10000.0, rope_scaling=dict(YARN),
      initializer_range=0.08, tie_word_embeddings=False)
  return cfg, LongcatFlashForCausalLM, None


def deepseek_v3_tiny():
  """q LoRA, YaRN with mscale_all_dim, first layer dense, 8 experts in 4 groups, 1 shared expert."""
  cfg = DeepseekV3Config(
      vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
      routed_scaling_factor=2.5, kv_lora_rank=24, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
      qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
      norm_topk_prob=True, rms_norm_eps=1e-5, max_position_embeddings=64, rope_theta=10000.0,
      rope_scaling=dict(YARN), rope_interleave=True, initializer_range=0.08, num_nextn_predict_layers=0)
  return cfg, DeepseekV3ForCausalLM, None


def deepseek_v3_tiny_noqlora():
  """q LoRA off, plain RoPE, non-interleaved rope, no top-k renormalisation, tied embeddings, sharded files."""
  cfg = DeepseekV3Config(
      vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=6,
      routed_scaling_factor=1.5, kv_lora_rank=24, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16,
      qk_nope_head_dim=16, n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=0,
      norm_topk_prob=False, rms_norm_eps=1e-6, max_position_embeddings=64, rope_theta=500.0,
      rope_interleave=False, initializer_range=0.08, tie_word_embeddings=True, num_nextn_predict_layers=0)
  return cfg, DeepseekV3ForCausalLM, "200KB"


FIXTURES = {"longcat_flash_tiny": longcat_flash_tiny, "deepseek_v3_tiny": deepseek_v3_tiny,
            "deepseek_v3_tiny_noqlora": deepseek_v3_tiny_noqlora}


def perturb_(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Make norms, correction biases and every weight non-trivial so a missed mapping changes logits."""
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if name.endswith("layernorm.weight") or name.endswith("norm.weight") or ".input_layernorm." in name \
          or ".post_attention_layernorm." in name:
        t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=gen))
      elif name.endswith("e_score_correction_bias"):
        t.copy_(0.05 * torch.randn(t.shape, generator=gen))


def build(name: str) -> None:
  cfg, cls, shard = FIXTURES[name]()
  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(1234)
  model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
  perturb_(model, gen)
  out = OUT / name
  shutil.rmtree(out, ignore_errors=True)
  kw = {"max_shard_size": shard} if shard else {}
  model.save_pretrained(out, **kw)
  tokens = np.random.RandomState(7).randint(0, cfg.vocab_size, size=(BATCH, SEQ)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
  np.save(out / "tokens.npy", tokens)
  np.save(out / "logits.npy", logits.astype(np.float32))
  (out / "generation_config.json").unlink(missing_ok=True)
  print(f"{name}: {sum(p.numel() for p in model.parameters())} params, logits {logits.shape}, "
        f"files {sorted(p.name for p in out.iterdir())}")


def run_cli(*args: str) -> None:
  cmd = [str(VENV_PY), "-m", "loza_jax.convert", *args]
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if res.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")


def sparse_types(n_sublayers: int) -> str:
  return "[" + ",".join("ssa" if i % 2 else "full" for i in range(n_sublayers)) + "]"


def check_export(name: str) -> None:
  """Round-trip a fixture through our CLI and check what transformers makes of the result."""
  src = OUT / name
  ref_cfg = json.loads((src / "config.json").read_text())
  cls = {"longcat_flash": (LongcatFlashConfig, LongcatFlashForCausalLM),
         "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM)}[ref_cfg["model_type"]]
  n_sub = ref_cfg.get("num_layers", 0) * 2 or ref_cfg["num_hidden_layers"]
  result = {"transformers_version": transformers.__version__, "torch_version": torch.__version__}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    run_cli("import", "--hf", str(src), "--out", str(tmp / "ckpt"))
    extra = ["--zero-expert-weights", "zeros"] if ref_cfg["model_type"] == "longcat_flash" else []
    run_cli("export", "--ckpt", str(tmp / "ckpt"), "--out", str(tmp / "hf_full"), *extra)
    run_cli("import", "--hf", str(src), "--out", str(tmp / "ckpt_sparse"),
            "--set", f"attention.layer_types={sparse_types(n_sub)}", "--set", "attention.block_size=16",
            "--set", "attention.local_blocks=3")
    run_cli("export", "--ckpt", str(tmp / "ckpt_sparse"), "--out", str(tmp / "hf_sparse"))
    for variant in ("hf_full", "hf_sparse"):
      exported = json.loads((tmp / variant / "config.json").read_text())
      loaded = cls[0].from_pretrained(tmp / variant)
      reference = cls[0].from_pretrained(src)
      keys = [k for k in reference.to_dict() if k not in ("transformers_version", "architectures", "dtype",
                                                          "torch_dtype", "bos_token_id", "eos_token_id",
                                                          "pad_token_id", "use_cache", "output_router_logits",
                                                          "num_mtp_layers", "num_nextn_predict_layers")]
      diffs = {k: [getattr(reference, k, None), getattr(loaded, k, None)] for k in keys
               if getattr(reference, k, None) != getattr(loaded, k, None)}
      result[variant] = {"config_class": cls[0].__name__, "loaded": True, "field_differences": diffs,
                         "streaming_sparse_attention": getattr(loaded, "streaming_sparse_attention", None)}
      (src / f"exported_{variant}_config.json").write_text(json.dumps(exported, indent=2, sort_keys=True) + "\n")
    model = cls[1].from_pretrained(tmp / "hf_full", attn_implementation="eager", dtype=torch.float32).eval()
    tokens = np.load(src / "tokens.npy")
    with torch.no_grad():
      logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
    ref = np.load(src / "logits.npy")
    rel = float(np.abs(logits - ref).max() / np.abs(ref).max())
    result["hf_full"]["model_loaded"] = True
    result["hf_full"]["logits_max_rel_err_vs_fixture"] = rel
  (src / "export_check.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
  print(f"{name}: export check {json.dumps(result)}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", nargs="*", default=sorted(FIXTURES), help="fixture names")
  p.add_argument("--check-only", action="store_true", help="skip rebuilding the HF models")
  p.add_argument("--no-check", action="store_true", help="skip the export check (needs the .venv)")
  args = p.parse_args(argv)
  for name in args.only:
    if not args.check_only:
      build(name)
    if not args.no_check:
      check_export(name)


if __name__ == "__main__":
  main(sys.argv[1:])

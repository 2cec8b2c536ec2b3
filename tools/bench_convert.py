"""Conversion speed on a synthetic multi-GB DeepSeek-V3-shaped bf16 checkpoint (written to a temp dir, deleted after).

  .venv/bin/python tools/bench_convert.py [--layers 5] [--experts 64] [--dir /tmp]

Writes a random HF checkpoint (config.json + ~1 GB safetensors shards + index), then times
`python -m loza_jax.convert import` and `export` in fresh processes (reporting GB/s and peak
RSS), and checks that a sample of tensors survives the round trip bit for bit. Files are read
right after being written, so the numbers are warm-page-cache numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]


def hf_config(layers: int, experts: int) -> dict:
  return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 32000,
          "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 704, "num_hidden_layers": layers,
          "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 1, "n_routed_experts": experts,
          "routed_scaling_factor": 2.5, "kv_lora_rank": 256, "q_lora_rank": 768, "qk_rope_head_dim": 32,
          "v_head_dim": 64, "qk_nope_head_dim": 64, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 6,
          "first_k_dense_replace": 1, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 16384,
          "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                                                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
          "torch_dtype": "bfloat16", "tie_word_embeddings": False, "hidden_act": "silu"}


def tensor_shapes(c: dict):
  """(name, shape, dtype) of every tensor, HF layout."""
  M, H = c["hidden_size"], c["num_attention_heads"]
  qk, v, R, kvr = c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["v_head_dim"], c["qk_rope_head_dim"], c["kv_lora_rank"]
  bf, f32 = ml_dtypes.bfloat16, np.float32
  out = [("model.embed_tokens.weight", (c["vocab_size"], M), bf)]
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}"
    out += [(f"{p}.input_layernorm.weight", (M,), bf), (f"{p}.post_attention_layernorm.weight", (M,), bf),
            (f"{p}.self_attn.q_a_proj.weight", (c["q_lora_rank"], M), bf),
            (f"{p}.self_attn.q_a_layernorm.weight", (c["q_lora_rank"],), bf),
            (f"{p}.self_attn.q_b_proj.weight", (H * qk, c["q_lora_rank"]), bf),
            (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (kvr + R, M), bf),
            (f"{p}.self_attn.kv_a_layernorm.weight", (kvr,), bf),
            (f"{p}.self_attn.kv_b_proj.weight", (H * (c["qk_nope_head_dim"] + v), kvr), bf),
            (f"{p}.self_attn.o_proj.weight", (M, H * v), bf)]
    if i < c["first_k_dense_replace"]:
      I = c["intermediate_size"]
      out += [(f"{p}.mlp.gate_proj.weight", (I, M), bf), (f"{p}.mlp.up_proj.weight", (I, M), bf),
              (f"{p}.mlp.down_proj.weight", (M, I), bf)]
    else:
      I, S = c["moe_intermediate_size"], c["moe_intermediate_size"] * c["n_shared_experts"]
      out += [(f"{p}.mlp.gate.weight", (c["n_routed_experts"], M), f32),
              (f"{p}.mlp.gate.e_score_correction_bias", (c["n_routed_experts"],), f32)]
      for e in range(c["n_routed_experts"]):
        out += [(f"{p}.mlp.experts.{e}.gate_proj.weight", (I, M), bf), (f"{p}.mlp.experts.{e}.up_proj.weight", (I, M), bf),
                (f"{p}.mlp.experts.{e}.down_proj.weight", (M, I), bf)]
      out += [(f"{p}.mlp.shared_experts.gate_proj.weight", (S, M), bf),
              (f"{p}.mlp.shared_experts.up_proj.weight", (S, M), bf),
              (f"{p}.mlp.shared_experts.down_proj.weight", (M, S), bf)]
  out += [("model.norm.weight", (M,), bf), ("lm_head.weight", (M, c["vocab_size"])[::-1], bf)]
  return out


def write_checkpoint(d: Path, c: dict, shard_bytes: int = 10**9) -> int:
  d.mkdir(parents=True)
  rng = np.random.default_rng(0)
  shards, cur, size = [], {}, 0
  for name, shape, dtype in tensor_shapes(c):
    cur[name] = (rng.random(shape, dtype=np.float32) * 0.02 - 0.01).astype(dtype)
    size += cur[name].nbytes
    if size >= shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
  if cur:
    shards.append(cur)
  weight_map, total = {}, 0
  for i, tensors in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(tensors, str(d / fname), metadata={"format": "pt"})
    for k, t in tensors.items():
      weight_map[k] = fname
      total += t.nbytes
  (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
  (d / "config.json").write_text(json.dumps(c))
  return total


CHILD = ("import resource, sys\nfrom loza_jax.convert.__main__ import main\nrc = main(sys.argv[1:])\n"
         "u = resource.getrusage(resource.RUSAGE_SELF)\n"
         "print('CPU_S', u.ru_utime + u.ru_stime)\nprint('MAXRSS_KB', u.ru_maxrss)\nsys.exit(rc)\n")


def timed_cli(*args: str) -> tuple[float, float, float, str]:
  """(wall seconds, CPU seconds, peak RSS GB, stdout) of `python -m loza_jax.convert ARGS` run in a fresh process."""
  t0 = time.perf_counter()
  res = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, text=True)
  dt = time.perf_counter() - t0
  if res.returncode:
    raise SystemExit(f"convert {args[0]} failed:\n{res.stdout}\n{res.stderr}")
  lines = res.stdout.strip().splitlines()
  cpu, rss = float(lines[-2].split()[-1]), int(lines[-1].split()[-1]) / 1e6
  return dt, cpu, rss, "\n".join(lines[:-2])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=5)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--dir", default="/tmp")
  args = p.parse_args(argv)
  work = Path(tempfile.mkdtemp(prefix="loza_bench_convert_", dir=args.dir))
  try:
    c = hf_config(args.layers, args.experts)
    t0 = time.perf_counter()
    total = write_checkpoint(work / "hf", c)
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB bf16 ({len(tensor_shapes(c))} tensors) written in "
          f"{time.perf_counter() - t0:.1f} s")
    t_imp, cpu_imp, rss_imp, out_imp = timed_cli("import", "--hf", str(work / "hf"), "--out", str(work / "ckpt"))
    print(out_imp)
    t_exp, cpu_exp, rss_exp, out_exp = timed_cli("export", "--ckpt", str(work / "ckpt"), "--out", str(work / "hf_out"))
    print(out_exp)
    index = json.loads((work / "hf_out" / "model.safetensors.index.json").read_text())["weight_map"]
    src_index = json.loads((work / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    sample = [n for i, n in enumerate(sorted(src_index)) if i % 97 == 0] + ["lm_head.weight", "model.layers.1.mlp.gate.weight"]
    for name in sample:
      with safe_open(work / "hf" / src_index[name], "numpy") as f, safe_open(work / "hf_out" / index[name], "numpy") as g:
        a, b = f.get_tensor(name), g.get_tensor(name)
        if a.dtype != b.dtype or a.tobytes() != b.tobytes():
          raise SystemExit(f"round trip changed {name}")
    print(f"round trip: {len(sample)} sampled tensors bit-identical")
    print(f"load average (1, 5, 15 min): {os.getloadavg()}, cores: {os.cpu_count()}")
    print("| step | GB | wall s (whole process) | GB/s (wall) | CPU s | peak RSS (GB) |")
    print("|---|---|---|---|---|---|")
    for step, t, cpu, rss in (("import", t_imp, cpu_imp, rss_imp), ("export", t_exp, cpu_exp, rss_exp)):
      print(f"| {step} | {total / 1e9:.2f} | {t:.1f} | {total / 1e9 / t:.2f} | {cpu:.1f} | {rss:.1f} |")
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main(sys.argv[1:])

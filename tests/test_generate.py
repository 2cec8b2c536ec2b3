"""Inference: decode through the cache equals the full forward at every step; caches, generate, CLI, bad input."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import NAMES, load

from loza_jax import cache as kc, generate as g
from loza_jax.config import Config, RopeScaling, from_dict, replace
from loza_jax.model import build_model

TOL = 1e-4   # fp32, max |decode - forward| / max |forward|


def tiny_cfg(layer_types=("full", "ssa", "ssa"), impl="xla", block=4, local=2, **model):
  m = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=len(layer_types),
           num_attention_heads=4, num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
           v_head_dim=8)
  m.update(model)
  return from_dict(Config, {"model": m, "attention": {"layer_types": list(layer_types), "block_size": block,
                                                        "sink_blocks": 1, "local_blocks": local, "impl": impl}})


def init(cfg):
  return nn.unbox(build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])


def decode_errors(params, cfg, seqs, prompt_lens, chunk, steps, cache_len=None):
  """Max rel. error over rows and steps of cached logits vs the full forward on the same prefix.

  The forward is causal, so one pass over each whole sequence gives every prefix's last logits.
  """
  model = build_model(cfg)
  refs = [np.asarray(model.apply({"params": params}, jnp.asarray(s[None])))[0] for s in seqs]
  B = len(seqs)
  block = cfg.attention.block_size
  T = -(-max(prompt_lens) // block) * block
  toks = np.zeros((B, T), np.int32)
  for i, n in enumerate(prompt_lens):
    toks[i, :n] = seqs[i][:n]
  cache = kc.init_cache(cfg, B, cache_len or T + steps + 1, jnp.float32)
  shapes = jax.tree_util.tree_map(lambda x: x.shape, cache)
  last, cache = g.prefill(params, cfg, cache, toks, np.array(prompt_lens), chunk)
  errs = []
  for step in range(steps + 1):
    err = max(np.abs(np.asarray(last[i]) - refs[i][n + step - 1]).max() / np.abs(refs[i][n + step - 1]).max()
              for i, n in enumerate(prompt_lens))
    errs.append(float(err))
    if step < steps:
      last, cache = g.decode_step(params, cfg, cache, np.array([seqs[i][n + step] for i, n in enumerate(prompt_lens)]))
  assert jax.tree_util.tree_map(lambda x: x.shape, cache) == shapes      # no entry grows
  np.testing.assert_array_equal(np.asarray(cache.lengths_B), np.array(prompt_lens) + steps)
  return errs


@pytest.mark.parametrize("chunk", [16, 8])
def test_decode_equals_forward_mixed_layout_ragged_batch(rng, chunk):
  """Full + SSA sublayers, GQA, prompts of 5/13/9 tokens, 30 steps: blocks of 4, ring of 12 wraps often."""
  cfg = tiny_cfg()
  params = init(cfg)
  lens = [5, 13, 9]
  seqs = [rng.integers(0, 64, n + 31) for n in lens]
  errs = decode_errors(params, cfg, seqs, lens, chunk, steps=30)
  assert max(errs) <= TOL, errs


def test_ssa_layout_matters_for_these_sequences(rng):
  """Negative control: the same weights with all-full layers give different logits past the window,
  so matching the forward above needs a correct ring, not just a correct full cache."""
  cfg = tiny_cfg()
  params = init(cfg)
  toks = jnp.asarray(rng.integers(0, 64, (1, 40)))
  sparse = np.asarray(build_model(cfg).apply({"params": params}, toks))
  full = np.asarray(build_model(tiny_cfg(("full",) * 3)).apply({"params": params}, toks))
  assert np.abs(sparse[0, :12] - full[0, :12]).max() < 1e-5          # inside the window: equal
  assert np.abs(sparse[0, 20:] - full[0, 20:]).max() / np.abs(full).max() > 100 * TOL


def test_wrong_ring_is_caught(rng, monkeypatch):
  """Mutation check: a ring one block short breaks decode/forward equality."""
  cfg = tiny_cfg(("ssa", "ssa"))
  params = init(cfg)
  monkeypatch.setattr(kc, "ssa_slots", lambda c: (c.attention.sink_blocks + c.attention.local_blocks - 1)
                      * c.attention.block_size)
  orig = kc.write_ring
  monkeypatch.setattr(kc, "write_ring", lambda e, a, b, s, sink, local: orig(e, a, b, s, sink, local - 4))
  seqs = [rng.integers(0, 64, 30)]
  assert max(decode_errors(params, cfg, seqs, [6], 8, steps=20)) > 100 * TOL


@pytest.mark.parametrize("name", NAMES)
def test_decode_equals_forward_hf_architectures(name, rng):
  """DeepSeek-V3 (with and without q LoRA) and LongCat-Flash fixtures with alternating SSA sublayers."""
  cfg, params, _, _ = load(name)
  n = cfg.model.num_attention_sublayers
  cfg = replace(cfg, **{"attention.layer_types": tuple("ssa" if i % 2 else "full" for i in range(n)),
                        "attention.block_size": 4, "attention.sink_blocks": 1, "attention.local_blocks": 2,
                        "attention.impl": "xla", "model.moe_impl": "dense"})
  V = cfg.model.vocab_size
  lens = [7, 12]
  seqs = [rng.integers(0, V, n + 21) for n in lens]
  errs = decode_errors(params, cfg, seqs, lens, 8, steps=20)
  assert max(errs) <= TOL, errs


def test_prefill_through_pallas_kernels_interpret(rng):
  """Prefill chunks run the Pallas kernels (interpret mode); later chunks use the sink-free window."""
  cfg = tiny_cfg(("full", "ssa"), impl="pallas_triton_interpret", block=16, local=2, num_key_value_heads=4,
                 qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
  params = init(cfg)
  seqs = [rng.integers(0, 64, 80), rng.integers(0, 64, 80)]
  errs = decode_errors(params, cfg, seqs, [70, 41], 32, steps=2)
  assert max(errs) <= TOL, errs


def test_ssa_cache_size_is_constant():
  cfg = tiny_cfg(("full", "ssa"))
  small, big = kc.init_cache(cfg, 2, 100), kc.init_cache(cfg, 2, 100_000)
  assert small.layers[1]["ckv"].shape == big.layers[1]["ckv"].shape == (2, 12, 16)
  assert big.layers[0]["ckv"].shape == (2, 100_096, 16)             # full: capacity, rounded up to 128s
  sparse = kc.init_cache(tiny_cfg(("ssa", "ssa")), 1, 1_000_000)
  assert kc.cache_bytes(sparse) == kc.cache_bytes(kc.init_cache(tiny_cfg(("ssa", "ssa")), 1, 10))


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_decode_step_updates_the_cache_in_place(impl):
  """The donated cache is written in place: a step's temporaries stay far below one full sublayer's latent
  (a copy of the cache is what limits the largest decode batch). On the GPU `auto` runs the kernel."""
  cfg = tiny_cfg(("full", "ssa", "full"), impl=impl, num_attention_heads=2, num_key_value_heads=2,
                 kv_lora_rank=128, qk_rope_head_dim=16)  # scores (heads per key) small beside the latent (C per key)
  cache = kc.init_cache(cfg, 4, 16384, jnp.float32)
  one_latent = cache.layers[0]["ckv"].nbytes
  mem = g.compiled_decode_step(init(cfg), cfg, cache, np.zeros(4, np.int32)).memory_analysis()
  assert mem.temp_size_in_bytes < one_latent / 2, (mem.temp_size_in_bytes, one_latent)


@pytest.mark.gpu
def test_gpu_decode_step_updates_the_cache_in_place():
  test_decode_step_updates_the_cache_in_place("auto")      # on the GPU: through the Pallas decode kernel


def is_greedy(params, cfg, prompt, new) -> bool:
  """Whether each new token is the forward's argmax after the tokens before it (one causal pass)."""
  seq = list(prompt) + list(new)
  pred = np.argmax(np.asarray(build_model(cfg).apply({"params": params}, jnp.asarray([seq])))[0], -1)
  return pred[len(prompt) - 1:len(seq) - 1].tolist() == list(new)


def test_generate_greedy_matches_forward_argmax(rng):
  cfg = tiny_cfg()
  params = init(cfg)
  prompts = [rng.integers(0, 64, n).tolist() for n in (3, 11)]
  out = g.generate(params, cfg, prompts, max_new_tokens=12, cache_dtype="float32", prefill_chunk=8)
  assert [len(o) for o in out] == [12, 12]
  for p, o in zip(prompts, out):
    assert is_greedy(params, cfg, p, o)
  assert not is_greedy(params, cfg, prompts[0], out[1])                 # the check can fail


def test_generate_stop_tokens_and_sampling(rng):
  cfg = tiny_cfg()
  params = init(cfg)
  prompts = [rng.integers(0, 64, 6).tolist()]
  greedy = g.generate(params, cfg, prompts, max_new_tokens=10, cache_dtype="float32")[0]
  stop = int(greedy[4])
  first = greedy.tolist().index(stop)
  assert g.generate(params, cfg, prompts, max_new_tokens=10, cache_dtype="float32",
                    stop_tokens=[stop])[0].tolist() == greedy[:first].tolist()
  for s in (g.Sampling(temperature=1.0, top_k=1), g.Sampling(temperature=0.7, top_p=1e-6)):
    assert g.generate(params, cfg, prompts, max_new_tokens=10, sampling=s, cache_dtype="float32")[0].tolist() \
        == greedy.tolist()
  hot = [g.generate(params, cfg, prompts, max_new_tokens=10, sampling=g.Sampling(temperature=5.0), seed=s)[0]
         for s in range(3)]
  assert len({tuple(h.tolist()) for h in hot}) > 1                     # sampling does sample


def test_sample_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = {int(g.sample(logits, jax.random.PRNGKey(i), g.Sampling(1.0, top_p=0.7))[0]) for i in range(200)}
  assert draws == {0, 1}


def test_bad_input():
  cfg = tiny_cfg()
  params = init(cfg)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    g.generate(params, cfg, [[1, 2], []])
  with pytest.raises(ValueError, match="max_position_embeddings"):
    g.generate(params, replace(cfg, **{"model.max_position_embeddings": 16}), [[1] * 10], max_new_tokens=10)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    g.generate(params, cfg, [[1, 64]])
  with pytest.raises(ValueError, match="sparsify"):
    g.generate(params, tiny_cfg(("full", "blend", "ssa")), [[1, 2]])
  with pytest.raises(ValueError, match="multiple of attention.block_size"):
    g.generate(params, cfg, [[1, 2]], prefill_chunk=6)
  # YaRN lifts the position limit.
  yarn = replace(cfg, **{"model.max_position_embeddings": 16,
                         "model.rope_scaling": RopeScaling(factor=4.0, original_max_position_embeddings=16)})
  assert len(g.generate(params, yarn, [[1] * 10], max_new_tokens=10)[0]) == 10


def test_cli(tmp_path, capsys):
  from loza_jax.model_dir import save_model
  cfg = replace(tiny_cfg(), **{"model.vocab_size": 256})
  params = init(cfg)
  save_model(tmp_path / "m", params, cfg)
  assert g.main(["--model", str(tmp_path / "m"), "--prompt", "abc", "--max-new-tokens", "5",
                 "--cache-dtype", "float32"]) == 0
  out = capsys.readouterr().out
  new = g.generate(params, cfg, [list(b"abc")], max_new_tokens=5, cache_dtype="float32")[0]
  assert is_greedy(params, cfg, list(b"abc"), new)
  assert out == "abc" + bytes(new.tolist()).decode("utf-8", errors="replace") + "\n"
  with pytest.raises(SystemExit) as e:
    g.main(["--model", str(tmp_path / "nope"), "--prompt", "x"])
  assert e.value.code == 2
  assert "no such directory" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("types", [("full", "ssa"), ("ssa", "full")])
def test_gpu_prefill_kernels_and_decode_match_forward(rng, types):
  """On the GPU: bf16 prefill through the default kernels (two chunks) and decode steps vs the XLA forward."""
  cfg = tiny_cfg(types, impl="auto", block=64, local=3, num_attention_heads=4, num_key_value_heads=4,
                 kv_lora_rank=64, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, dtype="bfloat16",
                 vocab_size=256)
  params = init(cfg)
  seqs = [rng.integers(0, 256, 700), rng.integers(0, 256, 700)]
  ref_cfg = replace(cfg, **{"attention.impl": "xla"})
  model = build_model(ref_cfg)
  refs = [np.asarray(model.apply({"params": params}, jnp.asarray(s[None])))[0] for s in seqs]
  lens = [600, 389]
  toks = np.zeros((2, 640), np.int32)
  for i, n in enumerate(lens):
    toks[i, :n] = seqs[i][:n]
  cache = kc.init_cache(cfg, 2, 720, jnp.bfloat16)
  last, cache = g.prefill(params, cfg, cache, toks, np.array(lens), 320)
  for step in range(40):
    for i, n in enumerate(lens):
      ref = refs[i][n + step - 1]
      assert np.abs(np.asarray(last[i]) - ref).max() / np.abs(ref).max() <= 3e-2
    last, cache = g.decode_step(params, cfg, cache, np.array([seqs[i][n + step] for i, n in enumerate(lens)]))


def test_evaluation_answers_by_generation_agree_with_teacher_forcing():
  """Free greedy answers (evaluate.answers=generate) start with the teacher-forced greedy tokens,
  which run up to and including the first wrong one; a blend model is refused."""
  from loza_jax.config import load_config
  from train import data as data_lib
  from train.evaluate import generated_answers, model_logits_fn, retrieval_cases, teacher_forced_answers
  cfg = load_config("configs/demo_cpu.yaml", ["evaluate.lengths=[256]", "evaluate.depths=[0.5]", "evaluate.samples=1",
                                                "evaluate.tasks=[passkey, multikey]", "attention.impl=xla"])
  params = init(cfg)
  tok = data_lib.load_tokenizer("byte")
  cases = retrieval_cases(cfg, data_lib.load_corpus(cfg.data), tok)
  prompts = [c.tokens[:c.answer_start] for c in cases]
  refs = [c.tokens[c.answer_start:] for c in cases]
  logits_fn = model_logits_fn(params, cfg)
  free = generated_answers(params, cfg, tok, logits_fn)(prompts, refs)
  forced = teacher_forced_answers(logits_fn, tok, cfg.attention.block_size)(prompts, refs)
  for f, t in zip(free, forced):
    assert f.text.startswith(t.text) and len(f.text) > 0
    assert f.token_acc == t.token_acc
  n = cfg.model.num_attention_sublayers
  with pytest.raises(ValueError, match="sparsify"):
    generated_answers(params, replace(cfg, **{"attention.layer_types": ("blend",) * n}), tok)

"""Evaluation: an independent scorer agrees with the generator; a perfect copier scores 100%, random ~0."""
import re

import numpy as np
import pytest

from loza_jax.config import load_config
from train import data as data_lib
from train.evaluate import (Answer, accuracy_table, evaluate_logits_fn, greedy_answer, length_label, line_style, markdown,
                            perplexity, retrieval_cases, score_cases)

CFG = ["evaluate.tasks=[passkey, multikey, multivalue, vartrack]", "evaluate.lengths=[256, 400]", "evaluate.depths=[0.0, 0.5, 1.0]", "evaluate.samples=2",
       "evaluate.ppl_rows=2", "evaluate.ppl_buckets=4", "evaluate.ppl_lengths=[]", "attention.block_size=16"]


def independent_answer(kind: str, prompt: str) -> str:
  """Solve the task from the prompt text alone, with regexes written for this test."""
  if kind == "passkey":
    (v,) = re.findall(r"The pass key is (\d+)\. Remember it\.", prompt)
    return v
  if kind == "multikey":
    key = re.search(r"What is the magic number for ([a-z]+-[a-z]+)\? Answer: $", prompt).group(1)
    (v,) = re.findall(rf"The magic number for {re.escape(key)} is (\d+)\.", prompt)
    return v
  if kind == "multivalue":
    key = re.search(r"List all magic numbers for ([a-z]+-[a-z]+)\. Answer: $", prompt).group(1)
    return ", ".join(re.findall(rf"The magic number for {re.escape(key)} is (\d+)\.", prompt))
  if kind == "vartrack":
    value = re.search(r"Which variables equal (\d+)\? Answer: $", prompt).group(1)
    assign = re.findall(r"^VAR ([A-Z]{5}) = (\S+)$", prompt, flags=re.M)
    found, changed = {value}, True
    names = []
    while changed:
      changed = False
      for name, rhs in assign:
        if rhs in found and name not in found:
          found.add(name)
          names.append(name)
          changed = True
    return " ".join(names)
  raise AssertionError(kind)


@pytest.fixture(scope="module")
def setup():
  cfg = load_config("configs/demo_cpu.yaml", CFG)
  tok = data_lib.load_tokenizer("byte")
  corpus = data_lib.load_corpus(cfg.data)
  return cfg, tok, corpus


def test_generator_answers_match_independent_scorer(setup):
  cfg, tok, corpus = setup
  cases = retrieval_cases(cfg, corpus, tok)
  assert len(cases) == 4 * 2 * 3 * 2
  for c in cases:
    assert independent_answer(c.kind, c.example.prompt) == c.example.answer, c.kind
    assert c.length - cfg.attention.block_size <= len(c.tokens) <= c.length
    assert c.zone in ("sink", "local", "beyond")
    assert data_lib.score_answer(c.example, c.example.answer) == 1.0
    assert data_lib.score_answer(c.example, "0000000") == 0.0


def test_perfect_copier_scores_100_and_random_scores_chance(setup):
  cfg, tok, corpus = setup
  V = cfg.model.vocab_size

  def copier(tokens, seg):  # constructed model: puts all mass on the true next token
    logits = np.full(tokens.shape + (V,), -10.0, np.float32)
    nxt = np.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    np.put_along_axis(logits, nxt[..., None], 10.0, axis=-1)
    return logits

  rng = np.random.default_rng(0)
  rand = lambda tokens, seg: rng.standard_normal(tokens.shape + (V,)).astype(np.float32)
  perfect = evaluate_logits_fn(copier, cfg, corpus=corpus, tokenizer=tok, progress=False)
  assert perfect["retrieval"]["overall"] == 1.0
  assert all(v == 1.0 for v in perfect["retrieval"]["cells"].values())
  assert perfect["perplexity"]["ppl"] < 1.001 and perfect["retrieval"]["token_acc"] == 1.0
  by_length = perfect["perplexity"]["by_length"]
  assert sorted(by_length) == ["256", "400"]
  for n, r in by_length.items():   # whole-length held-out rows: every target of a row of n tokens counts
    assert r["rows"] == 2 and r["tokens"] == 2 * (int(n) - 1) and r["ppl"] < 1.001
  assert perfect["retrieval"]["per_zone"]["beyond"]["n"] > 0 and perfect["retrieval"]["per_zone"]["beyond"]["acc"] == 1.0
  chance = evaluate_logits_fn(rand, cfg, corpus=corpus, tokenizer=tok, progress=False)
  assert chance["retrieval"]["overall"] < 0.05 and chance["retrieval"]["token_acc"] < 0.05
  assert chance["perplexity"]["ppl"] > 100   # ~ uniform over 256 bytes (plus noise)
  assert all(r["ppl"] > 100 for r in chance["perplexity"]["by_length"].values())
  md = markdown({"perfect": perfect, "chance": chance}, cfg)
  head = md.splitlines()[0]
  assert "ppl@256" in head and "ppl@400" in head and "beyond" in head and "exact match" in head
  assert "| perfect |" in md and "| chance |" in md and "(n=" in md


def test_cases_record_actual_depth_and_zone(setup):
  cfg, tok, corpus = setup
  a = cfg.attention
  for c in retrieval_cases(cfg, corpus, tok):
    ex = c.example
    prompt = tok.encode(ex.prompt)
    assert len(prompt) == ex.prompt_tokens == c.answer_start
    assert tok.decode(prompt[ex.needle_tokens[0]:ex.needle_ends[0] + 1]).strip() in ex.prompt
    q = ex.question_token
    assert tok.decode(prompt[q:]) == ex.prompt[len(ex.prompt) - len(tok.decode(prompt[q:])):]
    if c.depth == 1.0:
      assert c.zone == "local" and ex.distance < a.local_blocks * a.block_size
    assert c.zone == data_lib.needle_zone(ex.needle_ends[0], q, a.block_size, a.sink_blocks, a.local_blocks)
    if c.depth == 0.5 and c.kind == "passkey":
      assert c.zone == "beyond" and ex.distance >= (a.local_blocks - 1) * a.block_size
    hay = ex.question_token - sum(e - s + 1 for s, e in zip(ex.needle_tokens, ex.needle_ends))
    before = sum(e - s + 1 for s, e in zip(ex.needle_tokens, ex.needle_ends) if s < ex.needle_tokens[0])
    assert abs(ex.needle_tokens[0] - before - c.depth * hay) <= 6, (c.kind, c.depth, ex.needle_tokens, hay)
    assert ex.depth_actual == ex.needle_tokens[0] / len(prompt)


def test_score_cases_takes_an_answer_function(setup):
  cfg, tok, corpus = setup
  cases = retrieval_cases(cfg, corpus, tok)
  seen = []

  def oracle(prompts, refs):   # answers from the reference, multi-value items reversed
    seen.append(len(prompts))
    out = []
    for p, r in zip(prompts, refs):
      text = tok.decode(r)
      out.append(", ".join(reversed(text.split(", "))) if ", " in text else Answer(text, 1.0))
    return out

  scored = score_cases(None, cases, tok, 5, cfg.attention.block_size, progress=False, answer_fn=oracle)
  assert all(r["score"] == 1.0 for r in scored) and sum(seen) == len(cases) and max(seen) <= 5
  wrong = score_cases(None, cases, tok, 8, 16, progress=False, answer_fn=lambda p, r: ["0"] * len(p))
  assert all(r["score"] == 0.0 and r["token_acc"] is None for r in wrong)
  with pytest.raises(ValueError, match="answer_fn returned"):
    score_cases(None, cases, tok, 8, 16, progress=False, answer_fn=lambda p, r: [])


def test_greedy_answer_stops_after_first_error():
  np.testing.assert_array_equal(greedy_answer(np.array([1, 2, 9, 4]), np.array([1, 2, 3, 4])), [1, 2, 9])
  np.testing.assert_array_equal(greedy_answer(np.array([1, 2]), np.array([1, 2])), [1, 2])


def test_accuracy_table_and_perplexity_buckets():
  scored = [{"kind": "passkey", "length": 8, "depth": 0.5, "score": 1.0},
            {"kind": "passkey", "length": 8, "depth": 0.5, "score": 0.0},
            {"kind": "multikey", "length": 16, "depth": 0.5, "score": 1.0}]
  scored[0]["zone"] = scored[2]["zone"] = "beyond"
  t = accuracy_table(scored, ["passkey", "multikey"], [8, 16], [0.5])
  assert t["per_task"] == {"passkey": 0.5, "multikey": 1.0} and t["cells"]["passkey|8|0.5"] == 0.5
  assert t["per_zone"]["beyond"] == {"acc": 1.0, "n": 2} and t["per_zone"]["local"] == {"acc": None, "n": 0}
  assert np.isnan(t["token_acc"])
  V, T = 4, 8
  tokens = np.array([[0, 1, 2, 3, 0, 1, 2, 3]])
  row = {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": np.arange(T)[None]}
  uniform = lambda t, s: np.zeros(t.shape + (V,), np.float32)
  r = perplexity(uniform, [row], 2, T)
  assert r["ppl"] == pytest.approx(4.0) and [b["tokens"] for b in r["buckets"]] == [3, 4]


def test_pad_to_gives_the_same_logits_with_one_shape():
  """evaluate.pad_to pads rows to one compiled shape: same logits for the real tokens (also for rows of two
  documents); a pad_to that is no multiple of the block size is refused."""
  import jax

  from loza_jax.config import replace
  from loza_jax.model import build_model
  from train.evaluate import model_logits_fn
  cfg = load_config("configs/demo_cpu.yaml", ["model.num_hidden_layers=2", "attention.layer_types=[full, ssa]"])
  params = build_model(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 16), np.int32))["params"]
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (3, 40)).astype(np.int32)
  seg = np.ones((3, 40), np.int32)
  seg[1, 24:] = 2        # a second document in row 1
  seg[2, 32:] = 0        # padding at the end of row 2
  plain = model_logits_fn(params, cfg)(tokens, seg)
  padded = model_logits_fn(params, replace(cfg, **{"evaluate.pad_to": 64}))(tokens, seg)
  assert padded.shape == plain.shape == (3, 40, 256)
  real = seg > 0
  np.testing.assert_allclose(padded[real], plain[real], rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match=r"evaluate.pad_to=60 must be a multiple of attention.block_size=8"):
    model_logits_fn(params, replace(cfg, **{"evaluate.pad_to": 60}))
  with pytest.raises(ValueError, match=r"evaluate.pad_to must be >= 0"):
    load_config("configs/demo_cpu.yaml", ["evaluate.pad_to=-8"])


def test_generated_answers_past_the_positions_are_refused_up_front(tmp_path):
  """answers=generate at a length whose decoding passes max_position_embeddings fails before any work, naming
  the sizes (the pipeline checks it before pretraining); teacher-forced answers or RoPE scaling are fine."""
  from train import pipeline
  from train.evaluate import check_positions
  over = ["model.max_position_embeddings=256", "evaluate.lengths=[128, 256]", "pipeline.pretrain_stages=[]"]
  cfg = load_config("configs/demo_cpu.yaml", over + ["evaluate.answers=generate"])
  with pytest.raises(ValueError, match=r"evaluate.lengths has 256: greedy answers decode up to 258 positions, "
                                       r"past model.max_position_embeddings=256"):
    check_positions(cfg)
  with pytest.raises(ValueError, match=r"max_position_embeddings=256"):
    pipeline.check_pipeline(cfg)
  check_positions(load_config("configs/demo_cpu.yaml", over + ["evaluate.answers=teacher_forced"]))
  check_positions(load_config("configs/demo_cpu.yaml", over + [
      "model.rope_scaling={factor: 2.0, original_max_position_embeddings: 256}"]))


def test_plot_labels_and_styles_stay_apart():
  """Heatmap ticks shorten only exact multiples of 1024; eleven models get eleven distinct line styles."""
  assert [length_label(n) for n in (128, 1000, 4096, 32768)] == ["128", "1000", "4K", "32K"]
  styles = {tuple(sorted(line_style(i).items())) for i in range(11)}
  assert len(styles) == 11

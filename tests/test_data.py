"""Data pipeline: packing layout, determinism, per-process shards, retrieval tasks, source errors."""
import re

import numpy as np
import pytest

from train import data
from tests.trainer_utils import tiny_cfg, write_jsonl

BLOCK = 16


def _docs(rng, n=60):
  words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
  return [f"doc{i}: " + " ".join(rng.choice(words, rng.integers(1, 30))) for i in range(n)]


def _files_cfg(tmp_path, rng, extra=()):
  docs = _docs(rng)
  path = write_jsonl(tmp_path / "docs.jsonl", docs)
  return tiny_cfg(tmp_path / "run", ["data.source=files", f"data.paths=[{path}]", *extra]), docs


def _segments(row):
  """[(segment id, start, end)] of the non-padding runs of one packed row."""
  seg = row["segment_ids"]
  out, t = [], 0
  while t < len(seg):
    if seg[t] == 0:
      t += 1
      continue
    s = t
    while t < len(seg) and seg[t] == seg[s]:
      t += 1
    out.append((int(seg[s]), s, t))
  return out


def test_packing_layout(tmp_path, rng):
  cfg, docs = _files_cfg(tmp_path, rng)
  tok = data.ByteTokenizer()
  batches = [b for _, b in zip(range(6), data.build_dataset(cfg, 4))]
  n_multi = 0
  for b in batches:
    assert set(b) == {"tokens", "segment_ids", "positions", "loss_mask"}
    for r in range(b["tokens"].shape[0]):
      row = {k: v[r] for k, v in b.items()}
      segs = _segments(row)
      assert [s for s, _, _ in segs] == list(range(1, len(segs) + 1))
      n_multi += len(segs) > 1
      for sid, s, e in segs:
        assert s % BLOCK == 0, "documents must start on block boundaries"
        np.testing.assert_array_equal(row["positions"][s:e], np.arange(e - s))
        piece = tok.decode(row["tokens"][s:e])
        assert any(piece in d for d in docs), piece
      pad = row["segment_ids"] == 0
      assert (row["tokens"][pad] == 0).all() and (row["loss_mask"][pad] == 0).all()
  assert n_multi > 0, "short documents should share rows"


def test_target_weights_never_cross_documents():
  seg = np.array([[1, 1, 1, 2, 2, 0, 0, 3]])
  mask = np.array([[1, 1, 1, 1, 0, 0, 0, 1]])
  w = data.target_weights(seg, mask)
  np.testing.assert_array_equal(w, [[1, 1, 0, 0, 0, 0, 0]])


def test_deterministic_and_resumable(tmp_path, rng):
  cfg, _ = _files_cfg(tmp_path, rng, ["data.seq_len=256", "data.retrieval_fraction=0.3",
                                      "data.retrieval_tasks=[passkey, vartrack]"])
  corpus = data.load_corpus(cfg.data)
  a = iter(data.build_dataset(cfg, 4, corpus=corpus))
  first = [next(a) for _ in range(3)]
  state = a.get_state()
  rest = [next(a) for _ in range(3)]
  b = iter(data.build_dataset(cfg, 4, corpus=corpus))
  for x, y in zip(first, [next(b) for _ in range(3)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  c = iter(data.build_dataset(cfg, 4, corpus=corpus))
  c.set_state(state)
  for x, y in zip(rest, [next(c) for _ in range(3)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other = next(iter(data.build_dataset(cfg, 4, seed=123, corpus=corpus)))
  assert not np.array_equal(other["tokens"], first[0]["tokens"])


def test_per_process_shards_are_disjoint(tmp_path, rng):
  cfg, _ = _files_cfg(tmp_path, rng, ["data.chunk_bytes=1000"])
  tok = data.ByteTokenizer()

  def doc_ids(pid):
    it = iter(data.build_dataset(cfg, 2, process_index=pid, process_count=2))
    ids = []
    for _ in range(6):
      b = next(it)
      for r in range(2):
        ids += [tok.decode(b["tokens"][r][s:e]).split(":")[0] for _, s, e in _segments({k: v[r] for k, v in b.items()})]
    return ids

  a, b = doc_ids(0), doc_ids(1)
  assert len(set(a)) == len(a) and len(set(b)) == len(b), "no document repeats within the first epoch"
  assert not set(a) & set(b)
  assert len(a) > 10 and len(b) > 10


def _independent_answer(kind, prompt):
  """Solve a task from its text alone, without the generator's bookkeeping."""
  if kind == "passkey":
    return re.search(r"The pass key is (\d+)\. Remember it\.", prompt).group(1)
  if kind == "multikey":
    key = re.search(r"What is the magic number for ([\w-]+)\? Answer: $", prompt).group(1)
    return dict(re.findall(r"The magic number for ([\w-]+) is (\d+)\.", prompt))[key]
  if kind == "multivalue":
    key = re.search(r"List all magic numbers for ([\w-]+)\. Answer: $", prompt).group(1)
    return ", ".join(v for k, v in re.findall(r"The magic number for ([\w-]+) is (\d+)\.", prompt) if k == key)
  if kind == "vartrack":
    value = re.search(r"Which variables equal (\d+)\? Answer: $", prompt).group(1)
    found = []
    for name, rhs in re.findall(r"^VAR ([A-Z]{5}) = (\w+)$", prompt, re.M):
      if rhs == value or rhs in found:
        found.append(name)
    return " ".join(found)
  raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["passkey", "multikey", "multivalue", "vartrack"])
def test_retrieval_answer_recoverable(kind, rng):
  corpus, tok = data.stdlib_corpus(), data.ByteTokenizer()
  for length, depth in [(256, 0.0), (512, 0.5), (1024, 0.25), (1024, 1.0), (2048, 0.8)]:
    ex = data.make_retrieval_example(kind, length, depth, rng, corpus, tok)
    assert _independent_answer(kind, ex.prompt) == ex.answer
    enc = data.encode_example(ex, tok, "answer")
    assert len(enc["tokens"]) <= length
    assert len(enc["tokens"]) > 0.8 * length, "the haystack should fill most of the requested length"
    assert tok.decode(enc["tokens"]) == ex.text
    assert tok.decode(enc["tokens"][enc["loss_mask"] == 1]) == ex.answer
    if length >= 1024:
      assert abs(ex.needle_offsets[0] / len(ex.prompt) - depth) < 0.15
    assert data.score_answer(ex, ex.answer + "\nmore") == 1.0
    assert data.score_answer(ex, "0000000 nothing") == 0.0


def test_retrieval_too_short_is_an_error(rng):
  with pytest.raises(ValueError, match="retrieval_lengths"):
    data.make_retrieval_example("vartrack", 40, 0.5, rng, data.stdlib_corpus(), data.ByteTokenizer())


def test_stdlib_corpus():
  files = data.stdlib_files()
  assert len(files) > 100
  assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)


def test_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    data.file_corpus([str(tmp_path / "missing.jsonl")])
  (tmp_path / "x.csv").write_text("a,b")
  with pytest.raises(ValueError, match="unsupported suffix"):
    data.file_corpus([str(tmp_path / "x.csv")])
  empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
  with pytest.raises(ValueError, match="no non-empty documents"):
    data.file_corpus([str(empty)])
  (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: no 'text' field"):
    data.file_corpus([str(tmp_path / "bad.jsonl")])
  with pytest.raises(FileNotFoundError, match="data.tokenizer"):
    data.load_tokenizer(str(tmp_path / "tok.json"))
  with pytest.raises(ValueError, match="multiple of attention.block_size"):
    data.build_dataset(tiny_cfg(tmp_path, ["data.seq_len=40"]), 2)


def test_text_and_parquet_files(tmp_path):
  (tmp_path / "a.txt").write_text("hello world\n")
  (tmp_path / "b.md").write_text("# title\n")
  corpus = data.file_corpus([str(tmp_path)])
  assert sorted(corpus.read(i) for i in range(len(corpus))) == [b"# title\n", b"hello world\n"]
  assert sorted(corpus.read_range(i, 2, 5) for i in range(len(corpus))) == [b"llo", b"tit"]
  (tmp_path / "c.parquet").write_bytes(b"PAR1")
  try:
    import pyarrow  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="pyarrow"):
      data.file_corpus([str(tmp_path / "c.parquet")])


def test_hf_tokenizer_needs_the_package(tmp_path):
  try:
    import tokenizers  # noqa: F401
    pytest.skip("tokenizers is installed")
  except ImportError:
    pass
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(ImportError, match="tokenizers"):
    data.load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_heldout_split_is_disjoint_from_training():
  spans = np.stack([np.zeros(100, np.int64), np.arange(100) * 10, np.arange(100) * 10 + 10], 1)
  train = data.split_spans(spans, 10, "train")
  held = data.split_spans(spans, 10, "heldout")
  assert len(train) == 90 and len(held) == 10
  assert not set(map(tuple, train.tolist())) & set(map(tuple, held.tolist()))
  np.testing.assert_array_equal(data.split_spans(spans, 0, "train"), spans)
  with pytest.raises(ValueError, match="no held-out text"):
    data.split_spans(spans, 0, "heldout")
  with pytest.raises(ValueError, match="too few"):
    data.split_spans(spans[:3], 10, "heldout")

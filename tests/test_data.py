"""Data pipeline: packing layout, determinism, per-process shards, retrieval tasks, source errors."""
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from loza_jax.config import replace
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


@pytest.mark.parametrize("prefetch", [0, 3])
def test_deterministic_and_resumable(tmp_path, rng, prefetch):
  """The same batches with or without the prefetch thread; a state taken mid-stream resumes exactly."""
  cfg, _ = _files_cfg(tmp_path, rng, ["data.seq_len=256", "data.retrieval_fraction=0.3",
                                      "data.retrieval_tasks=[passkey, vartrack]", f"data.prefetch_batches={prefetch}"])
  corpus = data.load_corpus(cfg.data)
  a = iter(data.build_dataset(cfg, 4, corpus=corpus))
  first = [next(a) for _ in range(3)]
  state = a.get_state()
  rest = [next(a) for _ in range(3)]
  other_prefetch = replace(cfg, **{"data.prefetch_batches": 2 - prefetch % 2})   # 2 against 0, 1 against 3
  b = iter(data.build_dataset(other_prefetch, 4, corpus=corpus))
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
    assert tok.decode(enc["tokens"][enc["loss_mask"] == data.ANSWER]) == ex.answer
    assert not (enc["loss_mask"] == 1).any()   # retrieval_loss "answer": the prompt is no target
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


# ----------------------------------------------------------------------------------------
# Held-out documents, needle placement, real lengths, input validation.

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
MARK = 0x100   # document i is written in the character chr(MARK + i) (2 UTF-8 bytes) plus spaces/newlines


def shipped_seq_lens() -> list[int]:
  """Every seq_len a stage of a shipped config trains or evaluates at."""
  lens = set()
  for path in CONFIGS:
    c = yaml.safe_load(path.read_text())
    lens.add(c.get("data", {}).get("seq_len", 256))
    lens.add(c.get("calibrate", {}).get("seq_len") or c.get("data", {}).get("seq_len", 256))
    lens |= {s["seq_len"] for s in c.get("midtrain", {}).get("stages", [])}
    lens |= {s["seq_len"] for s in (c.get("pipeline") or {}).get("pretrain_stages", [])}
    lens |= set(c.get("evaluate", {}).get("lengths", []))
  return sorted(lens)


def _marked_corpus(tmp_path, rng, n=30):
  """n documents; document i uses only chr(MARK + i), spaces and newlines; sizes vary 100x."""
  texts = []
  for i in range(n):
    words = [chr(MARK + i) * int(k) for k in rng.integers(1, 9, int(rng.integers(20, 2000)))]
    texts.append(" ".join(w + ("\n" if rng.random() < 0.1 else "") for w in words))
  return write_jsonl(tmp_path / "marked.jsonl", texts), texts


def _docs_in(tokens: np.ndarray, n: int) -> set[int]:
  chars = set(bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", errors="replace"))
  return {ord(c) - MARK for c in chars if MARK <= ord(c) < MARK + n}


def test_heldout_documents_never_reach_training_at_any_shipped_seq_len(tmp_path, rng):
  path, texts = _marked_corpus(tmp_path, rng)
  n, total = len(texts), sum(len(t.encode()) for t in texts)
  seq_lens = shipped_seq_lens()
  assert {128, 32768, 131072, 262144} <= set(seq_lens)
  base = ["data.source=files", f"data.paths=[{path}]", "data.heldout_fraction=0.2", "data.retrieval_fraction=0.3",
          "model.max_position_embeddings=262144"]
  corpus = data.file_corpus([str(path)])
  train_docs, held_docs = (set(x.tolist()) for x in data.split_documents(corpus, 0.2))
  assert train_docs and held_docs and not train_docs & held_docs
  for seq_len in seq_lens:
    short = seq_len < 256            # the demo (128 tokens): passkey tasks that fit it
    cfg = tiny_cfg(tmp_path / "run", base + [f"data.seq_len={seq_len}", f"data.retrieval_lengths=[{min(256, seq_len)}]",
                                             f"data.retrieval_tasks=[{'passkey' if short else 'passkey, multikey'}]"])
    seen, n_tokens = set(), 0
    for b in data.build_dataset(cfg, 1, corpus=corpus):
      real = b["tokens"][b["segment_ids"] != 0]
      seen |= _docs_in(real, n)
      n_tokens += len(real)
      if n_tokens > 2 * total:
        break
    assert not seen & held_docs, f"seq_len {seq_len}: held-out documents {sorted(seen & held_docs)} in training"
    assert len(seen) > 0.8 * len(train_docs), (seq_len, len(seen), len(train_docs))
    held = next(iter(data.build_dataset(cfg, 1, corpus=corpus, split="heldout")))
    assert _docs_in(held["tokens"][held["segment_ids"] != 0], n) <= held_docs


def test_heldout_split_of_small_corpora(tmp_path):
  for k in (2, 3):
    corpus = data.file_corpus([str(write_jsonl(tmp_path / f"c{k}.jsonl", [f"text {i}" for i in range(k)]))])
    train, held = data.split_documents(corpus, 0.02)
    assert len(train) and len(held) and len(train) + len(held) == k
  one = data.file_corpus([str(write_jsonl(tmp_path / "one.jsonl", ["only"]))])
  with pytest.raises(ValueError, match="has 1 document.*data.heldout_fraction=0.02"):
    data.split_documents(one, 0.02)
  np.testing.assert_array_equal(data.split_documents(one, 0.0)[0], [0])
  with pytest.raises(ValueError, match="no held-out text"):
    data.split_docs(one, 0.0, "heldout")


def test_heldout_split_depends_on_document_ids_only(tmp_path, monkeypatch):
  (tmp_path / "d").mkdir()
  for i in range(40):
    (tmp_path / "d" / f"f{i}.txt").write_text(f"document {i}\n" * (i + 1))
  a = data.file_corpus([str(tmp_path / "d")])
  monkeypatch.chdir(tmp_path)
  b = data.file_corpus(["d"])
  assert [a.doc_id(i) for i in range(len(a))] == [b.doc_id(i) for i in range(len(b))]
  for x, y in zip(data.split_documents(a, 0.25), data.split_documents(b, 0.25)):
    np.testing.assert_array_equal(x, y)
  held = data.split_documents(a, 0.25)[1]
  assert 3 <= len(held) <= 20


def test_retrieval_filler_comes_only_from_the_given_documents(tmp_path, rng):
  path, texts = _marked_corpus(tmp_path, rng, n=10)
  corpus, tok = data.file_corpus([str(path)]), data.ByteTokenizer()
  for _ in range(20):
    ex = data.make_retrieval_example("passkey", 512, float(rng.uniform()), rng, corpus, tok, docs=[2, 5])
    assert _docs_in(tok.encode(ex.prompt), 10) <= {2, 5}


def _hay_corpus(tmp_path, rng, newlines: bool):
  words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod",
           "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua", "enim", "minim", "veniam"]
  sep = lambda: "\n" if newlines and rng.random() < 0.1 else " "
  texts = ["".join(str(w) + sep() for w in rng.choice(words, 3000)) for _ in range(6)]
  return data.file_corpus([str(write_jsonl(tmp_path / "hay.jsonl", texts))]), words


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  """A real tokenizer.json (byte-level BPE, ~6 bytes/token on its words) trained here, loaded by load_tokenizer."""
  tokenizers = pytest.importorskip("tokenizers")
  rng = np.random.default_rng(0)
  words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod",
           "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua", "enim", "minim", "veniam",
           "the", "pass", "key", "is", "remember", "it", "what", "magic", "number", "for", "answer", "list", "all"]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=600, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([" ".join(rng.choice(words, 200)) for _ in range(200)], trainer)
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tok.save(str(path))
  return data.load_tokenizer(str(path))


@pytest.mark.parametrize("tokenizer", ["byte", "hf"])
def test_needle_lands_at_the_requested_token_depth_without_newlines(tmp_path, rng, tokenizer, request):
  corpus, _ = _hay_corpus(tmp_path, rng, newlines=False)
  tok = data.ByteTokenizer() if tokenizer == "byte" else request.getfixturevalue("hf_tokenizer")
  for depth in (0.05, 0.25, 0.5, 0.75, 0.95):
    ex = data.make_retrieval_example("passkey", 1024, depth, rng, corpus, tok)
    needle_len = ex.needle_ends[0] - ex.needle_tokens[0] + 1
    hay = ex.question_token - needle_len            # haystack tokens
    assert abs(ex.needle_tokens[0] - depth * hay) <= 4, (depth, ex.needle_tokens[0], hay)
    assert ex.depth_actual == pytest.approx(ex.needle_tokens[0] / ex.prompt_tokens)
    pieces = tok.encode(ex.prompt)
    assert tok.decode(pieces[ex.needle_tokens[0]:ex.needle_ends[0] + 1].tolist()).strip().startswith("The pass key")
    assert ex.distance == ex.question_token - ex.needle_ends[0] > 0


@pytest.mark.parametrize("tokenizer", ["byte", "hf"])
def test_examples_have_their_stated_length(tmp_path, rng, tokenizer, request):
  corpus, _ = _hay_corpus(tmp_path, rng, newlines=True)
  tok = data.ByteTokenizer() if tokenizer == "byte" else request.getfixturevalue("hf_tokenizer")
  for kind in ("passkey", "multikey", "multivalue", "vartrack"):
    for length in (256, 1000, 4096):
      ex = data.make_retrieval_example(kind, length, float(rng.uniform()), rng, corpus, tok)
      n = len(data.encode_example(ex, tok)["tokens"])
      assert length - BLOCK <= n <= length, (kind, length, n)


def test_bytes_per_token_is_measured(tmp_path, rng, hf_tokenizer):
  corpus, _ = _hay_corpus(tmp_path, rng, newlines=True)
  bpt = data.measure_bytes_per_token(hf_tokenizer, corpus, range(len(corpus)))
  text = corpus.read(0)
  assert bpt == pytest.approx(len(text) / len(hf_tokenizer.encode(text)), rel=0.1)
  assert bpt > 3.5, "the fixture must be denser than the old 3 bytes/token guess"
  assert data.measure_bytes_per_token(data.ByteTokenizer(), corpus, [0]) == 1.0


def test_training_documents_reach_seq_len_with_a_dense_tokenizer(tmp_path, rng, hf_tokenizer):
  corpus, _ = _hay_corpus(tmp_path, rng, newlines=True)
  cfg = tiny_cfg(tmp_path / "run", ["data.seq_len=256", "data.heldout_fraction=0.0"])
  longest = 0
  for _, b in zip(range(20), data.build_dataset(cfg, 2, corpus=corpus, tokenizer=hf_tokenizer)):
    for r in range(2):
      longest = max([longest] + [e - s for _, s, e in _segments({k: v[r] for k, v in b.items()})])
  assert longest == 256


def test_needle_zone_follows_the_ssa_rule(rng):
  B, sink, local = 16, 1, 3

  def sees(t, s):   # README: query t sees key s iff s <= t and (s//B < sink or s//B >= t//B - (local - 1))
    return s <= t and (s // B < sink or s // B >= t // B - (local - 1))

  for _ in range(2000):
    q = int(rng.integers(1, 400))
    end = int(rng.integers(0, q))
    zone = data.needle_zone(end, q, B, sink, local)
    assert zone == ("sink" if end < sink * B else "local" if sees(q, end) else "beyond"), (end, q, zone)


def test_exact_match_scoring():
  ex = lambda kind, answer: data.RetrievalExample(kind, "", answer, 0.5, (0,))
  assert data.score_answer(ex("passkey", "1234567"), " 1234567\nmore") == 1.0
  assert data.score_answer(ex("passkey", "1234567"), "123456") == 0.0
  assert data.score_answer(ex("passkey", "1234567"), "12345678") == 0.0
  mv = ex("multivalue", "111, 222, 333")
  assert data.score_answer(mv, "333, 111, 222") == 1.0
  assert data.score_answer(mv, "111, 222") == 0.0
  assert data.score_answer(mv, "111, 222, 333, 444") == 0.0
  vt = ex("vartrack", "ABCDE FGHIJ KLMNO")
  assert data.score_answer(vt, "KLMNO ABCDE FGHIJ") == 1.0
  assert data.score_answer(vt, "ABCDE FGHIJ") == 0.0


@pytest.mark.parametrize("line,match", [('{"text": 5}', r"bad.jsonl:2: 'text' is int"),
                                        ('{"text": null}', r"bad.jsonl:2: 'text' is NoneType")])
def test_jsonl_text_must_be_a_string(tmp_path, line, match):
  (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
  with pytest.raises(ValueError, match=match):
    data.file_corpus([str(tmp_path / "bad.jsonl")])


def test_jsonl_invalid_utf8_names_file_and_line(tmp_path):
  (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid UTF-8"):
    data.file_corpus([str(tmp_path / "bad.jsonl")])


def test_passkey_digits_range_and_cap(rng):
  cfg = tiny_cfg("unused", ["data.seq_len=256", "data.retrieval_fraction=1.0", "data.retrieval_tasks=[passkey]",
                            "data.retrieval_lengths=[96, 128, 256]", "data.passkey_digits=[7, 40]"])
  corpus, tok = data.stdlib_corpus(), data.ByteTokenizer()
  src = data.RetrievalSource(corpus, tok, cfg.data, 0, bytes_per_token=1.0)
  assert [src.passkey_digits(n) for n in (96, 128, 256)] == [(7, 7), (7, 21), (7, 40)]
  seen = {}
  for i in range(60):
    r = src[i]
    answer = bytes(r["tokens"][r["loss_mask"] == data.ANSWER].astype(np.uint8).tolist()).decode()
    assert answer.endswith("\n") and len(r["tokens"]) <= 256   # training answers end their line
    answer = answer[:-1]
    assert answer.isdigit() and answer[0] != "0"
    lo, hi = src.passkey_digits(len(r["tokens"]) + 15 - (len(r["tokens"]) + 15) % 16)
    seen.setdefault(hi, set()).add(len(answer))
    assert lo <= len(answer) <= hi
  assert max(seen.get(40, {0})) > 21   # long keys where they fit
  ex = data.make_retrieval_example("passkey", 256, 0.5, rng, corpus, tok, bytes_per_token=1.0, digits=30)
  assert len(ex.answer) == 30 and f"The pass key is {ex.answer}." in ex.prompt


def test_default_passkeys_keep_their_draws():
  """data.passkey_digits' default draws exactly what 7-digit keys always drew (evaluation cases unchanged)."""
  a, b = np.random.default_rng(3), np.random.default_rng(3)
  assert data._number(a) == str(int(b.integers(1_000_000, 10_000_000)))
  with pytest.raises(ValueError, match="data.passkey_digits"):
    tiny_cfg("unused", ["data.passkey_digits=[8, 7]"])

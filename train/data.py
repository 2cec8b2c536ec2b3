"""Data: document sources, tokenizers, synthetic retrieval tasks and the grain packing pipeline.

A document record is `{"tokens": int32[n], "loss_mask": int32[n]}`; `loss_mask[t] = 1` when token t
is a prediction target. Packed batches (per process) are

  {"tokens", "segment_ids", "positions", "loss_mask"}: int32 [rows, seq_len]

with `segment_ids` 0 on padding, positions restarting at 0 for every document, and every document
starting at a multiple of `attention.block_size` (grain's first-fit packing with an alignment).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sysconfig
from pathlib import Path
from typing import Protocol, Sequence

import grain
from grain import experimental as grain_exp
import numpy as np

from loza_jax.config import Config, DataConfig

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_PACKED_KEYS = {"tokens": "tokens", "tokens_segment_ids": "segment_ids", "tokens_positions": "positions",
                "loss_mask": "loss_mask"}


# ----------------------------------------------------------------------------------------
# Tokenizers.


class Tokenizer(Protocol):
  vocab_size: int
  bytes_per_token: float   # rough average, used to size text chunks

  def encode(self, text: str) -> np.ndarray: ...
  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as token ids (vocab 256, no special tokens)."""
  vocab_size = 256
  bytes_per_token = 1.0

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


class HFTokenizer:
  """A HuggingFace `tokenizers` tokenizer.json (no special tokens added)."""
  bytes_per_token = 3.0

  def __init__(self, path: str | Path):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError(f"data.tokenizer={str(path)!r} needs the `tokenizers` package: "
                        "pip install -c constraints.txt tokenizers (or use data.tokenizer=byte)") from None
    self._tok = tokenizers.Tokenizer.from_file(str(path))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="ignore")
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
  """`byte` or a path to a tokenizer.json."""
  if spec == "byte":
    return ByteTokenizer()
  if not Path(spec).is_file():
    raise FileNotFoundError(f"data.tokenizer: {spec!r} is neither 'byte' nor an existing tokenizer.json file")
  return HFTokenizer(spec)


# ----------------------------------------------------------------------------------------
# Document sources: random access to UTF-8 document bytes.


@dataclasses.dataclass(frozen=True)
class _Doc:
  path: str
  offset: int = 0          # JSONL: byte offset of the line
  size: int = 0            # bytes of the document text (UTF-8)
  kind: str = "file"       # file | jsonl | mem
  text: bytes | None = None


class Corpus:
  """Documents with random access: `len(c)`, `c.read(i) -> bytes`, `c.size(i)`."""

  def __init__(self, docs: Sequence[_Doc], text_key: str = "text", description: str = ""):
    self._docs = [d for d in docs if d.size > 0]
    self.text_key = text_key
    self.description = description
    if not self._docs:
      raise ValueError(f"data: no non-empty documents in {description or 'the corpus'}; check data.paths / "
                       "data.text_key")

  def __len__(self) -> int:
    return len(self._docs)

  def size(self, i: int) -> int:
    return self._docs[i].size

  def read(self, i: int) -> bytes:
    d = self._docs[i]
    if d.kind == "mem":
      return d.text
    if d.kind == "file":
      return Path(d.path).read_bytes()
    with open(d.path, "rb") as f:
      f.seek(d.offset)
      return json.loads(f.readline())[self.text_key].encode("utf-8")

  def read_range(self, i: int, start: int, end: int) -> bytes:
    """Bytes [start, end) of document i (only that range is read for plain files)."""
    d = self._docs[i]
    if d.kind != "file":
      return self.read(i)[start:end]
    with open(d.path, "rb") as f:
      f.seek(start)
      return f.read(end - start)

  @property
  def total_bytes(self) -> int:
    return sum(d.size for d in self._docs)


def stdlib_files() -> list[Path]:
  """The running interpreter's standard library .py files (no site-packages, no test suites), sorted."""
  root = Path(sysconfig.get_paths()["stdlib"])
  skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip)
    out += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
  return out


def stdlib_corpus() -> Corpus:
  files = stdlib_files()
  return Corpus([_Doc(str(p), size=p.stat().st_size) for p in files], description=f"the stdlib ({len(files)} files)")


def _expand(paths: Sequence[str]) -> list[Path]:
  out = []
  for p in map(Path, paths):
    if p.is_dir():
      found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUPPORTED_SUFFIXES)
      if not found:
        raise ValueError(f"data.paths: directory {p} holds no {SUPPORTED_SUFFIXES} files")
      out += found
    elif p.is_file():
      if p.suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"data.paths: {p} has an unsupported suffix {p.suffix!r}; use one of {SUPPORTED_SUFFIXES}")
      out.append(p)
    else:
      raise FileNotFoundError(f"data.paths: {p} does not exist")
  return out


def _jsonl_docs(path: Path, text_key: str) -> list[_Doc]:
  docs, offset = [], 0
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or text_key not in record:
          raise ValueError(f"{path}:{lineno}: no {text_key!r} field (set data.text_key)")
        docs.append(_Doc(str(path), offset, len(str(record[text_key]).encode("utf-8")), "jsonl"))
      offset += len(line)
  return docs


def _parquet_docs(path: Path, text_key: str) -> list[_Doc]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"data.paths: reading {path} needs pyarrow (pip install -c constraints.txt pyarrow), "
                      "or convert it to JSONL") from None
  table = pq.read_table(path)
  if text_key not in table.column_names:
    raise ValueError(f"{path}: no column {text_key!r} (columns: {table.column_names}); set data.text_key")
  texts = [str(t).encode("utf-8") for t in table.column(text_key).to_pylist() if t is not None]
  return [_Doc(str(path), size=len(t), kind="mem", text=t) for t in texts]


def file_corpus(paths: Sequence[str], text_key: str = "text") -> Corpus:
  """Documents from .txt/.md/.py (one per file), .jsonl (one per line) and .parquet (one per row)."""
  docs = []
  for p in _expand(paths):
    if p.suffix in JSONL_SUFFIXES:
      docs += _jsonl_docs(p, text_key)
    elif p.suffix in PARQUET_SUFFIXES:
      docs += _parquet_docs(p, text_key)
    else:
      docs.append(_Doc(str(p), size=p.stat().st_size))
  return Corpus(docs, text_key, description=f"data.paths={list(paths)}")


def load_corpus(cfg: DataConfig) -> Corpus:
  return stdlib_corpus() if cfg.source == "stdlib" else file_corpus(cfg.paths, cfg.text_key)


def chunk_spans(corpus: Corpus, chunk_bytes: int) -> np.ndarray:
  """[n, 3] int64 (doc, start, end) byte spans cutting every document into pieces of <= chunk_bytes."""
  spans = []
  for i in range(len(corpus)):
    starts = np.arange(0, corpus.size(i), chunk_bytes)
    spans.append(np.stack([np.full_like(starts, i), starts, np.minimum(starts + chunk_bytes, corpus.size(i))], 1))
  return np.concatenate(spans).astype(np.int64)


class ChunkSource:
  """grain random-access source: span i -> {"tokens", "loss_mask"} (at most max_tokens tokens)."""

  def __init__(self, corpus: Corpus, tokenizer: Tokenizer, spans: np.ndarray, max_tokens: int):
    self.corpus, self.tokenizer, self.spans, self.max_tokens = corpus, tokenizer, spans, max_tokens

  def __len__(self) -> int:
    return len(self.spans)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    doc, start, end = (int(x) for x in self.spans[i])
    tokens = self.tokenizer.encode(self.corpus.read_range(doc, start, end))[: self.max_tokens]
    if len(tokens) == 0:   # a span of only undecodable bytes
      tokens = self.tokenizer.encode(" ")[:1]
    return {"tokens": tokens, "loss_mask": np.ones_like(tokens)}


# ----------------------------------------------------------------------------------------
# Synthetic long-context retrieval tasks.

_WORDS = ("amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kelp",
          "lagoon", "meadow", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet",
          "willow", "yarrow", "zephyr", "basalt", "cedar", "delta", "falcon", "glacier")


@dataclasses.dataclass(frozen=True)
class RetrievalExample:
  """A haystack with needles and a question (`prompt`) whose exact continuation is `answer`."""
  kind: str
  prompt: str
  answer: str
  depth: float
  needle_offsets: tuple[int, ...]   # character offsets of the needles in `prompt`

  @property
  def text(self) -> str:
    return self.prompt + self.answer


def _number(rng) -> str:
  return str(int(rng.integers(1_000_000, 10_000_000)))


def _key(rng, taken: set) -> str:
  while True:
    key = f"{_WORDS[rng.integers(len(_WORDS))]}-{_WORDS[rng.integers(len(_WORDS))]}"
    if key not in taken:
      taken.add(key)
      return key


def _var(rng, taken: set) -> str:
  while True:
    name = "".join(chr(ord("A") + int(c)) for c in rng.integers(0, 26, 5))
    if name not in taken:
      taken.add(name)
      return name


def _task(kind: str, rng, depth: float):
  """(needles, the relative depth of each needle, question, answer)."""
  later = lambda n: sorted(rng.uniform(depth, 1.0, n).tolist())
  anywhere = lambda n: rng.uniform(0.0, 1.0, n).tolist()
  if kind == "passkey":
    v = _number(rng)
    return [f"The pass key is {v}. Remember it.\n"], [depth], "\nWhat is the pass key? The pass key is ", v
  if kind == "multikey":
    keys: set = set()
    items = [(_key(rng, keys), _number(rng)) for _ in range(3)]
    needles = [f"The magic number for {k} is {v}.\n" for k, v in items]
    return needles, [depth] + anywhere(2), f"\nWhat is the magic number for {items[0][0]}? Answer: ", items[0][1]
  if kind == "multivalue":
    k = _key(rng, set())
    values = [_number(rng) for _ in range(3)]
    depths = [depth] + anywhere(2)
    needles = [f"The magic number for {k} is {v}.\n" for v in values]
    in_text_order = [values[i] for i in np.argsort(depths, kind="stable")]
    return needles, depths, f"\nList all magic numbers for {k}. Answer: ", ", ".join(in_text_order)
  if kind == "vartrack":
    names: set = set()
    chain = [_var(rng, names) for _ in range(3)]
    other = [_var(rng, names) for _ in range(2)]
    v, w = _number(rng), _number(rng)
    needles = [f"VAR {chain[0]} = {v}\n"] + [f"VAR {b} = {a}\n" for a, b in zip(chain, chain[1:])]
    needles += [f"VAR {other[0]} = {w}\n", f"VAR {other[1]} = {other[0]}\n"]
    depths = [depth] + later(2) + sorted(anywhere(2))
    return needles, depths, f"\nWhich variables equal {v}? Answer: ", " ".join(chain)
  raise ValueError(f"retrieval task {kind!r} is not one of passkey|multikey|multivalue|vartrack")


def _filler(corpus: Corpus, rng, n_bytes: int) -> str:
  """About n_bytes of contiguous corpus text starting at a random document and offset."""
  doc = int(rng.integers(len(corpus)))
  start = int(rng.integers(max(corpus.size(doc) - n_bytes, 0) + 1))
  out = b""
  while len(out) < n_bytes:
    out += corpus.read_range(doc, start, start + n_bytes - len(out))
    doc, start = (doc + 1) % len(corpus), 0
  return out.decode("utf-8", errors="ignore")


def _line_start(text: str, i: int) -> int:
  return text.rfind("\n", 0, i) + 1


def make_retrieval_example(kind: str, length: int, depth: float, rng: np.random.Generator, corpus: Corpus,
                           tokenizer: Tokenizer) -> RetrievalExample:
  """A `kind` task of at most `length` tokens, the (first) answer needle at relative `depth` in [0, 1]."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"retrieval depth must be in [0, 1], got {depth}")
  needles, depths, question, answer = _task(kind, rng, depth)
  ntok = lambda s: len(tokenizer.encode(s))
  fixed = sum(map(ntok, needles)) + ntok(question) + ntok(answer)
  if fixed > length:
    raise ValueError(f"retrieval task {kind!r} needs {fixed} tokens without any haystack; length={length} "
                     "is too short (raise data.retrieval_lengths)")
  budget = length - fixed
  filler = _filler(corpus, rng, int(budget * tokenizer.bytes_per_token)) if budget else ""
  while True:
    cuts = [_line_start(filler, int(round(d * len(filler)))) for d in depths]
    order = np.lexsort((depths, cuts))   # text order; ties on a line keep depth order
    parts, offsets, prev = [], [0] * len(needles), 0
    for i in order:
      parts.append(filler[prev:cuts[i]])
      offsets[i] = sum(map(len, parts))
      parts.append(needles[i])
      prev = cuts[i]
    prompt = "".join(parts) + filler[prev:] + question
    n = ntok(prompt) + ntok(answer)
    if n <= length:
      return RetrievalExample(kind, prompt, answer, depth, tuple(offsets))
    filler = filler[: max(int(len(filler) * (length - fixed) / max(n - fixed, 1) * 0.97), 0)]


def encode_example(example: RetrievalExample, tokenizer: Tokenizer, loss: str = "answer") -> dict[str, np.ndarray]:
  """Tokens of prompt + answer; loss_mask on the answer tokens only (`answer`) or on every token (`all`)."""
  prompt, answer = tokenizer.encode(example.prompt), tokenizer.encode(example.answer)
  mask = np.concatenate([np.full(len(prompt), 1 if loss == "all" else 0), np.ones(len(answer))]).astype(np.int32)
  return {"tokens": np.concatenate([prompt, answer]).astype(np.int32), "loss_mask": mask}


def score_answer(example: RetrievalExample, generated: str) -> float:
  """Share of the expected answer items found in the first line of `generated` (exact for single answers)."""
  line = generated.strip().split("\n", 1)[0] if generated.strip() else ""
  if example.kind in ("passkey", "multikey"):
    return float(line.startswith(example.answer))
  sep = ", " if example.kind == "multivalue" else " "
  items = example.answer.split(sep)
  found = set(line.replace(",", " ").split())
  return sum(item in found for item in items) / len(items)


class RetrievalSource:
  """Index i -> an encoded retrieval task drawn with rng(seed, i): kind, length and depth vary."""

  def __init__(self, corpus: Corpus, tokenizer: Tokenizer, cfg: DataConfig, seed: int):
    self.corpus, self.tokenizer, self.cfg, self.seed = corpus, tokenizer, cfg, seed
    self.lengths = cfg.retrieval_lengths or (cfg.seq_len,)

  def __len__(self) -> int:
    return 2 ** 40

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, 7919, int(i)])
    kind = self.cfg.retrieval_tasks[int(rng.integers(len(self.cfg.retrieval_tasks)))]
    length = self.lengths[int(rng.integers(len(self.lengths)))]
    example = make_retrieval_example(kind, length, float(rng.uniform()), rng, self.corpus, self.tokenizer)
    return encode_example(example, self.tokenizer, self.cfg.retrieval_loss)


# ----------------------------------------------------------------------------------------
# The packed pipeline.


def _rename(packed: dict) -> dict[str, np.ndarray]:
  return {new: packed[old].astype(np.int32) for old, new in _PACKED_KEYS.items()}


def default_chunk_bytes(cfg: DataConfig, tokenizer: Tokenizer) -> int:
  return cfg.chunk_bytes or max(int(cfg.seq_len * tokenizer.bytes_per_token), 1)


def split_spans(spans: np.ndarray, heldout_every: int, split: str) -> np.ndarray:
  """Training chunks, or the held-out ones (every `heldout_every`-th chunk), for evaluation."""
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  if heldout_every == 0:
    if split == "heldout":
      raise ValueError("data.heldout_every=0 leaves no held-out text; set it to e.g. 50")
    return spans
  held = np.arange(len(spans)) % heldout_every == heldout_every - 1
  out = spans[held] if split == "heldout" else spans[~held]
  if not len(out):
    raise ValueError(f"the corpus has {len(spans)} chunks: too few for a {split} split with "
                     f"data.heldout_every={heldout_every}")
  return out


def build_dataset(cfg: Config, rows: int, *, seed: int | None = None, process_index: int = 0, process_count: int = 1,
                  corpus: Corpus | None = None, tokenizer: Tokenizer | None = None,
                  split: str = "train") -> grain.IterDataset:
  """Infinite grain dataset of packed per-process batches of `rows` rows (this process's shard).

  split="heldout" yields only the held-out text chunks (data.heldout_every), never retrieval tasks.
  """
  d, block = cfg.data, cfg.attention.block_size
  if d.seq_len % block:
    raise ValueError(f"data.seq_len={d.seq_len} must be a multiple of attention.block_size={block} so packed "
                     "documents start on block boundaries")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  seed = d.seed if seed is None else seed
  tokenizer = tokenizer or load_tokenizer(d.tokenizer)
  corpus = corpus or load_corpus(d)
  spans = split_spans(chunk_spans(corpus, default_chunk_bytes(d, tokenizer)), d.heldout_every, split)
  text = grain.MapDataset.source(ChunkSource(corpus, tokenizer, spans, d.seq_len))
  if d.shuffle:
    text = text.shuffle(seed=seed)
  text = text.repeat()
  if d.retrieval_fraction > 0 and split == "train":
    for kind in d.retrieval_tasks:   # fail now, not on the first draw of a task that cannot fit
      make_retrieval_example(kind, min(d.retrieval_lengths or (d.seq_len,)), 0.5, np.random.default_rng(0),
                             corpus, tokenizer)
    tasks = grain.MapDataset.source(RetrievalSource(corpus, tokenizer, d, seed))
    ds = tasks if d.retrieval_fraction >= 1 else grain.MapDataset.mix(
        [text, tasks], weights=[1.0 - d.retrieval_fraction, d.retrieval_fraction])
  else:
    ds = text
  ds = ds[process_index::process_count]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4 * rows))
  lengths = {"tokens": d.seq_len, "loss_mask": d.seq_len}
  it = grain_exp.FirstFitPackIterDataset(
      it, length_struct=lengths, num_packing_bins=max(rows, 16), seed=seed, shuffle_bins=d.shuffle,
      pack_alignment_struct={"tokens": block, "loss_mask": block})
  return it.map(_rename).batch(rows, drop_remainder=True)


def unigram_counts(batches: Sequence[dict[str, np.ndarray]], vocab_size: int) -> np.ndarray:
  """Loss-weighted counts of target tokens (the tokens the LM loss predicts) in `batches`."""
  counts = np.zeros(vocab_size, np.float64)
  for b in batches:
    np.add.at(counts, b["tokens"][:, 1:], target_weights(b["segment_ids"], b["loss_mask"]))
  return counts


def entropy(counts: np.ndarray) -> float:
  """Entropy (nats) of the empirical distribution: the best unigram model's loss on the counted data."""
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def target_weights(segment_ids, loss_mask):
  """[B, T-1] weights of predicting token t+1 from t: same non-padding document and a loss-mask target."""
  same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
  return same & (loss_mask[:, 1:] != 0)

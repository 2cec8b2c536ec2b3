"""Data: document sources, tokenizers, synthetic retrieval tasks and the grain packing pipeline.

A document record is `{"tokens": int32[n], "loss_mask": int32[n]}`; `loss_mask[t]` is nonzero when
token t is a prediction target: `ANSWER` (2) on retrieval answer tokens, 1 on every other target, so
the loss can also report how well answers alone are predicted. Packed batches (per process) are

  {"tokens", "segment_ids", "positions", "loss_mask"}: int32 [rows, seq_len]

with `segment_ids` 0 on padding, positions restarting at 0 for every document, and every document
starting at a multiple of `attention.block_size` (grain's first-fit packing with an alignment).

Held-out split: whole documents, chosen by a stable hash of each document's id (its path relative to
the data root, plus the line or row for JSONL / Parquet), `data.heldout_fraction` of them; the split
does not depend on seq_len, so no stage ever trains on a byte of a held-out document. Retrieval
filler follows the same rule: training tasks take filler from training documents only, evaluation
tasks (train/evaluate.py) from held-out documents only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sysconfig
import typing
from pathlib import Path
from typing import Literal, Protocol, Sequence

import grain
from grain import experimental as grain_exp
import numpy as np

from loza_jax.config import RETRIEVAL_TASKS, Config, DataConfig, LossSpan

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
ANSWER = 2   # loss_mask value of a retrieval answer token (1: any other prediction target)
Split = Literal["train", "heldout"]   # training documents | held-out documents (data.heldout_fraction)
_PACKED_KEYS = {"tokens": "tokens", "tokens_segment_ids": "segment_ids", "tokens_positions": "positions",
                "loss_mask": "loss_mask"}


# ----------------------------------------------------------------------------------------
# Tokenizers.


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> np.ndarray: ...
  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as token ids (vocab 256, no special tokens)."""
  vocab_size = 256

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


class HFTokenizer:
  """A HuggingFace `tokenizers` tokenizer.json (no special tokens added)."""

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


def measure_bytes_per_token(tokenizer: Tokenizer, corpus: "Corpus", docs: Sequence[int],
                            sample_bytes: int = 1 << 16) -> float:
  """Average UTF-8 bytes per token of `tokenizer` on up to `sample_bytes` of documents `docs` (1.0 for bytes)."""
  if isinstance(tokenizer, ByteTokenizer):
    return 1.0
  docs = list(docs)
  if not docs:
    raise ValueError("measure_bytes_per_token: no documents to measure on")
  per_doc = max(sample_bytes // min(len(docs), 64), 256)
  n_bytes = n_tokens = 0
  for i in np.linspace(0, len(docs) - 1, min(len(docs), 64)).astype(int):
    text = corpus.read_range(int(docs[i]), 0, per_doc).decode("utf-8", errors="ignore")
    n_bytes += len(text.encode("utf-8"))
    n_tokens += len(tokenizer.encode(text))
  return n_bytes / max(n_tokens, 1)


# ----------------------------------------------------------------------------------------
# Document sources: random access to UTF-8 document bytes.


@dataclasses.dataclass(frozen=True)
class _Doc:
  path: str
  offset: int = 0          # JSONL: byte offset of the line
  size: int = 0            # bytes of the document text (UTF-8)
  kind: str = "file"       # file | jsonl | mem
  text: bytes | None = None
  id: str = ""             # stable id for the held-out hash: path relative to the data root (+ :line / #row)


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

  def doc_id(self, i: int) -> str:
    return self._docs[i].id or self._docs[i].path

  def read(self, i: int) -> bytes:
    d = self._docs[i]
    if d.kind == "mem":
      return d.text
    if d.kind == "file":
      return Path(d.path).read_bytes()
    with open(d.path, "rb") as f:
      f.seek(d.offset)
      return json.loads(f.readline().decode("utf-8"))[self.text_key].encode("utf-8")

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
  root = Path(sysconfig.get_paths()["stdlib"])
  return Corpus([_Doc(str(p), size=p.stat().st_size, id=p.relative_to(root).as_posix()) for p in files],
                description=f"the stdlib ({len(files)} files)")


def _expand(paths: Sequence[str]) -> list[tuple[Path, str]]:
  """(file, id) pairs; the id is the path relative to the given directory (or the file's name)."""
  out = []
  for p in map(Path, paths):
    if p.is_dir():
      found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUPPORTED_SUFFIXES)
      if not found:
        raise ValueError(f"data.paths: directory {p} holds no {SUPPORTED_SUFFIXES} files")
      out += [(f, f.relative_to(p).as_posix()) for f in found]
    elif p.is_file():
      if p.suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"data.paths: {p} has an unsupported suffix {p.suffix!r}; use one of {SUPPORTED_SUFFIXES}")
      out.append((p, p.name))
    else:
      raise FileNotFoundError(f"data.paths: {p} does not exist")
  return out


def _jsonl_text(path: Path, lineno: int, line: bytes, text_key: str) -> bytes:
  """The UTF-8 text of one JSONL line; ValueError naming file and line for bad JSON, UTF-8 or text."""
  try:
    record = json.loads(line.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
  if not isinstance(record, dict) or text_key not in record:
    raise ValueError(f"{path}:{lineno}: no {text_key!r} field (set data.text_key)")
  text = record[text_key]
  if not isinstance(text, str):
    raise ValueError(f"{path}:{lineno}: {text_key!r} is {type(text).__name__} {text!r:.40}, not a string")
  try:
    return text.encode("utf-8")
  except UnicodeEncodeError:
    raise ValueError(f"{path}:{lineno}: {text_key!r} holds a lone surrogate (not valid UTF-8)") from None


def _jsonl_docs(path: Path, text_key: str, doc_id: str = "") -> list[_Doc]:
  docs, offset = [], 0
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        size = len(_jsonl_text(path, lineno, line, text_key))
        docs.append(_Doc(str(path), offset, size, "jsonl", id=f"{doc_id or path.name}:{lineno}"))
      offset += len(line)
  return docs


def _parquet_docs(path: Path, text_key: str, doc_id: str = "") -> list[_Doc]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"data.paths: reading {path} needs pyarrow (pip install -c constraints.txt pyarrow), "
                      "or convert it to JSONL") from None
  table = pq.read_table(path)
  if text_key not in table.column_names:
    raise ValueError(f"{path}: no column {text_key!r} (columns: {table.column_names}); set data.text_key")
  texts = [(r, str(t).encode("utf-8")) for r, t in enumerate(table.column(text_key).to_pylist()) if t is not None]
  return [_Doc(str(path), size=len(t), kind="mem", text=t, id=f"{doc_id or path.name}#{r}") for r, t in texts]


def file_corpus(paths: Sequence[str], text_key: str = "text") -> Corpus:
  """Documents from .txt/.md/.py (one per file), .jsonl (one per line) and .parquet (one per row)."""
  docs = []
  for p, doc_id in _expand(paths):
    if p.suffix in JSONL_SUFFIXES:
      docs += _jsonl_docs(p, text_key, doc_id)
    elif p.suffix in PARQUET_SUFFIXES:
      docs += _parquet_docs(p, text_key, doc_id)
    else:
      docs.append(_Doc(str(p), size=p.stat().st_size, id=doc_id))
  return Corpus(docs, text_key, description=f"data.paths={list(paths)}")


def load_corpus(cfg: DataConfig) -> Corpus:
  return stdlib_corpus() if cfg.source == "stdlib" else file_corpus(cfg.paths, cfg.text_key)


def chunk_spans(corpus: Corpus, chunk_bytes: int, docs: Sequence[int] | None = None) -> np.ndarray:
  """[n, 3] int64 (doc, start, end) byte spans cutting documents `docs` (default all) into pieces of <= chunk_bytes."""
  spans = []
  for i in (range(len(corpus)) if docs is None else docs):
    starts = np.arange(0, corpus.size(int(i)), chunk_bytes)
    spans.append(np.stack([np.full_like(starts, i), starts, np.minimum(starts + chunk_bytes, corpus.size(int(i)))], 1))
  return np.concatenate(spans).astype(np.int64) if spans else np.zeros((0, 3), np.int64)


def doc_hash(doc_id: str) -> float:
  """A stable pseudo-random number in [0, 1) from a document id (same on every machine and run)."""
  return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "big") / 2.0 ** 64


def split_documents(corpus: Corpus, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(training, held-out) document indices: a document is held out iff doc_hash(id) < heldout_fraction.

  Independent of seq_len and chunking. When the hash leaves a side empty, the document with the lowest hash is
  held out (or the one with the highest trains); a corpus of one document cannot be split (ValueError).
  """
  n = len(corpus)
  if heldout_fraction <= 0:
    return np.arange(n), np.zeros(0, np.int64)
  if n < 2:
    raise ValueError(f"data: the corpus ({corpus.description or 'data.paths'}) has {n} document; a held-out "
                     f"split of whole documents (data.heldout_fraction={heldout_fraction}) needs at least 2 "
                     "(add documents or set data.heldout_fraction=0)")
  h = np.array([doc_hash(corpus.doc_id(i)) for i in range(n)])
  held = h < heldout_fraction
  if not held.any():
    held[np.argmin(h)] = True
  if held.all():
    held[np.argmax(h)] = False
  return np.nonzero(~held)[0], np.nonzero(held)[0]


def split_docs(corpus: Corpus, heldout_fraction: float, split: Split) -> np.ndarray:
  """Document indices of `split` (train | heldout)."""
  if split not in typing.get_args(Split):
    raise ValueError(f"split: {split!r} is not one of {list(typing.get_args(Split))}")
  train, held = split_documents(corpus, heldout_fraction)
  if split == "heldout" and not len(held):
    raise ValueError("data.heldout_fraction=0 leaves no held-out text; set it to e.g. 0.02")
  return held if split == "heldout" else train


class ChunkSource:
  """grain random-access source: span i -> {"tokens", "loss_mask"} (at most max_tokens tokens)."""

  def __init__(self, corpus: Corpus, tokenizer: Tokenizer, spans: np.ndarray, max_tokens: int, loss: bool = True):
    self.corpus, self.tokenizer, self.spans, self.max_tokens, self.loss = corpus, tokenizer, spans, max_tokens, loss

  def __len__(self) -> int:
    return len(self.spans)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    doc, start, end = (int(x) for x in self.spans[i])
    tokens = self.tokenizer.encode(self.corpus.read_range(doc, start, end))[: self.max_tokens]
    if len(tokens) == 0:   # a span of only undecodable bytes
      tokens = self.tokenizer.encode(" ")[:1]
    return {"tokens": tokens, "loss_mask": np.full_like(tokens, int(self.loss))}


# ----------------------------------------------------------------------------------------
# Synthetic long-context retrieval tasks.

_WORDS = ("amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kelp",
          "lagoon", "meadow", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet",
          "willow", "yarrow", "zephyr", "basalt", "cedar", "delta", "falcon", "glacier")


@dataclasses.dataclass(frozen=True)
class RetrievalExample:
  """A haystack with needles and a question (`prompt`) whose exact continuation is `answer`.

  Token indices count the tokens of `tokenizer.encode(prompt)`; needle i covers tokens
  needle_tokens[i]..needle_ends[i] (inclusive); needle 0 is the one placed at the requested `depth`.
  """
  kind: str
  prompt: str
  answer: str
  depth: float                          # requested depth of needle 0 (share of the haystack's tokens before it)
  needle_offsets: tuple[int, ...]       # character offsets of the needles in `prompt`
  needle_tokens: tuple[int, ...] = ()   # token index of each needle's first token
  needle_ends: tuple[int, ...] = ()     # token index of each needle's last token
  question_token: int = 0               # token index of the question's first token
  prompt_tokens: int = 0                # tokens of the prompt

  @property
  def text(self) -> str:
    return self.prompt + self.answer

  @property
  def depth_actual(self) -> float:
    """Token index of needle 0 over the prompt's tokens."""
    return self.needle_tokens[0] / max(self.prompt_tokens, 1)

  @property
  def distance(self) -> int:
    """Tokens from needle 0's last token to the question's first token."""
    return self.question_token - self.needle_ends[0]


def needle_zone(needle_end: int, question_token: int, block_size: int, sink_blocks: int, local_blocks: int) -> str:
  """Where a needle lies for an SSA layer whose query is the question's first token.

  sink: the needle's last token is in the first sink_blocks blocks (always visible); local: it is in one
  of the local_blocks most recent blocks of that query (block >= query block - (local_blocks - 1));
  beyond: SSA cannot see it directly (only full layers, or information carried forward, can).
  """
  if needle_end // block_size < sink_blocks:
    return "sink"
  if needle_end // block_size >= question_token // block_size - (local_blocks - 1):
    return "local"
  return "beyond"


def _number(rng, digits: int = 7) -> str:
  """A random number of `digits` digits (no leading zero); 7 digits draw one integer, as they always have."""
  if digits == 7:
    return str(int(rng.integers(1_000_000, 10_000_000)))
  return str(int(rng.integers(1, 10))) + "".join(str(int(d)) for d in rng.integers(0, 10, digits - 1))


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


def _task(kind: str, rng, depth: float, digits: int = 7):
  """(needles, the relative depth of each needle, question, answer); a passkey has `digits` digits."""
  later = lambda n: sorted(rng.uniform(depth, 1.0, n).tolist())
  anywhere = lambda n: rng.uniform(0.0, 1.0, n).tolist()
  if kind == "passkey":
    v = _number(rng, digits)
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
  raise ValueError(f"retrieval task {kind!r} is not one of {list(RETRIEVAL_TASKS)}")


def _filler(corpus: Corpus, docs: Sequence[int], start: tuple[int, int], n_bytes: int) -> str:
  """About n_bytes of contiguous text of documents `docs` from (position in docs, byte offset), wrapping."""
  k, offset = start
  out = b""
  while len(out) < n_bytes:
    doc = int(docs[k])
    out += corpus.read_range(doc, offset, offset + n_bytes - len(out))
    k, offset = (k + 1) % len(docs), 0
  return out.decode("utf-8", errors="ignore")


def _filler_tokens(corpus: Corpus, docs: Sequence[int], rng, tokenizer: Tokenizer, n_tokens: int,
                   bytes_per_token: float) -> np.ndarray:
  """At least n_tokens tokens of contiguous text from a random document and offset of `docs`."""
  k = int(rng.integers(len(docs)))
  n_bytes = int(n_tokens * bytes_per_token * 1.2) + 64
  start = (k, int(rng.integers(max(corpus.size(int(docs[k])) - n_bytes, 0) + 1)))
  while True:
    tokens = tokenizer.encode(_filler(corpus, docs, start, n_bytes))
    if len(tokens) >= n_tokens:
      return tokens
    n_bytes = 2 * n_bytes


def _snap(text: str, i: int, window: int) -> int:
  """The word start (index 0, or just after whitespace) nearest to character i within `window`, else i."""
  best = i
  for d in range(window + 1):
    for j in (i - d, i + d):
      if 0 <= j <= len(text) and (j == 0 or j == len(text) or text[j - 1].isspace()):
        return j
  return best


def _assemble(hay: str, needles, depths, cuts) -> tuple[str, list[int]]:
  """Haystack with needle i inserted at character cuts[i] (text order; ties keep depth order), each needle
  starting a line (a newline is added before it when the cut is not at a line start)."""
  order = np.lexsort((depths, cuts))
  parts, offsets, prev = [], [0] * len(needles), 0
  for i in order:
    parts.append(hay[prev:cuts[i]])
    if cuts[i] > 0 and not parts[-1].endswith("\n") and not (prev == cuts[i] and len(parts) > 1):
      parts.append("\n")
    offsets[i] = sum(map(len, parts))
    parts.append(needles[i])
    prev = cuts[i]
  return "".join(parts) + hay[prev:], offsets


def make_retrieval_example(kind: str, length: int, depth: float, rng: np.random.Generator, corpus: Corpus,
                           tokenizer: Tokenizer, *, docs: Sequence[int] | None = None,
                           bytes_per_token: float | None = None, snap_tokens: int = 4,
                           digits: int = 7) -> RetrievalExample:
  """A `kind` task of `length` tokens (at most, and at least length minus a few), haystack from documents `docs`;
  a passkey has `digits` digits.

  Needle 0 goes after round(depth * H) of the H haystack tokens, moved to the nearest word start within
  `snap_tokens` tokens; the token positions actually reached are recorded on the example.
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"retrieval depth must be in [0, 1], got {depth}")
  docs = np.arange(len(corpus)) if docs is None else np.asarray(docs)
  if not len(docs):
    raise ValueError("retrieval filler: no documents to draw the haystack from")
  needles, depths, question, answer = _task(kind, rng, depth, digits)
  ntok = lambda s: len(tokenizer.encode(s))
  fixed = sum(map(ntok, needles)) + ntok(question) + ntok(answer)
  if fixed > length:
    raise ValueError(f"retrieval task {kind!r} needs {fixed} tokens without any haystack; length={length} "
                     "is too short (raise data.retrieval_lengths)")
  budget = length - fixed
  bpt = bytes_per_token or measure_bytes_per_token(tokenizer, corpus, docs)
  filler = _filler_tokens(corpus, docs, rng, tokenizer, budget, bpt) if budget else np.zeros(0, np.int32)
  window = max(int(np.ceil(snap_tokens * bpt)), 1)
  h = budget
  for _ in range(32):
    hay = tokenizer.decode(filler[:h].tolist()) if h else ""
    cuts = [_snap(hay, len(tokenizer.decode(filler[:int(round(d * h))].tolist())), window) for d in depths]
    body, offsets = _assemble(hay, needles, depths, cuts)
    prompt = body + question
    n = ntok(prompt) + ntok(answer)
    if n <= length:
      break
    h = max(h - max(n - length, 1), 0)
  else:
    raise RuntimeError(f"retrieval task {kind!r}: could not fit {length} tokens")
  starts = tuple(ntok(prompt[:o]) for o in offsets)
  ends = tuple(ntok(prompt[:o + len(nd)]) - 1 for o, nd in zip(offsets, needles))
  return RetrievalExample(kind, prompt, answer, depth, tuple(offsets), starts, ends, ntok(body), ntok(prompt))


def encode_example(example: RetrievalExample, tokenizer: Tokenizer, loss: LossSpan = "answer",
                   end: str = "") -> dict[str, np.ndarray]:
  """Tokens of prompt + answer + `end`; loss_mask `ANSWER` on the answer and `end` tokens, and 1 (`all`) or 0
  (`answer`) on the prompt. Training passes end="\n", so a model learns where an answer stops (as generation does)."""
  prompt, answer = tokenizer.encode(example.prompt), tokenizer.encode(example.answer + end)
  mask = np.concatenate([np.full(len(prompt), 1 if loss == "all" else 0), np.full(len(answer), ANSWER)])
  return {"tokens": np.concatenate([prompt, answer]).astype(np.int32), "loss_mask": mask.astype(np.int32)}


def answer_items(kind: str, text: str) -> list[str]:
  """The answer fields of `text`: its first line, split into values for multi-value tasks."""
  line = text.strip().split("\n", 1)[0].strip().rstrip(".")
  if kind in ("passkey", "multikey"):
    return [line]
  return sorted(w.strip(".") for w in line.replace(",", " ").split())


def score_answer(example: RetrievalExample, generated: str) -> float:
  """Exact match (1.0 or 0.0) of the whole answer on the first line of `generated`; values of multi-value
  answers (multivalue, vartrack) in any order, none missing and none extra."""
  return float(answer_items(example.kind, generated) == answer_items(example.kind, example.answer))


class RetrievalSource:
  """Index i -> an encoded retrieval task drawn with rng(seed, i): kind, length and depth vary.

  The haystack comes from documents `docs` (build_dataset passes the training documents).
  """

  def __init__(self, corpus: Corpus, tokenizer: Tokenizer, cfg: DataConfig, seed: int,
               docs: Sequence[int] | None = None, bytes_per_token: float | None = None):
    self.corpus, self.tokenizer, self.cfg, self.seed = corpus, tokenizer, cfg, seed
    self.docs = np.arange(len(corpus)) if docs is None else np.asarray(docs)
    self.bytes_per_token = bytes_per_token or measure_bytes_per_token(tokenizer, corpus, self.docs)
    self.lengths = cfg.retrieval_lengths or (cfg.seq_len,)
    needles, _, question, _ = _task("passkey", np.random.default_rng(0), 0.5, digits=1)
    self._passkey_tokens = len(tokenizer.encode(needles[0])) + len(tokenizer.encode(question)) - 1

  def __len__(self) -> int:
    return 2 ** 40

  def passkey_digits(self, length: int) -> tuple[int, int]:
    """The range of passkey digits at `length`: data.passkey_digits, the top capped so that needle, question and
    answer leave at least one block's worth (16 tokens) of haystack (never below the bottom)."""
    lo, hi = self.cfg.passkey_digits
    return lo, max(lo, min(hi, (length - self._passkey_tokens - 16) // 2))

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, 7919, int(i)])
    kind = self.cfg.retrieval_tasks[int(rng.integers(len(self.cfg.retrieval_tasks)))]
    length = self.lengths[int(rng.integers(len(self.lengths)))]
    lo, hi = self.passkey_digits(length)
    digits = lo if lo == hi or kind != "passkey" else int(rng.integers(lo, hi + 1))
    end = "\n"   # the answer's line ends: a model learns to stop where generation stops
    example = make_retrieval_example(kind, length - len(self.tokenizer.encode(end)), float(rng.uniform()), rng,
                                     self.corpus, self.tokenizer, docs=self.docs,
                                     bytes_per_token=self.bytes_per_token, digits=digits)
    return encode_example(example, self.tokenizer, self.cfg.retrieval_loss, end=end)


# ----------------------------------------------------------------------------------------
# The packed pipeline.


def _rename(packed: dict) -> dict[str, np.ndarray]:
  return {new: packed[old].astype(np.int32) for old, new in _PACKED_KEYS.items()}


def default_chunk_bytes(cfg: DataConfig, bytes_per_token: float) -> int:
  """data.chunk_bytes, or seq_len tokens' worth of bytes at the measured rate, so chunks reach seq_len."""
  return cfg.chunk_bytes or max(int(np.ceil(cfg.seq_len * bytes_per_token)), 1)


def build_dataset(cfg: Config, rows: int, *, seed: int | None = None, process_index: int = 0, process_count: int = 1,
                  corpus: Corpus | None = None, tokenizer: Tokenizer | None = None,
                  split: Split = "train", text_loss: bool = True) -> grain.IterDataset:
  """Infinite grain dataset of packed per-process batches of `rows` rows (this process's shard).

  split="train": chunks of training documents mixed with retrieval tasks whose haystack is training text;
  split="heldout": chunks of held-out documents only (data.heldout_fraction), never retrieval tasks.
  text_loss=False gives text chunks loss_mask 0 (context only; calibrate.loss_mask=answer).
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
  train_docs = split_docs(corpus, d.heldout_fraction, "train")
  docs = train_docs if split == "train" else split_docs(corpus, d.heldout_fraction, split)
  bpt = measure_bytes_per_token(tokenizer, corpus, train_docs)
  chunk_bytes = default_chunk_bytes(d, bpt)
  if d.chunk_bytes and d.chunk_bytes < d.seq_len * bpt:
    log.warning("data.chunk_bytes=%d holds ~%d tokens (%.2f bytes/token measured), fewer than data.seq_len=%d: "
                "documents never fill a row", d.chunk_bytes, d.chunk_bytes / bpt, bpt, d.seq_len)
  spans = chunk_spans(corpus, chunk_bytes, docs)
  text = grain.MapDataset.source(ChunkSource(corpus, tokenizer, spans, d.seq_len, loss=text_loss))
  if d.shuffle:
    text = text.shuffle(seed=seed)
  text = text.repeat()
  if d.retrieval_fraction > 0 and split == "train":
    for kind in d.retrieval_tasks:   # fail now, not on the first draw of a task that cannot fit
      make_retrieval_example(kind, min(d.retrieval_lengths or (d.seq_len,)), 0.5, np.random.default_rng(0),
                             corpus, tokenizer, docs=train_docs, bytes_per_token=bpt)
    tasks = grain.MapDataset.source(RetrievalSource(corpus, tokenizer, d, seed, train_docs, bpt))
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
  it = it.map(_rename).batch(rows, drop_remainder=True)
  if d.prefetch_batches:   # packing and batching run in the consumer's thread otherwise: the trainer would wait
    it = grain_exp.ThreadPrefetchIterDataset(it, prefetch_buffer_size=d.prefetch_batches)
  return it


def full_length_rows(corpus: Corpus, tokenizer: Tokenizer, docs: Sequence[int], length: int, n_rows: int,
                     seed: int, bytes_per_token: float) -> list[np.ndarray]:
  """Up to n_rows token rows of exactly `length` tokens, each one piece of one document of `docs`."""
  spans = chunk_spans(corpus, int(np.ceil(length * bytes_per_token * 1.25)) + 16, docs)
  spans = spans[(spans[:, 2] - spans[:, 1]) >= length * bytes_per_token * 0.8]
  out = []
  for i in np.random.default_rng(seed).permutation(len(spans)):
    doc, start, end = (int(x) for x in spans[i])
    tokens = tokenizer.encode(corpus.read_range(doc, start, end))
    if len(tokens) >= length:
      out.append(tokens[:length].astype(np.int32))
      if len(out) == n_rows:
        break
  return out


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

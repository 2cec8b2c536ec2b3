"""Prefill, decode and generation through the inference cache (loza_jax.cache).

`generate(params, cfg, prompts, ...)`: right-pads the prompts, fills the cache chunk by chunk with
the training attention kernels (forward only), then runs the whole decode loop on device
(`lax.while_loop`, one jitted step for the batch with the cache carried in place): greedy,
temperature, top-k and top-p sampling, stop tokens and a new-token limit.

CLI: `python -m loza_jax.generate --model DIR --prompt "..." [--max-new-tokens N --temperature T ...]`
streams the tokens to the terminal. DIR is a model directory of ours or a HuggingFace checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from loza_jax.cache import Cache, check_cacheable, check_prefill_start, init_cache
from loza_jax.config import Config
from loza_jax.layers import dtype_of
from loza_jax.model import build_model


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Next-token choice: greedy when temperature == 0, else softmax(logits / T) cut to top_k / top_p."""
  temperature: float = 0.0
  top_k: int = 0             # 0 = no cut
  top_p: float = 1.0         # 1 = no cut

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and top_p in (0, 1]; got {self}")


def sample(logits_BV, rng, s: Sampling):
  """One token per row from fp32 logits [B, V]."""
  if s.temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV.astype(jnp.float32) / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs            # mass strictly above each token
    cutoff = jnp.min(jnp.where(before < s.top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------
# Jitted entry points (one compilation per config, chunk offset and shape).


@functools.lru_cache(maxsize=64)
def _prefill_fn(cfg: Config, start: int):
  model = build_model(cfg)

  def run(params, cache, tokens_BT, prompt_lengths_B, last_BV):
    T = tokens_BT.shape[1]
    last_pos_B = prompt_lengths_B - 1
    at_B = jnp.clip(last_pos_B - start, 0, T - 1)
    logits, cache = model.apply({"params": params}, tokens_BT, cache=cache, prefill_start=start,
                                prompt_lengths_B=prompt_lengths_B, logits_at_B=at_B)
    here_B = (last_pos_B >= start) & (last_pos_B < start + T)
    return jnp.where(here_B[:, None], logits[:, 0], last_BV), cache

  return jax.jit(run, donate_argnums=(1, 4))


def prefill(params, cfg: Config, cache: Cache, tokens_BT, prompt_lengths_B, chunk: int = 4096,
            on_chunk: Callable[[int, jax.Array, Cache], None] | None = None):
  """Fill an empty cache with right-padded prompts; returns (logits of each row's last prompt token, cache).

  Chunks of `chunk` tokens (a multiple of attention.block_size) bound the activation memory; a chunk
  attends to its own keys through the attention kernels and to earlier chunks through the cache.
  `on_chunk(start, last, cache)`, if given, runs after each chunk is dispatched (progress; it may wait on
  the arrays to time the chunk).
  """
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  B, T = tokens_BT.shape
  lengths = jnp.asarray(prompt_lengths_B, jnp.int32)
  last = jnp.zeros((B, cfg.model.vocab_size), jnp.float32)
  for start in range(0, T, chunk):
    check_prefill_start(cfg, start)
    last, cache = _prefill_fn(cfg, start)(params, cache, tokens_BT[:, start:start + chunk], lengths, last)
    if on_chunk is not None:
      on_chunk(start, last, cache)
  return last, cache


@functools.lru_cache(maxsize=16)
def _decode_step_fn(cfg: Config):
  model = build_model(cfg)

  def step(params, cache, tokens_B):
    logits, cache = model.apply({"params": params}, tokens_B[:, None], cache=cache)
    return logits[:, 0], cache

  return step


@functools.lru_cache(maxsize=16)
def _decode_step_jit(cfg: Config):
  return jax.jit(_decode_step_fn(cfg), donate_argnums=(1,))


def decode_step(params, cfg: Config, cache: Cache, tokens_B):
  """One token per row at position cache.lengths_B: (logits [B, V], cache); the cache is donated."""
  return _decode_step_jit(cfg)(params, cache, jnp.asarray(tokens_B, jnp.int32))


def compiled_decode_step(params, cfg: Config, cache: Cache, tokens_B):
  """decode_step compiled for these shapes, called as (params, cache, tokens_B); its `memory_analysis()`
  says what a step needs beyond its arguments (`temp_size_in_bytes`: with the cache updated in place,
  far below the cache's size)."""
  return _decode_step_jit(cfg).lower(params, cache, jnp.asarray(tokens_B, jnp.int32)).compile()


@functools.lru_cache(maxsize=16)
def _decode_loop_fn(cfg: Config, max_new: int, sampling: Sampling, stop: tuple[int, ...], on_token):
  step = _decode_step_fn(cfg)
  stop_ids = jnp.asarray(stop or (-1,), jnp.int32)

  def loop(params, cache, logits_BV, rng):
    B = logits_BV.shape[0]

    def cond(state):
      i, _, _, _, done_B, _ = state
      return (i < max_new) & ~jnp.all(done_B)

    def body(state):
      i, cache, logits_BV, out_BN, done_B, rng = state
      rng, sub = jax.random.split(rng)
      tok_B = sample(logits_BV, sub, sampling)
      out_BN = out_BN.at[:, i].set(jnp.where(done_B, -1, tok_B))
      if on_token is not None:
        io_callback(on_token, None, i, tok_B, done_B, ordered=True)
      done_B = done_B | jnp.isin(tok_B, stop_ids)
      logits_BV, cache = step(params, cache, tok_B)
      return i + 1, cache, logits_BV, out_BN, done_B, rng

    init = (jnp.int32(0), cache, logits_BV, jnp.full((B, max_new), -1, jnp.int32), jnp.zeros((B,), bool), rng)
    _, cache, _, out_BN, _, _ = jax.lax.while_loop(cond, body, init)
    return out_BN, cache

  return jax.jit(loop, donate_argnums=(1,))


def check_prompts(cfg: Config, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> np.ndarray:
  """Prompt lengths [B]; ValueError for an empty batch or prompt, bad ids, or too many positions."""
  if not len(prompts):
    raise ValueError("generate: no prompts given")
  lengths = np.array([len(p) for p in prompts], np.int32)
  empty = np.nonzero(lengths == 0)[0]
  if len(empty):
    raise ValueError(f"generate: prompt {int(empty[0])} is empty; every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  V = cfg.model.vocab_size
  for i, p in enumerate(prompts):
    bad = [int(t) for t in p if not 0 <= int(t) < V]
    if bad:
      raise ValueError(f"generate: prompt {i} has token id {bad[0]} outside the vocabulary [0, {V})")
  m = cfg.model
  need = int(lengths.max()) + max_new_tokens
  if need > m.max_position_embeddings and m.rope_scaling is None:
    raise ValueError(f"generate: prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) = {need} "
                     f"exceeds model.max_position_embeddings={m.max_position_embeddings}; shorten the prompt or "
                     "configure model.rope_scaling (YaRN) to extend the context")
  return lengths


def generate(params, cfg: Config, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (), seed: int = 0,
             prefill_chunk: int = 4096, cache_dtype: str = "bfloat16",
             on_token: Callable | None = None) -> list[np.ndarray]:
  """New tokens for each prompt (token-id lists of any lengths), up to and excluding a stop token.

  on_token(i, tokens_B, done_B) is called on the host after each step (for streaming).
  """
  check_cacheable(cfg)
  lengths = check_prompts(cfg, prompts, max_new_tokens)
  block = cfg.attention.block_size
  if prefill_chunk < block or prefill_chunk % block:
    raise ValueError(f"prefill_chunk={prefill_chunk} must be a positive multiple of attention.block_size={block}")
  B = len(prompts)
  T = -(-int(lengths.max()) // block) * block
  tokens = np.zeros((B, T), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = np.asarray(p, np.int32)
  cache = init_cache(cfg, B, max(T, int(lengths.max()) + max_new_tokens), dtype_of(cache_dtype))
  last_BV, cache = prefill(params, cfg, cache, tokens, lengths, prefill_chunk)
  loop = _decode_loop_fn(cfg, max_new_tokens, sampling, tuple(int(t) for t in stop_tokens), on_token)
  out_BN, _ = loop(params, cache, last_BV, jax.random.PRNGKey(seed))
  out_BN = np.asarray(out_BN)
  results = []
  for row in out_BN:
    row = row[row >= 0]
    stops = np.nonzero(np.isin(row, list(stop_tokens)))[0]
    results.append(row[:stops[0]] if len(stops) else row)
  return results


# ----------------------------------------------------------------------------------------
# Command line.


def load_any(model_dir: str | Path):
  """(params, cfg, tokenizer spec or None) from a model directory of ours or a HuggingFace checkpoint."""
  d = Path(model_dir)
  if not d.is_dir():
    raise FileNotFoundError(f"--model {model_dir}: no such directory (expected a model directory written by "
                            "train.* / `python -m loza_jax.convert import`, or a HuggingFace checkpoint)")
  if (d / "config.yaml").is_file():
    from loza_jax.model_dir import load_model
    params, cfg = load_model(d)
    tok = None
  elif (d / "config.json").is_file():
    from loza_jax.convert.hf import read_hf_config, read_hf_params
    from loza_jax.convert.hf_config import config_from_hf
    cfg = config_from_hf(read_hf_config(d), source=str(d / "config.json"))
    params, _ = read_hf_params(d, cfg)
    tok = str(d / "tokenizer.json") if (d / "tokenizer.json").is_file() else None
  else:
    raise FileNotFoundError(f"--model {model_dir}: neither config.yaml (our model directory) nor config.json "
                            "(HuggingFace checkpoint) found there")
  return params, cfg, tok


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description="Generate text with a LoZA / DeepSeek-V3 / LongCat-Flash model.")
  ap.add_argument("--model", required=True, help="model directory (ours or a HuggingFace checkpoint)")
  ap.add_argument("--prompt", required=True, help="prompt text")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--top-k", type=int, default=0)
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--stop", action="append", default=[], help="stop string (first token of its encoding); repeatable")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the model's)")
  ap.add_argument("--prefill-chunk", type=int, default=4096)
  ap.add_argument("--cache-dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
  args = ap.parse_args(argv)
  try:
    from train.data import load_tokenizer
    params, cfg, tok_spec = load_any(args.model)
    tokenizer = load_tokenizer(args.tokenizer or tok_spec or cfg.data.tokenizer)
    prompt = [int(t) for t in tokenizer.encode(args.prompt)]
    stops = [int(tokenizer.encode(s)[0]) for s in args.stop if len(tokenizer.encode(s))]
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    params = jax.device_put(params)
    printed = []

    def stream(i, tok_B, done_B):
      if not bool(done_B[0]) and int(tok_B[0]) not in stops:
        printed.append(int(tok_B[0]))
        text = tokenizer.decode(printed)
        sys.stdout.write(text[len(tokenizer.decode(printed[:-1])):])
        sys.stdout.flush()

    sys.stdout.write(args.prompt)
    generate(params, cfg, [prompt], max_new_tokens=args.max_new_tokens, sampling=sampling, stop_tokens=stops,
             seed=args.seed, prefill_chunk=args.prefill_chunk, cache_dtype=args.cache_dtype, on_token=stream)
    sys.stdout.write("\n")
  except (ValueError, FileNotFoundError) as e:
    ap.exit(2, f"error: {e}\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

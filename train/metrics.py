"""Training metrics: the metrics.jsonl + TensorBoard writer, its tolerant reader, the FLOP model
behind TFLOP/s, and the console line of a logged step."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np

from loza_jax.config import Config

log = logging.getLogger(__name__)


def is_finite(x) -> bool:
  return bool(np.isfinite(x))


def non_finite_what(rec: dict) -> str:
  """'loss is nan', 'grad-norm is inf', 'params are not finite': what stopped the run."""
  if "params" in rec:
    return "params are not finite (NaN/Inf) after the update"
  if not is_finite(rec["loss"]):
    return f"loss is {rec['loss']}"
  return f"grad-norm is {rec.get('grad_norm')} (loss {rec['loss']:.4f})"


def step_line(rec: dict) -> str:
  """One console line per logged step (with the retrieval answers' accuracy when the batch had any, and the share
  of the window's wall time the host spent waiting for batches when it is 5% or more: a data-bound run)."""
  answers = (f" | answer-acc {rec['answer_acc']:.3f} ({rec['answer_tokens']:.0f} tok)"
             if rec.get("answer_tokens") else "")
  return (f"step {rec['step']:>6d} | loss {rec['loss']:.4f}{answers} | grad-norm {rec['grad_norm']:.3f} | "
          f"lr {rec['lr']:.2e} | {rec['tokens_per_s']:,.0f} tok/s | "
          f"{rec['tflops_per_device']:.4f} TFLOP/s/dev | {rec['step_time'] * 1e3:.0f} ms/step"
          + (f" ({rec['data_share']:.0%} waiting for data)" if rec.get("data_share", 0) >= 0.05 else ""))


def answer_accuracy(records: list[dict], last: int = 100) -> float | None:
  """Token-weighted greedy accuracy on retrieval answer targets over the last `last` records that had any
  (None when none had): whether a run has learnt to retrieve, from its training log alone."""
  recs = [r for r in records if r.get("answer_tokens")][-last:]
  n = sum(r["answer_tokens"] for r in recs)
  return sum(r["answer_acc"] * r["answer_tokens"] for r in recs) / n if n else None


def flops_per_token(cfg: Config, n_params: int, seq_len: int) -> float:
  """Training FLOPs per token: 6 x active matmul params + 3 x attention (QK and PV over the visible keys)."""
  m = cfg.model
  matmul = n_params - (0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size)
  if m.n_routed_experts:   # MoE: only the top-k routed experts work (upper bound when zero experts are picked)
    moe_layers = m.num_hidden_layers - (m.first_k_dense_replace if m.architecture == "deepseek_v3" else 0)
    idle = max(m.n_routed_experts - m.num_experts_per_tok, 0)
    matmul -= moe_layers * idle * 3 * m.hidden_size * m.moe_intermediate_size
  attn = 0.0
  for lt in cfg.layer_types:
    full = (seq_len + 1) / 2
    ssa = min(full, (cfg.attention.sink_blocks + cfg.attention.local_blocks) * cfg.attention.block_size)
    keys = {"full": full, "ssa": ssa, "blend": full + ssa}[lt]
    attn += 2 * m.num_attention_heads * (m.qk_head_dim + m.v_head_dim) * keys
  return 6.0 * matmul + 3.0 * attn


def read_jsonl(path: str | Path) -> list[dict]:
  """Records of a metrics.jsonl; a partial last line (a run killed mid-write) is dropped, a damaged
  line before it raises ValueError naming the file and line."""
  path = Path(path)
  if not path.is_file():
    return []
  lines = path.read_text().split("\n")
  out = []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines):            # the last line, with no newline after it: an interrupted write
        log.warning("%s:%d: dropping a partial last line (%d chars) left by an interrupted run", path, i, len(line))
        break
      raise ValueError(f"{path}:{i}: not a JSON record ({e}); remove or fix the line") from None
    if not isinstance(rec, dict):
      raise ValueError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
    out.append(rec)
  return out


def logged_steps(run_dir: str | Path, start: int = 0, end: int | None = None) -> list[dict]:
  """The records of a run's metrics.jsonl whose step lies in (start, end] (no upper bound when end is None)."""
  return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl")
          if start < r.get("step", 0) <= (end if end is not None else float("inf"))]


class MetricsLogger:
  """JSONL metrics and TensorBoard scalars in the run directory (process 0 only)."""

  def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None):
    self.active = jax.process_index() == 0
    self.path = run_dir / "metrics.jsonl"
    self._tb = None
    if not self.active:
      return
    run_dir.mkdir(parents=True, exist_ok=True)
    if self.path.exists():   # keep history up to the restored step only, so a resumed log reads as one run
      keep = [r for r in read_jsonl(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    if tensorboard:
      import tensorboardX  # pylint: disable=import-outside-toplevel
      self._tb = tensorboardX.SummaryWriter(str(run_dir / "tb"), purge_step=(resume_step or 0) + 1)

  def write(self, record: dict) -> None:
    if not self.active:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(f"train/{k}", v, record["step"])

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()

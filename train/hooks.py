"""What runs around the training step: progress, metrics logging and checkpointing as hooks with an
`every`, and the per-fit state they share (metrics not yet fetched, the divergence guard).

A hook runs after every `every`-th step (0: never) and once more when the loop ends; returning
False stops training. A plain callable `fn(trainer, step)` is a hook with every=1.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import jax

from train.checkpoint import Checkpointer
from train.metrics import MetricsLogger, is_finite, non_finite_what, step_line

if TYPE_CHECKING:
  from train.trainer import Trainer


@dataclasses.dataclass
class Loop:
  """One fit() call as the hooks see it.

  The divergence guard: a checkpoint stays `unverified` until the next step's loss (computed
  with its params) is finite; a non-finite loss moves that checkpoint aside, and a checkpoint is
  never written from non-finite params.
  """
  trainer: Trainer
  ckpt: Checkpointer
  logger: MetricsLogger
  data_iter: Any
  start: int
  steps: int                                         # the step fit() trains up to
  tokens_per_step: int
  flops_per_step: float
  write: Callable[[str], None]                       # console line (the progress bar's write when shown)
  pending: list[tuple[int, Any]] = dataclasses.field(default_factory=list)   # (step, device metrics)
  unverified: set[int] = dataclasses.field(default_factory=set)
  last: dict[str, float] = dataclasses.field(default_factory=dict)
  last_saved: int | None = None
  window_start: float = dataclasses.field(default_factory=time.perf_counter)
  window_steps: int = 0
  window_data_s: float = 0.0                         # host time spent waiting for batches in this window

  def __post_init__(self):
    self.unverified = {self.start} if self.start else set()
    self.last_saved = self.start if self.start else None

  def record(self, step: int, metrics, data_s: float = 0.0) -> None:
    """A dispatched step's device metrics and the host seconds its batch took to arrive."""
    self.pending.append((step, metrics))
    self.window_steps += 1
    self.window_data_s += data_s

  def flush(self) -> bool:
    """Fetch pending metrics and log them; False (and a report) when a loss or grad-norm is not finite."""
    if not self.pending:
      return True
    host = jax.device_get([m for _, m in self.pending])
    window_s = time.perf_counter() - self.window_start
    dt = window_s / max(self.window_steps, 1)
    data_share = self.window_data_s / window_s if window_s > 0 else 0.0
    ok = True
    for (s, _), m in zip(self.pending, host):
      rec = {"step": s, **{k: float(v) for k, v in m.items()}}
      if is_finite(rec["loss"]) and s - 1 in self.unverified:
        self.ckpt.mark_good(s - 1)
        self.unverified.discard(s - 1)
      if not (is_finite(rec["loss"]) and is_finite(rec.get("grad_norm", 0.0))):
        ok = False
        self.stop(s, rec)
        break
      rec.update(step_time=dt, data_share=data_share, tokens_per_s=self.tokens_per_step / dt,
                 tflops_per_device=self.flops_per_step / dt / jax.device_count() / 1e12)
      self.logger.write(rec)
      self.last = rec
    self.pending.clear()
    self.window_start, self.window_steps, self.window_data_s = time.perf_counter(), 0, 0.0
    if ok:
      self.write(step_line(self.last))
    return ok

  def save(self, step: int) -> bool:
    """Checkpoint `step` when its params are finite; False (and a report) when they are not."""
    if not self.trainer.params_finite():
      self.stop(step, {"loss": self.last.get("loss", float("nan")), "params": float("nan")})
      return False
    self.ckpt.save(step, self.trainer.state, self.data_iter, self.trainer.cfg)
    self.unverified.add(step)
    self.last_saved = step
    return True

  def stop(self, s: int, rec: dict) -> None:
    """Report a non-finite step; a checkpoint holding the params that gave it is moved aside."""
    moved = ""
    if not is_finite(rec["loss"]) and s - 1 in self.unverified:   # the loss of step s is that of checkpoint s - 1
      target = self.ckpt.quarantine(s - 1, f"its params give loss {rec['loss']} at step {s}",
                                    what="holds diverged params", after="so that a resume starts before the divergence")
      self.unverified.discard(s - 1)
      moved = f"; checkpoint {s - 1} (saved after the diverging update) was moved to {target}"
    good = self.ckpt.latest_step()
    where = self.ckpt.directory / str(good) if good is not None else "none"
    self.trainer.say(f"step {s}: {non_finite_what(rec)}; stopping. Last good checkpoint (before the diverging "
                     f"update): {where}{moved}. A resume starts from {where}; lower train.learning_rate (or "
                     "train.grad_clip) first", logging.ERROR)


@dataclasses.dataclass
class Hook:
  """Base hook: override what is needed; after_step runs when `due`, end once after the last step."""
  every: int = 1

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def begin(self, loop: Loop) -> None:
    pass

  def after_step(self, loop: Loop, step: int) -> bool:
    return True

  def end(self, loop: Loop, step: int) -> bool:
    return True

  def close(self, loop: Loop) -> None:
    pass


@dataclasses.dataclass
class ProgressBar(Hook):
  """A tqdm bar on process 0; logged lines go through it so they do not break the bar."""
  _bar: Any = None

  def begin(self, loop: Loop) -> None:
    if jax.process_index() == 0:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=loop.steps, initial=loop.start, desc="train", dynamic_ncols=True,
                       leave=True)
      loop.write = self._bar.write

  def after_step(self, loop: Loop, step: int) -> bool:
    if self._bar is not None:
      self._bar.update(self.every)
    return True

  def close(self, loop: Loop) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


@dataclasses.dataclass
class LogMetrics(Hook):
  """Fetch, check and log the metrics of the steps since the last flush (and after the last step)."""

  def after_step(self, loop: Loop, step: int) -> bool:
    return loop.flush()

  def end(self, loop: Loop, step: int) -> bool:
    return loop.flush()


@dataclasses.dataclass
class SaveCheckpoint(Hook):
  """Checkpoint every `every` steps and after the last step, metrics checked first."""

  def after_step(self, loop: Loop, step: int) -> bool:
    return loop.flush() and loop.save(step)

  def end(self, loop: Loop, step: int) -> bool:
    if not loop.flush():
      return False
    return step == loop.last_saved or step == 0 or loop.save(step)


@dataclasses.dataclass
class Callback(Hook):
  """A user function `fn(trainer, step)` after every `every` steps."""
  fn: Callable[[Any, int], None] = lambda trainer, step: None

  def after_step(self, loop: Loop, step: int) -> bool:
    self.fn(loop.trainer, step)
    return True


def as_hook(hook: Hook | Callable[[Any, int], None]) -> Hook:
  """A Hook as is; a plain callable as Callback(fn=it)."""
  return hook if isinstance(hook, Hook) else Callback(fn=hook)

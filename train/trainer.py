"""The training loop every stage reuses: a pure, jitted, sharded `(state, batch) -> (state, metrics)`
step, a pluggable loss, a trainable-parameter filter, orbax checkpoints with exact resume, and logs.

    trainer = Trainer(cfg, loss_fn=make_lm_loss(model), trainable="alpha$")
    result = trainer.fit(data_iterator)          # resumes from cfg.train.run_dir when possible
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from loza_jax import sharding as shd
from loza_jax.config import Config, save_config
from loza_jax.model import build_model
from train import data as data_lib
from loza_jax.model_dir import check_compatible
from train.checkpoint import Checkpointer

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
"""(params, batch, rng) -> (scalar loss, metrics); metrics may include `weight` (tokens counted)."""
Trainable = Callable[[str], bool] | str | None
"""Predicate on 'a/b/c' param paths, a regex searched in them, or None for all params."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array         # int32 []
  params: Any             # the full param tree (trainable and frozen)
  opt_state: Any          # optimizer state of the trainable subtree only
  rng: jax.Array          # uint32 [2] raw PRNG key


@dataclasses.dataclass(frozen=True)
class FitResult:
  step: int
  stopped: str            # done | non_finite
  last_metrics: dict[str, float]


# ----------------------------------------------------------------------------------------
# Losses.


def lm_loss_terms(logits_BTV, batch: Batch, z_loss: float = 0.0):
  """Next-token CE (+ z-loss) over targets inside one document and under the loss mask."""
  w_BT = data_lib.target_weights(batch["segment_ids"], batch["loss_mask"]).astype(jnp.float32)
  logits = logits_BTV[:, :-1].astype(jnp.float32)
  targets = batch["tokens"][:, 1:]
  lse = jax.nn.logsumexp(logits, axis=-1)
  ce = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  n = jnp.maximum(w_BT.sum(), 1.0)
  ce_mean = (ce * w_BT).sum() / n
  loss = ce_mean + (z_loss * (lse ** 2 * w_BT).sum() / n if z_loss else 0.0)
  return loss, {"ce": ce_mean, "weight": w_BT.sum()}


def make_lm_loss(model: nn.Module, z_loss: float = 0.0) -> LossFn:
  """Language-model loss for `model` (tokens, segment_ids, positions -> logits)."""
  def loss_fn(params, batch, rng):
    del rng
    logits = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"])
    return lm_loss_terms(logits, batch, z_loss)
  return loss_fn


def make_distill_loss(student: nn.Module, teacher: nn.Module, teacher_params: Callable[[Any], Any] | None = None
                      ) -> LossFn:
  """MSE between the student's and a frozen teacher's final hidden states on non-padding tokens.

  `teacher_params(params)` picks the teacher's weights from the trained tree (default: drop `alpha`).
  """
  pick = teacher_params or (lambda p: without(p, lambda path: path.endswith("alpha")))

  def loss_fn(params, batch, rng):
    del rng
    args = (batch["tokens"], batch["segment_ids"], batch["positions"])
    h_s = student.apply({"params": params}, *args, return_hidden=True).astype(jnp.float32)
    h_t = teacher.apply({"params": jax.lax.stop_gradient(pick(params))}, *args, return_hidden=True)
    w = (batch["segment_ids"] != 0).astype(jnp.float32)[..., None]
    n = jnp.maximum(w.sum() * h_s.shape[-1], 1.0)
    mse = (((h_s - h_t.astype(jnp.float32)) ** 2) * w).sum() / n
    return mse, {"mse": mse, "weight": w.sum()}
  return loss_fn


# ----------------------------------------------------------------------------------------
# Trainable partition.


def _flat(params) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep="/")


def trainable_predicate(trainable: Trainable) -> Callable[[str], bool]:
  if trainable is None or trainable == "":
    return lambda path: True
  if isinstance(trainable, str):
    pattern = re.compile(trainable)
    return lambda path: pattern.search(path) is not None
  return trainable


def without(params, drop: Callable[[str], bool]):
  return traverse_util.unflatten_dict({k: v for k, v in _flat(params).items() if not drop(k)}, sep="/")


def split_params(params, is_trainable: Callable[[str], bool]):
  """(trainable, frozen) nested dicts."""
  flat = _flat(params)
  t = {k: v for k, v in flat.items() if is_trainable(k)}
  f = {k: v for k, v in flat.items() if not is_trainable(k)}
  return traverse_util.unflatten_dict(t, sep="/"), traverse_util.unflatten_dict(f, sep="/")


def merge_params(trainable, frozen):
  return traverse_util.unflatten_dict({**_flat(frozen), **_flat(trainable)}, sep="/")


# ----------------------------------------------------------------------------------------
# Optimizer, FLOPs.


def make_schedule(cfg: Config) -> optax.Schedule:
  """Linear warmup to the peak over warmup_steps, cosine to peak * min_lr_ratio at decay_steps.

  Step s (0-based) uses the value at s + 1, so the first update is not wasted on lr = 0.
  """
  t = cfg.train
  decay = max(t.decay_steps or t.steps, 1)
  base = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, min(t.warmup_steps, decay - 1), decay,
                                            t.learning_rate * t.min_lr_ratio)
  return lambda step: base(step + 1)


def make_optimizer(cfg: Config, schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW on the schedule; no weight decay on vectors and scalars."""
  t = cfg.train
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  adamw = optax.adamw(schedule or make_schedule(cfg), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                      mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip else adamw


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


# ----------------------------------------------------------------------------------------
# Logging.


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


def _finite(x) -> bool:
  return bool(np.isfinite(x))


def non_finite_what(rec: dict) -> str:
  """'loss is nan', 'grad-norm is inf', 'params are not finite': what stopped the run."""
  if "params" in rec:
    return "params are not finite (NaN/Inf) after the update"
  if not _finite(rec["loss"]):
    return f"loss is {rec['loss']}"
  return f"grad-norm is {rec.get('grad_norm')} (loss {rec['loss']:.4f})"


# ----------------------------------------------------------------------------------------
# The trainer.


class Trainer:
  """Builds the sharded state and step for `cfg` and trains it; see the module docstring."""

  def __init__(self, cfg: Config, model: nn.Module | None = None, *, loss_fn: LossFn | None = None,
               trainable: Trainable = None, init_params: Any = None, mesh=None, run_dir: str | Path | None = None,
               hooks: Sequence[Callable[["Trainer", int], None]] = (), print_fn: Callable[[str], None] | None = None,
               tx: optax.GradientTransformation | None = None, schedule: optax.Schedule | None = None):
    self.cfg = cfg
    self.model = model or build_model(cfg)
    self.loss_fn = loss_fn or make_lm_loss(self.model, cfg.train.z_loss)
    self.is_trainable = trainable_predicate(cfg.train.trainable if trainable is None else trainable)
    self.mesh = mesh or shd.make_mesh(cfg.mesh)
    self.rules = shd.LOGICAL_AXIS_RULES
    self.run_dir = Path(run_dir or cfg.train.run_dir)
    self.hooks = tuple(hooks)
    self.print_fn = print_fn
    self.tx = tx or make_optimizer(cfg)     # a custom optimizer (e.g. with a projection) may replace it
    self.schedule = schedule or make_schedule(cfg)   # what `lr` logs; pass the one `tx` uses
    self._check_batch_layout()

    rng = jax.random.PRNGKey(cfg.train.seed)
    self._init_rng, self._state_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, min(cfg.data.seq_len, 8 * cfg.attention.block_size)), jnp.int32)
    self._boxed_params = jax.eval_shape(lambda: self.model.init(self._init_rng, tokens)["params"])
    self.param_shardings = shd.tree_shardings(self._boxed_params, self.mesh, self.rules)
    self._abstract_params = abstract_params = nn.unbox(self._boxed_params)
    self.trainable_paths = sorted(k for k in _flat(abstract_params) if self.is_trainable(k))
    if not self.trainable_paths:
      raise ValueError(f"train.trainable={cfg.train.trainable!r} (or the trainable= argument) selects no parameter; "
                       f"parameters look like {sorted(_flat(abstract_params))[:3]}")
    boxed_trainable, _ = split_params(self._boxed_params, self.is_trainable)
    self.opt_shardings = shd.tree_shardings(jax.eval_shape(self.tx.init, boxed_trainable), self.mesh, self.rules)
    repl = NamedSharding(self.mesh, P())
    self.state_shardings = TrainState(step=repl, params=self.param_shardings, opt_state=self.opt_shardings, rng=repl)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(self._make_state, abstract_params), self.state_shardings)
    self.n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
    self.n_trainable = sum(math.prod(v.shape) for k, v in _flat(abstract_params).items() if self.is_trainable(k))
    self._init_params = init_params
    self.state: TrainState | None = None
    self._step_fn = None
    self._eval_fn = None
    self._finite_fn = None

  # --- construction ---------------------------------------------------------------------

  def _check_batch_layout(self) -> None:
    c, n_proc = self.cfg, jax.process_count()
    dp, ctx = shd.data_parallel_size(self.mesh), self.mesh.shape["context"]
    if c.train.batch_size % dp:
      raise ValueError(f"train.batch_size={c.train.batch_size} must be divisible by mesh data x fsdp = {dp}")
    if c.train.batch_size % n_proc:
      raise ValueError(f"train.batch_size={c.train.batch_size} must be divisible by the {n_proc} processes")
    if c.data.seq_len % ctx:
      raise ValueError(f"data.seq_len={c.data.seq_len} must be divisible by mesh.context={ctx}")

  def _make_state(self, params) -> TrainState:
    trainable, _ = split_params(params, self.is_trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(trainable),
                      rng=self._state_rng)

  def init_state(self) -> TrainState:
    """Fresh state: params from `init_params` (checked and resharded) or initialised sharded."""
    if self._init_params is not None:
      params = nn.unbox(self._init_params)
      check_compatible(self._abstract_params, params, "init_params")
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      if self._init_params is not None:
        params = jax.device_put(params, self.param_shardings)
        return jax.jit(self._make_state, out_shardings=self.state_shardings)(params)
      tokens = jnp.zeros((1, min(self.cfg.data.seq_len, 8 * self.cfg.attention.block_size)), jnp.int32)
      init = lambda: self._make_state(nn.unbox(self.model.init(self._init_rng, tokens)["params"]))
      return jax.jit(init, out_shardings=self.state_shardings)()

  # --- the step -------------------------------------------------------------------------

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """Pure: gradients w.r.t. the trainable subtree only; frozen params pass through unchanged."""
    rng, step_rng = jax.random.split(state.rng)
    trainable, frozen = split_params(state.params, self.is_trainable)

    def loss_of(tp):
      with nn.logical_axis_rules(self.rules):
        return self.loss_fn(merge_params(tp, frozen), batch, step_rng)

    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    updates, opt_state = self.tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": self.schedule(state.step), **aux}
    new = TrainState(step=state.step + 1, params=merge_params(trainable, frozen), opt_state=opt_state, rng=rng)
    return new, metrics

  def _batch_shardings(self):
    return {k: shd.batch_sharding(self.mesh) for k in ("tokens", "segment_ids", "positions", "loss_mask")}

  def compiled_step(self):
    if self._step_fn is None:
      repl = NamedSharding(self.mesh, P())
      self._step_fn = jax.jit(self.train_step, in_shardings=(self.state_shardings, self._batch_shardings()),
                              out_shardings=(self.state_shardings, repl), donate_argnums=0)
    return self._step_fn

  def step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """One step on this process's rows of the global batch; returns device metrics."""
    if self.state is None:
      self.state = self.init_state()
    with jax.set_mesh(self.mesh):
      global_batch = shd.host_batch_to_global(batch, self.mesh)
      self.state, metrics = self.compiled_step()(self.state, global_batch)
    return metrics

  def evaluate(self, batches: Sequence[dict[str, np.ndarray]]) -> float:
    """Token-weighted mean loss of the current params over `batches`."""
    if self._eval_fn is None:
      def ev(params, batch):
        with nn.logical_axis_rules(self.rules):
          loss, aux = self.loss_fn(params, batch, jax.random.PRNGKey(0))
        return loss, aux.get("weight", jnp.ones(()))
      self._eval_fn = jax.jit(ev, in_shardings=(self.param_shardings, self._batch_shardings()))
    if self.state is None:
      self.state = self.init_state()
    total = weight = 0.0
    with jax.set_mesh(self.mesh):
      for b in batches:
        loss, w = jax.device_get(self._eval_fn(self.state.params, shd.host_batch_to_global(b, self.mesh)))
        total, weight = total + float(loss) * float(w), weight + float(w)
    return total / max(weight, 1e-9)

  def params_finite(self) -> bool:
    """Whether every parameter of the current state is finite (one scalar fetched)."""
    if self._finite_fn is None:
      self._finite_fn = jax.jit(lambda p: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))
    with jax.set_mesh(self.mesh):
      return bool(jax.device_get(self._finite_fn(self.state.params)))

  # --- the loop -------------------------------------------------------------------------

  def _say(self, msg: str, level: int = logging.INFO) -> None:
    """Process 0 only: print_fn when given (and logging for warnings and errors), else logging."""
    if jax.process_index() != 0:
      return
    if self.print_fn is not None:
      self.print_fn(msg)
    if self.print_fn is None or level >= logging.WARNING:
      log.log(level, msg)

  def restore_or_init(self, data_iter=None, checkpointer: Checkpointer | None = None) -> int:
    """Restore the newest readable checkpoint (and the data iterator) when train.resume; else init."""
    if checkpointer is not None and self.cfg.train.resume:
      found = checkpointer.restore_latest(self.abstract_state, data_iter, self.cfg)
      if found is not None:
        self.state, step = found
        self._say(f"resumed from {checkpointer.directory / str(step)}")
        return step
    self.state = self.init_state()
    return 0

  def fit(self, data_iter: Iterator[dict[str, np.ndarray]], steps: int | None = None,
          restore_data: bool = True) -> FitResult:
    """Train until state.step == steps (default train.steps), checkpointing and logging on the way.

    restore_data=False resumes the model state but starts `data_iter` afresh (a new data stage).
    """
    t = self.cfg.train
    steps = t.steps if steps is None else steps
    if jax.process_index() == 0:
      self.run_dir.mkdir(parents=True, exist_ok=True)
      save_config(self.cfg, self.run_dir / "config.yaml")
    ckpt = Checkpointer(self.run_dir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpointing)
    if not t.resume and ckpt.all_steps():
      ckpt.close()
      raise ValueError(f"train.resume=false but {ckpt.directory} already holds checkpoints {ckpt.all_steps()}; "
                       "pick a new train.run_dir (or delete them) so nothing saved is overwritten")
    start = self.restore_or_init(data_iter if restore_data else None, ckpt)
    last_saved = start if start else None
    logger = MetricsLogger(self.run_dir, t.tensorboard, start)
    n_dev = jax.device_count()
    tokens_per_step = t.batch_size * self.cfg.data.seq_len
    flops_step = flops_per_token(self.cfg, self.n_params, self.cfg.data.seq_len) * tokens_per_step
    self._say(f"training {self.n_trainable:,} of {self.n_params:,} params on {n_dev} device(s), mesh "
              f"{dict(self.mesh.shape)}, steps {start} -> {steps}, run dir {self.run_dir}")
    bar = None
    if t.progress and jax.process_index() == 0:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True, leave=True)
    pending: list[tuple[int, dict]] = []
    window_start, window_steps = time.perf_counter(), 0
    last: dict[str, float] = {}
    stopped = "done"
    step = start
    unverified = {start} if start else set()   # checkpoints whose params have not yet given a finite loss

    def stop(s: int, rec: dict) -> None:
      """Report a non-finite step; a checkpoint holding the params that gave it is moved aside."""
      moved = ""
      if not _finite(rec["loss"]) and s - 1 in unverified:   # the loss of step s is that of checkpoint s - 1
        target = ckpt.quarantine(s - 1, f"its params give loss {rec['loss']} at step {s}", what="holds diverged params",
                                 after="so that a resume starts before the divergence")
        unverified.discard(s - 1)
        moved = f"; checkpoint {s - 1} (saved after the diverging update) was moved to {target}"
      good = ckpt.latest_step()
      where = ckpt.directory / str(good) if good is not None else "none"
      self._say(f"step {s}: {non_finite_what(rec)}; stopping. Last good checkpoint (before the diverging update): "
                f"{where}{moved}. A resume starts from {where}; lower train.learning_rate (or train.grad_clip) first",
                logging.ERROR)

    def flush() -> bool:
      """Fetch pending metrics, log them; False when a loss or grad-norm is not finite."""
      nonlocal window_start, window_steps, last
      if not pending:
        return True
      host = jax.device_get([m for _, m in pending])
      dt = (time.perf_counter() - window_start) / max(window_steps, 1)
      ok = True
      for (s, _), m in zip(pending, host):
        rec = {"step": s, **{k: float(v) for k, v in m.items()}}
        if _finite(rec["loss"]) and s - 1 in unverified:
          ckpt.mark_good(s - 1)
          unverified.discard(s - 1)
        if not (_finite(rec["loss"]) and _finite(rec.get("grad_norm", 0.0))):
          ok = False
          stop(s, rec)
          break
        rec.update(step_time=dt, tokens_per_s=tokens_per_step / dt, tflops_per_device=flops_step / dt / n_dev / 1e12)
        logger.write(rec)
        last = rec
      pending.clear()
      window_start, window_steps = time.perf_counter(), 0
      if ok:
        line = (f"step {last['step']:>6d} | loss {last['loss']:.4f} | grad-norm {last['grad_norm']:.3f} | "
                f"lr {last['lr']:.2e} | {last['tokens_per_s']:,.0f} tok/s | "
                f"{last['tflops_per_device']:.4f} TFLOP/s/dev | {last['step_time'] * 1e3:.0f} ms/step")
        if bar is not None:
          bar.write(line)
        else:
          self._say(line)
      return ok

    def save(s: int) -> bool:
      """Checkpoint step s when its params are finite; False (and a report) when they are not."""
      if not self.params_finite():
        stop(s, {"loss": last.get("loss", float("nan")), "params": float("nan")})
        return False
      ckpt.save(s, self.state, data_iter, self.cfg)
      unverified.add(s)
      return True

    try:
      while step < steps:
        try:
          batch = next(data_iter)
        except StopIteration:
          self._say(f"data ran out at step {step}")
          break
        metrics = self.step(batch)
        step += 1
        window_steps += 1
        pending.append((step, metrics))
        if bar is not None:
          bar.update(1)
        save_now = t.checkpoint_every and step % t.checkpoint_every == 0
        if step % t.log_every == 0 or save_now or step == steps:
          if not flush():
            stopped = "non_finite"
            break
        if save_now:
          if not save(step):
            stopped = "non_finite"
            break
          last_saved = step
        for hook in self.hooks:
          hook(self, step)
      if stopped == "done" and not flush():
        stopped = "non_finite"
      if stopped == "done" and step != last_saved and step > 0:
        if save(step):
          last_saved = step
        else:
          stopped = "non_finite"
    finally:
      ckpt.close()
      logger.close()
      if bar is not None:
        bar.close()
    return FitResult(step=step, stopped=stopped, last_metrics=last)

"""The training loop every stage reuses: a pure, jitted, sharded `(state, batch) -> (state, metrics)`
step over the trainable subtree, orbax checkpoints with exact resume, and hooks around the step.

    trainer = Trainer(cfg, loss_fn=make_lm_loss(model), trainable="alpha$")
    result = trainer.fit(data_iterator)          # resumes from cfg.train.run_dir when possible

Losses live in train/losses.py, the trainable partition in train/partition.py, the optimizer in
train/optimizer.py, progress/logging/checkpointing hooks in train/hooks.py.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from loza_jax import sharding as shd
from loza_jax.config import Config, save_config
from loza_jax.model import build_model
from loza_jax.model_dir import check_compatible
from train.checkpoint import Checkpointer
from train.hooks import Hook, LogMetrics, Loop, ProgressBar, SaveCheckpoint, as_hook
from train.losses import Batch, LossFn, make_lm_loss
from train.metrics import MetricsLogger, flops_per_token
from train.optimizer import make_optimizer, make_schedule
from train.partition import Trainable, flat, merge_params, split_params, trainable_predicate

log = logging.getLogger(__name__)


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
# The trainer.



def check_batch_layout(cfg: Config, data_parallel: int, context: int) -> None:
  """ValueError unless train.batch_size splits over data x fsdp (`data_parallel`) and the processes, and
  data.seq_len over `context`."""
  n_proc = jax.process_count()
  if cfg.train.batch_size % data_parallel:
    raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by mesh data x fsdp = {data_parallel}")
  if cfg.train.batch_size % n_proc:
    raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the {n_proc} processes")
  if cfg.data.seq_len % context:
    raise ValueError(f"data.seq_len={cfg.data.seq_len} must be divisible by mesh.context={context}")


class Trainer:
  """Builds the sharded state and step for `cfg` and trains it; see the module docstring."""

  def __init__(self, cfg: Config, model: nn.Module | None = None, *, loss_fn: LossFn | None = None,
               trainable: Trainable = None, init_params: Any = None, mesh=None, run_dir: str | Path | None = None,
               hooks: Sequence[Hook | Callable[["Trainer", int], None]] = (),
               print_fn: Callable[[str], None] | None = None, schedule: optax.Schedule | None = None,
               post_update: optax.GradientTransformation | None = None):
    self.cfg = cfg
    self.model = model or build_model(cfg)
    self.loss_fn = loss_fn or make_lm_loss(self.model, cfg.train.z_loss)
    self.is_trainable = trainable_predicate(cfg.train.trainable if trainable is None else trainable)
    self.mesh = mesh or shd.make_mesh(cfg.mesh)
    self.rules = shd.LOGICAL_AXIS_RULES
    self.run_dir = Path(run_dir or cfg.train.run_dir)
    self.hooks = tuple(as_hook(h) for h in hooks)
    self.print_fn = print_fn
    self.schedule = schedule or make_schedule(cfg)   # what the optimizer follows and `lr` logs
    self.tx = make_optimizer(cfg, self.schedule, post_update)
    self._check_batch_layout()

    rng = jax.random.PRNGKey(cfg.train.seed)
    self._init_rng, self._state_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, min(cfg.data.seq_len, 8 * cfg.attention.block_size)), jnp.int32)
    self._boxed_params = jax.eval_shape(lambda: self.model.init(self._init_rng, tokens)["params"])
    self.param_shardings = shd.tree_shardings(self._boxed_params, self.mesh, self.rules)
    self._abstract_params = abstract_params = nn.unbox(self._boxed_params)
    self.trainable_paths = sorted(k for k in flat(abstract_params) if self.is_trainable(k))
    if not self.trainable_paths:
      raise ValueError(f"train.trainable={cfg.train.trainable!r} (or the trainable= argument) selects no parameter; "
                       f"parameters look like {sorted(flat(abstract_params))[:3]}")
    boxed_trainable, _ = split_params(self._boxed_params, self.is_trainable)
    self.opt_shardings = shd.tree_shardings(jax.eval_shape(self.tx.init, boxed_trainable), self.mesh, self.rules)
    repl = NamedSharding(self.mesh, P())
    self.state_shardings = TrainState(step=repl, params=self.param_shardings, opt_state=self.opt_shardings, rng=repl)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(self._make_state, abstract_params), self.state_shardings)
    self.n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
    self.n_trainable = sum(math.prod(v.shape) for k, v in flat(abstract_params).items() if self.is_trainable(k))
    self._init_params = init_params
    self.state: TrainState | None = None
    self._step_fn = None
    self._eval_fn = None
    self._finite_fn = None

  # --- construction ---------------------------------------------------------------------

  def _check_batch_layout(self) -> None:
    check_batch_layout(self.cfg, shd.data_parallel_size(self.mesh), self.mesh.shape["context"])

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

  def say(self, msg: str, level: int = logging.INFO) -> None:
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
        self.say(f"resumed from {checkpointer.directory / str(step)}")
        return step
    self.state = self.init_state()
    return 0

  def fit(self, data_iter: Iterator[dict[str, np.ndarray]], steps: int | None = None,
          restore_data: bool = True) -> FitResult:
    """Train until state.step == steps (default train.steps), hooks logging and checkpointing on the way.

    restore_data=False resumes the model state but starts `data_iter` afresh (a new data stage).
    """
    steps = self.cfg.train.steps if steps is None else steps
    loop = self._begin(data_iter, steps, restore_data)
    hooks = [*self.default_hooks(), *self.hooks]
    step, stopped = loop.start, "done"
    try:
      for hook in hooks:
        hook.begin(loop)
      while step < steps and stopped == "done":
        t0 = time.perf_counter()
        batch = next(data_iter, None)
        data_s = time.perf_counter() - t0
        if batch is None:
          self.say(f"data ran out at step {step}")
          break
        step += 1
        loop.record(step, self.step(batch), data_s)
        if not all(hook.after_step(loop, step) for hook in hooks if hook.due(step)):
          stopped = "non_finite"
      if stopped == "done" and not all(hook.end(loop, step) for hook in hooks):
        stopped = "non_finite"
    finally:
      for hook in hooks:
        hook.close(loop)
      loop.ckpt.close()
      loop.logger.close()
    return FitResult(step=step, stopped=stopped, last_metrics=loop.last)

  def default_hooks(self) -> list[Hook]:
    """Progress bar (train.progress), metrics every train.log_every steps, checkpoints every
    train.checkpoint_every steps (0: only after the last step)."""
    t = self.cfg.train
    return ([ProgressBar(every=1)] if t.progress else []) + [LogMetrics(every=t.log_every),
                                                              SaveCheckpoint(every=t.checkpoint_every)]

  def _begin(self, data_iter, steps: int, restore_data: bool) -> Loop:
    """Write the run config, open the checkpoints, restore or init, and say what will run."""
    t = self.cfg.train
    if jax.process_index() == 0:
      self.run_dir.mkdir(parents=True, exist_ok=True)
      save_config(self.cfg, self.run_dir / "config.yaml")
    ckpt = Checkpointer(self.run_dir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpointing)
    if not t.resume and ckpt.all_steps():
      ckpt.close()
      raise ValueError(f"train.resume=false but {ckpt.directory} already holds checkpoints {ckpt.all_steps()}; "
                       "pick a new train.run_dir (or delete them) so nothing saved is overwritten")
    start = self.restore_or_init(data_iter if restore_data else None, ckpt)
    tokens_per_step = t.batch_size * self.cfg.data.seq_len
    self.say(f"training {self.n_trainable:,} of {self.n_params:,} params on {jax.device_count()} device(s), mesh "
             f"{dict(self.mesh.shape)}, steps {start} -> {steps}, run dir {self.run_dir}")
    return Loop(trainer=self, ckpt=ckpt, logger=MetricsLogger(self.run_dir, t.tensorboard, start),
                data_iter=data_iter, start=start, steps=steps, tokens_per_step=tokens_per_step,
                flops_per_step=flops_per_token(self.cfg, self.n_params, self.cfg.data.seq_len) * tokens_per_step,
                write=self.say)

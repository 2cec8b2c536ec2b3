"""Mid-train: resume training of all weights of the sparse model through context-length stages.

python -m train.midtrain --config configs/demo_cpu.yaml --set midtrain.init=runs/demo/sparse/model

Each entry of midtrain.stages sets seq_len, steps, learning rate (warm-up then cosine within the
stage) and optionally rope_scaling (e.g. a YaRN factor growing with seq_len) and mesh (the stage's
axis sizes, e.g. context parallelism for long stages only; the run's mesh otherwise). All stages
share one checkpoint series in train.run_dir, so a killed run resumes at its last checkpoint, in
whichever stage, resharded onto that stage's mesh; stages.json records each transition. The final
model goes to <train.run_dir>/model.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
from tqdm.auto import tqdm

from loza_jax import context, sharding as shd
from loza_jax.config import MESH_AXES, Config, MidtrainStage, replace, stage_mesh
from loza_jax.model_dir import export_model, load_model
from train import cli, data as data_lib
from train.checkpoint import Checkpointer
from train.iterators import train_iterator
from train.metrics import answer_accuracy, logged_steps
from train.optimizer import make_schedule
from train.trainer import Trainer, check_batch_layout

STAGE_SEED_STRIDE = 7_919


def stage_config(base: Config, model_cfg: Config, stage: MidtrainStage, index: int) -> Config:
  """The run config of one stage: the sparse model (with the stage's RoPE scaling), its mesh and its schedule."""
  model = model_cfg.model if stage.rope_scaling is None else replace(model_cfg.model, rope_scaling=stage.rope_scaling)
  return replace(base, **{
      "model": model,
      "attention": model_cfg.attention,
      "mesh": stage_mesh(base.mesh, stage.mesh),
      "data.seq_len": stage.seq_len,
      "data.seed": base.data.seed + STAGE_SEED_STRIDE * index,
      "train.batch_size": stage.batch_size or base.train.batch_size,
      "train.steps": stage.steps,
      "train.learning_rate": stage.learning_rate,
      "train.warmup_steps": stage.warmup_steps,
      "train.decay_steps": stage.steps,
  })


def check_stage_mesh(scfg: Config, n_devices: int) -> None:
  """ValueError unless a stage's mesh fits `n_devices`, its batch splits over data x fsdp and its rows over
  context (what the trainer and the model would find only when the stage starts)."""
  sizes = dict(zip(MESH_AXES, shd.mesh_shape(scfg.mesh, n_devices)))
  check_batch_layout(scfg, sizes["data"] * sizes["fsdp"], sizes["context"])
  if sizes["context"] > 1:
    a, sparse = scfg.attention, any(t != "full" for t in scfg.layer_types)
    context.check_split(scfg.data.seq_len, context.Layout(sizes["context"], "zigzag"),
                        a.block_size if sparse else None, a.sink_blocks * a.block_size if sparse else 0)


def stage_bounds(stages: Sequence[MidtrainStage]) -> list[tuple[int, int]]:
  """[(first global step, end global step)] per stage."""
  out, start = [], 0
  for s in stages:
    out.append((start, start + s.steps))
    start += s.steps
  return out


def _record(run_dir: Path, entry: dict) -> None:
  path = run_dir / "stages.json"
  log = json.loads(path.read_text()) if path.is_file() else []
  log = [e for e in log if e["stage"] != entry["stage"]] + [entry]
  path.write_text(json.dumps(sorted(log, key=lambda e: e["stage"]), indent=2) + "\n")


def midtrain(cfg: Config, init: str | Path, *, hooks: Sequence[Callable] = (), print_fn=None) -> Path:
  """Run (or resume) every stage; returns the exported final model directory."""
  stages = cfg.midtrain.stages
  if not stages:
    raise ValueError("midtrain.stages is empty: give at least one {seq_len, steps} stage")
  params, model_cfg = load_model(init)
  for i, st in enumerate(stages):
    if st.seq_len % model_cfg.attention.block_size:
      raise ValueError(f"midtrain.stages[{i}].seq_len={st.seq_len} must be a multiple of attention.block_size="
                       f"{model_cfg.attention.block_size}")
  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
  corpus = data_lib.load_corpus(cfg.data)
  for i, st in enumerate(stages):   # fail before any training if a later stage's data or mesh does not fit
    try:
      scfg = stage_config(cfg, model_cfg, st, i)
      data_lib.build_dataset(scfg, 1, corpus=corpus, tokenizer=tokenizer)
      check_stage_mesh(scfg, jax.device_count())
    except ValueError as e:
      raise ValueError(f"midtrain.stages[{i}] (seq_len {st.seq_len}): {e}") from None
  run_dir = Path(cfg.train.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  say = print_fn or print
  trainer = None
  for i, (stage, (start, end)) in enumerate(zip(stages, stage_bounds(stages))):
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    latest = ckpt.latest_step() or 0
    ckpt.close()
    scfg = stage_config(cfg, model_cfg, stage, i)
    base_schedule = make_schedule(scfg)
    schedule = lambda step, s0=start, f=base_schedule: f(step - s0)
    trainer = Trainer(scfg, init_params=params, schedule=schedule, run_dir=run_dir, hooks=hooks, print_fn=print_fn)
    if latest >= end:
      say(f"stage {i} (seq_len {stage.seq_len}, steps {start}->{end}) already done")
      continue
    say(f"stage {i}: seq_len {stage.seq_len}, steps {start}->{end}, lr {stage.learning_rate}, rope_scaling "
        f"{stage.rope_scaling}, mesh {dict(trainer.mesh.shape)}" +
        (f" (resuming at step {latest})" if latest > start else ""))
    entry = {"stage": i, "seq_len": stage.seq_len, "start_step": start, "end_step": end,
             "learning_rate": stage.learning_rate, "mesh": dict(trainer.mesh.shape),
             "rope_scaling": None if stage.rope_scaling is None else stage.rope_scaling.__dict__,
             "started_unix": time.time()}
    data_iter = train_iterator(scfg, corpus=corpus, tokenizer=tokenizer)
    result = trainer.fit(data_iter, steps=end, restore_data=latest > start)
    if result.stopped != "done" or result.step < end:
      raise RuntimeError(f"stage {i} stopped at step {result.step}: {result.stopped}")
    entry.update(finished_unix=time.time(), final_loss=result.last_metrics.get("loss"),
                 answer_acc=answer_accuracy(logged_steps(run_dir, start, end)))
    if jax.process_index() == 0:
      _record(run_dir, entry)
  if trainer.state is None:  # every stage was already done: load the final state for export
    trainer.restore_or_init(None, Checkpointer(run_dir / "checkpoints"))
  return export_model(run_dir / "model", trainer.state.params, trainer.cfg)


def main(argv: Sequence[str] | None = None, hooks: Sequence[Callable] = ()) -> int:
  ap, _, cfg, init = cli.parse_stage(__doc__.splitlines()[0], argv, "midtrain", "sparse model directory")
  out = cli.run_or_exit(ap, midtrain, cfg, init, hooks=hooks, print_fn=tqdm.write, lock=cfg.train.run_dir)
  print(f"mid-trained model -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Trainer: loss masking, trainable filter, distillation loss, NaN stop, exact resume (in-process and after SIGKILL)."""
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from loza_jax import config as config_lib
from loza_jax.attention import default_positions
from loza_jax.model import build_model
from loza_jax.model_dir import load_model
from tests.trainer_utils import read_metrics, tiny_cfg, write_tiny_yaml
from train import data
from train.checkpoint import Checkpointer
from train.hooks import Callback
from train.iterators import train_iterator
from train.losses import lm_loss_terms, make_distill_loss, make_lm_loss
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _batches(cfg, n, seed=0):
  it = iter(data.build_dataset(cfg, cfg.train.batch_size, seed=seed))
  return [next(it) for _ in range(n)]


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_packed_loss_equals_separate_documents(tmp_path, rng):
  """A row holding two documents has the token-weighted loss of the two documents run alone."""
  cfg = tiny_cfg(tmp_path)
  model = build_model(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64), jnp.int32))["params"])
  a, b = rng.integers(0, 256, 32), rng.integers(0, 256, 20)
  tokens = np.zeros((1, 64), np.int32)
  seg = np.zeros((1, 64), np.int32)
  tokens[0, :32], seg[0, :32] = a, 1
  tokens[0, 32:52], seg[0, 32:52] = b, 2
  pos = np.asarray(default_positions(jnp.asarray(seg)))
  loss_fn = jax.jit(make_lm_loss(model))
  packed = {"tokens": tokens, "segment_ids": seg, "positions": pos, "loss_mask": (seg > 0).astype(np.int32)}
  loss, aux = loss_fn(params, packed, None)
  assert float(aux["weight"]) == 31 + 19
  total = 0.0
  for doc in (a, b):
    one = {"tokens": doc[None], "segment_ids": np.ones((1, len(doc)), np.int32),
           "positions": np.arange(len(doc))[None], "loss_mask": np.ones((1, len(doc)), np.int32)}
    l1, aux1 = loss_fn(params, one, None)
    total += float(l1) * float(aux1["weight"])
  np.testing.assert_allclose(float(loss), total / 50, rtol=1e-5)
  # The loss mask restricts targets: masking doc b leaves doc a's loss.
  masked = dict(packed, loss_mask=(seg == 1).astype(np.int32))
  la, _ = loss_fn(params, masked, None)
  one_a = {"tokens": a[None], "segment_ids": np.ones((1, 32), np.int32), "positions": np.arange(32)[None],
           "loss_mask": np.ones((1, 32), np.int32)}
  np.testing.assert_allclose(float(la), float(loss_fn(params, one_a, None)[0]), rtol=1e-5)


def test_z_loss_adds_lse_penalty():
  logits = jnp.zeros((1, 4, 8)) + jnp.arange(8.0)
  batch = {"tokens": jnp.array([[1, 2, 3, 4]]), "segment_ids": jnp.ones((1, 4), jnp.int32),
           "loss_mask": jnp.ones((1, 4), jnp.int32)}
  base, _ = lm_loss_terms(logits, batch)
  with_z, aux = lm_loss_terms(logits, batch, z_loss=1e-2)
  lse = float(jax.nn.logsumexp(jnp.arange(8.0)))
  np.testing.assert_allclose(float(with_z - base), 1e-2 * lse ** 2, rtol=1e-5)
  np.testing.assert_allclose(float(aux["ce"]), float(base), rtol=1e-6)


def test_answer_metrics_count_answer_targets_only():
  """answer_ce / answer_acc average over the targets marked data.ANSWER alone (not text targets, not a
  target in the next document); none marked gives answer_tokens 0."""
  V = 8
  tokens = jnp.array([[1, 2, 3, 4, 5, 6]])
  seg = jnp.array([[1, 1, 1, 1, 2, 2]])
  mask = jnp.array([[1, 1, data.ANSWER, data.ANSWER, data.ANSWER, 1]])
  # Logits at position t predict token t+1: right at t=1 (-> 3) and wrong at t=2 (-> 4, argmax 0);
  # t=3 -> 5 crosses into document 2 and is no target.
  logits = jnp.zeros((1, 6, V)).at[0, 1, 3].set(5.0).at[0, 2, 0].set(5.0)
  batch = {"tokens": tokens, "segment_ids": seg, "loss_mask": mask}
  _, aux = lm_loss_terms(logits, batch)
  assert float(aux["answer_tokens"]) == 2
  np.testing.assert_allclose(float(aux["answer_acc"]), 0.5)
  ce = lambda row, t: float(jax.nn.logsumexp(logits[0, row]) - logits[0, row, t])
  np.testing.assert_allclose(float(aux["answer_ce"]), (ce(1, 3) + ce(2, 4)) / 2, rtol=1e-6)
  assert float(aux["weight"]) == 4   # text targets count in the loss, not in the answer metrics
  _, none = lm_loss_terms(logits, dict(batch, loss_mask=jnp.ones_like(mask)))
  assert float(none["answer_tokens"]) == 0 and float(none["answer_acc"]) == 0


def test_answer_accuracy_and_step_line():
  from train.metrics import answer_accuracy, step_line
  recs = [{"answer_tokens": 0, "answer_acc": 0.0}, {"answer_tokens": 10, "answer_acc": 0.2},
          {"answer_tokens": 30, "answer_acc": 0.6}]
  np.testing.assert_allclose(answer_accuracy(recs), (2 + 18) / 40)
  np.testing.assert_allclose(answer_accuracy(recs, last=1), 0.6)
  assert answer_accuracy(recs[:1]) is None and answer_accuracy([]) is None
  base = {"step": 5, "loss": 1.0, "grad_norm": 0.5, "lr": 1e-3, "tokens_per_s": 10.0, "tflops_per_device": 1.0,
          "step_time": 0.1}
  assert "answer-acc" not in step_line(dict(base, answer_tokens=0.0, answer_acc=0.0))
  assert "answer-acc 0.600 (30 tok)" in step_line(dict(base, answer_tokens=30.0, answer_acc=0.6))


def test_trainable_filter_only_alpha(tmp_path):
  cfg = tiny_cfg(tmp_path / "run", ["attention.layer_types=[blend, blend]", "train.trainable=alpha$"])
  tr = Trainer(cfg)
  state0 = tr.init_state()
  before = _flat(state0.params)
  opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state0.opt_state)[0]]
  opt_arrays = jax.tree.leaves(state0.opt_state)
  param_leaves = [p for p in opt_paths if "mu" in p or "nu" in p]
  assert param_leaves and all("alpha" in p for p in param_leaves), opt_paths
  assert len(param_leaves) == 2 * 2  # mu and nu for the two alphas
  assert sum(x.size for x in opt_arrays) < 10, "frozen weights must cost no optimizer memory"
  tr.state = state0
  for b in _batches(cfg, 2):
    tr.step(b)
  after = _flat(tr.state.params)
  changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
  assert changed == ["layers_0/self_attn/alpha", "layers_1/self_attn/alpha"]


def test_distill_loss_trains_alpha_against_frozen_full_model(tmp_path):
  cfg = tiny_cfg(tmp_path / "run", ["attention.layer_types=[blend, blend]", "data.seq_len=128"])
  full_cfg = config_lib.replace(cfg, **{"attention.layer_types": ("full", "full")})
  student, teacher = build_model(cfg), build_model(full_cfg)
  params = nn.unbox(student.init(jax.random.PRNGKey(1), jnp.zeros((1, 16), jnp.int32))["params"])
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, 0.5) if jax.tree_util.keystr(p).endswith("['alpha']") else x, params)
  tr = Trainer(cfg, student, loss_fn=make_distill_loss(student, teacher), trainable="alpha$", init_params=params)
  batches = _batches(cfg, 3)
  losses = [float(tr.step(b)["loss"]) for b in batches]
  assert losses[0] > 0
  alphas = [float(v) for k, v in _flat(tr.state.params).items() if k.endswith("alpha")]
  assert all(a > 0.5 for a in alphas), f"distillation toward the full model should raise alpha: {alphas}"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_cfg(tmp_path / "run", ["train.steps=6"])
  model = build_model(cfg)
  lm = make_lm_loss(model)

  def loss_fn(params, batch, rng):
    loss, aux = lm(params, batch, rng)
    return jnp.where(batch["tokens"][0, 0] == 255, jnp.nan, loss), aux

  batches = _batches(cfg, 6)
  batches[3]["tokens"][0, 0] = 255
  said = []
  tr = Trainer(cfg, model, loss_fn=loss_fn, print_fn=said.append)
  result = tr.fit(iter(batches))
  assert result.stopped == "non_finite" and result.step == 4
  assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()) == [2]
  assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
  assert any("step 4: loss is nan" in s and "checkpoints/2" in s for s in said), said


def test_metrics_record_the_share_of_time_waiting_for_data(tmp_path):
  """A batch source slower than the step shows up as data_share (and in the step line)."""
  import time as time_lib
  cfg = tiny_cfg(tmp_path / "run", ["train.steps=4", "train.log_every=1", "train.checkpoint_every=0"])

  def slow(batches):
    for b in batches:
      time_lib.sleep(0.4)
      yield b

  said = []
  Trainer(cfg, print_fn=said.append).fit(slow(_batches(cfg, 4)))
  rec = read_metrics(tmp_path / "run")[-1]     # a window after compilation: the sleep dominates it
  assert 0.5 < rec["data_share"] <= 1.0, rec
  assert "waiting for data" in said[-2] or "waiting for data" in said[-1], said


def test_resume_in_process_matches_uninterrupted(tmp_path):
  over = ["train.steps=5", "train.checkpoint_every=2"]
  cfg_a = tiny_cfg(tmp_path / "a", over)
  Trainer(cfg_a).fit(iter(data.build_dataset(cfg_a, 4)))
  cfg_b = tiny_cfg(tmp_path / "b", over)
  Trainer(cfg_b).fit(iter(data.build_dataset(cfg_b, 4)), steps=3)
  tr = Trainer(cfg_b)
  tr.fit(iter(data.build_dataset(cfg_b, 4)))
  a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
  assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  tr_a = Trainer(cfg_a)
  assert tr_a.restore_or_init(None, Checkpointer(tmp_path / "a" / "checkpoints")) == 5
  for k, v in _flat(tr_a.state.params).items():
    np.testing.assert_array_equal(v, _flat(tr.state.params)[k], err_msg=k)


def _pretrain(args, timeout=240):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(ROOT / "tests" / "resume_helper.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
  yaml_path = write_tiny_yaml(tmp_path / "tiny.yaml", ["train.steps=6", "train.checkpoint_every=2",
                                                       "train.async_checkpointing=true", "train.tensorboard=true",
                                                       "data.retrieval_fraction=0.25", "data.seq_len=256",
                                                       "data.retrieval_tasks=[passkey]", "train.batch_size=2"])
  ref = _pretrain(["--config", str(yaml_path), "--run-dir", str(tmp_path / "ref")])
  assert ref.returncode == 0, ref.stderr[-3000:]
  killed = _pretrain(["--config", str(yaml_path), "--run-dir", str(tmp_path / "run"), "--kill-at", "5"])
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert not (tmp_path / "run" / "model").exists()
  resumed = _pretrain(["--config", str(yaml_path), "--run-dir", str(tmp_path / "run")])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stdout + resumed.stderr
  ref_log, run_log = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "run")
  assert [r["step"] for r in run_log] == list(range(1, 7))
  assert [r["loss"] for r in run_log] == [r["loss"] for r in ref_log]
  p_ref, cfg_ref = load_model(tmp_path / "ref" / "model")
  p_run, _ = load_model(tmp_path / "run" / "model")
  assert cfg_ref.train.steps == 6
  for k, v in _flat(p_ref).items():
    np.testing.assert_array_equal(v, _flat(p_run)[k], err_msg=k)
  assert list((tmp_path / "run" / "tb").iterdir()), "TensorBoard event files expected"


def test_pretrain_cli_reports_data_errors(tmp_path):
  from train import pretrain
  cfg_yaml = write_tiny_yaml(tmp_path / "c.yaml", ["data.source=files", f"data.paths=[{tmp_path / 'nope.jsonl'}]"])
  with pytest.raises(SystemExit, match=r"error: data.paths: .*nope.jsonl does not exist"):
    pretrain.main(["--config", str(cfg_yaml), "--run-dir", str(tmp_path / "run")])
  empty = tmp_path / "empty.jsonl"
  empty.write_text('{"text": ""}\n')
  cfg_yaml = write_tiny_yaml(tmp_path / "c.yaml", ["data.source=files", f"data.paths=[{empty}]"])
  with pytest.raises(SystemExit, match="no non-empty documents"):
    pretrain.main(["--config", str(cfg_yaml), "--run-dir", str(tmp_path / "run")])


def test_resume_false_refuses_to_overwrite(tmp_path):
  cfg = tiny_cfg(tmp_path / "run", ["train.steps=2"])
  Trainer(cfg).fit(iter(data.build_dataset(cfg, 4)))
  again = tiny_cfg(tmp_path / "run", ["train.steps=2", "train.resume=false"])
  with pytest.raises(ValueError, match="train.resume=false"):
    Trainer(again).fit(iter(data.build_dataset(again, 4)))
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2", "2.sha256.json"]


def test_hooks_run_every_n_steps_and_once_at_the_end(tmp_path):
  """Logging and checkpointing are hooks with an `every`; a user hook with every=2 sees steps 2 and 4,
  metrics are logged every train.log_every steps and flushed after the last, the last step is saved."""
  cfg = tiny_cfg(tmp_path / "run", ["train.steps=5", "train.log_every=2", "train.checkpoint_every=0"])
  seen = []
  result = Trainer(cfg, hooks=[Callback(every=2, fn=lambda tr, step: seen.append(step))]).fit(train_iterator(cfg))
  assert result.stopped == "done" and seen == [2, 4]
  assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()) == ["5"]

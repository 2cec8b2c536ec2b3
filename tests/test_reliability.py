"""The failure modes the project handles, one test each: read the docstrings as the list.

Checkpoints (corrupt, diverged, noisy), run-directory ownership, outputs we did not create, and
inputs that used to raise tracebacks or pass silently.
"""
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hf_fixtures import FIXTURES

from loza_jax import attention as A
from loza_jax.config import load_config
from loza_jax.convert import export_hf, import_hf
from loza_jax.model_dir import export_model
from tests.trainer_utils import tiny_cfg, write_tiny_yaml
from train import data, rundir
from train.checkpoint import Checkpointer, steps_to_delete
from train.metrics import MetricsLogger, read_jsonl
from train.sparsify import calibration_alphas, read_calibration, sparsify
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run directory with checkpoints at steps 2 and 4, saved asynchronously."""
  run = tmp_path_factory.mktemp("rel") / "run"
  cfg = tiny_cfg(run, ["train.steps=4", "train.checkpoint_every=2", "train.async_checkpointing=true"])
  tr = Trainer(cfg)
  tr.fit(iter(data.build_dataset(cfg, 4)))
  return run


def _copy(run: Path, tmp_path: Path) -> Path:
  dst = tmp_path / "run"
  shutil.copytree(run, dst)
  return dst


def _largest_array_file(step_dir: Path) -> Path:
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
  return max(files, key=lambda f: f.stat().st_size)


# ----------------------------------------------------------------------------------------
# 1-3. Checkpoints.


def test_overwritten_array_data_is_caught_by_checksums(trained, tmp_path, caplog):
  """4 KB of a checkpoint's array data overwritten in place (same size) used to restore cleanly with
  corrupt optimizer values; the checksums written at save now send the restore to the previous step."""
  run = _copy(trained, tmp_path)
  assert (run / "checkpoints" / "2.sha256.json").is_file() and (run / "checkpoints" / "4.sha256.json").is_file()
  f = _largest_array_file(run / "checkpoints" / "4")
  raw = bytearray(f.read_bytes())
  raw[1024:1024 + 4096] = bytes(4096)[:len(raw[1024:1024 + 4096])]
  size = f.stat().st_size
  f.write_bytes(bytes(raw))
  assert f.stat().st_size == size
  cfg = tiny_cfg(run, ["train.steps=4", "train.checkpoint_every=2"])
  ckpt = Checkpointer(run / "checkpoints")
  with caplog.at_level(logging.ERROR):
    assert Trainer(cfg).restore_or_init(None, ckpt) == 2
  ckpt.close()
  errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  assert len(errors) == 1 and "step 4" in errors[0] and "checksum mismatch" in errors[0], errors
  assert [p.name for p in (run / "checkpoints.corrupt").iterdir()][0].startswith("4-")


def _diverging_fit(run: Path, steps: int = 8):
  """checkpoint_every 1, keep 1: learning rate 1e-2 for three updates, then 1e9 (|param| ~ 1e9, loss NaN after)."""
  cfg = tiny_cfg(run, [f"train.steps={steps}", "train.checkpoint_every=1", "train.keep_checkpoints=1",
                       "train.grad_clip=0"])
  schedule = lambda step: jnp.where(step < 3, 1e-2, 1e9)
  said = []
  tr = Trainer(cfg, schedule=schedule, print_fn=said.append)
  return cfg, tr, tr.fit(iter(data.build_dataset(cfg, 4))), said


def test_diverged_checkpoint_is_not_the_last_good_one(tmp_path):
  """A checkpoint saved after a diverging update (finite loss, |param| ~ 1e9) used to be the 'last good'
  one and rotation deleted the real one, so every resume hit NaN. Now the NaN names the checkpoint
  before the diverging update, keeps it, and moves the diverged one aside."""
  run = tmp_path / "run"
  cfg, _, result, said = _diverging_fit(run)
  assert result.stopped == "non_finite" and result.step == 5
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.is_dir())
  assert steps == [3], steps
  msg = [s for s in said if "stopping" in s]
  assert len(msg) == 1 and "step 5: loss is nan" in msg[0] and "checkpoints/3" in msg[0], msg
  assert any(p.name.startswith("4-") for p in (run / "checkpoints.corrupt").iterdir())
  ckpt = Checkpointer(run / "checkpoints")
  assert Trainer(cfg).restore_or_init(None, ckpt) == 3
  ckpt.close()


def test_no_checkpoint_of_non_finite_params_and_rotation_spares_the_good_step(tmp_path):
  """Params that are NaN after an update are never saved; rotation never drops the newest good step."""
  cfg = tiny_cfg(tmp_path / "run", ["train.steps=4", "train.checkpoint_every=1"])
  schedule = lambda step: jnp.where(step < 2, 1e-2, jnp.nan)
  said = []
  tr = Trainer(cfg, schedule=schedule, print_fn=said.append)
  result = tr.fit(iter(data.build_dataset(cfg, 4)))
  assert result.stopped == "non_finite" and result.step == 3
  assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()) == [1, 2]
  assert any("params are not finite" in s and "checkpoints/2" in s for s in said), said
  assert steps_to_delete([1, 2, 3, 4], keep=1, protected=2) == [1, 3]
  assert steps_to_delete([1, 2], keep=None, protected=None) == []


def test_unreadable_checkpoint_prints_one_line_and_logs_the_rest(trained, tmp_path, caplog, capfd):
  """A truncated array file (no checksum: the run died before writing it) used to print hundreds of
  asyncio tracebacks before the useful line; now the console gets that line and the run directory's
  checkpoint_errors.log the detail."""
  run = _copy(trained, tmp_path)
  (run / "checkpoints" / "4.sha256.json").unlink()
  f = _largest_array_file(run / "checkpoints" / "4")
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  cfg = tiny_cfg(run, ["train.steps=4", "train.checkpoint_every=2"])
  ckpt = Checkpointer(run / "checkpoints")
  with caplog.at_level(logging.INFO):
    assert Trainer(cfg).restore_or_init(None, ckpt) == 2
  ckpt.close()
  shown = [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(shown) == 1 and "step 4" in shown[0].getMessage() and "unreadable" in shown[0].getMessage()
  assert not any(r.name.startswith("asyncio") for r in caplog.records)
  assert "Traceback" not in capfd.readouterr().err
  assert "Traceback" in (run / "checkpoint_errors.log").read_text()


# ----------------------------------------------------------------------------------------
# 4. One writer per run directory.

HOLD = ("import sys, time; from train import rundir; rundir.acquire(sys.argv[1]); print('held', flush=True); "
        "time.sleep(60)")


def test_second_writer_on_a_run_directory_is_refused(tmp_path, capsys):
  """Two runs on one run directory used to interleave metrics.jsonl and resume from each other's
  checkpoints; the second now stops with the directory and the holder's pid, and a killed holder
  frees the directory."""
  run = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(rundir.RunDirLocked, match=rf"{run}.*pid {holder.pid}"):
      rundir.acquire(run)
    from train import evaluate
    yaml_path = write_tiny_yaml(tmp_path / "c.yaml")
    with pytest.raises(SystemExit) as e:
      evaluate.main(["--config", str(yaml_path), "--run-dir", str(run), "--model", str(tmp_path / "m")])
    assert e.value.code == 2 and f"pid {holder.pid}" in capsys.readouterr().err
  finally:
    holder.kill()
    holder.wait()
  with rundir.locked(run), rundir.locked(run):   # free again, and re-entrant within a process
    pass


# ----------------------------------------------------------------------------------------
# 5. Outputs we did not create.


def test_outputs_that_are_not_ours_are_never_replaced(tmp_path):
  """sparsify.out on a non-empty directory used to rmtree it, out == --init overwrote the input, and
  convert export overwrote config.json in a used directory: all are refused, nothing is touched."""
  cfg = tiny_cfg(tmp_path / "run")
  other = tmp_path / "precious"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="precious.*not empty"):
    sparsify(cfg, tmp_path / "model", other)
  assert (other / "notes.txt").read_text() == "keep me"
  with pytest.raises(ValueError, match="overlaps the input"):
    sparsify(cfg, tmp_path / "model", tmp_path / "model")
  with pytest.raises(ValueError, match="overlaps the input"):
    sparsify(cfg, tmp_path / "run" / "model", tmp_path / "run")
  with pytest.raises(FileExistsError, match="not empty"):
    export_model(other, {"w": np.zeros(2)}, cfg)
  ours = export_model(tmp_path / "ours", {"w": np.zeros(2)}, cfg)
  assert (ours / "loza_model.json").is_file()
  export_model(ours, {"w": np.ones(2)}, cfg)        # our own earlier output may be replaced
  hf_out = tmp_path / "hf"
  hf_out.mkdir()
  (hf_out / "config.json").write_text("{}")
  with pytest.raises(FileExistsError, match="not empty"):
    export_hf(ours, hf_out)
  assert (hf_out / "config.json").read_text() == "{}"


# ----------------------------------------------------------------------------------------
# 6. Inputs that raised tracebacks or passed silently.


def test_malformed_calibration_is_named(tmp_path):
  """calibration.json without `alpha`, with non-numeric or NaN α (which used to rank as the highest)
  raises ValueError naming the file and the entry."""
  path = tmp_path / "calibration.json"
  for bad, match in (({}, r"key 'alpha'"), ({"alpha": [{"alpha": "0.3"}, {"alpha": 0.5}]}, r"alpha\[0\]\.alpha"),
                     ({"alpha": [{"alpha": 0.3}, {"alpha": float("nan")}]}, r"alpha\[1\]\.alpha = nan"),
                     ({"alpha": [{"sublayer": 0}, {"alpha": 0.5}]}, r"alpha\[0\]\.alpha must be a number")):
    with pytest.raises(ValueError, match=rf"calibration\.json.*{match}"):
      calibration_alphas(bad, path, 2)
  path.write_text("[1, 2]")
  with pytest.raises(ValueError, match="calibration.json is not a calibration.json object"):
    read_calibration(path, tiny_cfg())
  assert calibration_alphas({"alpha": [{"alpha": 0.25}, {"alpha": 1}]}, path, 2) == [0.25, 1.0]


def test_truncated_safetensors_is_named(tmp_path):
  """A truncated .safetensors file in convert import raised the library's bare error; it now names the file."""
  src = tmp_path / "hf"
  shutil.copytree(FIXTURES / "deepseek_v3_tiny", src)
  f = src / "model.safetensors"
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(ValueError, match=r"model\.safetensors: not a readable \.safetensors file.*truncated"):
    import_hf(src, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_zero_expert_placeholders_on_deepseek(tmp_path):
  """--zero-expert-weights zeros on a DeepSeek-V3 model with a dense layer 0 raised KeyError; DeepSeek-V3
  has no zero experts, so the export now writes none."""
  cfg, _ = import_hf(FIXTURES / "deepseek_v3_tiny", tmp_path / "model")
  assert cfg.model.first_k_dense_replace >= 1
  export_hf(tmp_path / "model", tmp_path / "hf", zero_expert_weights="zeros")
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "deepseek_v3"


def test_partial_last_metrics_line_is_repaired(tmp_path, caplog):
  """A run killed mid-write leaves a partial last line in metrics.jsonl, which made resume crash;
  readers drop it, the resumed log is rewritten without it, a damaged earlier line is named."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert [r["step"] for r in read_jsonl(path)] == [1, 2]
  MetricsLogger(tmp_path, tensorboard=False, resume_step=2).close()
  assert path.read_text().splitlines() == ['{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.5}']
  path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record"):
    read_jsonl(path)


def test_attention_rejects_wrong_dtypes():
  """Integer q/k/v or float segment_ids/positions were accepted; ValueError names the argument and dtype."""
  q = jnp.zeros((1, 16, 2, 8), jnp.float32)
  seg = jnp.ones((1, 16), jnp.int32)
  with pytest.raises(ValueError, match="k has dtype int32"):
    A.attention(q, q.astype(jnp.int32), q, pattern=A.Full(), impl="xla")
  with pytest.raises(ValueError, match="segment_ids has dtype float32"):
    A.attention(q, q, q, pattern=A.Full(), segment_ids=seg.astype(jnp.float32), impl="xla")
  with pytest.raises(ValueError, match="positions has dtype float32"):
    A.attention(q, q, q, pattern=A.Full(), segment_ids=seg, positions=jnp.zeros((1, 16)), impl="xla")


def test_kernels_that_ignore_positions_refuse_them():
  """The Pallas kernels (and tokamax) derive positions from segment_ids and silently ignored explicit
  ones; they are registered with custom_positions=False, so an explicit request raises and auto skips
  them, while positions=None (what the model passes) still runs on them."""
  for name in ("pallas_triton", "pallas_mosaic", "pallas_triton_interpret", "pallas_mosaic_interpret", "tokamax"):
    assert A.lookup(name).custom_positions is False, name
  assert A.lookup("xla").custom_positions and A.lookup("xla_dense").custom_positions
  q = jnp.zeros((1, 32, 2, 16), jnp.float32)
  seg, pos = jnp.ones((1, 32), jnp.int32), jnp.arange(32)[None] + 5
  with pytest.raises(ValueError, match="ignores `positions`"):
    A.attention(q, q, q, pattern=A.Full(), segment_ids=seg, positions=pos, impl="pallas_triton_interpret")
  assert A.resolve_impl("pallas_triton_interpret", A.Full(), q, q, q).name == "pallas_triton_interpret"


def test_set_blames_the_right_override():
  """`--set train=5` followed by `--set train.steps=3` blamed the second override; each message now
  names the override at fault."""
  with pytest.raises(ValueError, match=r"--set 'train=5': 'train' is a section"):
    load_config(None, ["train=5", "train.steps=3"])
  with pytest.raises(ValueError, match=r"--set 'train.steps.x=1'.*--set 'train.steps=3' made it 3"):
    load_config(None, ["train.steps=3", "train.steps.x=1"])

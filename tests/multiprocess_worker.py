"""One of two localhost processes (gloo CPU collectives, 2 CPU devices each): a sharded train step on a
(data=2, fsdp=2) mesh spanning both processes, then a short fit with a per-process data shard and a
checkpoint. Prints one JSON line. Usage: multiprocess_worker.py PORT PROCESS_ID RUN_DIR"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from loza_jax import sharding as shd  # noqa: E402
from loza_jax.config import MeshConfig  # noqa: E402
from tests.trainer_utils import read_metrics, tiny_cfg  # noqa: E402
from train import data  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def checksum(params) -> float:
  return float(jax.jit(lambda p: sum(jnp.abs(x).sum() for x in jax.tree.leaves(p)))(params))


def main(port: int, pid: int, run_dir: str):
  dist = ["mesh.distributed=true", f"mesh.coordinator_address=localhost:{port}", "mesh.num_processes=2",
          f"mesh.process_id={pid}"]
  cfg = tiny_cfg(run_dir, dist + ["mesh.data=2", "mesh.fsdp=2", "train.steps=2"])
  shd.maybe_initialize_distributed(cfg.mesh)
  out = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count()}

  batch = next(iter(data.build_dataset(cfg, cfg.train.batch_size)))   # the same global batch everywhere
  ref = Trainer(cfg, mesh=shd.make_mesh(MeshConfig(data=1), jax.local_devices()[:1]), run_dir=run_dir + "/ref")
  ref.state = ref.init_state()
  params0 = jax.device_get(ref.state.params)
  m_ref = ref.step(batch)
  out.update(loss_ref=float(m_ref["loss"]), checksum_ref=checksum(ref.state.params))

  tr = Trainer(cfg, init_params=params0)
  rows = cfg.train.batch_size // jax.process_count()
  local = {k: v[pid * rows:(pid + 1) * rows] for k, v in batch.items()}
  m = tr.step(local)
  out.update(loss=float(m["loss"]), checksum=checksum(tr.state.params),
             param_sharding=str(tr.state.params["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec))

  it = iter(data.build_dataset(cfg, rows, process_index=pid, process_count=2))
  result = tr.fit(it)   # starts again from params0, reusing the compiled step
  out.update(fit_step=result.step, fit_loss=result.last_metrics.get("loss"),
             data_state=os.path.exists(os.path.join(run_dir, "checkpoints", "2", "data",
                                                    f"process_{pid}-of-2.json")))
  if pid == 0:
    out["logged_steps"] = [r["step"] for r in read_metrics(run_dir)]
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

"""Run in a subprocess with 8 simulated CPU devices: one train step on a 2x2x2 (data, fsdp, tensor) mesh vs
one device, then a checkpoint restored onto an 8-way fsdp mesh. Prints one JSON line of results."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from tests.trainer_utils import one_device_vs_sharded_step, tiny_cfg  # noqa: E402
from train.checkpoint import Checkpointer  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def main(run_dir):
  # Adam eps well above the fp32 reduction noise of the gradients: a near-zero gradient then moves its
  # parameter by ~g/eps instead of a full ±lr step whose sign the reduction order decides.
  over = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_attention_heads=4", "train.eps=1e-5"]
  cfg = tiny_cfg(run_dir, over + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  one, sharded, m1, m8, params0 = one_device_vs_sharded_step(cfg)
  p1, p8 = flat(one.state.params), flat(sharded.state.params)
  specs = {k: str(v.sharding.spec) for k, v in traverse_util.flatten_dict(sharded.state.params, sep="/").items()}
  mu = sharded.state.opt_state[1][0].mu
  mu_spec = str(mu["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec)

  ckpt = Checkpointer(os.path.join(run_dir, "ckpt"), async_save=False)
  ckpt.save(1, sharded.state)
  ckpt.wait()
  data_mesh = Trainer(tiny_cfg(run_dir, over + ["mesh.data=1", "mesh.fsdp=-1", "train.batch_size=8"]))
  step = data_mesh.restore_or_init(None, ckpt)
  p_restored = flat(data_mesh.state.params)
  restored_spec = str(data_mesh.state.params["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec)
  print(json.dumps({
      "devices": jax.device_count(),
      "mesh": dict(sharded.mesh.shape),
      "loss_single": float(m1["loss"]), "loss_sharded": float(m8["loss"]),
      "gnorm_single": float(m1["grad_norm"]), "gnorm_sharded": float(m8["grad_norm"]),
      "max_param_diff": max(float(np.abs(p1[k] - p8[k]).max()) for k in p1),
      "max_param_change": max(float(np.abs(p1[k] - params0_flat).max()) for k, params0_flat in
                              traverse_util.flatten_dict(params0, sep="/").items()),
      "specs": specs, "mu_spec": mu_spec,
      "restored_step": step, "restored_spec": restored_spec, "restored_mesh": dict(
          data_mesh.state.params["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.mesh.shape),
      "max_restore_diff": max(float(np.abs(p_restored[k] - p8[k]).max()) for k in p8),
  }))


if __name__ == "__main__":
  main(sys.argv[1])

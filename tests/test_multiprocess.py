"""Two processes on localhost (jax.distributed, gloo CPU collectives) run a sharded step and agree."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_agree(tmp_path):
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multiprocess_worker.py"), str(port), str(pid),
                             str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for pid in range(2)]
  outs = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=240)
      assert p.returncode == 0, stderr[-4000:]
      outs.append(json.loads(stdout.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  a, b = outs
  assert (a["process"], b["process"]) == (0, 1) and a["processes"] == 2 and a["devices"] == 4
  assert a["param_sharding"] == "P('fsdp', 'tensor')"
  assert a["loss"] == b["loss"] and a["checksum"] == b["checksum"]
  for r in outs:
    np.testing.assert_allclose(r["loss"], r["loss_ref"], rtol=1e-5)
    np.testing.assert_allclose(r["checksum"], r["checksum_ref"], rtol=1e-5)
    assert r["fit_step"] == 2 and r["data_state"]
  assert a["fit_loss"] == b["fit_loss"]
  assert a["logged_steps"] == [1, 2]

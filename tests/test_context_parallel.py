"""Context parallelism (loza_jax/context.py): loss and gradients with mesh.context = 4 and 8 equal context = 1.

The multi-device cases run in subprocesses with simulated CPU devices (this file is also the worker:
`python tests/test_context_parallel.py DEVICES`), which print one JSON line of results.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
T = 256


def _run_worker(devices: int) -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, __file__, str(devices)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def eight():
  return _run_worker(8)


@pytest.fixture(scope="module")
def four():
  return _run_worker(4)


def _check(case):
  np.testing.assert_allclose(case["loss"], case["loss_ref"], rtol=1e-5)
  assert case["grad_rel_err"] < 1e-4, case


@pytest.mark.parametrize("name", ["mixed_c8", "mixed_c4_fsdp2", "mixed_c4_data2", "mixed_c4_tensor2",
                                  "ssa_pallas_c8", "mixed_pallas_c8", "mixed_pallas_c4_tensor2"])
def test_context8_matches_context1(eight, name):
  _check(eight[name])


def test_trainer_step_with_context(eight):
  r = eight["trainer_c4_data2"]
  assert r["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1, "context": 4}
  np.testing.assert_allclose(r["loss"], r["loss_ref"], rtol=1e-5)
  np.testing.assert_allclose(r["gnorm"], r["gnorm_ref"], rtol=1e-4)


def test_context4_matches_context1(four):
  _check(four["mixed_c4"])


def test_ssa_collective_bytes_do_not_grow_with_T(eight):
  b = eight["ssa_bytes"]
  assert b[str(2 * T)] > 0 and b[str(2 * T)] == b[str(8 * T)], b


def test_unsplittable_sequences_raise_naming_sizes(eight):
  assert "T=200" in eight["error_chunks"] and "16 chunks" in eight["error_chunks"]
  assert "block_size=32" in eight["error_blocks"] and "T=256" in eight["error_blocks"]


def test_misaligned_documents_are_refused(eight):
  """Eagerly a ValueError naming the token; under jit on 8 devices the outputs are NaN (and an error is logged)."""
  assert "row 0 has a document starting at token 21" in eight["error_misaligned"]
  assert eight["misaligned_all_nan"]


def test_documents_aligned_without_a_mesh(caplog):
  import jax
  import jax.numpy as jnp

  from loza_jax import context
  good, bad = jnp.asarray([[1] * 16 + [2] * 16 + [0] * 8] * 2), jnp.asarray([[1] * 40, [1] * 3 + [2] * 37])
  assert bool(context.documents_aligned(good, 16))
  with pytest.raises(ValueError, match="row 1 has a document starting at token 3"):
    context.documents_aligned(bad, 16)
  traced = jax.jit(lambda s: context.documents_aligned(s, 16))
  assert bool(traced(good)) and not bool(jax.block_until_ready(traced(bad)))
  jax.effects_barrier()
  assert "row 1 has a document starting at token 3" in caplog.text


@pytest.mark.parametrize("impl", ["xla", "pallas_triton_interpret"])
def test_shard_map_path_at_context1_matches_plain(impl):
  """context.force_shard_map at context = 1 (what benchmarks/context_gpu.py times) takes the shard_map path and
  gives the plain path's loss and gradients on packed, padded rows (Full sublayers: the XLA latent form, or the
  prefix kernel at each chunk's offset)."""
  import jax
  import jax.numpy as jnp

  from benchmarks.context_gpu import mesh_scope, step_fn
  from loza_jax.config import load_config
  cfg = load_config(str(ROOT / "configs/demo_cpu.yaml"), [
      "model.num_hidden_layers=2", "model.hidden_size=32", "model.intermediate_size=64", "model.kv_lora_rank=16",
      "model.num_attention_heads=2", "attention.block_size=16", "attention.layer_types=[full, ssa]",
      f"attention.impl={impl}", f"model.max_position_embeddings={T}"])
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, T)), jnp.int32)
  seg = jnp.asarray(_segments(2, T))
  out = {}
  for forced in (False, True):
    fn, params = step_fn(cfg)   # a fresh function per path: jit keeps one trace per function
    with mesh_scope(forced):
      jaxpr = str(jax.make_jaxpr(fn)(params, tokens, seg))
      assert ("shard_map" in jaxpr) == forced
      # Full sublayers on the shard_map path: the prefix kernel for kernel impls, never for xla
      assert ("prefix_attention_fwd" in jaxpr) == (forced and impl != "xla")
      out[forced] = jax.jit(fn)(params, tokens, seg)
  np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out[False][1]), jax.tree.leaves(out[True][1])):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_check_split_messages():
  from loza_jax import context
  with pytest.raises(ValueError, match=r"T=100 is not divisible into 8 chunks \(mesh.context=8"):
    context.check_split(100, context.Layout(8))
  with pytest.raises(ValueError, match=r"chunks of 8 tokens, not a multiple of attention.block_size=16"):
    context.check_split(64, context.Layout(4, "zigzag"), block_size=16)
  with pytest.raises(ValueError, match=r"sink \(32 tokens\) is longer than a chunk of 16"):
    context.check_split(256, context.Layout(8, "zigzag"), block_size=16, sink_tokens=32)
  assert context.check_split(256, context.Layout(8, "zigzag"), block_size=16) == 16


def test_latent_attention_matches_dense(rng):
  """Full attention from latents (chunked, causal chunk skipping, custom VJP) equals xla_dense on expanded K/V."""
  import jax
  import jax.numpy as jnp

  from loza_jax import attention as attn, context
  B, T, H, K, Cl, R, Dn, E, chunk = 2, 48, 4, 2, 8, 4, 6, 5, 16
  ex = context.Expand(K, Dn, jnp.float32)
  q = jnp.asarray(rng.normal(size=(B, T, H, Dn + R)), jnp.float32)
  lat = jnp.asarray(rng.normal(size=(B, T, Cl + R)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(Cl, K * (Dn + E))) / 3, jnp.float32)
  seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 20 + [0] * 8, [3] * 30 + [4] * 18], 1, axis=0), jnp.int32)
  idx = jnp.broadcast_to(jnp.arange(T), (B, T))

  def ours(q, lat, w):
    return context.latent_attention(q, lat, w, seg, idx, seg, jnp.arange(T), 0.3, chunk, ex)

  def ref(q, lat, w):
    k, v = context.expand_chunk(lat, w, ex)
    return attn.attention(q, k, v, pattern=attn.Full(), segment_ids=seg, scale=0.3, impl="xla_dense")

  np.testing.assert_allclose(ours(q, lat, w), ref(q, lat, w), rtol=1e-5, atol=1e-5)
  f = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(q, lat, w)
  for a, b in zip(f(ours), f(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_layouts():
  from loza_jax import context
  zz = context.Layout(4, "zigzag")
  assert zz.order() == [0, 7, 1, 6, 2, 5, 3, 4]
  assert all(zz.place(zz.chunk(d, p)) == (d, p) for d in range(4) for p in range(2))


# ----------------------------------------------------------------------------------------
# Worker (runs in a subprocess with simulated devices).


def _segments(B: int, T: int):
  """Packed documents starting on 16-token blocks and crossing chunk boundaries; padding at one row's end."""
  seg = np.zeros((B, T), np.int32)
  cuts = [[0, 48, 80, 208, T - 16], [0, 160, T]]
  for b in range(B):
    c = cuts[b % 2]
    for i in range(len(c) - 1):
      seg[b, c[i]:c[i + 1]] = i + 1
  return seg


def _worker(devices: int) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from benchmarks.context_parallel import collective_bytes
  from loza_jax import attention as attn, context, sharding as shd
  from loza_jax.config import MeshConfig, load_config
  from loza_jax.model import build_model

  def cfg_for(types, impl="xla", block=16, sink=1):
    return load_config(str(ROOT / "configs/demo_cpu.yaml"), [
        f"model.num_hidden_layers={len(types)}", "model.hidden_size=32", "model.intermediate_size=64",
        "model.num_attention_heads=2", "model.kv_lora_rank=16", "model.qk_nope_head_dim=16",
        "model.qk_rope_head_dim=16", "model.v_head_dim=16", f"attention.block_size={block}",
        "attention.local_blocks=3", f"attention.sink_blocks={sink}", f"attention.impl={impl}",
        f"attention.layer_types=[{', '.join(types)}]"])

  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, (4, T)), jnp.int32)
  seg = jnp.asarray(_segments(4, T))

  def loss_and_grad(cfg, meshes: dict, B=2):
    """Per named mesh: its loss, the context=1 loss and the largest relative gradient difference."""
    model = build_model(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens[:1, :32])["params"])

    def loss(p, tok, sg):
      logp = jax.nn.log_softmax(model.apply({"params": p}, tok, sg)[:, :-1])
      nll = -jnp.take_along_axis(logp, tok[:, 1:, None], -1)[..., 0]
      return jnp.sum(nll * (sg[:, 1:] != 0)) / jnp.sum(sg[:, 1:] != 0)

    step = jax.jit(jax.value_and_grad(loss))
    l1, g1 = step(params, tokens[:B], seg[:B])
    for name, mesh_cfg in meshes.items():
      with jax.set_mesh(shd.make_mesh(mesh_cfg)), nn.logical_axis_rules(shd.LOGICAL_AXIS_RULES):
        ln, gn = step(params, tokens[:B], seg[:B])
      err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12))
                for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(gn)))
      out[name] = {"loss_ref": float(l1), "loss": float(ln), "grad_rel_err": err}

  out = {}
  if devices == 4:   # Full, SSA and blend sublayers on context=4; two sink blocks (sinks cross chunk ends)
    loss_and_grad(cfg_for(["full", "ssa", "blend"], sink=2), {"mixed_c4": MeshConfig(data=1, context=4)})
    return out
  loss_and_grad(cfg_for(["full", "ssa"]), {"mixed_c8": MeshConfig(data=1, context=8),
                                           "mixed_c4_fsdp2": MeshConfig(data=1, fsdp=2, context=4),
                                           "mixed_c4_data2": MeshConfig(data=2, context=4),
                                           "mixed_c4_tensor2": MeshConfig(data=1, tensor=2, context=4)})
  loss_and_grad(cfg_for(["ssa"], "pallas_triton_interpret"), {"ssa_pallas_c8": MeshConfig(data=1, context=8)}, B=1)
  # Full sublayers through the prefix kernel (and its backward) at each chunk's offset.
  loss_and_grad(cfg_for(["full", "ssa"], "pallas_triton_interpret"),
                {"mixed_pallas_c8": MeshConfig(data=1, context=8),
                 "mixed_pallas_c4_tensor2": MeshConfig(data=1, tensor=2, context=4)})

  # The trainer (every stage's loop) on a data=2 x context=4 mesh vs one device, on packed real batches.
  import tempfile

  from tests.trainer_utils import one_device_vs_sharded_step, tiny_cfg
  with tempfile.TemporaryDirectory() as run_dir:
    over = ["data.seq_len=256", "model.max_position_embeddings=256", "attention.layer_types=[full, ssa]",
            "train.eps=1e-5"]
    cfg = tiny_cfg(run_dir, over + ["mesh.data=2", "mesh.context=4"])
    _, cp, m1, m8, _ = one_device_vs_sharded_step(cfg)
    out["trainer_c4_data2"] = {"loss_ref": float(m1["loss"]), "loss": float(m8["loss"]),
                               "gnorm_ref": float(m1["grad_norm"]), "gnorm": float(m8["grad_norm"]),
                               "mesh": dict(cp.mesh.shape)}

  # Bytes through collectives of one SSA sublayer's attention (exchange + attention, forward + backward).
  pattern = attn.SSA(16, 1, 3)
  mesh = shd.make_mesh(MeshConfig(data=1, context=8))
  out["ssa_bytes"] = {}
  for t in (2 * T, 8 * T):        # chunks of 32 and 128 tokens: both hold the 32-token halo
    layout = context.Layout(8, "zigzag")
    w = jnp.asarray(rng.normal(size=(24, 2, 16)), jnp.float32)

    def f(q, lat, sg):
      ext, ext_seg = context.ssa_exchange(lat, sg, layout, pattern)
      k = jnp.einsum("bxf,fkd->bxkd", ext, w)
      return jnp.sum(context.ssa_attention(q, k, k, ext_seg, layout, pattern, 0.25, "xla") ** 2)

    q = jnp.ones((1, t, 2, 16), jnp.float32)
    lat = jnp.ones((1, t, 24), jnp.float32)
    with jax.set_mesh(mesh):
      sh = lambda x: jax.device_put(x, jax.NamedSharding(mesh, jax.P(None, "context")))
      hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(sh(q), sh(lat), sh(jnp.ones((1, t), jnp.int32))).compile()
    out["ssa_bytes"][str(t)] = sum(collective_bytes(hlo.as_text()).values())

  # Unsplittable sequences: the model raises naming the sizes.
  for key, cfg, length in (("error_chunks", cfg_for(["full"]), 200), ("error_blocks", cfg_for(["ssa"], block=32), T)):
    model = build_model(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens[:1, :32])["params"])
    try:
      with jax.set_mesh(shd.make_mesh(MeshConfig(data=1, context=8))):
        jax.jit(model.apply)({"params": params}, jnp.zeros((1, length), jnp.int32))
      out[key] = "no error"
    except ValueError as e:
      out[key] = str(e)

  # A document starting inside a block: SSA's exchange would be wrong, so the model refuses it at run time.
  cfg = cfg_for(["ssa"])
  model = build_model(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens[:1, :32])["params"])
  bad_seg = jnp.ones((1, T), jnp.int32).at[:, 21:].set(2)
  with jax.set_mesh(shd.make_mesh(MeshConfig(data=1, context=8))):
    logits = jax.jit(model.apply)({"params": params}, tokens[:1], bad_seg)
    out["misaligned_all_nan"] = bool(jnp.all(jnp.isnan(logits)))
    try:
      model.apply({"params": params}, tokens[:1], bad_seg)          # concrete ids: checked eagerly
      out["error_misaligned"] = "no error"
    except ValueError as e:
      out["error_misaligned"] = str(e)
  return out


if __name__ == "__main__":
  n = int(sys.argv[1])
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, str(ROOT))
  print(json.dumps(_worker(n)))

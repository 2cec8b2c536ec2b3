"""Device mesh, logical-axis rules and NamedSharding placement for params, optimizer state and batches.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded params and optimizer
state), `tensor` (heads / MLP / vocab), `context` (sequence: context parallelism, loza_jax/context.py; the
model finds the axis on the active mesh, so placement here only shards rows' tokens over it).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from loza_jax.config import MESH_AXES, MeshConfig

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")

# Logical axis name (model annotations, see layers.py / mla.py / model.py) -> mesh axes.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", "context"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("q_lora", None),
    ("kv_lora", None),
    ("norm", None),
    ("alpha_heads", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("experts", "data"),          # expert parallelism over the data axis (MoE)
    ("expert_mlp", "tensor"),
)


def maybe_initialize_distributed(cfg: MeshConfig) -> None:
  """Start jax.distributed when mesh.distributed is set or LOZA_DISTRIBUTED=1 (CPU uses gloo collectives)."""
  if not (cfg.distributed or os.environ.get("LOZA_DISTRIBUTED") == "1"):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if cfg.coordinator_address:
    kwargs["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes > 0:
    kwargs["num_processes"] = cfg.num_processes
  if cfg.process_id >= 0:
    kwargs["process_id"] = cfg.process_id
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  log.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(), jax.process_count(),
           jax.device_count())


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
  """Resolve -1 to the remaining devices; the product must equal n_devices."""
  sizes = [getattr(cfg, a) for a in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % fixed:
      raise ValueError(f"mesh: the fixed axes {dict(zip(MESH_AXES, sizes))} use {fixed} devices, which does not "
                       f"divide the {n_devices} available; change mesh.* so the product divides {n_devices}")
    sizes[sizes.index(-1)] = n_devices // fixed
  elif fixed != n_devices:
    raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {fixed} devices but {n_devices} are available; "
                     "set one axis to -1 to take the rest")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor, context) mesh over `devices` (default: all global devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    return mesh.shape[axes]
  return math.prod(mesh.shape[a] for a in axes)


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=LOGICAL_AXIS_RULES,
             path: str = "") -> P:
  """PartitionSpec for logical `names`; a dim not divisible by its mesh axes stays replicated (logged)."""
  axes = list(nn.logical_to_mesh_axes(tuple(names), rules))
  for i, (ax, dim) in enumerate(zip(axes, shape)):
    size = _axis_size(mesh, ax)
    if size > 1 and dim % size:
      log.warning("%s: dim %d (%s, size %d) is not divisible by mesh axes %s (size %d); replicating it",
                  path or "array", i, names[i], dim, ax, size)
      axes[i] = None
  return P(*axes)


def _is_boxed(x) -> bool:
  return isinstance(x, nn.Partitioned)


def tree_shardings(tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a (possibly abstract) pytree whose leaves may be nn.Partitioned boxes.

  Boxed leaves are sharded by their logical names; plain leaves (step counters, RNG) are replicated.
  The result has the structure of the unboxed tree.
  """
  def one(path, x):
    if _is_boxed(x):
      return NamedSharding(mesh, spec_for(x.names, x.value.shape, mesh, rules, jax.tree_util.keystr(path)))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_boxed)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over data x fsdp, the sequence over context, trailing dims replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, "context", *([None] * (ndim - 2))))


def data_parallel_size(mesh: Mesh) -> int:
  return _axis_size(mesh, BATCH_AXES)


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each process's rows (a contiguous slice of the global batch) into global sharded arrays."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in batch.items()}

"""The one mesh builder, logical-axis rules, and host-local -> global arrays.

The model names logical axes only (`vocab`, `embed`, `heads`, `kv_heads`, `mlp`, `layers`, and the
activation axes `batch`, `length`, `head_dim`); a rules table from the config maps them onto the mesh
axes `data`, `fsdp`, `tensor`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Logical axis -> mesh axes: batch over data x fsdp, weights' `embed` over fsdp, the rest over tensor.
# (configs/common.py writes the same table as the configs' `rules` section; a test keeps them equal.)
DEFAULT_RULES: Rules = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("layers", None),
  ("lora", None),  # the rank of low-rank adapters
)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a stage is laid out: the mesh's axis sizes (one may be -1 = the rest of the devices) and the
  logical-axis rules."""

  mesh: tuple[tuple[str, int], ...] = (("data", -1),)
  rules: Rules = DEFAULT_RULES

  def make_mesh(self, devices: Sequence[jax.Device] | None = None):
    return make_mesh(dict(self.mesh), devices)


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves `{data, fsdp, tensor}` sizes (one may be -1 = the rest) against the device count."""
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
  sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices "
        f"(the fixed axes multiply to {known})"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but "
      f"{num_devices} are available; use -1 for one axis to take the rest"
    )
  return tuple(sizes)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None):
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(axis_sizes, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def rules_from_config(rules: Mapping[str, object]) -> Rules:
  """Turns the config's `{logical: mesh axis | [axes] | None}` table into flax's rule tuple."""
  out = []
  for logical, mesh_axes in rules.items():
    if mesh_axes is None or isinstance(mesh_axes, str):
      axes = mesh_axes
    else:
      axes = tuple(mesh_axes)
    for axis in (axes,) if isinstance(axes, str) else axes or ():
      if axis not in MESH_AXES:
        raise ValueError(f"sharding rule {logical!r} -> {axis!r}: not a mesh axis {MESH_AXES}")
    out.append((logical, axes))
  return tuple(out)


def logical_to_shardings(logical_specs, mesh, rules: Rules):
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch, mesh, rules: Rules):
  """Assembles each process's rows (every leaf of a pytree: a dict of arrays, a rollout node)
  into global arrays sharded on the batch axes."""
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, x.ndim), x),
    local_batch,
  )


def abstract(tree):
  """`ShapeDtypeStruct`s with the arrays' shardings: what to restore into, or lower a step for."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def check_divisible(shape: Sequence[int], sharding: NamedSharding, what: str) -> None:
  """Clear error instead of XLA's when a dimension does not divide over its mesh axes."""
  for dim, axes in zip(shape, sharding.spec):
    if axes is None:
      continue
    names = (axes,) if isinstance(axes, str) else axes
    size = int(np.prod([sharding.mesh.shape[a] for a in names]))
    if dim % size:
      raise ValueError(f"{what}: dimension {dim} does not divide over mesh axes {names} ({size})")


def batch_axes(rules: Rules) -> str | tuple[str, ...] | None:
  """The mesh axes the `batch` logical axis maps to."""
  return nn.logical_to_mesh_axes(("batch",), rules)[0]


def to_global(host_array: np.ndarray, array_sharding: NamedSharding) -> jax.Array:
  """A global array from a host value that every process holds in full (each process places the
  parts its devices own). Works the same with one process or many."""
  host_array = np.asarray(host_array)
  return jax.make_array_from_callback(host_array.shape, array_sharding, lambda idx: host_array[idx])


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded on its first axis, in global order: the rows it gave to
  `global_batch`. Replicas (the same rows on several local devices) are read once."""
  if array.is_fully_addressable:
    return np.asarray(jax.device_get(array))
  shards = {}
  for shard in array.addressable_shards:
    start = shard.index[0].start or 0
    shards.setdefault(start, shard)
  return np.concatenate([np.asarray(shards[s].data) for s in sorted(shards)], axis=0)


def to_host(array: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) array on every process."""
  if array.is_fully_addressable or array.is_fully_replicated:
    return np.asarray(jax.device_get(array))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(array, tiled=True))

"""Data parallelism with ``jax.sharding``: a 1-D device mesh, sharded batches, replicated state.

Growjax adds no distributed engine of its own (DESIGN.md): jit with sharded inputs lets XLA insert
the collectives, so the global-batch mean loss and BatchNorm statistics equal the single-device
ones. Multi-host runs call ``jax.distributed.initialize()`` first; the same code then spans hosts.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places every array of ``batch`` split along its leading axis over the mesh.

  Raises:
    ValueError: a leading dimension is not divisible by the number of devices.
  """
  n = mesh.devices.size
  for leaf in jax.tree.leaves(batch):
    if np.shape(leaf)[0] % n:
      raise ValueError(f"Batch leading dimension {np.shape(leaf)[0]} is not divisible by the "
                       f"{n} devices of the mesh; use a batch size that is a multiple of {n}.")
  return jax.device_put(batch, NamedSharding(mesh, P(DATA_AXIS)))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places ``tree`` fully replicated on every device of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))

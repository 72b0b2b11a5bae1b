"""Data-parallel training on several devices and hosts, with JAX's own runtime (no hand-made communication).

* ``initialize_distributed()`` calls ``jax.distributed.initialize`` when the environment describes a
  multi-host job: explicitly with ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``
  and ``JAX_PROCESS_ID``; or by JAX's own detection under SLURM (``SLURM_NTASKS`` > 1) or Open MPI
  (``OMPI_COMM_WORLD_SIZE`` > 1). On one host it does nothing.
* ``data_mesh(n)``: a 1-D ``Mesh`` with axis ``"data"`` over the first ``n`` local devices of every process.
* ``ShardedGraphLoader``: each step is a global batch of ``D`` per-device batches (``D`` = devices of the mesh),
  each packed to ``data.atom_budget`` atoms (so the global batch is ``D * atom_budget`` atoms), all padded to
  the same bucket shape, with neighbour indices local to each device's ``AtomGraph``; they are stacked on a
  leading device axis and placed with ``NamedSharding(mesh, P("data"))``. The epoch's plan of per-device
  batches is the one ``GraphLoader`` makes (a function of the seed and the epoch); step ``s`` takes plan
  batches ``s*D ... s*D + D - 1`` and host ``h`` of ``H`` builds only the batches ``h, h+H, ...`` of those, so
  every host reads only its own shard of the data. The epoch's last ``len(plan) % D`` batches are dropped.
* ``compiled_sharded_train_step``: ``train_step_fn`` under ``jax.shard_map`` with parameters, optimizer state
  and EMA replicated (``P()``) and the batch split over ``"data"``; the loss counts, loss terms and gradients
  are summed with ``jax.lax.psum``, so a step on D devices is the step of the whole global batch.

Checkpoints hold plain numpy copies of the replicated state (``local_copy``: device 0's copy), so they are
the same as a one-device run's and resume unchanged (on the same number of devices: the data order per step
depends on it).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from e2former_jax.config import ModelConfig
from e2former_jax.data.batching import Batch, Bucket, GraphLoader, PaddingStats
from e2former_jax.training.config import LossConfig, OptimConfig
from e2former_jax.training.step import train_step_fn

AXIS = "data"


def initialize_distributed() -> bool:
  """``jax.distributed.initialize`` when the environment describes a multi-host job; True if it was called.

  Must run before anything touches a JAX device (``train.py`` calls it first).
  """
  addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if addr:
    jax.distributed.initialize(
      coordinator_address=addr,
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()  # JAX's own cluster detection (SLURM, Open MPI)
    return True
  return False


def data_mesh(local_devices: int | None = None) -> Mesh:
  """A 1-D mesh, axis ``"data"``, over the first ``local_devices`` (default: all) local devices of every
  process, ordered by process so that each process's devices are contiguous."""
  n_local = jax.local_device_count() if local_devices is None else int(local_devices)
  if not 1 <= n_local <= jax.local_device_count():
    raise ValueError(f"--devices {n_local}: this process has {jax.local_device_count()} local device(s)")
  by_process: dict[int, list] = {}
  for d in jax.devices():
    by_process.setdefault(d.process_index, []).append(d)
  devices = [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:n_local]]
  return Mesh(np.array(devices), (AXIS,))


def replicate(tree, mesh: Mesh):
  """Every leaf replicated on every device of ``mesh`` (from host or single-device values)."""
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def local_copy(tree):
  """The first addressable copy of every (replicated) leaf: single-device arrays for evaluation and
  checkpoints."""
  return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def stack_batches(batches: list[Batch]) -> Batch:
  """Per-device batches of one bucket shape stacked on a new leading axis (numpy)."""
  periodic = any(b.graph.periodic for b in batches)
  batches = [dataclasses.replace(b, graph=dataclasses.replace(b.graph, periodic=periodic)) for b in batches]
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)


class ShardedGraphLoader(GraphLoader):
  """``GraphLoader`` whose items are global batches: one per-device batch per device of ``mesh``, stacked and
  sharded over ``"data"`` (see the module docstring). Same arguments as ``GraphLoader`` (``atom_budget`` is
  per device) plus ``mesh``; ``num_batches`` and ``epoch`` count global batches (steps)."""

  def __init__(self, dataset, cutoff, max_neighbors, *, mesh: Mesh, **kwargs):
    kwargs.pop("device_put", None)
    super().__init__(dataset, cutoff, max_neighbors, **kwargs)
    self.mesh = mesh
    self.sharding = NamedSharding(mesh, P(AXIS))
    self.num_devices = mesh.devices.size
    self.process_count = jax.process_count()
    self.process_index = jax.process_index()
    if self.num_devices % self.process_count:
      raise ValueError(f"{self.num_devices} devices do not split evenly over {self.process_count} processes")

  def device_plan(self, epoch: int = 0) -> list[tuple[Bucket, list[int]]]:
    """The per-device batches of ``epoch`` (``GraphLoader.plan``)."""
    return GraphLoader.plan(self, epoch)

  def plan(self, epoch: int = 0) -> list[tuple[Bucket, list[list[int]]]]:
    """Steps of ``epoch``: ``(common bucket, [dataset indices of each of this process's devices])``."""
    per_device = self.device_plan(epoch)
    d, h, hosts = self.num_devices, self.process_index, self.process_count
    steps = []
    for s in range(len(per_device) // d):
      group = per_device[s * d : (s + 1) * d]
      bucket = Bucket(max(b.num_atoms for b, _ in group), max(b.num_graphs for b, _ in group))
      steps.append((bucket, [indices for _, indices in group[h::hosts]]))
    if not steps and per_device:
      raise ValueError(
        f"an epoch has {len(per_device)} batch(es) of {self.atom_budget} atoms, fewer than the "
        f"{d} devices: lower data.atom_budget or use fewer devices"
      )
    return steps

  def padding_stats(self, epoch: int = 0) -> PaddingStats:
    """Padding of ``epoch``'s per-device batches (each in its step's common bucket)."""
    per_device = self.device_plan(epoch)
    d = self.num_devices
    per_bucket: dict = {}
    real_atoms = atom_slots = real_structures = structure_slots = 0
    for s in range(len(per_device) // d):
      group = per_device[s * d : (s + 1) * d]
      bucket = Bucket(max(b.num_atoms for b, _ in group), max(b.num_graphs for b, _ in group))
      per_bucket[bucket] = per_bucket.get(bucket, 0) + d
      for _, indices in group:
        real_atoms += int(self.sizes[indices].sum())
        real_structures += len(indices)
        atom_slots += bucket.num_atoms
        structure_slots += bucket.num_graphs
    return PaddingStats(
      batches=sum(per_bucket.values()),
      real_atoms=real_atoms,
      atom_slots=atom_slots,
      real_structures=real_structures,
      structure_slots=structure_slots,
      per_bucket=per_bucket,
    )

  def _build(self, bucket: Bucket, groups: list[list[int]]) -> Batch:
    local = stack_batches([GraphLoader._build(self, bucket, indices) for indices in groups])
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharding, x), local)


@functools.cache
def compiled_sharded_train_step(
  model_cfg: ModelConfig, optim_cfg: OptimConfig, loss_cfg: LossConfig, total_steps: int, mesh: Mesh
):
  """``step(state, elements, batch) -> (state, metrics)`` over ``mesh``: state and elements replicated, the
  batch's leading device axis split over ``"data"``, gradients and loss terms ``psum``-ed; jitted with the
  state donated."""
  fn = functools.partial(
    train_step_fn, model_cfg=model_cfg, optim_cfg=optim_cfg, loss_cfg=loss_cfg, total_steps=total_steps, axis_name=AXIS
  )

  def per_device(state, elements, batch):
    return fn(state, elements, jax.tree.map(lambda x: x[0], batch))

  # check_vma off: gradients with respect to the replicated parameters stay per-device until the explicit
  # psum in train_step_fn (with it on, JAX would insert that reduction itself).
  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS)), out_specs=(P(), P()), check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,))

"""Static-shape batches: pack structures up to an atom budget into ``AtomGraph``s padded to fixed buckets.

Every batch is padded to one of a small fixed list of ``Bucket(num_atoms, num_graphs)`` shapes (slot counts,
including the padding atom and padding structure that ``AtomGraph`` needs), so a jitted step compiles at most
once per bucket. ``GraphLoader`` builds the neighbour lists on the host in a background thread and keeps a
queue of ready batches, in an order fixed by the seed and the epoch number.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import warnings
from collections.abc import Iterator, Sequence

import ase
import flax.struct
import jax
import numpy as np

from e2former_jax.data.labels import stored_results
from e2former_jax.graph import AtomGraph, graph_from_atoms


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
  """A padded batch shape: ``num_atoms`` atom slots and ``num_graphs`` structure slots (padding included)."""

  num_atoms: int
  num_graphs: int

  def fits(self, atoms: int, graphs: int) -> bool:
    # AtomGraph needs at least one padding atom and one padding structure.
    return atoms < self.num_atoms and graphs < self.num_graphs


@flax.struct.dataclass
class Batch:
  """A padded batch with its labels.

  Attributes:
    graph: the ``AtomGraph``.
    energy: [G] total energy in eV (0 for padding structures and missing labels).
    forces: [N, 3] eV/A (0 for padding atoms and missing labels).
    energy_mask: [G] bool, structure has an energy label.
    forces_mask: [N] bool, atom has a force label.
    structure_index: [G] int32 position of each structure in the dataset, -1 for padding.
  """

  graph: AtomGraph
  energy: jax.Array
  forces: jax.Array
  energy_mask: jax.Array
  forces_mask: jax.Array
  structure_index: jax.Array

  @property
  def bucket(self) -> Bucket:
    return Bucket(self.graph.num_atoms, self.graph.num_graphs)


def _round_up(x: int, multiple: int) -> int:
  return int(math.ceil(x / multiple) * multiple)


def make_buckets(
  sizes: Sequence[int], atom_budget: int, max_structures: int | None = None, num_buckets: int = 4, multiple: int = 8
) -> list[Bucket]:
  """A fixed list of bucket shapes for structures of the given sizes packed up to ``atom_budget`` atoms.

  Atom caps are evenly spaced fractions of the budget (plus one padding slot, rounded up to ``multiple``);
  each bucket's structure cap is the most structures that can fit its atoms (given the smallest structure),
  limited by ``max_structures``, plus one padding slot. The largest bucket holds any packed batch.
  """
  sizes = np.asarray(sizes, dtype=np.int64)
  if sizes.size == 0:
    raise ValueError("no structures to make buckets for")
  if sizes.min() < 1:
    raise ValueError("structures must have at least one atom")
  if sizes.max() > atom_budget:
    raise ValueError(f"a structure has {int(sizes.max())} atoms, more than the atom budget {atom_budget}")
  min_size = int(sizes.min())
  max_structures = atom_budget // min_size if max_structures is None else int(max_structures)
  if max_structures < 1:
    raise ValueError("max_structures must be >= 1")
  buckets = set()
  for k in range(1, num_buckets + 1):
    atom_cap = _round_up(int(math.ceil(atom_budget * k / num_buckets)) + 1, multiple)
    if k == num_buckets:
      atom_cap = max(atom_cap, _round_up(atom_budget + 1, multiple))
    graph_cap = min(max_structures, (atom_cap - 1) // min_size) + 1
    buckets.add(Bucket(atom_cap, graph_cap))
  return sorted(buckets)


def pack(
  sizes: Sequence[int], order: Sequence[int], atom_budget: int, max_structures: int | None = None
) -> list[list[int]]:
  """Greedy packing in the given order: a batch is closed when the next structure would exceed
  ``atom_budget`` atoms or ``max_structures`` structures. Every index appears exactly once."""
  batches, current, atoms = [], [], 0
  for i in order:
    n = int(sizes[i])
    if n > atom_budget:
      raise ValueError(f"structure {i} has {n} atoms, more than the atom budget {atom_budget}")
    if current and (atoms + n > atom_budget or (max_structures is not None and len(current) >= max_structures)):
      batches.append(current)
      current, atoms = [], 0
    current.append(int(i))
    atoms += n
  if current:
    batches.append(current)
  return batches


def choose_bucket(buckets: Sequence[Bucket], atoms: int, graphs: int) -> Bucket:
  """The smallest bucket (fewest atom slots, then structure slots) that fits."""
  for b in sorted(buckets):
    if b.fits(atoms, graphs):
      return b
  raise ValueError(f"no bucket fits {atoms} atoms in {graphs} structures (buckets: {list(buckets)})")


def batch_from_atoms(
  structures: Sequence[ase.Atoms],
  bucket: Bucket,
  cutoff: float,
  max_neighbors: int,
  indices: Sequence[int] | None = None,
  dtype=np.float32,
) -> tuple[Batch, int]:
  """One padded ``Batch`` (graph + labels) in the given bucket; returns it and the count of in-cutoff
  neighbours beyond K."""
  graph, beyond = graph_from_atoms(
    structures, cutoff, max_neighbors, num_atoms=bucket.num_atoms, num_graphs=bucket.num_graphs, dtype=dtype
  )
  energy = np.zeros(bucket.num_graphs, dtype)
  energy_mask = np.zeros(bucket.num_graphs, bool)
  forces = np.zeros((bucket.num_atoms, 3), dtype)
  forces_mask = np.zeros(bucket.num_atoms, bool)
  structure_index = np.full(bucket.num_graphs, -1, np.int32)
  offset = 0
  for g, atoms in enumerate(structures):
    n = len(atoms)
    results = stored_results(atoms)
    if "energy" in results:
      energy[g] = results["energy"]
      energy_mask[g] = True
    if "forces" in results:
      forces[offset : offset + n] = results["forces"]
      forces_mask[offset : offset + n] = True
    structure_index[g] = g if indices is None else indices[g]
    offset += n
  return Batch(
    graph=graph,
    energy=energy,
    forces=forces,
    energy_mask=energy_mask,
    forces_mask=forces_mask,
    structure_index=structure_index,
  ), beyond


def _num_atoms(dataset, i: int) -> int:
  f = getattr(dataset, "num_atoms", None)
  return int(f(i)) if callable(f) else len(dataset[i])


@dataclasses.dataclass
class PaddingStats:
  """Padding of one epoch's batches."""

  batches: int
  real_atoms: int
  atom_slots: int
  real_structures: int
  structure_slots: int
  per_bucket: dict

  @property
  def atom_overhead(self) -> float:
    """Fraction of atom slots that are padding."""
    return 1.0 - self.real_atoms / self.atom_slots if self.atom_slots else 0.0

  def __str__(self) -> str:
    buckets = ", ".join(f"{b.num_atoms}x{b.num_graphs}: {c}" for b, c in sorted(self.per_bucket.items()))
    return (
      f"{self.batches} batches, {self.real_atoms} atoms in {self.atom_slots} slots "
      f"({100 * self.atom_overhead:.1f}% padding), {self.real_structures} structures in "
      f"{self.structure_slots} slots; batches per bucket (atoms x structures): {buckets}"
    )


class GraphLoader:
  """Epochs of padded batches with background prefetching.

  Args:
    dataset: a sequence of ``ase.Atoms`` (a list, or a ``Dataset`` from ``open_dataset``).
    cutoff: neighbour cutoff (Angstrom); max_neighbors: K. Take them from the model config.
    atom_budget: most real atoms per batch (the authors use 2,048 per GPU).
    max_structures: most structures per batch (default: no limit beyond the atom budget).
    buckets: the bucket shapes (default ``make_buckets`` with ``num_buckets``).
    shuffle: reshuffle every epoch; the order is a function of ``(seed, epoch)`` only.
    seed: the seed.
    prefetch: batches built ahead in the background thread (0: build in the caller's thread).
    device_put: move each batch to the default device in the background thread.
    dtype: floating dtype of positions and labels.
  """

  def __init__(
    self,
    dataset: Sequence[ase.Atoms],
    cutoff: float,
    max_neighbors: int,
    atom_budget: int = 2048,
    max_structures: int | None = None,
    buckets: Sequence[Bucket] | None = None,
    num_buckets: int = 4,
    shuffle: bool = True,
    seed: int = 0,
    prefetch: int = 4,
    device_put: bool = False,
    dtype=np.float32,
  ):
    self.dataset = dataset
    self.cutoff = float(cutoff)
    self.max_neighbors = int(max_neighbors)
    self.atom_budget = int(atom_budget)
    self.max_structures = max_structures
    self.shuffle = shuffle
    self.seed = int(seed)
    self.prefetch = int(prefetch)
    self.device_put = device_put
    self.dtype = dtype
    self.sizes = np.array([_num_atoms(dataset, i) for i in range(len(dataset))], dtype=np.int64)
    self.buckets = (
      sorted(buckets)
      if buckets is not None
      else make_buckets(self.sizes, self.atom_budget, max_structures, num_buckets)
    )
    largest = self.buckets[-1]
    if largest.num_atoms <= self.atom_budget:
      raise ValueError(f"the largest bucket {largest} cannot hold a full batch of {self.atom_budget} atoms")
    if self.max_structures is None or self.max_structures >= largest.num_graphs:
      self.max_structures = largest.num_graphs - 1
    self.epoch_count = 0
    self.neighbors_beyond_k = 0
    self._warned_beyond_k = False

  def order(self, epoch: int) -> np.ndarray:
    """Dataset indices in the order of ``epoch``."""
    if not self.shuffle:
      return np.arange(len(self.sizes))
    return np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.sizes))

  def plan(self, epoch: int = 0) -> list[tuple[Bucket, list[int]]]:
    """The batches of ``epoch`` as ``(bucket, dataset indices)``, without reading any structure."""
    groups = pack(self.sizes, self.order(epoch), self.atom_budget, self.max_structures)
    return [(choose_bucket(self.buckets, int(self.sizes[g].sum()), len(g)), g) for g in groups]

  def padding_stats(self, epoch: int = 0) -> PaddingStats:
    """Padding overhead of ``epoch``'s batches."""
    plan = self.plan(epoch)
    per_bucket: dict = {}
    for b, _ in plan:
      per_bucket[b] = per_bucket.get(b, 0) + 1
    return PaddingStats(
      batches=len(plan),
      real_atoms=int(sum(self.sizes[g].sum() for _, g in plan)),
      atom_slots=sum(b.num_atoms for b, _ in plan),
      real_structures=sum(len(g) for _, g in plan),
      structure_slots=sum(b.num_graphs for b, _ in plan),
      per_bucket=per_bucket,
    )

  def num_batches(self, epoch: int = 0) -> int:
    return len(self.plan(epoch))

  def _build(self, bucket: Bucket, indices: list[int]) -> Batch:
    structures = [self.dataset[i] for i in indices]
    batch, beyond = batch_from_atoms(structures, bucket, self.cutoff, self.max_neighbors, indices, self.dtype)
    if beyond:
      self.neighbors_beyond_k += beyond
      if not self._warned_beyond_k:
        self._warned_beyond_k = True
        warnings.warn(
          f"{beyond} in-cutoff neighbour(s) beyond K={self.max_neighbors} dropped in a batch "
          "(K-truncation; see loader.neighbors_beyond_k for the running count)",
          stacklevel=2,
        )
    if self.device_put:
      batch = jax.device_put(batch)
    return batch

  def epoch(self, epoch: int) -> Iterator[Batch]:
    """The batches of ``epoch``, built ``prefetch`` ahead in a background thread."""
    plan = self.plan(epoch)
    if self.prefetch <= 0:
      for bucket, indices in plan:
        yield self._build(bucket, indices)
      return
    q: queue.Queue = queue.Queue(maxsize=self.prefetch)
    stop = threading.Event()
    done = object()

    def producer():
      try:
        for bucket, indices in plan:
          if stop.is_set():
            return
          item = self._build(bucket, indices)
          while not stop.is_set():
            try:
              q.put(item, timeout=0.1)
              break
            except queue.Full:
              continue
      except BaseException as err:  # handed to the consumer, re-raised there
        q.put(err)
        return
      q.put(done)

    thread = threading.Thread(target=producer, name=f"GraphLoader-epoch{epoch}", daemon=True)
    thread.start()
    try:
      while True:
        item = q.get()
        if item is done:
          break
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      stop.set()
      while thread.is_alive():
        try:
          q.get_nowait()
        except queue.Empty:
          pass
        thread.join(timeout=0.05)

  def __iter__(self) -> Iterator[Batch]:
    """The next epoch (0, 1, 2, ... on successive iterations)."""
    epoch = self.epoch_count
    self.epoch_count += 1
    return self.epoch(epoch)

  def __len__(self) -> int:
    return self.num_batches(self.epoch_count)

"""``AtomGraph``: a padded batch of structures, the only input of the model."""

from __future__ import annotations

from collections.abc import Sequence

import ase
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from e2former_jax.elements import MAX_ATOMIC_NUMBER
from e2former_jax.neighbors.host import k_nearest_neighbors
from e2former_jax.system_keys import charge_and_multiplicity


@flax.struct.dataclass
class AtomGraph:
  """A padded batch of G structures with N atom slots and K neighbour slots per atom.

  Padding atoms (``atom_mask`` False) belong to a padding structure (``graph_mask`` False); empty neighbour
  slots point at a padding atom, so there is always at least one padding atom and one padding structure.

  Attributes:
    positions: [N, 3] Angstrom, centred per structure (in float64, before the cast).
    numbers: [N] int32 atomic numbers (0 for padding).
    atom_mask: [N] bool, real atom.
    neighbors: [N, K] int32 source atom of each slot.
    neighbor_mask: [N, K] bool, slot holds a neighbour within the cutoff.
    neighbor_shift: [N, K, 3] Angstrom, Cartesian image offset: the source sits at
      positions[neighbors] + neighbor_shift.
    graph_index: [N] int32 structure of each atom.
    charge: [G] int32 total charge.
    spin: [G] int32 spin multiplicity 2S+1.
    cell: [G, 3, 3] Angstrom, lattice vectors as rows (zero for molecules).
    pbc: [G, 3] bool.
    graph_mask: [G] bool, real structure.
    periodic: static flag, some structure is periodic (slots may cross cell boundaries).
  """

  positions: jax.Array
  numbers: jax.Array
  atom_mask: jax.Array
  neighbors: jax.Array
  neighbor_mask: jax.Array
  neighbor_shift: jax.Array
  graph_index: jax.Array
  charge: jax.Array
  spin: jax.Array
  cell: jax.Array
  pbc: jax.Array
  graph_mask: jax.Array
  periodic: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def num_atoms(self) -> int:
    return self.positions.shape[0]

  @property
  def num_graphs(self) -> int:
    return self.charge.shape[0]

  @property
  def max_neighbors(self) -> int:
    return self.neighbors.shape[1]

  def check_shapes(self) -> None:
    """Raises ``ValueError`` naming the first field whose shape disagrees with N, K and G."""
    n, k, g = self.num_atoms, self.max_neighbors, self.num_graphs
    expected = {
      "positions": (n, 3),
      "numbers": (n,),
      "atom_mask": (n,),
      "neighbors": (n, k),
      "neighbor_mask": (n, k),
      "neighbor_shift": (n, k, 3),
      "graph_index": (n,),
      "charge": (g,),
      "spin": (g,),
      "cell": (g, 3, 3),
      "pbc": (g, 3),
      "graph_mask": (g,),
    }
    for name, shape in expected.items():
      actual = tuple(getattr(self, name).shape)
      if actual != shape:
        raise ValueError(f"AtomGraph.{name} has shape {actual}, expected {shape} (N={n}, K={k}, G={g})")

  def atoms_per_graph(self) -> jax.Array:
    """[G] number of real atoms of each structure."""
    return jax.ops.segment_sum(self.atom_mask.astype(jnp.int32), self.graph_index, self.num_graphs)


def validate_atoms(atoms: ase.Atoms, where: str = "structure") -> None:
  """Raises ``ValueError`` naming the problem for inputs the model cannot take."""
  if len(atoms) == 0:
    raise ValueError(f"{where} is empty (no atoms)")
  numbers = atoms.get_atomic_numbers()
  bad = (numbers < 1) | (numbers > MAX_ATOMIC_NUMBER)
  if bad.any():
    raise ValueError(f"{where} has unknown element(s) with atomic number {sorted(set(numbers[bad].tolist()))}")
  positions = atoms.get_positions()
  if not np.all(np.isfinite(positions)):
    raise ValueError(f"{where} has non-finite (NaN or inf) positions")


def _charge_and_spin(atoms: ase.Atoms, where: str = "structure") -> tuple[int, int]:
  """(total charge, multiplicity 2S+1) from ``atoms.info`` in any spelling of ``e2former_jax.system_keys``."""
  return charge_and_multiplicity(atoms.info, where=where)


def graph_from_atoms(
  structures: Sequence[ase.Atoms] | ase.Atoms,
  cutoff: float,
  max_neighbors: int,
  num_atoms: int | None = None,
  num_graphs: int | None = None,
  dtype=np.float32,
) -> tuple[AtomGraph, int]:
  """Builds a padded ``AtomGraph`` on the host.

  Args:
    structures: one ``ase.Atoms`` or a sequence; the total charge and the multiplicity 2S+1 are read from
      ``atoms.info`` in any spelling of ``e2former_jax.system_keys`` (``charge``/``total_charge``,
      ``spin``/``total_spin``/``multiplicity``; defaults 0 and 1).
    cutoff: neighbour cutoff in Angstrom.
    max_neighbors: K.
    num_atoms: atom slots N (default: real atoms + 1); must exceed the real atom count.
    num_graphs: structure slots G (default: structures + 1); must exceed the structure count.
    dtype: floating dtype of positions, shifts and cells.

  Returns:
    The graph and the number of in-cutoff neighbours dropped because an atom had more than K.
  """
  if isinstance(structures, ase.Atoms):
    structures = [structures]
  if len(structures) == 0:
    raise ValueError("no structures given")
  total = sum(len(a) for a in structures)
  num_atoms = total + 1 if num_atoms is None else num_atoms
  num_graphs = len(structures) + 1 if num_graphs is None else num_graphs
  if num_atoms <= total:
    raise ValueError(f"num_atoms={num_atoms} must exceed the {total} real atoms (one padding atom is needed)")
  if num_graphs <= len(structures):
    raise ValueError(f"num_graphs={num_graphs} must exceed the {len(structures)} structures")
  pad_atom, pad_graph = num_atoms - 1, num_graphs - 1
  positions = np.zeros((num_atoms, 3))
  numbers = np.zeros(num_atoms, np.int32)
  atom_mask = np.zeros(num_atoms, bool)
  neighbors = np.full((num_atoms, max_neighbors), pad_atom, np.int32)
  neighbor_mask = np.zeros((num_atoms, max_neighbors), bool)
  neighbor_shift = np.zeros((num_atoms, max_neighbors, 3))
  graph_index = np.full(num_atoms, pad_graph, np.int32)
  charge = np.zeros(num_graphs, np.int32)
  spin = np.ones(num_graphs, np.int32)
  cell = np.zeros((num_graphs, 3, 3))
  pbc = np.zeros((num_graphs, 3), bool)
  graph_mask = np.zeros(num_graphs, bool)
  beyond = 0
  offset = 0
  for g, atoms in enumerate(structures):
    where = f"structure {g}" + (f" ({atoms.info['source']})" if "source" in atoms.info else "")
    validate_atoms(atoms, where)
    n = len(atoms)
    pos = atoms.get_positions().astype(np.float64)
    try:
      slots = k_nearest_neighbors(pos, cutoff, max_neighbors, atoms.cell.array, atoms.pbc)
    except ValueError as err:
      raise ValueError(f"{where}: {err}") from None
    beyond += slots.num_beyond_k
    sl = slice(offset, offset + n)
    positions[sl] = pos - pos.mean(axis=0)
    numbers[sl] = atoms.get_atomic_numbers()
    atom_mask[sl] = True
    neighbors[sl] = np.where(slots.mask, slots.neighbors + offset, pad_atom)
    neighbor_mask[sl] = slots.mask
    neighbor_shift[sl] = slots.shifts
    graph_index[sl] = g
    charge[g], spin[g] = _charge_and_spin(atoms, where)
    cell[g] = atoms.cell.array
    pbc[g] = atoms.pbc
    graph_mask[g] = True
    offset += n
  graph = AtomGraph(
    positions=positions.astype(dtype),
    numbers=numbers,
    atom_mask=atom_mask,
    neighbors=neighbors,
    neighbor_mask=neighbor_mask,
    neighbor_shift=neighbor_shift.astype(dtype),
    graph_index=graph_index,
    charge=charge,
    spin=spin,
    cell=cell.astype(dtype),
    pbc=pbc,
    graph_mask=graph_mask,
    periodic=bool(pbc.any()),
  )
  return graph, beyond

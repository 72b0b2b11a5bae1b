"""Static-shape batching: buckets, packing, compilation count, every label once per epoch, deterministic order."""

import threading

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from e2former_jax import data as D

CUTOFF, K = 5.0, 20  # the largest demo molecule (aspirin) has 21 atoms


@pytest.fixture(scope="module")
def demo_train():
  return D.open_dataset(D.demo_data_path("train"))


def _molecule(n, seed, energy=None):
  rng = np.random.default_rng(seed)
  # atoms on a jittered line 1.2 A apart: no overlaps, every atom has neighbours within the cutoff
  pos = np.stack([np.arange(n) * 1.2, rng.normal(scale=0.1, size=n), rng.normal(scale=0.1, size=n)], axis=1)
  a = ase.Atoms(numbers=rng.choice([1, 6, 7, 8], size=n), positions=pos)
  a.calc = SinglePointCalculator(
    a, energy=float(rng.normal()) if energy is None else energy, forces=rng.normal(size=(n, 3))
  )
  a.info.update(charge=0, spin=1, source=f"mol{seed}")
  return a


def test_make_buckets_and_choose():
  buckets = D.make_buckets([3, 5, 9, 21], atom_budget=64, num_buckets=4)
  assert buckets == sorted(buckets) and len(buckets) == 4
  assert [b.num_atoms % 8 for b in buckets] == [0] * 4
  assert buckets[-1].num_atoms > 64
  for b in buckets:  # structure cap: as many 3-atom structures as the atom slots can hold, plus padding
    assert b.num_graphs == min(64 // 3, (b.num_atoms - 1) // 3) + 1
  assert D.choose_bucket(buckets, 10, 2) == buckets[0]
  assert D.choose_bucket(buckets, 64, 4) == buckets[-1]
  assert D.Bucket(24, 3).fits(23, 2) and not D.Bucket(24, 3).fits(24, 2) and not D.Bucket(24, 3).fits(10, 3)
  with pytest.raises(ValueError, match="no bucket fits"):
    D.choose_bucket(buckets, 1000, 1)
  with pytest.raises(ValueError, match="more than the atom budget"):
    D.make_buckets([100], atom_budget=64)
  capped = D.make_buckets([3, 5], atom_budget=64, max_structures=4)
  assert all(b.num_graphs == 5 for b in capped)


def test_pack_covers_every_index_once_within_budget():
  rng = np.random.default_rng(1)
  sizes = rng.integers(1, 30, size=200)
  order = rng.permutation(200)
  batches = D.pack(sizes, order, atom_budget=64, max_structures=6)
  flat = [i for b in batches for i in b]
  assert flat == order.tolist()
  assert all(sizes[b].sum() <= 64 and len(b) <= 6 for b in batches)
  # greedy: the next structure would not have fitted into the batch that was closed
  for b, nxt in zip(batches[:-1], batches[1:]):
    assert sizes[b].sum() + sizes[nxt[0]] > 64 or len(b) == 6
  with pytest.raises(ValueError, match="structure 0 has 70 atoms"):
    D.pack([70], [0], atom_budget=64)


def test_batch_from_atoms_labels_and_padding():
  mols = [_molecule(4, 0), _molecule(7, 1)]
  batch, beyond = D.batch_from_atoms(mols, D.Bucket(16, 4), CUTOFF, K, indices=[10, 3])
  assert beyond == 0
  g = batch.graph
  assert g.num_atoms == 16 and g.num_graphs == 4 and batch.bucket == D.Bucket(16, 4)
  assert g.atom_mask.sum() == 11 and g.graph_mask.tolist() == [True, True, False, False]
  assert batch.structure_index.tolist() == [10, 3, -1, -1]
  np.testing.assert_allclose(batch.energy[:2], [m.get_potential_energy() for m in mols], rtol=1e-6)
  assert batch.energy[2:].tolist() == [0.0, 0.0] and batch.energy.dtype == np.float32
  np.testing.assert_allclose(batch.forces[:4], mols[0].get_forces(), rtol=1e-6)
  np.testing.assert_allclose(batch.forces[4:11], mols[1].get_forces(), rtol=1e-6)
  assert not batch.forces[11:].any() and batch.forces_mask.tolist() == [True] * 11 + [False] * 5
  # a structure without labels is batched with masks off
  bare = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
  b2, _ = D.batch_from_atoms([bare], D.Bucket(8, 2), CUTOFF, K)
  assert not b2.energy_mask.any() and not b2.forces_mask.any()


def test_demo_epoch_compiles_once_per_bucket_and_sees_every_label_once(demo_train):
  loader = D.GraphLoader(demo_train, CUTOFF, K, atom_budget=192, seed=3, prefetch=3)
  stats = loader.padding_stats(0)
  assert 0.0 <= stats.atom_overhead < 0.25 and stats.real_structures == len(demo_train)
  assert str(stats).startswith(f"{stats.batches} batches")

  traces = []

  @jax.jit
  def loss_terms(batch):
    traces.append(batch.bucket)  # runs only while tracing, i.e. once per compilation
    g = batch.graph
    fmask = (batch.forces_mask & g.atom_mask)[:, None]
    emask = batch.energy_mask & g.graph_mask
    return {
      "atoms": jnp.sum(g.atom_mask),
      "numbers": jnp.sum(jnp.where(g.atom_mask, g.numbers, 0)),
      "force_sum": jnp.sum(
        jnp.where(fmask, batch.forces.astype(jnp.float64) if jax.config.x64_enabled else batch.forces, 0.0), axis=0
      ),
      "force_abs": jnp.sum(jnp.where(fmask, jnp.abs(batch.forces), 0.0)),
      "energy": jnp.sum(jnp.where(emask, batch.energy - jnp.float32(-500.0), 0.0)),
      "structures": jnp.sum(g.graph_mask),
    }

  seen = []
  totals = {"atoms": 0, "numbers": 0, "force_abs": 0.0, "energy": 0.0, "structures": 0}
  for batch in loader:
    out = jax.device_get(loss_terms(batch))
    for k in totals:
      totals[k] += out[k]
    seen.extend(int(i) for i in batch.structure_index[np.asarray(batch.graph.graph_mask)])
  assert len(traces) <= len(loader.buckets)
  assert len(set(traces)) == len(traces)
  assert loader.neighbors_beyond_k == 0
  # every structure exactly once
  assert sorted(seen) == list(range(len(demo_train)))
  ref = [demo_train[i] for i in range(len(demo_train))]
  assert totals["structures"] == len(ref)
  assert totals["atoms"] == sum(len(a) for a in ref) == stats.real_atoms
  assert totals["numbers"] == sum(int(a.numbers.sum()) for a in ref)
  f_abs = sum(np.abs(a.get_forces()).sum() for a in ref)
  assert totals["force_abs"] == pytest.approx(f_abs, rel=1e-5)
  e = sum(a.get_potential_energy() + 500.0 for a in ref)
  assert totals["energy"] == pytest.approx(e, rel=1e-5)
  # later epochs reuse the compiled shapes (their last batch may land in another of the buckets)
  for batch in loader:
    loss_terms(batch)
  assert len(traces) <= len(loader.buckets) and len(set(traces)) == len(traces)


def test_order_is_deterministic_for_a_seed(demo_train):
  def indices(loader, epoch):
    return [batch.structure_index.tolist() for batch in loader.epoch(epoch)]

  a = D.GraphLoader(demo_train, CUTOFF, K, atom_budget=256, seed=7, prefetch=2)
  b = D.GraphLoader(demo_train, CUTOFF, K, atom_budget=256, seed=7, prefetch=0)
  assert [g for _, g in a.plan(0)] == [g for _, g in b.plan(0)]
  first = indices(a, 1)
  assert first == indices(b, 1)
  assert [g for _, g in a.plan(0)] != [g for _, g in a.plan(1)]
  c = D.GraphLoader(demo_train, CUTOFF, K, atom_budget=256, seed=8)
  assert [g for _, g in c.plan(1)] != [g for _, g in a.plan(1)]
  d = D.GraphLoader(demo_train, CUTOFF, K, atom_budget=256, shuffle=False)
  assert [i for _, g in d.plan(5) for i in g] == list(range(len(demo_train)))
  # __iter__ walks epochs 0, 1, ...
  e = D.GraphLoader(demo_train, CUTOFF, K, atom_budget=256, seed=7, prefetch=2)
  next(iter(e))
  assert e.epoch_count == 1 and [x.structure_index.tolist() for x in e] == first


class _Failing:
  """A dataset whose record 5 cannot be read."""

  def __init__(self, n):
    self.mols = [_molecule(3 + i % 4, i) for i in range(n)]

  def __len__(self):
    return len(self.mols)

  def __getitem__(self, i):
    if i == 5:
      raise D.DataFormatError("fake.xyz", 5, "missing key 'REF_forces'")
    return self.mols[i]

  def num_atoms(self, i):
    return len(self.mols[i])


def test_prefetch_thread_errors_and_early_exit():
  loader = D.GraphLoader(_Failing(40), CUTOFF, K, atom_budget=16, shuffle=False, prefetch=2)
  with pytest.raises(D.DataFormatError, match="fake.xyz, record 5"):
    for _ in loader.epoch(0):
      pass
  ok = D.GraphLoader([_molecule(3 + i % 4, i) for i in range(40)], CUTOFF, K, atom_budget=16, prefetch=2)
  before = threading.active_count()
  it = ok.epoch(0)
  next(it)
  it.close()  # consumer stops early: the producer thread ends
  assert threading.active_count() <= before
  assert len(list(ok.epoch(0))) == ok.num_batches(0)
  on_device = D.GraphLoader(ok.dataset, CUTOFF, K, atom_budget=16, prefetch=2, device_put=True)
  first = next(iter(on_device))
  assert isinstance(first.graph.positions, jax.Array) and isinstance(first.forces, jax.Array)


def test_loader_rejects_oversized_structures_and_reports_truncation():
  mols = [_molecule(3, 0), _molecule(30, 1)]
  with pytest.raises(ValueError, match="more than the atom budget"):
    D.GraphLoader(mols, CUTOFF, K, atom_budget=16)
  # a 30-atom chain with cutoff 5 A has up to 8 in-cutoff neighbours; K=2 truncates and warns once
  loader = D.GraphLoader(mols, CUTOFF, 2, atom_budget=64, prefetch=0)
  with pytest.warns(UserWarning, match="beyond K=2"):
    list(loader.epoch(0))
  assert loader.neighbors_beyond_k > 0


def test_batch_predictions_match_each_structure_alone(demo_train):
  from flax import nnx

  from e2former_jax.config import get_config
  from e2former_jax.model import E2Former
  from e2former_jax.predict import make_predict_fn

  cfg = get_config(
    "small",
    channels=16,
    num_layers=1,
    num_heads=4,
    head_dim=4,
    qk_hidden=16,
    type_embed_dim=8,
    num_basis=8,
    radial_hidden=16,
    max_neighbors=K,
    attention_impl="jnp_node",
  )
  predict = make_predict_fn(E2Former(cfg, rngs=nnx.Rngs(0)))
  loader = D.GraphLoader(demo_train, cfg.cutoff, cfg.max_neighbors, atom_budget=48, seed=0, prefetch=1)
  batch = next(b for b in loader.epoch(0) if int(b.graph.graph_mask.sum()) >= 3)
  real = np.asarray(batch.graph.graph_mask)
  assert real.sum() >= 3 and not real.all()
  out = jax.device_get(predict(batch.graph))
  atom_graph = np.asarray(batch.graph.graph_index)
  atom_mask = np.asarray(batch.graph.atom_mask)
  alone_bucket = batch.bucket  # each structure alone, padded to the same shape: a single compilation
  for g in np.flatnonzero(real):
    idx = int(batch.structure_index[g])
    single, _ = D.batch_from_atoms([demo_train[idx]], alone_bucket, cfg.cutoff, cfg.max_neighbors, [idx])
    ref = jax.device_get(predict(single.graph))
    e_ref = float(ref["energy"][0])
    assert float(out["energy"][g]) == pytest.approx(e_ref, abs=2e-4 * max(1.0, abs(e_ref)))
    n = len(demo_train[idx])
    np.testing.assert_allclose(out["forces"][(atom_graph == g) & atom_mask], ref["forces"][:n], rtol=1e-4, atol=1e-5)
  assert np.all(out["forces"][~atom_mask] == 0.0) and np.all(out["energy"][~real] == 0.0)

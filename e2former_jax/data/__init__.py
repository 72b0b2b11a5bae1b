"""Data pipeline: readers (SPICE HDF5, extxyz, OMol25 aselmdb), structure sources, element references, batching,
shipped demo data."""

from e2former_jax.data.batching import (
  Batch,
  Bucket,
  GraphLoader,
  PaddingStats,
  batch_from_atoms,
  choose_bucket,
  make_buckets,
  pack,
)
from e2former_jax.data.demo import demo_data_path, load_demo
from e2former_jax.data.readers import (
  BOHR_TO_ANGSTROM,
  HARTREE_PER_BOHR_TO_EV_PER_ANGSTROM,
  HARTREE_TO_EV,
  AselmdbDataset,
  DataFormatError,
  Dataset,
  ExtxyzDataset,
  SpiceDataset,
  detect_format,
  load,
  open_dataset,
  smiles_formal_charge,
)
from e2former_jax.data.references import (
  ELEMENT_REFERENCE_TABLES,
  OMOL25_ELEMENT_REFERENCES,
  SPICE_ELEMENT_REFERENCES,
  fit_element_references,
  reference_array,
  reference_energy,
)
from e2former_jax.data.sources import read_structures

__all__ = [
  "BOHR_TO_ANGSTROM",
  "HARTREE_PER_BOHR_TO_EV_PER_ANGSTROM",
  "HARTREE_TO_EV",
  "AselmdbDataset",
  "DataFormatError",
  "Dataset",
  "ExtxyzDataset",
  "SpiceDataset",
  "detect_format",
  "load",
  "open_dataset",
  "smiles_formal_charge",
  "ELEMENT_REFERENCE_TABLES",
  "OMOL25_ELEMENT_REFERENCES",
  "SPICE_ELEMENT_REFERENCES",
  "fit_element_references",
  "reference_array",
  "reference_energy",
  "demo_data_path",
  "load_demo",
  "read_structures",
  "Batch",
  "Bucket",
  "GraphLoader",
  "PaddingStats",
  "batch_from_atoms",
  "choose_bucket",
  "make_buckets",
  "pack",
]

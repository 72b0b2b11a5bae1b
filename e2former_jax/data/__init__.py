"""Data pipeline: readers (SPICE HDF5, extxyz, OMol25 aselmdb), element references, shipped demo data."""

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
from e2former_jax.data.demo import demo_data_path, load_demo

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
]

"""The element reference energies the authors' calculator adds to each head's output.

The authors' ASE calculator (UBio-MolFM ``main``, ``interface/model_interface.py``) adds sum_i ref[Z_i] * unit
to a head's energy, with (ref, unit) the table its data module gives for the head's name
(``data/utils.py``, ``get_data_defult_config``): ``omol25`` in eV (unit 1; the same numbers as
``e2former_jax.data.OMOL25_ELEMENT_REFERENCES``), names starting with ``svp`` and ``tzvpd`` in kcal/mol with unit
0.0433634 eV per kcal/mol, every other name an all-zero table (the head predicts total energies itself). The
``svp`` and ``tzvpd`` tables below are those of the authors' code, indexed by atomic number Z = 0..83 (their
entries for Z >= 84 are zero). Entries of magnitude below 1e-4 kcal/mol are least-squares residue for
elements absent from their data; they are kept because the authors add them too. docs/authors_checkpoints.md
section 3.
"""

from __future__ import annotations

from e2former_jax.data.references import OMOL25_ELEMENT_REFERENCES

KCAL_PER_MOL_IN_EV = 0.0433634  # the authors' unit for the svp and tzvpd tables (eV per kcal/mol)
PRESENT = 1.0  # |reference| at or above this (table units) marks an element of the head's training data

# kcal/mol, index = Z
SVP_KCAL_PER_MOL = (
  4.49229734e-10,
  -3.72433460e02,
  -6.23675060e-05,
  -5.56284534e03,
  -8.50287678e03,
  -1.47809267e04,
  -2.39028361e04,
  -3.43431709e04,
  -4.71925073e04,
  -6.26513937e04,
  -1.15425792e-07,
  -1.01941849e05,
  -1.25608189e05,
  -1.51169437e05,
  -1.80777290e05,
  -2.14051636e05,
  -2.49787635e05,
  -2.88765961e05,
  -1.28056854e-09,
  -3.76381424e05,
  -4.25047952e05,
  -9.31322575e-10,
  6.11180440e-10,
  -5.92018205e05,
  -6.54301950e05,
  -7.21407376e05,
  -7.92389900e05,
  -8.66955763e05,
  -9.45666713e05,
  -1.02891357e06,
  -1.11599550e06,
  -1.20723417e06,
  3.20142135e-10,
  -1.40180562e06,
  -1.50601945e06,
  -1.61519050e06,
  -2.29192665e-10,
  0.00000000e00,
  2.61934474e-10,
  -2.34722732e04,
  -8.14907253e-10,
  -1.16415322e-10,
  -4.18770349e04,
  1.16415322e-10,
  -5.90661723e04,
  -6.87425955e04,
  -7.94450689e04,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  -1.33502265e05,
  -1.49775100e05,
  -1.67350976e05,
  -1.86959836e05,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  -4.17398182e04,
  -4.78718875e04,
  -5.63180079e04,
  0.00000000e00,
  -7.40116024e04,
  -8.43947260e04,
  -9.53408640e04,
  0.00000000e00,
  -1.19921583e05,
  0.00000000e00,
)
TZVPD_KCAL_PER_MOL = (
  9.15343287e-11,
  -3.76397121e02,
  -9.71739064e-06,
  -1.63912773e-07,
  -9.00796030e03,
  -1.52155189e04,
  -2.39252718e04,
  -3.43741831e04,
  -4.72464887e04,
  -6.27057637e04,
  4.67407517e-08,
  -1.01930194e05,
  -1.25605887e05,
  -9.66247171e-09,
  -1.81116523e05,
  -2.14268356e05,
  -2.49888864e05,
  -2.88823642e05,
  -4.65661287e-10,
  -3.76531228e05,
  -4.25195432e05,
  -4.36557457e-11,
  -3.27418093e-10,
  3.78349796e-10,
  -1.16415322e-10,
  -1.45519152e-10,
  -7.92838875e05,
  -8.67362812e05,
  1.16415322e-10,
  -1.02934443e06,
  -1.11648012e06,
  0.00000000e00,
  -5.82076609e-11,
  -1.40236252e06,
  -1.50664257e06,
  -1.61531897e06,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  -4.24193446e04,
  0.00000000e00,
  -5.89232686e04,
  -6.91526004e04,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  -1.34169398e05,
  -1.50487065e05,
  0.00000000e00,
  -1.86907896e05,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  0.00000000e00,
  -7.57615599e04,
  -8.46857659e04,
  -9.60197949e04,
  0.00000000e00,
  -1.20647268e05,
  0.00000000e00,
)


class MissingReferenceTable(ValueError):
  """The authors' code has a reference table for this head that this project does not include."""


# Head names whose tables in the authors' code this project does not include (periodic catalysis data sets).
NOT_INCLUDED = ("oc20", "oc22")


def head_reference_table(head: str) -> tuple[dict[int, float], tuple[int, ...] | None]:
  """(reference energy in eV per atomic number, elements of the head's table) for head ``head``.

  The elements are the atomic numbers whose table entry is at least ``PRESENT`` in magnitude (the elements
  the head was trained on); None for heads the authors give an all-zero table (nothing is known).

  Raises:
    MissingReferenceTable: ``oc20`` and ``oc22``, whose tables are not included here.
  """
  name = head.lower()
  if name in NOT_INCLUDED:
    raise MissingReferenceTable(
      f"head {head!r}: the authors' reference table for {name} is not included in this project; import with "
      "element_references=False (--no-element-references) and set the references yourself"
    )
  if name == "omol25":
    raw, unit = dict(OMOL25_ELEMENT_REFERENCES), 1.0
  elif name.startswith(("svp", "tzvpd")):
    values = SVP_KCAL_PER_MOL if name.startswith("svp") else TZVPD_KCAL_PER_MOL
    raw, unit = {z: v for z, v in enumerate(values) if z > 0}, KCAL_PER_MOL_IN_EV
  else:
    return {}, None
  present = tuple(sorted(z for z, v in raw.items() if abs(v) >= PRESENT))
  return {z: v * unit for z, v in raw.items()}, present

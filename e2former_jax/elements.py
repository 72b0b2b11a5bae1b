"""Facts about the chemical elements that several modules check against (one copy)."""

from ase.data import chemical_symbols

MAX_ATOMIC_NUMBER = len(chemical_symbols) - 1
"""118 (oganesson): the largest atomic number a structure may hold."""

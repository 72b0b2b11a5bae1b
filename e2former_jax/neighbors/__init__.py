"""Neighbour slots: the K nearest atoms within the cutoff of every atom.

* ``host``: built on the CPU with vesin, for data pipelines and CPU inference.
* ``skin``: built and updated on the device inside jitted MD, with a skin so it is rebuilt rarely.
"""

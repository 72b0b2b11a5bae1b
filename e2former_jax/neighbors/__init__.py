"""Neighbour slots: the K nearest atoms within the cutoff of every atom.

* ``host``: built on the CPU with vesin, for data pipelines and CPU inference.
* ``device``: built on the device in O(N), jittable, for JAX users and GPU inference.
* ``skin``: built and updated on the device inside jitted MD, with a skin so it is rebuilt rarely.

``device.neighbor_slots`` bins atoms into a capped grid (the cell along periodic directions, the atoms'
bounding box along free ones, so molecules, crystals and slabs all take the same O(N) path), sorts them by
bin, and collects every pair within the cutoff from the stencil of bins around each atom (several lattice
images when a periodic cell is thinner than the cutoff); structures of a batch never see each other. It
keeps the K nearest by the host builder's rule, ``host.selection_order``: distances and displacements are
compared on a grid of ``host.TIE_RESOLUTION`` (6.1e-5 A), so equidistant neighbours at the K-th distance are
chosen by geometry, never by the order of atoms in memory or by float32 rounding. Its ``neighbors``, ``mask``
and ``shift`` are those of ``graph_from_atoms`` (same kept set, images, padding and dropped-pair count; the
slot order differs only between distances equal to float32 precision). Shapes are static: bins and candidate
buffers have fixed capacities, a build that needs more reports ``overflow`` and what it needed, and
``device.fit_neighbor_slots`` retries with the next capacity bucket, so a run compiles a few programs.
"""

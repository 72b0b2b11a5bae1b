#!/usr/bin/env python
"""Train E2Former-V2 (see ``python train.py --help``).

Without arguments: the ``small`` model with conservative forces on the shipped demo data (configs/demo.yaml),
ending with the held-out error table.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
  # glibc's malloc hands XLA's large per-step buffers back to the kernel and faults them in again on every
  # step (about 70,000 page faults and a quarter of the CPU time of a demo step on 2 cores). Backed by
  # transparent huge pages they fault a hundred times less (measured: 73,000 -> 600 faults, 0.45 -> 0.36 s per
  # step). glibc reads the tunable at process start only, so the process restarts once, before the package
  # (and JAX) is imported. Set GLIBC_TUNABLES yourself to choose otherwise.
  if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
    os.environ["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    os.execv(sys.executable, [sys.executable, *sys.argv])
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from e2former_jax.training.cli import main

  sys.exit(main())

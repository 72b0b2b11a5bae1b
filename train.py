#!/usr/bin/env python
"""Train E2Former-V2: a thin wrapper of the installed ``e2former-train`` (see ``python train.py --help``).

Without arguments: the ``small`` model with conservative forces on the shipped demo data (the ``demo`` preset),
ending with the held-out error table.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from e2former_jax.training.cli import console

  sys.exit(console())

#!/usr/bin/env python
"""Train E2Former-V2 (see ``python train.py --help``).

Without arguments: the ``small`` model with conservative forces on the shipped demo data (configs/demo.yaml),
ending with the held-out error table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2former_jax.training.cli import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())

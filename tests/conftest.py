"""Shared test settings: fail loudly on NaNs created inside jitted code is left to individual tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

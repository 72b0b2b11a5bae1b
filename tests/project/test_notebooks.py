"""The notebooks execute top to bottom on a CPU (nbclient), and are stored without outputs."""

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"


def execute(name: str, timeout: int = 600, env: dict | None = None) -> nbformat.NotebookNode:
  """Runs a notebook in a fresh kernel (cwd notebooks/, this checkout importable even when not installed)."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
  env = {"PYTHONPATH": path, **(env or {})}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    NotebookClient(
      nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


def text_of(nb) -> str:
  return "\n".join(
    o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
  )


def figures(nb) -> int:
  return sum(
    1
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
    if o.output_type == "display_data" and "image/png" in o.get("data", {})
  )


@pytest.mark.parametrize("name", ["quickstart.ipynb", "performance.ipynb"])
def test_stored_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name} has stored outputs"


@pytest.mark.slow
def test_quickstart_executes():
  """With XLA's optimisations on, as a user runs it (the suite turns most of them off, tests/conftest.py): the
  400-step MD cell runs 4x faster optimised, which outweighs the slower compiles of the other cells (the notebook
  alone on the suite's 2-core host: 97 against 109 s, 2026-12-08)."""
  nb = execute("quickstart.ipynb", env={"JAX_DISABLE_MOST_OPTIMIZATIONS": "0"})
  text = text_of(nb)
  print(text)
  assert "largest weights" in text
  assert figures(nb) >= 4  # parity, MD energies, attention matrices, attention on the molecule
  rotation_errors = [float(x) for x in re.findall(r"max\|F\(Rx\) - R F\(x\)\| / max\|F\| = (\S+)", text)]
  assert len(rotation_errors) == 3 and max(rotation_errors) < 1e-4
  spread = float(re.search(r"total-energy spread .* = (\S+) meV/atom", text).group(1))
  assert spread <= 1.0


def test_performance_reads_every_result_file_and_plots_each_kind():
  """Every result file read and listed; one figure drawn per kind of file (``E2FORMER_FIGURES_PER_KIND=1``: the
  same drawing code for each file, and drawing all of them took 65 of the notebook's 71 s on the suite's host)."""
  nb = execute("performance.ipynb", env={"E2FORMER_FIGURES_PER_KIND": "1"})
  text = text_of(nb)
  files = sorted((ROOT / "benchmarks" / "results").glob("*.json*"))
  assert f"({len(files)} result files)" in text and "No benchmark numbers" not in text
  assert all(f"{path.stem}\n  device: " in text for path in files)
  assert figures(nb) == len({path.name.split("_")[0] for path in files})
  # the CPU measurement: both CPU paths read, jnp_dense plotted and compared (2.75x at N = 64, energy + forces)
  cpu = text[text.index("model_cpu_2026-12-04\n") :]
  assert "paths ['jnp_dense', 'jnp_node'], cases ['infer', 'step_conservative']" in cpu
  assert "N=     64 infer                    jnp_dense    2.75x" in text


def test_performance_says_so_without_numbers(tmp_path):
  nb = execute("performance.ipynb", env={"E2FORMER_RESULTS_DIR": str(tmp_path)})
  assert "No benchmark numbers yet" in text_of(nb) and figures(nb) == 0


def test_performance_reads_both_layouts(tmp_path):
  """An attention report and model lines as the benchmark scripts write them: every row becomes a point."""
  rows = [
    dict(n=1024, impl="pallas", case="forward", seconds=0.0005, bytes_compiled=2**28),
    dict(n=8192, impl="pallas", case="forward", seconds=0.003, bytes_compiled=2**30),
    dict(n=1024, impl="jnp_node", case="forward", seconds=0.002, bytes_compiled=2**30),
  ]
  (tmp_path / "attention_x.json").write_text(json.dumps({"device": "card A", "results": rows}))
  runs = {"old_abc": {"device": "card B", "results": rows[:1]}, "new_def": {"device": "card B", "results": rows[:1]}}
  (tmp_path / "attention_runs.json").write_text(json.dumps(runs))  # a comparison of two commits
  lines = [
    dict(mode="infer", atoms=64, impl="jnp_node", ms=40.0, device="cpu"),
    dict(mode="infer", atoms=64, impl="jnp_dense", ms=10.0, device="cpu"),
    dict(mode="infer", atoms=64, impl="jnp_dense", ms=30.0, device="cpu", deterministic=True),
  ]
  (tmp_path / "model_y.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  other = {  # breakdown.py, precision.py, authors_import.py and memory.py with edge chunks
    "breakdown_z.jsonl": [
      dict(part="gates", ms=5.0, atoms=4096, mode="direct"),
      dict(part="model", ms=24.0, atoms=4096, mode="direct"),
    ],
    "precision_z.jsonl": [dict(case="paper_direct", precision="highest", ms=33.0, force_rel_dev=0.0, atoms=4096)],
    "authors_z.jsonl": [dict(model="v15", atoms=1024, forces="conservative", precision="highest", device_ms=22.0)],
    "memory_z.jsonl": [
      dict(
        mode="conservative",
        remat="on",
        edge_chunk=4096,
        atoms=32768,
        temp_mib=1.0,
        args_mib=1.0,
        out_mib=0.0,
        ms=1000.0,
      )
    ],
  }
  for name, rows_of_file in other.items():
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows_of_file))
  nb = execute("performance.ipynb", env={"E2FORMER_RESULTS_DIR": str(tmp_path)})
  text = text_of(nb)
  assert "breakdown_z\n  device: not named\n  2 rows, N = [4096], paths ['gates', 'model'], cases ['direct']" in text
  assert "precision_z\n  device: not named\n  1 rows, N = [4096], paths ['highest'], cases ['paper_direct']" in text
  assert "authors_z\n  device: not named\n  1 rows, N = [1024], paths ['v15']" in text
  assert "paths ['remat on, edge_chunk 4096'], cases ['conservative']" in text
  assert "3 rows, N = [1024, 8192], paths ['jnp_node', 'pallas']" in text
  assert "device: card B\n  2 rows, N = [1024], paths ['pallas new_def', 'pallas old_abc']" in text
  assert "cases ['infer', 'infer deterministic']" in text
  assert "N=  1,024 forward                  pallas       4.00x" in text
  assert "N=     64 infer                    jnp_dense    4.00x" in text
  assert figures(nb) == 7

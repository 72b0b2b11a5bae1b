"""The notebooks execute top to bottom on a CPU (nbclient), and are stored without outputs."""

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
  nb = execute("quickstart.ipynb")
  text = text_of(nb)
  print(text)
  assert "largest weights" in text
  assert figures(nb) >= 4  # parity, MD energies, attention matrices, attention on the molecule
  rotation_errors = [float(x) for x in re.findall(r"max\|F\(Rx\) - R F\(x\)\| / max\|F\| = (\S+)", text)]
  assert len(rotation_errors) == 3 and max(rotation_errors) < 1e-4
  spread = float(re.search(r"total-energy spread .* = (\S+) meV/atom", text).group(1))
  assert spread <= 1.0


def test_performance_plots_measured_tables():
  nb = execute("performance.ipynb")
  text = text_of(nb)
  results = ROOT / "benchmarks" / "RESULTS.md"
  if results.exists() and "| N |" in results.read_text():
    assert "paths" in text and "No benchmark numbers" not in text
    assert figures(nb) >= 1
  else:
    assert "No benchmark numbers yet" in text and figures(nb) == 0


def test_performance_says_so_without_numbers(tmp_path):
  empty = tmp_path / "RESULTS.md"
  empty.write_text("# Benchmark results\n\nNothing measured yet.\n")
  nb = execute("performance.ipynb", env={"E2FORMER_RESULTS_MD": str(empty)})
  assert "No benchmark numbers yet" in text_of(nb) and figures(nb) == 0


def test_performance_parses_a_table(tmp_path):
  """A table in the kernel engineer's layout: every row becomes a point, units and thousands separators read."""
  table = tmp_path / "RESULTS.md"
  table.write_text(
    "\n".join(
      [
        "## run",
        "",
        "| N | impl | case | ms | GiB | floor |",
        "|---|---|---|---|---|---|",
        "| 1,024 | pallas | forward | 0.5 | 0.10 | 12.0% |",
        "| 8,192 | pallas | forward | 3.0 | 0.80 | 15% |",
        "| 1,024 | jnp_node | forward | 2.0 | 1.00 | 3% |",
        "| 8,192 | jnp_node | forward | failed | - | - |",
        "",
      ]
    )
  )
  nb = execute("performance.ipynb", env={"E2FORMER_RESULTS_MD": str(table)})
  text = text_of(nb)
  assert "3 rows, N = [1024, 8192]" in text and "paths ['jnp_node', 'pallas']" in text
  assert "4.00x" in text  # pallas over jnp_node at N = 1,024
  assert figures(nb) == 1

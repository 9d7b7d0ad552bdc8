"""Re-execute chapter notebooks in place, in the pinned environment, to refresh their committed outputs.

    python tools/execute_notebooks.py notebooks/00_tiny_models.ipynb [more.ipynb ...]

Runs every cell top to bottom with nbclient in a fresh kernel of *this* Python (the one in .venv),
with the notebook's folder as working directory; cells tagged ``skip-execution`` are not run. Then it
normalises the notebook's metadata (kernelspec python3, no per-cell execution timestamps) so diffs show
only real changes. Prints each notebook's wall time: record it in the README's budget table.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def normalise(nb: nbformat.NotebookNode) -> None:
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    language_info = nb.metadata.get("language_info", {})
    nb.metadata["language_info"] = {"name": "python", "pygments_lexer": "ipython3",
                                    "version": language_info.get("version", "")}
    for key in ("widgets", "colab", "vscode"):
        nb.metadata.pop(key, None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("collapsed", None)
        cell.metadata.pop("scrolled", None)
        if cell.cell_type == "code" and "skip-execution" in cell.metadata.get("tags", []):
            cell.execution_count = None
            cell.outputs = []


def execute(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                            record_timing=False)
    started = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - started
    normalise(nb)
    nbformat.write(nb, path)
    return seconds


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit("usage: execute_notebooks.py NOTEBOOK.ipynb [...]")
    for name in paths:
        seconds = execute(Path(name))
        print(f"{name}: executed in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

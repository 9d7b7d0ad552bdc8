"""Compare the training-dependent outputs of two executions of one notebook, against their tolerances.

    python tools/compare_runs.py committed.ipynb other-run.ipynb [N]

Use it to size a tolerance before committing it: execute the notebook once as usual and once on another
float path (``ATEN_CPU_CAPABILITY=default python tools/execute_notebooks.py copy.ipynb``, or another
machine, or another torch version), then compare. It lists the N (default 40) values closest to or
beyond their declared tolerance (``companion.nbtools`` records: ``glue``/``say``/``table``/``rate``), as
a multiple of that tolerance, and exits 1 when any value differs by more than its tolerance.
"""

from __future__ import annotations

import json
import sys


def records(notebook: dict) -> list[tuple[int, str, dict]]:
    found = []
    for index, cell in enumerate(notebook["cells"]):
        for output in cell.get("outputs", []):
            record = output.get("metadata", {}).get("companion")
            if record:
                label = (output.get("metadata", {}).get("scrapbook", {}).get("name")
                         or record.get("skeleton", "")[:50].replace("\n", " / "))
                found.append((index, label, record))
    return found


def main(path_a: str, path_b: str, show: int = 40) -> int:
    a = records(json.load(open(path_a, encoding="utf-8")))
    b = records(json.load(open(path_b, encoding="utf-8")))
    print(f"{len(a)} vs {len(b)} tolerant outputs")
    failures, rows = 0, []
    for (i, label_a, rec_a), (j, label_b, rec_b) in zip(a, b):
        if i != j or len(rec_a["values"]) != len(rec_b["values"]):
            print(f"cell {i}: MISALIGNED {label_a!r} vs {label_b!r}")
            failures += 1
            continue
        for k, (va, vb, tol) in enumerate(zip(rec_a["values"], rec_b["values"], rec_a["tols"])):
            if tol == "varies":
                continue
            diff = abs(va - vb)
            ratio = diff / tol if tol else (0.0 if diff == 0 else float("inf"))
            failures += ratio > 1
            rows.append((ratio, i, label_a, k, va, vb, tol))
    rows.sort(key=lambda row: -row[0])
    for ratio, i, label, k, va, vb, tol in rows[:show]:
        print(f"{ratio:6.2f}x tol  cell {i:2d} {label[:40]!r:44} v{k} A {va:.4f} B {vb:.4f} tol {tol:g}")
    if len(a) != len(b):
        failures += 1
    print("within tolerance" if not failures else f"{failures} outside tolerance")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 40))

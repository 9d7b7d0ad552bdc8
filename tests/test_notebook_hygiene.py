"""Notebook hygiene (DESIGN.md): every chapter notebook is committed executed, tidy and consistent.

These checks read the committed .ipynb files only; strict nbval (``make nbval``) then proves that
their outputs still reproduce.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ALLOWED_CELL_METADATA = {"tags"}
MAX_OUTPUT_BYTES = 400_000
MAX_NOTEBOOK_BYTES = 3_000_000


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _glue_records(nb: dict) -> set[str]:
    names = set()
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                names.add(name)
    return names


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no chapter notebook"


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.name)
def notebook(request):
    return request.param, _load(request.param)


def test_kernelspec_is_python3(notebook):
    path, nb = notebook
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"


def test_execution_counts_are_sequential(notebook):
    path, nb = notebook
    counts = [c.get("execution_count") for c in nb["cells"]
              if c["cell_type"] == "code" and "skip-execution" not in _tags(c)]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: execution counts {counts} are not 1..n; run `make execute NB={path.relative_to(ROOT)}`")


def test_skip_execution_implies_nbval_skip(notebook):
    path, nb = notebook
    for i, cell in enumerate(nb["cells"]):
        if "skip-execution" in _tags(cell):
            assert "nbval-skip" in _tags(cell), f"{path.name} cell {i}: skip-execution without nbval-skip"
            assert not cell.get("outputs"), f"{path.name} cell {i}: a skip-execution cell must carry no outputs"


def test_first_code_cell_is_the_guarded_colab_install(notebook):
    path, nb = notebook
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    source = _source(first)
    assert '"google.colab" in sys.modules' in source, f"{path.name}: first code cell must be the guarded install"
    assert "remove-cell" in _tags(first), f"{path.name}: the install cell must be tagged remove-cell"
    assert not first.get("outputs"), f"{path.name}: the install cell must print nothing outside Colab"
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    url = config["repository"]["url"]
    assert f"git+{url}@{config['repository']['branch']}" in source, (
        f"{path.name}: the install cell must install from _config.yml's repository ({url})")


def test_title_and_colab_badge(notebook):
    path, nb = notebook
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and _source(first).startswith("# "), f"{path.name}: no title cell"
    assert "colab-badge.svg" in _source(first), f"{path.name}: the title cell must carry the Open-in-Colab badge"


def test_every_glue_reference_exists(notebook):
    path, nb = notebook
    records = _glue_records(nb)
    pattern = re.compile(r"\{glue(?::\w+)?\}`([A-Za-z_][\w]*)")
    directive = re.compile(r"```\{glue(?::\w+)?\}\s+([A-Za-z_]\w*)|:::\{glue(?::\w+)?\}\s+([A-Za-z_]\w*)")
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        text = _source(cell)
        keys = pattern.findall(text) + [a or b for a, b in directive.findall(text)]
        missing = sorted(set(keys) - records)
        assert not missing, f"{path.name}: prose references glue keys with no glued output: {missing}"


def test_every_citation_is_in_the_bibliography(notebook):
    path, nb = notebook
    bib = (ROOT / "book" / "references.bib").read_text(encoding="utf-8")
    known = set(re.findall(r"@\w+\{([^,\s]+),", bib))
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", _source(cell)):
                missing = {k.strip() for k in group.split(",")} - known
                assert not missing, f"{path.name}: cited keys missing from references.bib: {missing}"


def test_outputs_are_png_and_small(notebook):
    path, nb = notebook
    assert path.stat().st_size <= MAX_NOTEBOOK_BYTES, f"{path.name} is larger than {MAX_NOTEBOOK_BYTES} bytes"
    for i, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []):
            assert "image/svg+xml" not in output.get("data", {}), f"{path.name} cell {i}: SVG output (use PNG)"
            size = len(json.dumps(output))
            assert size <= MAX_OUTPUT_BYTES, f"{path.name} cell {i}: an output of {size} bytes"
            assert output.get("output_type") != "error", f"{path.name} cell {i}: committed with an error"


def test_metadata_is_normalised(notebook):
    path, nb = notebook
    for key in ("widgets", "colab", "vscode"):
        assert key not in nb["metadata"], f"{path.name}: notebook metadata has {key!r}; run make execute"
    for i, cell in enumerate(nb["cells"]):
        extra = set(cell.get("metadata", {})) - ALLOWED_CELL_METADATA
        assert not extra, f"{path.name} cell {i}: unexpected cell metadata {sorted(extra)}"


def test_notebooks_are_in_the_toc():
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f"notebooks/{path.stem}" in toc, f"{path.name} is not listed in _toc.yml"


def _calls(source: str, function: str) -> list[str]:
    """The argument text of every call ``function(...)`` in ``source`` (parentheses matched)."""
    calls = []
    for match in re.finditer(rf"\b{function}\(", source):
        depth, start = 0, match.end() - 1
        for end in range(start, len(source)):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            if depth == 0:
                calls.append(source[start + 1:end])
                break
    return calls


def test_every_glue_declares_how_it_is_checked(notebook):
    """README, reproducibility rule: a glued value is either deterministic (tol=0) or training-dependent
    with a declared tolerance (or nbtools.VARIES); never glued bare, never through myst_nb directly."""
    path, nb = notebook
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = _source(cell)
        assert "myst_nb" not in source, f"{path.name} cell {i}: glue through companion.nbtools.glue, not myst_nb"
        for args in _calls(source, "glue"):
            declared = re.search(r"\btol=", args) or re.search(r"^\s*f?[\"'][^\"']+[\"'],\s*(approx|rate|rate_of|varies)\(", args)
            assert declared, f"{path.name} cell {i}: glue({args[:60]}...) declares no tol= (nor glues an approx/rate/varies)"


def test_tolerant_records_are_well_formed(notebook):
    """Every training-dependent output carries one tolerance per value, as the nbval plugin expects."""
    path, nb = notebook
    for i, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []):
            record = output.get("metadata", {}).get("companion")
            if record is None:
                continue
            assert len(record["values"]) == len(record["tols"]) > 0, f"{path.name} cell {i}: malformed record"
            for value, tol in zip(record["values"], record["tols"]):
                assert (tol == "varies" and value is None) or (isinstance(tol, (int, float)) and tol >= 0
                                                               and isinstance(value, (int, float))), (
                    f"{path.name} cell {i}: value {value!r} with tolerance {tol!r}")

"""Tests of the checker itself: the tolerant nbval comparison (tools/nbval_tolerance.py) lets a machine
that differs pass and makes a change that matters fail.

A small reference notebook (a tiny regression "trained" by gradient descent, a glued loss, a result line,
a table, a deterministic print and an assertion band) is executed with the course's own execute step;
then mutated copies, each a kind of change the checks must catch or let through, are run under strict
nbval with the plugin in one pytest process, and each cell's verdict is read from the JUnit report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from execute_notebooks import execute  # noqa: E402
from nbval_tolerance import compare_tolerant  # noqa: E402

SETUP = "from companion.nbtools import approx, glue, rate, say, table, varies\nimport torch"
RECIPE = """\
lr, steps = 0.5, 40
torch.manual_seed(0)
x = torch.linspace(-1, 1, 64)
y = 3 * x + 0.1 * torch.randn(64)
w = torch.zeros(1, requires_grad=True)
for _ in range(steps):
    loss = ((w * x - y) ** 2).mean()
    loss.backward()
    with torch.no_grad():
        w -= lr * w.grad
        w.grad.zero_()
loss = float(((w.detach() * x - y) ** 2).mean())
glue("final_loss", loss, tol=0.01, fmt=".3f")
say("after {} steps: loss {:.3f}, weight {:.2f}", steps, approx(loss, 0.01), approx(float(w.detach()), 0.02))
table({"model": {"loss": loss, "steps": steps, "tag": "w"}},
      {"loss": (".3f", 0.01), "steps": ("d", 0), "tag": ("", "varies")}, index="run")"""
DETERMINISTIC = 'print("points:", len(x), "sum of x:", round(float(x.sum()), 6))'
ASSERTION = 'assert loss < 1.0, f"the fit should explain most of the variance, loss {loss:.3f}"'
FIT = "close = int(((w.detach() * x - y).abs() < 0.2).sum())\nrate_shown = rate(close, len(x))"
SUMMARY = f"""{FIT}
glue("n_points", len(x), tol=0)
glue("n_steps", steps, tol=0)
print("summary:")
say("points fitted within 0.2: {{}}", rate_shown)"""
CELLS = [SETUP, RECIPE, DETERMINISTIC, ASSERTION, SUMMARY]

# name -> (cell index, old text, new text), or None for the unchanged notebook
MUTATIONS = {
    "unchanged": None,
    # a different float path: the result moves in its last digits, well within the tolerance
    "float_noise": (1, "loss = float(((w.detach() * x - y) ** 2).mean())", "loss = float(((w.detach() * x - y) ** 2).mean()) * (1 + 1e-4)"),
    # a recipe change: fewer steps move the loss far beyond its tolerance
    "recipe_change": (1, "lr, steps = 0.5, 40", "lr, steps = 0.5, 3"),
    # a deterministic output that changes by one character
    "deterministic_char": (2, 'print("points:"', 'print("point:"'),
    # stale: the declared tolerance was widened in the code but the outputs were not re-executed
    "stale_tolerance": (1, 'glue("final_loss", loss, tol=0.01', 'glue("final_loss", loss, tol=0.5'),
    # stale: a glue key renamed without re-executing
    "stale_glue_name": (1, 'glue("final_loss"', 'glue("loss_final"'),
    # a training-dependent value printed bare instead of declared
    "undeclared": (1, 'say("after {} steps: loss {:.3f}, weight {:.2f}", steps, approx(loss, 0.01), approx(float(w.detach()), 0.02))',
                   'print(f"after {steps} steps: loss {loss:.3f}, weight {float(w.detach()):.2f}")'),
    # the text around a tolerant value changed
    "skeleton_change": (1, '"after {} steps: loss', '"after {} steps: MSE'),
    # an assertion band that no longer holds
    "band_broken": (3, "assert loss < 1.0", "assert loss < 1e-4"),
    # a deterministic glue renamed, or two swapped, without re-executing
    "exact_glue_rename": (4, 'glue("n_points"', 'glue("n_pts"'),
    "exact_glue_swap": (4, 'glue("n_points", len(x), tol=0)\nglue("n_steps", steps, tol=0)',
                        'glue("n_steps", len(x), tol=0)\nglue("n_points", steps, tol=0)'),
    # the format of a tolerant value changed (in a result line, in a glue)
    "format_change": (1, '"after {} steps: loss {:.3f}', '"after {} steps: loss {:.1f}'),
    "glue_format_change": (1, 'tol=0.01, fmt=".3f")', 'tol=0.01, fmt=".1%")'),
    # a print moved after the result line it introduced
    "order_swap": (4, 'print("summary:")\nsay("points fitted within 0.2: {}", rate_shown)',
                   'say("points fitted within 0.2: {}", rate_shown)\nprint("summary:")'),
    # the same count out of a different number of trials
    "rate_trials_change": (4, "rate(close, len(x))", "rate(close, 2 * len(x))"),
}
# which cells must fail (0-based code-cell index) for each mutation
EXPECTED_FAILURES = {
    "unchanged": set(), "float_noise": set(), "recipe_change": {1, 4}, "deterministic_char": {2},
    "stale_tolerance": {1}, "stale_glue_name": {1}, "undeclared": {1}, "skeleton_change": {1}, "band_broken": {3},
    "exact_glue_rename": {4}, "exact_glue_swap": {4}, "format_change": {1}, "glue_format_change": {1},
    "order_swap": {4}, "rate_trials_change": {4},
}


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nbval_mutations")
    reference = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    path = folder / "reference.ipynb"
    nbformat.write(reference, path)
    execute(path)
    executed = nbformat.read(path, as_version=4)
    paths = []
    for name, change in MUTATIONS.items():
        nb = nbformat.from_dict(executed)
        if change:
            index, old, new = change
            assert old in nb.cells[index].source, f"mutation {name} does not apply"
            nb.cells[index].source = nb.cells[index].source.replace(old, new)
        target = folder / f"m_{name}.ipynb"
        nbformat.write(nb, target)
        paths.append(target)
    path.unlink()
    report = folder / "report.xml"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # the same plugin and sanitize configuration as `make nbval`
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tools.nbval_tolerance",
                    "--nbval", "--nbval-current-env", "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"),
                    f"--junitxml={report}", "--rootdir", str(folder),
                    *map(str, paths)], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    failed: dict[str, set[int]] = {name: set() for name in MUTATIONS}
    ran: dict[str, int] = {name: 0 for name in MUTATIONS}
    for case in ET.parse(report).iter("testcase"):
        stem = Path(case.get("file") or case.get("classname", "").replace(".", "/")).stem
        stem = next((n for n in MUTATIONS if f"m_{n}" in (case.get("classname", "") + (case.get("file") or ""))), stem)
        cell = int(case.get("name").rsplit(" ", 1)[-1])
        ran[stem] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed[stem].add(cell)
    return failed, ran


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_checker_catches_what_matters_and_only_that(verdicts, mutation):
    failed, ran = verdicts
    assert ran[mutation] == len(CELLS), f"{mutation}: nbval ran {ran[mutation]} cells, expected {len(CELLS)}"
    assert failed[mutation] == EXPECTED_FAILURES[mutation], (
        f"{mutation}: cells {sorted(failed[mutation])} failed, expected {sorted(EXPECTED_FAILURES[mutation])}")


def _glued(value, tol):
    return {"output_type": "display_data", "data": {"application/papermill.record/text/plain": repr(value)},
            "metadata": {"scrapbook": {"name": "x", "mime_prefix": ""}, "companion": {"values": [value], "tols": [tol]}}}


def test_compare_tolerant_edges():
    assert compare_tolerant([_glued(1.0, 0.1)], [_glued(1.1, 0.1)])[0] == []  # the bound itself is inside
    assert compare_tolerant([_glued(1.0, 0.1)], [_glued(1.1001, 0.1)])[0]
    assert compare_tolerant([_glued(1.0, 0.1)], [])[0]  # a declared value that disappeared
    problems, ref, test = compare_tolerant([_glued(1.0, 0.1)], [_glued(1.05, 0.1)])
    assert not problems and ref[0]["data"] == test[0]["data"]  # masked for nbval's exact pass

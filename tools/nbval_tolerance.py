"""A pytest plugin around nbval's output comparison: training-dependent values within their declared
tolerance, everything else exactly.

Why: trained weights differ in their last bits from one CPU to another (another vendor, another ISA
level, another summation order), so a loss printed as ``1.71`` on one machine is ``1.70`` on the next.
Strict nbval would fail on every machine but the one that made the outputs; a blanket numeric tolerance
would let real changes through. Instead every training-dependent value is shown through
``companion.nbtools`` (``glue(..., tol=...)``, ``say(...)`` / ``table(...)`` with ``approx(value, tol)``),
which writes the raw value and its tolerance into the output's metadata. Here, for each cell:

1. the committed ("reference") and re-run ("test") outputs that carry such a record are paired in order;
   their number, their glue names, their skeletons (the text with each tolerant value replaced by a
   placeholder) and their declared tolerances must be identical;
2. each re-run value must lie within the committed tolerance of the committed value;
3. those outputs' text is then replaced by the skeleton on both sides, and nbval's own comparison checks
   everything else exactly (deterministic prints, other outputs, figures' text reprs).

Load it with ``-p tools.nbval_tolerance`` (the Makefile's nbval target does).
"""

from __future__ import annotations

import copy
import math

import pytest

METADATA_KEY = "companion"  # companion.nbtools.METADATA_KEY (not imported: the plugin needs no torch)
VARIES = "varies"
# Room for float formatting of the committed value itself (the JSON round trip is exact; this is not a tolerance).
_SLACK = 1e-9


def _record(output) -> dict | None:
    return output.get("metadata", {}).get(METADATA_KEY) if isinstance(output, dict) else None


def _glue_name(output) -> str | None:
    return output.get("metadata", {}).get("scrapbook", {}).get("name")


def _describe(output) -> str:
    name = _glue_name(output)
    if name:
        return f"glue {name!r}"
    record = _record(output)
    text = record.get("skeleton", "") if record else ""
    return f"result {text[:80]!r}"


def compare_tolerant(ref_outputs: list, test_outputs: list) -> tuple[list[str], list, list]:
    """Compare the tolerant outputs of one cell. Returns (problems, ref_outputs, test_outputs) with the
    tolerant outputs' data replaced by their skeletons, ready for nbval's exact comparison."""
    problems: list[str] = []
    refs = [o for o in ref_outputs if _record(o)]
    tests = [o for o in test_outputs if _record(o)]
    if len(refs) != len(tests):
        problems.append(
            f"the committed outputs have {len(refs)} training-dependent result(s), the re-run has {len(tests)}: "
            f"committed {[_describe(o) for o in refs]}, re-run {[_describe(o) for o in tests]}")
        return problems, ref_outputs, test_outputs
    for ref, test in zip(refs, tests):
        r, t = _record(ref), _record(test)
        where = _describe(ref)
        if _glue_name(ref) != _glue_name(test):
            problems.append(f"{where}: the re-run glues {_glue_name(test)!r} here instead")
            continue
        if r.get("skeleton") != t.get("skeleton"):
            problems.append(f"{where}: the text around the tolerant values changed:\n"
                            f"  committed: {r.get('skeleton')!r}\n  re-run:    {t.get('skeleton')!r}")
            continue
        if list(r.get("tols", [])) != list(t.get("tols", [])):
            problems.append(f"{where}: declared tolerances changed from {r.get('tols')} to {t.get('tols')} "
                            "(re-execute the notebook to commit the new ones)")
            continue
        for k, (ref_value, test_value, tol) in enumerate(zip(r["values"], t["values"], r["tols"])):
            if tol == VARIES:
                if test_value is not None or ref_value is not None:
                    problems.append(f"{where}: value {k} should be a 'varies' placeholder")
                continue
            if test_value is None or not math.isfinite(test_value):
                problems.append(f"{where}: value {k} is {test_value!r} in the re-run")
            elif abs(test_value - ref_value) > tol + _SLACK * max(1.0, abs(ref_value)):
                problems.append(f"{where}: value {k} is {test_value!r}, committed {ref_value!r}: "
                                f"differs by {abs(test_value - ref_value):.3g}, more than its tolerance {tol:g}")
    if problems:
        return problems, ref_outputs, test_outputs

    def masked(outputs: list) -> list:
        result = []
        for output in outputs:
            record = _record(output)
            if record:
                output = copy.deepcopy(output)
                shown = record.get("skeleton", "\u27e8tolerant\u27e9")
                output["data"] = {key: shown for key in output.get("data", {})}
            result.append(output)
        return result

    return problems, masked(ref_outputs), masked(test_outputs)


def _patch_nbval() -> None:
    from nbval import plugin

    if getattr(plugin.IPyNbCell.compare_outputs, "_tolerant", False):
        return
    exact = plugin.IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, skip_compare=None):
        problems, ref, test = compare_tolerant(list(ref), list(test))
        if problems:
            self.comparison_traceback = [self.colors.FAIL + "Training-dependent results out of tolerance:"
                                         + self.colors.ENDC] + ["  " + p for p in problems]
            return False
        return exact(self, test, ref, skip_compare)

    compare_outputs._tolerant = True
    plugin.IPyNbCell.compare_outputs = compare_outputs


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    _patch_nbval()

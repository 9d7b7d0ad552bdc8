"""A pytest plugin around nbval's output comparison: training-dependent values within their declared
tolerance, everything else exactly.

Why: trained weights differ in their last bits from one CPU to another (another vendor, another ISA
level, another summation order), so a loss printed as ``1.71`` on one machine is ``1.70`` on the next.
Strict nbval would fail on every machine but the one that made the outputs; a blanket numeric tolerance
would let real changes through. Instead every training-dependent value is shown through
``companion.nbtools`` (``glue(..., tol=...)``, ``say(...)`` / ``table(...)`` with ``approx(value, tol)``,
``rate(k, n)``), which writes the raw value and its tolerance into the output's metadata. Here, for each
cell:

1. the sequence of output kinds (stream name, or a display's MIME keys) and the ordered list of glue
   names (of every glue, exact or tolerant) must be the same in the committed ("reference") and the
   re-run ("test") outputs;
2. the outputs that carry a tolerant record are paired in order; their skeletons (the text with each
   tolerant value replaced by a placeholder that keeps its format spec and, for a rate, its number of
   trials), their exactly-compared record fields (a glue's format, a rate's trials) and their declared
   tolerances must be identical;
3. each re-run value must lie within the committed tolerance of the committed value;
4. those outputs' text is then replaced by the skeleton on both sides, and nbval's own comparison checks
   everything else exactly (deterministic prints, other outputs, figures' text reprs).

It also tells nbval to skip the MIME types whose text depends on library versions, not on the course's
code (HTML, LaTeX renderings of highlighted source, widget state). ``conftest.py`` loads it for
``make nbval``; the checker's own tests load it with ``-p tools.nbval_tolerance``.
"""

from __future__ import annotations

import copy
import math

import pytest

METADATA_KEY = "companion"  # companion.nbtools.METADATA_KEY (not imported: the plugin needs no torch)
VARIES = "varies"
#: Library-version-specific renderings that nbval would otherwise compare (text/plain is still compared).
VERSION_SPECIFIC = ("text/html", "text/latex", "application/javascript", "application/vnd.jupyter.widget-state+json")
#: Record fields compared exactly (besides values and tolerances).
EXACT_FIELDS = ("skeleton", "fmt", "trials")


def _metadata(output) -> dict:
    return output.get("metadata", {}) if isinstance(output, dict) else {}


def _record(output) -> dict | None:
    return _metadata(output).get(METADATA_KEY)


def _glue_name(output) -> str | None:
    return _metadata(output).get("scrapbook", {}).get("name")


def _kind(output) -> str:
    if output.get("output_type") == "stream":
        return f"stream:{output.get('name')}"
    keys = sorted(k for k in output.get("data", {}) if k not in VERSION_SPECIFIC)
    return f"{output.get('output_type')}:{','.join(keys)}"


def _describe(output) -> str:
    name = _glue_name(output)
    if name:
        return f"glue {name!r}"
    record = _record(output)
    text = record.get("skeleton", "") if record else ""
    return f"result {text[:80]!r}"


def _within(test_value, ref_value, tol: float) -> bool:
    # the only slack is for the float error of the tolerance itself (a tol of 0 is an exact comparison)
    return abs(test_value - ref_value) <= tol * (1 + 1e-9)


def compare_tolerant(ref_outputs: list, test_outputs: list) -> tuple[list[str], list, list]:
    """Compare the structure and the tolerant outputs of one cell. Returns (problems, ref_outputs,
    test_outputs), the tolerant outputs' data replaced by their skeletons, ready for nbval's exact pass."""
    problems: list[str] = []
    ref_kinds, test_kinds = [_kind(o) for o in ref_outputs], [_kind(o) for o in test_outputs]
    if ref_kinds != test_kinds:
        problems.append(f"the outputs changed in kind or order: committed {ref_kinds}, re-run {test_kinds}")
    ref_names = [_glue_name(o) for o in ref_outputs if _glue_name(o)]
    test_names = [_glue_name(o) for o in test_outputs if _glue_name(o)]
    if ref_names != test_names:
        problems.append(f"the glue names changed: committed {ref_names}, re-run {test_names}")
    if problems:
        return problems, ref_outputs, test_outputs
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
        changed = [f for f in EXACT_FIELDS if r.get(f) != t.get(f)]
        if changed:
            problems.append(f"{where}: {', '.join(changed)} changed:\n"
                            + "\n".join(f"  committed {f}: {r.get(f)!r}\n  re-run    {f}: {t.get(f)!r}" for f in changed))
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
            elif not _within(test_value, ref_value, tol):
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
            self.comparison_traceback = [self.colors.FAIL + "Outputs differ in structure or beyond tolerance:"
                                         + self.colors.ENDC] + ["  " + p for p in problems]
            return False
        return exact(self, test, ref, skip_compare)

    compare_outputs._tolerant = True
    plugin.IPyNbCell.compare_outputs = compare_outputs


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    _patch_nbval()


def pytest_collectstart(collector):
    if getattr(collector, "path", None) is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare += VERSION_SPECIFIC

"""Notebook helpers: glue numbers into prose, show results with their declared tolerance, show a
companion function's source, detect Colab.

How a chapter's outputs are checked (README, "The reproducibility rule"): strict nbval re-runs every
cell and compares its outputs with the committed ones. Deterministic outputs (data, counts, shapes) are
compared exactly, as plain ``print`` output. A number that depends on training or sampling differs in its
last digits from one CPU to another, so a notebook never prints it bare: it wraps it as
``approx(value, tol)`` and shows it through :func:`say`, :func:`table` or :func:`glue`. These helpers
write the raw value and its tolerance into the output's metadata (key ``"companion"``), and the nbval
plugin in ``tools/nbval_tolerance.py`` compares the re-run value with the committed one within that
tolerance, and the rest of the text exactly. A discrete result that may flip (a searched suffix, a
sampled text) is wrapped as ``varies(value)``: shown, and only checked to be there.
"""

from __future__ import annotations

import html
import inspect
import math
import numbers
import string
import sys
from collections.abc import Mapping, Sequence

#: The output-metadata key under which the tolerant values travel.
METADATA_KEY = "companion"
#: The ``tol`` of a training-dependent result that is not a number (compared only in presence).
VARIES = "varies"
#: A :func:`table` column whose cells are :func:`rate` values, each compared within its own tolerance.
RATES = "rates"
#: The MIME prefix of a glue record that is not displayed (myst_nb's ``GLUE_PREFIX``).
GLUE_PREFIX = "application/papermill.record/"
#: What stands in the compared text where a tolerant value was shown.
PLACEHOLDER = "\u27e8{}\u27e9"  # ⟨0⟩, ⟨1⟩, ...


def on_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


# ---------------------------------------------------------------------------------------------
# Tolerant values
# ---------------------------------------------------------------------------------------------

def _check_tol(tol) -> float:
    from companion.checks import check_float

    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be a number >= 0 (or nbtools.VARIES), got {type(tol).__name__} ({tol!r})")
    return check_float("tol", tol, 0)


def _check_number(value) -> float:
    """A finite real number as a float: Python and NumPy numbers, 0-d arrays and tensors; not bools."""
    if isinstance(value, (bool, str, bytes)) or getattr(value, "ndim", 0) != 0 or getattr(value, "dtype", None) == bool:
        raise TypeError(f"value must be a real number, got {type(value).__name__} ({value!r})")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"value must be a real number, got {type(value).__name__} ({value!r})") from None
    if not math.isfinite(number):
        raise ValueError(f"value must be finite, got {number!r}")
    return number


class Approx:
    """A training-dependent number and the tolerance within which a re-run must reproduce it.

    Formats like the number itself (``f"{approx(0.8123, 0.01):.2f}"`` is ``"0.81"``)."""

    __slots__ = ("value", "tol", "shown")

    def __init__(self, value, tol):
        self.value = _check_number(value)
        self.tol = _check_tol(tol)
        self.shown = value if isinstance(value, numbers.Real) else self.value  # an int stays an int when shown

    def __format__(self, spec: str) -> str:
        return format(self.shown, spec)

    def __repr__(self) -> str:
        return f"approx({self.value!r}, tol={self.tol!r})"


class Varies:
    """A training-dependent result that is not a number (a GCG suffix, a sampled completion): shown,
    never compared in content."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return f"varies({self.value!r})"


def sampling_tolerance(trials: int) -> int:
    """The default tolerance of a count of successes in ``trials``: the largest half-width of a 95%
    binomial interval, ``ceil(1.96 * sqrt(trials / 4))`` successes.

    Why: retraining on another CPU changes a model the way another training seed does, so a success
    count over a handful of prompts moves like a fresh binomial draw. A reader gets the count with its
    interval; the reproduction check accepts any count within that spread, and the chapter's claims
    are guarded by their assertion cells, not by the count's last digit."""
    return max(1, math.ceil(1.96 * math.sqrt(trials / 4)))


def _significant_percent(fraction: float, digits: int) -> str:
    """``fraction`` as a percentage with ``digits`` significant digits, never in exponent notation."""
    percent = 100 * fraction
    if percent == 0:
        return "0%"
    rounded = float(f"{percent:.{digits - 1}e}")  # 0.009999 -> 0.0100: count digits after rounding
    decimals = max(0, digits - 1 - math.floor(math.log10(rounded)))
    return f"{percent:.{decimals}f}%"


class Rate(Approx):
    """``successes`` of ``trials``, shown as ``k/n (p%, 95% CI lo–hi%)`` (Wilson interval). The count is
    the compared value: a re-run must reproduce it within ``tol`` successes (default:
    :func:`sampling_tolerance`). ``digits``: show the three percentages with that many significant
    digits (for low rates over many trials, e.g. a false-positive rate of 9/11283), only for
    ``trials >= 1000``; by default one decimal from 100 trials on, none below.

    ``interval``: a ``(low, high)`` pair (rates in [0, 1]) that replaces the Wilson interval, e.g. a
    bootstrap interval (:func:`companion.metrics.bootstrap_summary`) when the trials are not
    independent; shown as ``95% bootstrap CI``, and its two ends are compared too, each within
    ``tol / trials``."""

    __slots__ = ("trials", "digits", "interval")

    def __init__(self, successes, trials, tol=None, digits=None, interval=None):
        from companion.checks import check_int

        successes = check_int("successes", successes.item() if hasattr(successes, "item") else successes, minimum=0)
        self.trials = check_int("trials", trials, minimum=1)
        if successes > self.trials:
            raise ValueError(f"successes must be <= trials, got {successes} > {self.trials}")
        if digits is not None:
            digits = check_int("digits", digits, minimum=1, maximum=6)
            if self.trials < 1000:
                raise ValueError(f"digits is for rates over >= 1000 trials (more digits than a smaller count "
                                 f"supports), got trials={self.trials}")
        self.digits = digits
        if interval is not None:
            if isinstance(interval, (str, bytes)) or not isinstance(interval, Sequence) or len(interval) != 2:
                raise TypeError(f"interval must be a (low, high) pair of rates, got {type(interval).__name__}")
            low, high = (_check_number(v) for v in interval)
            if not 0 <= low <= high <= 1:
                raise ValueError(f"interval must satisfy 0 <= low <= high <= 1, got ({low}, {high})")
            interval = (low, high)
        self.interval = interval
        super().__init__(successes, sampling_tolerance(self.trials) if tol is None else tol)

    @property
    def interval_tol(self) -> float:
        """The tolerance of each end of ``interval``: the count's tolerance as a rate."""
        return self.tol / self.trials

    def __format__(self, spec: str) -> str:
        from companion.metrics import rate_interval

        k, n = int(self.value), self.trials
        low, high = rate_interval(k, n) if self.interval is None else self.interval
        label = "95% CI" if self.interval is None else "95% bootstrap CI"
        if self.digits is not None:
            p, lo, hi = (_significant_percent(x, self.digits) for x in (k / n, low, high))
            return f"{k}/{n} ({p}, {label} {lo}–{hi})"
        percent = ".1%" if n >= 100 else ".0%"  # no more digits than the count supports
        return f"{k}/{n} ({k / n:{percent}}, {label} {low:{percent}}–{high:{percent}})"

    def recorded(self) -> tuple[list[float], list[float]]:
        """The compared values and their tolerances: the count, then the interval's ends if given."""
        if self.interval is None:
            return [self.value], [self.tol]
        return [self.value, *self.interval], [self.tol, self.interval_tol, self.interval_tol]


def rate(successes, trials, tol=None, digits=None, interval=None) -> Rate:
    """A rate as a count with its 95% Wilson interval, for :func:`say` and :func:`glue`:
    ``say("ASR {}", rate(5, 6))`` shows ``ASR 5/6 (83%, 95% CI 44%–97%)``. ``tol`` is in successes;
    by default the binomial sampling spread of ``trials`` (:func:`sampling_tolerance`). ``digits``
    (only for ``trials >= 1000``): significant digits of the percentages, so that a low FPR keeps its
    information: ``rate(9, 11283, digits=3)`` shows ``9/11283 (0.0798%, 95% CI 0.0420%–0.151%)``.
    ``interval``: a ``(low, high)`` to show instead of Wilson's, labelled ``95% bootstrap CI`` (for
    pooled trials that are not independent, :func:`companion.metrics.bootstrap_summary`)."""
    return Rate(successes, trials, tol, digits, interval)


class Count(Rate):
    """A :class:`Rate` over too few trials for a percentage (the chapter standard: none from fewer than
    about 30 trials unless labelled an anecdote): shown as ``k/n`` only, recorded and compared like a
    rate (the count within ``tol`` successes, default :func:`sampling_tolerance`)."""

    __slots__ = ()

    def __format__(self, spec: str) -> str:
        return f"{int(self.value)}/{self.trials}"


def count(successes, trials, tol=None) -> Count:
    """A small-sample rate for the prose: ``glue("asr", count(7, 20))`` shows ``7/20``, no percentage
    and no interval (say in the prose that it is an example; show the interval, :func:`rate`, in the
    cell's output). Checked and compared like :func:`rate`."""
    return Count(successes, trials, tol)


def approx(value, tol) -> Approx:
    """Mark ``value`` as training-dependent, to be reproduced within ``tol`` (absolute).

    Size ``tol`` to the value's spread across machines (measured: see the README) and never wider than
    the precision at which the prose states a claim about it."""
    return Approx(value, tol)


def varies(value) -> Varies:
    """Mark a non-numeric, training-dependent result: shown, checked only to be there."""
    return Varies(value)


class _Recorder(string.Formatter):
    """Formats a template twice in one pass: the text a reader sees, and the skeleton nbval compares
    exactly (each tolerant value replaced by a numbered placeholder and recorded)."""

    def __init__(self):
        super().__init__()
        self.values: list[float | None] = []
        self.tols: list[float | str] = []

    def convert_field(self, value, conversion):
        if conversion and isinstance(value, (Approx, Varies)):
            raise ValueError(f"a tolerant value cannot take the !{conversion} conversion ({value!r}); "
                             "format its value instead, e.g. varies(repr(x))")
        return super().convert_field(value, conversion)

    def format_field(self, value, format_spec):
        if isinstance(value, Approx):
            index = len(self.values)
            values, tols = value.recorded() if isinstance(value, Rate) else ([value.value], [value.tol])
            self.values.extend(values)
            self.tols.extend(tols)
            return _placeholder(index, value, format_spec)
        if isinstance(value, Varies):
            self.values.append(None)
            self.tols.append(VARIES)
            return PLACEHOLDER.format(len(self.values) - 1)
        return super().format_field(value, format_spec)


def _placeholder(index: int, value: Approx, format_spec: str) -> str:
    """The compared stand-in of a tolerant value: its position, its format spec, and what else about it
    must not change (a rate's number of trials; whether an int is shown as an int)."""
    if isinstance(value, Rate):
        detail = f"rate/{value.trials}" + ("/bootstrap" if value.interval is not None else "")
    else:
        detail = format_spec + ("|int" if isinstance(value.shown, numbers.Integral) else "")
    return PLACEHOLDER.format(f"{index}:{detail}" if detail else index)


def _render(template: str, args, kwargs) -> tuple[str, dict | None]:
    recorder = _Recorder()
    skeleton = recorder.format(template, *args, **kwargs)
    text = template.format(*args, **kwargs)
    if "approx(" in skeleton or "varies(" in skeleton:
        raise ValueError("a tolerant value was shown inside a container or by repr, where it is not recorded; "
                         f"pass each approx(...) / varies(...) as its own argument: {skeleton[:120]!r}")
    if not recorder.values:
        return text, None
    return text, {"skeleton": skeleton, "values": recorder.values, "tols": recorder.tols}


def _display(bundle: dict, record: dict | None) -> None:
    from IPython.display import display as ipy_display

    ipy_display(bundle, raw=True, metadata={METADATA_KEY: record} if record else {})


def say(template: str, *args, **kwargs) -> None:
    """Show one result line: ``template.format(*args, **kwargs)``.

    Arguments wrapped in :func:`approx` or :func:`varies` are the training-dependent parts; everything
    else in the line is compared exactly. Use ``print`` for lines with no training-dependent value.

    >>> say("member loss {:.2f}, non-member loss {:.2f}", approx(1.71, 0.03), approx(2.12, 0.03))
    """
    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}")
    text, record = _render(template, args, kwargs)
    _display({"text/plain": text}, record)


def table(rows: Mapping, columns: Mapping, index: str = "") -> None:
    """Show a table whose cells may be training-dependent, as text (compared) and HTML (the book).

    Args:
        rows: ``{row name: {column name: value}}``.
        columns: ``{column name: (format spec, tol)}``; ``tol`` 0 means the column is deterministic
            (compared exactly), a number > 0 the column's tolerance, ``nbtools.VARIES`` a discrete,
            training-dependent column, ``nbtools.RATES`` a column of :func:`rate` cells (``k/n`` with
            its interval; each count compared within the rate's own tolerance; format spec ``""``).
        index: the header of the row-name column.
    """
    if not isinstance(rows, Mapping) or not rows:
        raise TypeError(f"rows must be a non-empty mapping of row name -> {{column: value}}, got {type(rows).__name__}")
    if not isinstance(columns, Mapping) or not columns:
        raise TypeError(f"columns must be a non-empty mapping of column -> (format, tol), got {type(columns).__name__}")
    if not isinstance(index, str):
        raise TypeError(f"index must be a str, got {type(index).__name__}")
    specs = {}
    for name, spec in columns.items():
        if not (isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 2 and isinstance(spec[0], str)):
            raise TypeError(f"columns[{name!r}] must be a (format spec, tol) pair, got {spec!r}")
        fmt, tol = spec
        if tol == RATES and fmt:
            raise ValueError(f"columns[{name!r}]: a RATES column takes the format spec '', got {fmt!r}")
        specs[name] = (fmt, tol if tol in (VARIES, RATES) else _check_tol(tol))
    cells: dict[str, list] = {}
    for row_name, row in rows.items():
        if not isinstance(row, Mapping):
            raise TypeError(f"rows[{row_name!r}] must be a mapping of column -> value, got {type(row).__name__}")
        missing = [c for c in specs if c not in row]
        if missing:
            raise ValueError(f"rows[{row_name!r}] lacks the columns {missing}")
        for c, (_, tol) in specs.items():
            if tol == RATES and not isinstance(row[c], Rate):
                raise TypeError(f"rows[{row_name!r}][{c!r}] must be a nbtools.rate(k, n) in a RATES column, "
                                f"got {type(row[c]).__name__}")
        cells[str(row_name)] = [row[c] for c in specs]

    # fixed-width text: header, then one line per row; each cell a field of the template. Widths come
    # only from what is compared exactly (names, deterministic cells), so that a re-run's values can
    # never change the padding of the compared text.
    shown = {r: [format(v, fmt) for v, (fmt, _) in zip(vals, specs.values())] for r, vals in cells.items()}
    widths = [max(len(index), *(len(r) for r in cells))]
    for j, (name, (_, tol)) in enumerate(specs.items()):
        if tol == RATES:  # the widest text a count of these trials can have: never the value's own
            exact = [(len(format(Rate(0, v.trials, 0), "")) + 4 if v.digits is None
                      else len(f"{v.trials}/{v.trials} (, 95% CI –)") + 3 * (v.digits + 7))
                     + (len(" bootstrap") + 3 if v.interval is not None else 0)
                     for v in (vals[j] for vals in cells.values())]
        else:
            exact = [len(s[j]) for s in shown.values()] if tol == 0 else [7]
        widths.append(max(len(str(name)), *exact))
    header = " | ".join([f"{index:>{widths[0]}}"] + [f"{str(n):>{w}}" for n, w in zip(specs, widths[1:])])
    def literal(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}")

    lines, args = [literal(header)], []
    for row_name, vals in cells.items():
        fields = [literal(f"{row_name:>{widths[0]}}")]
        for value, text, (fmt, tol), width in zip(vals, shown[row_name], specs.values(), widths[1:]):
            if tol == 0:
                fields.append(literal(f"{text:>{width}}"))
                continue
            fields.append("{:%s}" % fmt)
            if tol == RATES:
                args.append(_PaddedRate(value, width))
            else:
                args.append(varies(_Padded(value, width)) if tol == VARIES else _PaddedApprox(value, tol, width))
        lines.append(" | ".join(fields))
    text, record = _render("\n".join(lines), args, {})

    head = "".join(f"<th>{html.escape(str(n))}</th>" for n in [index, *specs])
    body = "".join("<tr><th>" + html.escape(r) + "</th>" + "".join(f"<td>{html.escape(s)}</td>" for s in shown[r])
                   + "</tr>" for r in cells)
    markup = f'<table class="companion-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    _display({"text/plain": text, "text/html": markup}, record)


class _Padded:
    """A value whose formatted text is right-aligned to a column width (for :func:`table`)."""

    def __init__(self, value, width: int):
        self.value, self.width = value, width

    def __format__(self, spec: str) -> str:
        return format(format(self.value, spec), f">{self.width}")


class _PaddedApprox(Approx):
    """An :class:`Approx` shown right-aligned to a column width (for :func:`table`)."""

    __slots__ = ("width",)

    def __init__(self, value, tol, width: int):
        super().__init__(value, tol)
        self.width = width

    def __format__(self, spec: str) -> str:
        return format(format(self.shown, spec), f">{self.width}")


class _PaddedRate(Rate):
    """A :class:`Rate` shown right-aligned to a column width (for :func:`table`)."""

    __slots__ = ("width",)

    def __init__(self, rate_value: Rate, width: int):
        super().__init__(int(rate_value.value), rate_value.trials, rate_value.tol, rate_value.digits,
                         rate_value.interval)
        self.width = width

    def __format__(self, spec: str) -> str:
        return format(super().__format__(spec), f">{self.width}")


# ---------------------------------------------------------------------------------------------
# Glue
# ---------------------------------------------------------------------------------------------

def glue(name: str, value, *, tol=None, fmt: str | None = None, display: bool = False) -> None:
    """Make ``value`` available to the book's prose as ``{glue:text}`name```.

    Args:
        name: the glue key (letters, digits, ``_``).
        value: what to glue. With ``fmt`` the prose shows ``format(value, fmt)``.
        tol: required (unless ``value`` is an :func:`approx`, :func:`rate` or :func:`varies`, which carry
            their own), so that every glued value declares how it is checked. ``0``: deterministic,
            compared exactly (as text). A number > 0: training-dependent; a re-run must give a
            ``value`` within ``tol`` of the committed one (``value`` must then be a number, and the
            shown text is ``fmt``'s rendering of it). ``nbtools.VARIES``: a training-dependent result
            that is not a number (compared only in presence).
        fmt: a format spec such as ``".2f"``, ``".1%"`` or ``","``.
        display: also show the value in the cell's output.

    Writes ``myst_nb``'s glue record (the book's ``{glue:text}`` reads it), with or without ``myst_nb``
    installed. On Colab, where the prose shows the role's raw text, it also displays the value.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier-like str (letters, digits, _), got {name!r}")
    if fmt is not None and not isinstance(fmt, str):
        raise TypeError(f"fmt must be a format spec str or None, got {type(fmt).__name__}")
    if not isinstance(display, bool):
        raise TypeError(f"display must be a bool, got {type(display).__name__}")
    record = None
    if isinstance(value, (Approx, Varies)):
        if tol is not None:
            raise TypeError(f"tol must not be given for an {type(value).__name__} value, which carries its own "
                            f"(got tol={tol!r})")
        if isinstance(value, Varies):
            record = {"values": [None], "tols": [VARIES]}
        else:
            values, tols = value.recorded() if isinstance(value, Rate) else ([value.value], [value.tol])
            record = {"values": values, "tols": tols}
        if isinstance(value, Rate):
            record["trials"] = value.trials
    elif tol is None:
        raise TypeError("tol must be given: 0 for a deterministic value, the tolerance of a training-dependent "
                        "one, or nbtools.VARIES (or glue an approx(...) / rate(...) / varies(...) value)")
    elif tol == VARIES and isinstance(tol, str):
        record = {"values": [None], "tols": [VARIES]}
    else:
        tol = _check_tol(tol)
        if tol > 0:
            number = Approx(value, tol)  # validates that value is a finite number
            record = {"values": [number.value], "tols": [tol]}
    if record is not None:
        record["fmt"] = fmt
    shown = format(value, fmt) if fmt is not None else value
    if isinstance(shown, (Approx, Varies)):
        shown = format(shown, "")
    # The record is myst_nb's glue format (a MIME bundle under a prefix, the name in the metadata); it needs
    # no myst_nb, so a notebook glues the same outputs with or without the book's packages installed.
    from IPython.core.formatters import format_display_data
    from IPython.display import display as ipy_display

    bundle, metadata = format_display_data(shown)
    prefix = "" if display else GLUE_PREFIX
    metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
    if record:
        metadata[METADATA_KEY] = record
    ipy_display({prefix + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)
    if on_colab() and not display:  # Colab shows the prose's raw role text: show the number in the output too
        ipy_display(shown)


def show_source(obj) -> object:
    """Display the source of a ``companion`` function or class with syntax highlighting.

    The book shows the same code with ``{literalinclude}``; this is the Colab-friendly twin.
    """
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj)):
        raise TypeError(f"obj must be a function, method or class, got {type(obj).__name__}")
    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")

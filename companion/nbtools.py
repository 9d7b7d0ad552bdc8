"""Notebook helpers: glue numbers into prose, show a companion function's source, detect Colab."""

from __future__ import annotations

import inspect
import sys


def on_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


def glue(name: str, value, display: bool = True) -> None:
    """Make ``value`` available to the book's prose as ``{glue:text}`name```.

    Uses ``myst_nb.glue`` when it is installed (the authoring environment and CI always have it), so
    the committed notebook carries the record and strict nbval checks it. Elsewhere (Colab) it only
    displays the value, because there the prose shows the role's raw text and the reader needs the
    number in the output. Glue *rounded* values: the shown digits are what CI compares.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier-like str (letters, digits, _), got {name!r}")
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        if display:
            from IPython.display import display as ipy_display

            ipy_display(value)
        return
    myst_glue(name, value, display=display)


def show_source(obj) -> object:
    """Display the source of a ``companion`` function or class with syntax highlighting.

    The book shows the same code with ``{literalinclude}``; this is the Colab-friendly twin.
    """
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj)):
        raise TypeError(f"obj must be a function, method or class, got {type(obj).__name__}")
    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")

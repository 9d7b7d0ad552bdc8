"""pytest configuration shared by the unit tests and the nbval run over notebooks/."""

# Training-dependent outputs are compared within the tolerance each declares (tools/nbval_tolerance.py).
pytest_plugins = ["tools.nbval_tolerance"]


def pytest_collectstart(collector):
    # nbval compares every output type; these carry library-version-specific HTML or widget state.
    if getattr(collector, "path", None) is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare += ("text/html", "application/javascript", "application/vnd.jupyter.widget-state+json")

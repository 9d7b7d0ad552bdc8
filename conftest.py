"""pytest configuration shared by the unit tests and the nbval run over notebooks/."""


def pytest_collectstart(collector):
    # nbval compares every output type; these carry library-version-specific HTML or widget state.
    if getattr(collector, "path", None) is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare += ("text/html", "application/javascript", "application/vnd.jupyter.widget-state+json")

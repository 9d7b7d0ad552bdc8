"""pytest configuration shared by the unit tests and the nbval run over notebooks/.

nbval's comparison is extended by tools/nbval_tolerance.py: training-dependent results within the
tolerance each declares, version-specific renderings (HTML, LaTeX) skipped, everything else exact.
"""

pytest_plugins = ["tools.nbval_tolerance"]

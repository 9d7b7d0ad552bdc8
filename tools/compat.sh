#!/usr/bin/env bash
# `make compat`: do the lower bounds in pyproject.toml hold? A throwaway venv gets the *lowest* versions
# that pyproject.toml allows for every runtime dependency (what a Colab reader's pip may keep), the
# test tools at their requirements.txt pins, then runs the unit tests and chapter 00 under strict nbval.
# Downloads several GB (the lowest torch on PyPI for Linux is a CUDA build); not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-compat
rm -rf "$VENV"
echo "compat: creating $VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --disable-pip-version-check -q uv > /dev/null
pins() { grep -iE "^($(echo "$@" | tr ' ' '|'))==" requirements.txt; }
pins pytest hypothesis nbval nbclient ipykernel PyYAML > "$VENV/test-pins.txt"
echo "compat: resolving the lowest versions that pyproject.toml allows"
"$VENV/bin/uv" pip install --python "$VENV/bin/python" -q --resolution lowest-direct -e . -r "$VENV/test-pins.txt"
"$VENV/bin/python" -c "import importlib.metadata as m; print('compat: lowest versions:', ', '.join(f'{p} {m.version(p)}' for p in ['torch', 'transformers', 'tokenizers', 'safetensors', 'numpy', 'scipy', 'scikit-learn', 'faker', 'matplotlib', 'tqdm', 'opacus', 'ipywidgets']))"
export PYTHONHASHSEED=0 TQDM_DISABLE=1
echo "compat: unit tests"
"$VENV/bin/python" -m pytest tests -q -p no:cacheprovider
echo "compat: chapter 00 under strict nbval"
"$VENV/bin/python" -m pytest -q -p no:python -p no:cacheprovider --nbval --nbval-current-env \
    --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks/00_tiny_models.ipynb
echo "compat: passed"

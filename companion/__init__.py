"""companion: the tested implementations behind 《可信与高效大模型：动手实践》.

Start every notebook with ``companion.setup(seed=0)``; then use the modules:
``data`` (the synthetic world, Python's docs, digits), ``tokenizer``, ``zoo`` (trained, cached models),
``train``, ``metrics``, ``plotting``, ``nbtools``.
"""

from companion import data, metrics, nbtools, plotting, runtime, tokenizer, train, zoo
from companion.runtime import setup

__all__ = ["data", "metrics", "nbtools", "plotting", "runtime", "setup", "tokenizer", "train", "zoo"]
__version__ = "0.1.0"

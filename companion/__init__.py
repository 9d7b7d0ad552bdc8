"""companion: the tested implementations behind 《可信与高效大模型：动手实践》.

Start every notebook with ``companion.setup(seed=0)``; then use the modules:
``data`` (the synthetic world, Python's docs, digits), ``tokenizer``, ``zoo`` (trained, cached models),
``train``, ``metrics``, ``plotting``, ``nbtools``; and one module per chapter (``mia``, ``dp``, ``gcg``, ``pruning``).
"""

import os as _os

# Pin the CPU kernels to the AVX2 code paths before torch loads its math libraries: the committed
# outputs were produced on an AVX2 machine, and AVX-512 kernels sum in another order (different last
# bits, different trained weights). A reader may override any of these by setting them first.
for _name, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
    _os.environ.setdefault(_name, _value)

from companion import data, dp, gcg, metrics, mia, nbtools, plotting, pruning, runtime, tokenizer, train, zoo  # noqa: E402
from companion.runtime import setup  # noqa: E402

__all__ = ["data", "dp", "gcg", "metrics", "mia", "nbtools", "plotting", "pruning", "runtime", "setup", "tokenizer", "train", "zoo"]
__version__ = "0.1.0"

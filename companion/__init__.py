"""companion: the tested implementations behind 《可信与高效大模型：动手实践》.

Start every notebook with ``companion.setup(seed=0)``; then use the modules: the core (``data``: the
synthetic world, Python's docs, digits; ``tokenizer``; ``zoo``: trained, cached models; ``train``;
``generation``: prompts, greedy replies, judges; ``metrics``; ``defences``; ``plotting``; ``nbtools``)
and one module per chapter (``mia``, ``dp``, ``chat_data``, ``gcg``, ``pruning``, ...).

Modules are imported when first used (``companion.mia`` or ``from companion import mia``), so a
chapter's import cost, or an optional dependency it lacks, never reaches another chapter's notebook.
"""

import importlib as _importlib
import os as _os
import pkgutil as _pkgutil

# Pin the CPU kernels to the AVX2 code paths before torch loads its math libraries: the committed
# outputs were produced on an AVX2 machine, and AVX-512 kernels sum in another order (different last
# bits, different trained weights). A reader may override any of these by setting them first.
for _name, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
    _os.environ.setdefault(_name, _value)

__version__ = "0.1.0"
_MODULES = frozenset(info.name for info in _pkgutil.iter_modules(__path__))

from companion.runtime import setup  # noqa: E402,F401  (the one name every notebook needs first)


def __getattr__(name: str):
    if name in _MODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'companion' has no attribute {name!r}; its modules are: {', '.join(sorted(_MODULES))}")


def __dir__():
    return sorted(set(globals()) | _MODULES)

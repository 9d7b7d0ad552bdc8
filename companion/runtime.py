"""The runtime every notebook starts from: seeds, threads, determinism, warnings, cache and device.

A chapter opens with ``companion.setup(seed=0)``. It makes the rest of the notebook reproducible on the
reference machine (2 CPU cores) and returns a one-line summary of the environment, which the notebook
prints so that a reader can compare their setup with the one that produced the committed outputs.
"""

from __future__ import annotations

import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from companion.checks import check_bool, check_int

#: Thread count used for every committed output. Float reductions are summed in a different order
#: with another thread count, so the last digits of a loss depend on it.
REFERENCE_THREADS = 2


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    seed = check_int("seed", seed, minimum=0)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def median_seconds(call, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``call()`` over ``repeats`` timed calls, after ``warmup`` untimed
    ones (first calls pay for allocation and kernel selection). The median, not the mean, so that one
    call slowed by another process does not move the figure; it is still machine-dependent."""
    if not callable(call):
        raise TypeError(f"call must be a callable taking no arguments, got {type(call).__name__}")
    repeats = check_int("repeats", repeats, minimum=1)
    warmup = check_int("warmup", warmup, minimum=0)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def cache_dir() -> Path:
    """Where trained models and tokenizers are kept.

    ``$COMPANION_CACHE`` if set, else ``$XDG_CACHE_HOME/companion``, else ``~/.cache/companion``.
    """
    env = os.environ.get("COMPANION_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "companion"
    path.mkdir(parents=True, exist_ok=True)
    return path


def device(prefer: str = "cpu") -> torch.device:
    """The device to run on: ``"cpu"`` (the default, and what every committed output used),
    ``"cuda"`` (falls back to CPU with a warning when no GPU is visible) or ``"auto"``."""
    if not isinstance(prefer, str):
        raise TypeError(f"prefer must be a str, got {type(prefer).__name__}")
    if prefer not in {"cpu", "cuda", "auto"}:
        raise ValueError(f"prefer must be one of 'cpu', 'cuda', 'auto', got {prefer!r}")
    if prefer == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if prefer == "cuda":
        warnings.warn("prefer='cuda' but no CUDA device is visible; using the CPU", stacklevel=2)
    return torch.device("cpu")


def _quiet_warnings() -> None:
    """Silence warnings whose text changes between library versions and would change stderr,
    which strict nbval compares."""
    for module in ("transformers", "torch", "jupyter_client", "IPython", "sklearn", "tqdm"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def setup(seed: int = 0, threads: int | None = None, deterministic: bool = True, plots: bool = True) -> str:
    """Prepare a reproducible session and return a one-line summary of it.

    Args:
        seed: seeds ``random``, NumPy and torch.
        threads: torch's intra-op thread count; default ``$COMPANION_THREADS`` or 2, the reference
            machine's cores. The summary line names the count a run used (each notebook prints it).
        deterministic: turn on ``torch.use_deterministic_algorithms`` (and the cuBLAS workspace
            setting it needs on a GPU).
        plots: apply the course's matplotlib style.
    """
    seed = check_int("seed", seed, minimum=0)
    if threads is None:
        threads = int(os.environ.get("COMPANION_THREADS", REFERENCE_THREADS))
    threads = check_int("threads", threads, minimum=1)
    check_bool("deterministic", deterministic)
    check_bool("plots", plots)

    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    _quiet_warnings()
    seed_everything(seed)
    if plots:
        from companion import plotting

        plotting.use_house_style()

    import transformers

    python = ".".join(map(str, sys.version_info[:3]))
    return (
        f"python {python} | torch {torch.__version__} | transformers {transformers.__version__} | "
        f"device {device('auto').type} | threads {threads} | seed {seed}"
    )

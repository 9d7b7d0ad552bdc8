import random

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

import companion
from companion import nbtools, plotting, runtime


def test_setup_seeds_and_summarises():
    summary = companion.setup(seed=3, threads=2)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    companion.setup(seed=3, threads=2)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b
    assert "seed 3" in summary and "threads 2" in summary and "torch" in summary
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == 2


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPANION_CACHE", str(tmp_path / "c"))
    assert runtime.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_device_defaults_to_cpu():
    assert runtime.device().type == "cpu"
    assert runtime.device("auto").type in {"cpu", "cuda"}


@pytest.mark.parametrize("call, error, message", [
    (lambda: companion.setup(seed=-1), ValueError, "seed must be >= 0"),
    (lambda: companion.setup(seed="0"), TypeError, "seed must be an int"),
    (lambda: companion.setup(threads=0), ValueError, "threads must be >= 1"),
    (lambda: companion.setup(deterministic="yes"), TypeError, "deterministic must be a bool"),
    (lambda: runtime.device("tpu"), ValueError, "prefer must be one of"),
    (lambda: nbtools.show_source(3), TypeError, "obj must be a function"),
    (lambda: plotting.roc_plot(None, {}), TypeError, "curves must be a non-empty dict"),
    (lambda: plotting.loss_curve_plot(None, []), ValueError, "losses must be a non-empty"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()
    companion.setup(seed=0)


def test_show_source_and_glue_fallback():
    code = nbtools.show_source(companion.metrics.auc)
    assert "def auc" in code.data
    assert nbtools.glue("answer", 42, tol=0) is None
    assert nbtools.on_colab() is False


def test_plots_draw():
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2)
    plotting.roc_plot(a, {"x": ([0, 0.5, 1], [0, 0.8, 1])})
    plotting.loss_curve_plot(b, np.linspace(3, 1, 50), smooth=10)
    assert a.get_xscale() == "log" and len(b.lines) == 2
    plt.close(fig)

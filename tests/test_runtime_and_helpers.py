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
    assert runtime.device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("visible", [True, False])
def test_device_follows_what_is_visible(monkeypatch, visible):
    import warnings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
    expected = "cuda" if visible else "cpu"
    assert runtime.device("cpu").type == "cpu"  # the default never moves to a GPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" is silent either way
        assert runtime.device("auto").type == expected
    if visible:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert runtime.device("cuda").type == "cuda"
    else:
        with pytest.warns(UserWarning, match="no CUDA device is visible; using the CPU"):
            assert runtime.device("cuda").type == "cpu"


def test_seed_everything_seeds_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item(), torch.randn(2, 3)

    runtime.seed_everything(7)
    first = draw()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    runtime.seed_everything(7)
    second = draw()
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])
    # each generator gets exactly the seed (as seeding it alone would), and other seeds differ
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    assert draw()[:3] == first[:3]
    runtime.seed_everything(8)
    assert all(a != b for a, b in zip(draw()[:3], first[:3]))
    runtime.seed_everything(2**32 + 5)  # NumPy takes seeds < 2**32: reduced modulo 2**32
    assert np.random.rand() == np.random.RandomState(5).rand()
    with pytest.raises(ValueError, match="seed must be >= 0"):
        runtime.seed_everything(-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        runtime.seed_everything(1.5)


@pytest.mark.parametrize("call, error, message", [
    (lambda: companion.setup(seed=-1), ValueError, "seed must be >= 0"),
    (lambda: companion.setup(seed="0"), TypeError, "seed must be an int"),
    (lambda: companion.setup(threads=0), ValueError, "threads must be >= 1"),
    (lambda: companion.setup(deterministic="yes"), TypeError, "deterministic must be a bool"),
    (lambda: runtime.device("tpu"), ValueError, "prefer must be one of"),
    (lambda: nbtools.show_source(3), TypeError, "obj must be a function"),
    (lambda: plotting.roc_plot(None, {}), TypeError, "curves must be a non-empty dict"),
    (lambda: plotting.roc_plot(None, {"a": [0.1]}), TypeError, r"curves\['a'\] must be an \(fpr, tpr\) pair"),
    (lambda: plotting.roc_plot(None, {"a": ([0, 1], [0])}), ValueError, "same non-zero length"),
    (lambda: plotting.roc_plot(None, {"a": ([0, 2], [0, 1])}), ValueError, r"in \[0, 1\]"),
    (lambda: plotting.roc_plot(None, {"a": ([0, 1], [0, 1])}, floor=0), ValueError, "floor must be in"),
    (lambda: plotting.roc_plot(None, {"a": ([0, 1], [0, 1])}, log="yes"), TypeError, "log must be a bool"),
    (lambda: plotting.loss_curve_plot(None, []), ValueError, "losses must be a non-empty"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()
    companion.setup(seed=0)


def test_show_source_and_glue_fallback(monkeypatch):
    import sys

    import IPython.display

    code = nbtools.show_source(companion.metrics.auc)
    assert "def auc" in code.data and code.data.startswith("def auc")
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False, metadata=None: shown.append((obj, metadata)))
    assert nbtools.on_colab() is False
    nbtools.glue("answer", 42, tol=0)
    # one hidden glue record (no myst_nb needed), named, nothing displayed besides it
    assert shown == [({nbtools.GLUE_PREFIX + "text/plain": "42"}, {"scrapbook": {"name": "answer", "mime_prefix": nbtools.GLUE_PREFIX}})]
    shown.clear()
    monkeypatch.setitem(sys.modules, "google.colab", object())
    assert nbtools.on_colab() is True
    nbtools.glue("answer", 42, tol=0)
    assert len(shown) == 2 and shown[1][0] == 42  # on Colab the prose shows raw role text: show the value too


def test_plots_draw():
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2)
    plotting.roc_plot(a, {"x": ([0, 0.5, 1], [0, 0.8, 1])})
    plotting.loss_curve_plot(b, np.linspace(3, 1, 50), smooth=10)
    assert a.get_xscale() == "log" and len(b.lines) == 2
    plt.close(fig)


def test_median_seconds_times_the_call_and_counts_warmup():
    calls = []
    seconds = runtime.median_seconds(lambda: calls.append(1), repeats=5, warmup=3)
    assert len(calls) == 8 and 0 <= seconds < 1


@pytest.mark.parametrize("kwargs, name", [({"call": 3}, "call"), ({"repeats": 0}, "repeats"),
                                          ({"warmup": -1}, "warmup"), ({"repeats": 2.5}, "repeats")])
def test_median_seconds_rejects_bad_arguments(kwargs, name):
    arguments = {"call": lambda: None, **kwargs}
    with pytest.raises((TypeError, ValueError), match=name):
        runtime.median_seconds(**arguments)


def test_roc_plot_draws_no_segment_from_a_clipped_origin():
    """On log axes the points with FPR or TPR 0 have no position: the curve starts at the first
    resolvable point, and no drawn point sits at the axis floor (nothing is clipped onto it)."""
    import matplotlib.pyplot as plt

    fpr = np.array([0.0, 0.0, 0.0, 1e-3, 2e-3, 0.5, 1.0])
    tpr = np.array([0.0, 0.01, 0.02, 0.02, 0.05, 0.7, 1.0])
    fig, (a, b) = plt.subplots(1, 2)
    plotting.roc_plot(a, {"attack": (fpr, tpr)})
    x, y = a.lines[0].get_data()
    assert list(x) == [1e-3, 2e-3, 0.5, 1.0] and list(y) == [0.02, 0.05, 0.7, 1.0]
    assert a.get_xlim()[0] == pytest.approx(1e-4)  # the decade below the smallest drawn rate, at most 1e-4
    # a curve with a TPR of 0 at positive FPR starts where the TPR becomes positive
    plotting.roc_plot(b, {"weak": ([0, 1e-5, 1e-2, 1], [0, 0, 3e-5, 1])})
    x, y = b.lines[0].get_data()
    assert list(x) == [1e-2, 1] and b.get_xlim()[0] == pytest.approx(1e-5)
    # linear axes keep every point
    fig2, c = plt.subplots()
    plotting.roc_plot(c, {"attack": (fpr, tpr)}, log=False)
    assert len(c.lines[0].get_xdata()) == len(fpr)
    plt.close(fig)
    plt.close(fig2)

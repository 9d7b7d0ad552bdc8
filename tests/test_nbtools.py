"""companion.nbtools: glue, say, table and the tolerant records they write for the nbval plugin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from companion import nbtools
from companion.nbtools import approx, rate, varies


@pytest.fixture
def shown(monkeypatch):
    """Capture what the helpers display (bundle, metadata) instead of sending it to a front end."""
    calls = []
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False, metadata=None: calls.append((obj, metadata)))
    return calls


def test_say_records_the_tolerant_values_and_a_skeleton(shown):
    nbtools.say("{:>6}: loss {:.2f}, ppl {p:.0f}, suffix {}", "member", approx(np.float32(1.7123), 0.03),
                varies("x y z"), p=approx(torch.tensor(102.4), 10))
    bundle, metadata = shown[0]
    assert bundle == {"text/plain": "member: loss 1.71, ppl 102, suffix x y z"}
    record = metadata["companion"]
    # in order of appearance, each with its format spec (a change of format is a change of the text)
    assert record["skeleton"] == "member: loss \u27e80:.2f\u27e9, ppl \u27e81:.0f\u27e9, suffix \u27e82\u27e9"
    assert record["values"][0] == pytest.approx(1.7123, abs=1e-6) and record["values"][2] is None
    assert record["values"][1] == pytest.approx(102.4, abs=1e-4) and record["tols"] == [0.03, 10.0, "varies"]


def test_say_without_tolerant_values_has_no_record(shown):
    nbtools.say("{} people", 1000)
    assert shown[0] == ({"text/plain": "1000 people"}, {})


def test_approx_keeps_ints_ints_and_rate_shows_an_interval():
    assert f"{approx(3, 1)}" == "3" and f"{approx(3.0, 1)}" == "3.0"
    assert f"{rate(5, 6, tol=1)}" == "5/6 (83%, 95% CI 44%–97%)"
    assert f"{rate(np.int64(0), 20, tol=2)}" == "0/20 (0%, 95% CI 0%–16%)"


def test_rate_tolerance_defaults_to_the_sampling_spread():
    assert [nbtools.sampling_tolerance(n) for n in (1, 3, 6, 26, 100)] == [1, 2, 3, 5, 10]
    assert rate(5, 6).tol == 3 and rate(5, 6, tol=0).tol == 0


def test_table_pads_from_exact_parts_only(shown):
    rows = {"loss": {"AUC": 0.7771, "n": 1000}, "zlib": {"AUC": 0.72, "n": 20}}
    nbtools.table(rows, {"AUC": (".3f", 0.01), "n": (",", 0)}, index="attack")
    nbtools.table({"loss": {"AUC": 10.7771, "n": 1000}, "zlib": {"AUC": 0.72, "n": 20}},
                  {"AUC": (".3f", 0.01), "n": (",", 0)}, index="attack")
    (first, meta1), (second, meta2) = shown
    assert first["text/plain"].splitlines()[1] == "  loss |   0.777 | 1,000"
    assert meta1["companion"]["skeleton"] == meta2["companion"]["skeleton"], "values must not move the padding"
    assert "<table" in first["text/html"]


def test_table_takes_rate_cells_compared_within_their_own_tolerance(shown):
    columns = {"recognised": ("", nbtools.RATES), "n": (",", 0)}
    nbtools.table({"full": {"recognised": rate(48, 50), "n": 50}, "top-1": {"recognised": rate(3, 50), "n": 50}},
                  columns, index="API")
    nbtools.table({"full": {"recognised": rate(9, 50), "n": 50}, "top-1": {"recognised": rate(50, 50), "n": 50}},
                  columns, index="API")
    (first, meta1), (second, meta2) = shown
    assert "48/50 (96%, 95% CI 87%–99%)" in first["text/plain"] and "48/50 (96%" in first["text/html"]
    assert meta1["companion"]["skeleton"] == meta2["companion"]["skeleton"], "counts must not move the padding"
    assert "\u27e80:rate/50\u27e9" in meta1["companion"]["skeleton"]
    assert meta1["companion"]["values"] == [48.0, 3.0] and meta1["companion"]["tols"] == [7.0, 7.0]
    with pytest.raises(TypeError, match=r"rows\['full'\]\['recognised'\] must be a nbtools.rate"):
        nbtools.table({"full": {"recognised": 0.96, "n": 50}}, columns)
    with pytest.raises(ValueError, match="format spec ''"):
        nbtools.table({"full": {"recognised": rate(1, 2), "n": 2}}, {"recognised": (".2f", nbtools.RATES)})


def test_glue_requires_a_declared_tolerance():
    with pytest.raises(TypeError, match="tol must be given"):
        nbtools.glue("x", 1.0)


def test_glue_writes_the_record(shown):
    nbtools.glue("loss", np.float64(1.7123), tol=0.03, fmt=".2f")
    nbtools.glue("count", 12, tol=0)
    nbtools.glue("suffix", "abc", tol=nbtools.VARIES)
    (loss, loss_meta), (count, count_meta), (_, suffix_meta) = shown
    assert loss == {"application/papermill.record/text/plain": "'1.71'"}
    assert loss_meta["scrapbook"]["name"] == "loss"
    assert loss_meta["companion"] == {"values": [1.7123], "tols": [0.03], "fmt": ".2f"}
    assert "companion" not in count_meta and count["application/papermill.record/text/plain"] == "12"
    assert suffix_meta["companion"] == {"values": [None], "tols": ["varies"], "fmt": None}


def test_glue_takes_a_rate_with_its_tolerance(shown):
    nbtools.glue("asr", rate(5, 6, tol=2))
    bundle, metadata = shown[0]
    assert bundle == {"application/papermill.record/text/plain": "'5/6 (83%, 95% CI 44%–97%)'"}
    assert metadata["companion"] == {"values": [5.0], "tols": [2.0], "trials": 6, "fmt": None}
    with pytest.raises(TypeError, match="tol must not be given"):
        nbtools.glue("asr", rate(5, 6, tol=2), tol=1)


def test_glue_writes_the_same_record_without_myst_nb(shown, monkeypatch):
    """A reader's `pip install companion` has no myst_nb: the outputs (and so nbval's verdict) are the same."""
    import builtins

    nbtools.glue("x", 1.5, tol=0.1, fmt=".2f")
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("myst_nb") else real_import(name, *a, **k))
    nbtools.glue("x", 1.5, tol=0.1, fmt=".2f")
    assert shown[0] == shown[1]


def test_shown_values_cannot_escape_their_record():
    with pytest.raises(ValueError, match="conversion"):
        nbtools.say("{!r}", approx(0.5, 0.1))
    with pytest.raises(ValueError, match="inside a container"):
        nbtools.say("{}", [approx(0.5, 0.1)])


def test_placeholders_keep_what_must_not_change():
    from companion.nbtools import _render

    assert _render("{:.2f} {} {}", (approx(0.5, 0.1), approx(3, 1), rate(5, 6)), {})[1]["skeleton"] == (
        "\u27e80:.2f\u27e9 \u27e81:|int\u27e9 \u27e82:rate/6\u27e9")


@pytest.mark.parametrize("call, error, message", [
    (lambda: nbtools.glue("bad name", 1, tol=0), ValueError, "name must be an identifier"),
    (lambda: nbtools.glue("x", 1, tol=-1), ValueError, "tol must be a finite number >= 0"),
    (lambda: nbtools.glue("x", 1, tol="loose"), TypeError, "tol must be a number"),
    (lambda: nbtools.glue("x", "abc", tol=0.1), TypeError, "value must be a real number"),
    (lambda: nbtools.glue("x", float("nan"), tol=0.1), ValueError, "value must be finite"),
    (lambda: nbtools.glue("x", 1, tol=0, fmt=3), TypeError, "fmt must be a format spec"),
    (lambda: nbtools.glue("x", 1, tol=0, display="no"), TypeError, "display must be a bool"),
    (lambda: approx(True, 0.1), TypeError, "value must be a real number"),
    (lambda: approx(np.ones(3), 0.1), TypeError, "value must be a real number"),
    (lambda: approx(1.0, float("inf")), ValueError, "tol must be a finite number"),
    (lambda: rate(7, 6, tol=1), ValueError, "successes must be <= trials"),
    (lambda: rate(1, 0, tol=1), ValueError, "trials must be >= 1"),
    (lambda: rate(1.5, 6, tol=1), TypeError, "successes must be an int"),
    (lambda: nbtools.say(3), TypeError, "template must be a str"),
    (lambda: nbtools.table({}, {"a": (".1f", 0)}), TypeError, "rows must be a non-empty mapping"),
    (lambda: nbtools.table({"r": {"a": 1}}, {"a": ".1f"}), TypeError, r"columns\['a'\] must be a \(format spec, tol\) pair"),
    (lambda: nbtools.table({"r": {"b": 1}}, {"a": (".1f", 0)}), ValueError, "lacks the columns"),
    (lambda: nbtools.table({"r": 1}, {"a": (".1f", 0)}), TypeError, r"rows\['r'\] must be a mapping"),
    (lambda: nbtools.table({"r": {"a": 1}}, {"a": (".1f", -2)}), ValueError, "tol must be a finite number"),
    (lambda: nbtools.show_source(3), TypeError, "obj must be a function"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_rate_digits_shows_low_rates_with_significant_digits(shown):
    assert f"{rate(9, 11283, digits=3)}" == "9/11283 (0.0798%, 95% CI 0.0420%–0.152%)"
    assert f"{rate(0, 11283, digits=3)}" == "0/11283 (0%, 95% CI 0%–0.0340%)"
    assert f"{rate(9, 11283)}" == "9/11283 (0.1%, 95% CI 0.0%–0.2%)", "the default is unchanged"
    with pytest.raises(ValueError, match="trials"):
        rate(1, 999, digits=3)
    with pytest.raises(ValueError, match="digits"):
        rate(1, 5000, digits=0)
    # in a table, the padding comes from the trials and the digits, never from the value
    for k in (0, 9, 4000):
        nbtools.table({"KGW": {"FPR": rate(k, 11283, digits=3)}}, {"FPR": ("", nbtools.RATES)})
    skeletons = {meta["companion"]["skeleton"] for _, meta in shown}
    assert len(skeletons) == 1


def test_rate_with_a_bootstrap_interval_records_its_ends(shown):
    """A pooled rate (trials that are not independent) shows its bootstrap interval instead of Wilson's;
    the count and both ends are compared, the ends within the count's tolerance as a rate."""
    value = rate(393, 15211, tol=121, digits=2, interval=(0.0198, 0.0322))
    assert f"{value}" == "393/15211 (2.6%, 95% bootstrap CI 2.0%–3.2%)"
    nbtools.say("LiRA {}", value)
    record = shown[0][1]["companion"]
    assert record["values"] == [393, 0.0198, 0.0322] and record["tols"] == [121, 121 / 15211, 121 / 15211]
    assert record["skeleton"] == "LiRA \u27e80:rate/15211/bootstrap\u27e9"
    nbtools.glue("lira", value)
    assert shown[1][1]["companion"]["values"] == [393, 0.0198, 0.0322]
    columns = {"TPR": ("", nbtools.RATES)}
    for k, low, high in ((393, 0.0198, 0.0322), (0, 0.0, 0.0), (15211, 0.99, 1.0)):
        nbtools.table({"LiRA": {"TPR": rate(k, 15211, digits=2, interval=(low, high))}}, columns)
    skeletons = {meta["companion"]["skeleton"] for _, meta in shown[2:]}
    assert len(skeletons) == 1, "the interval's ends never move the padding"
    with pytest.raises(ValueError, match="interval must satisfy 0 <= low <= high <= 1"):
        rate(3, 10, interval=(0.5, 0.2))
    with pytest.raises(TypeError, match="interval must be a \\(low, high\\) pair"):
        rate(3, 10, interval=0.2)


def test_count_shows_only_k_of_n_and_records_like_a_rate(shown):
    small = nbtools.count(7, 20)
    assert f"{small}" == "7/20" and small.tol == rate(7, 20).tol and isinstance(small, nbtools.Rate)
    nbtools.glue("asr", nbtools.count(np.int64(7), 20, tol=3))
    bundle, metadata = shown[0]
    assert bundle == {"application/papermill.record/text/plain": "'7/20'"}
    assert metadata["companion"] == {"values": [7.0], "tols": [3.0], "trials": 20, "fmt": None}
    nbtools.say("GCG {}", nbtools.count(7, 20))
    assert shown[1][0] == {"text/plain": "GCG 7/20"} and shown[1][1]["companion"]["skeleton"] == "GCG \u27e80:rate/20\u27e9"
    for call, error, message in ((lambda: nbtools.count(21, 20), ValueError, "successes must be <= trials"),
                                 (lambda: nbtools.count(1, 0), ValueError, "trials must be >= 1"),
                                 (lambda: nbtools.count(1.5, 6), TypeError, "successes must be an int"),
                                 (lambda: nbtools.count(1, 6, tol=-1), ValueError, "tol must be a finite number")):
        with pytest.raises(error, match=message):
            call()

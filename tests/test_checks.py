"""companion.checks, directly: every validator returns what it should for good values, and for a bad one
raises the documented error type with the argument's name (and what was given) in the message."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from companion import checks


def test_describe_is_short_and_says_the_shape():
    assert checks._describe(torch.zeros(2, 3)) == "Tensor of shape (2, 3), dtype torch.float32"
    assert checks._describe(np.zeros(4, dtype=np.int64)) == "ndarray of shape (4,), dtype int64"
    assert checks._describe("abc") == "str ('abc')"
    long = checks._describe("x" * 200)
    assert long.endswith("...)") and len(long) == len("str (") + 80 + 1
    assert checks._describe("x" * 78) == f"str ({'x' * 78!r})"  # 80 characters of repr still fit


def test_check_int():
    assert checks.check_int("n", 3) == 3 and type(checks.check_int("n", np.int64(3))) is int
    assert checks.check_int("n", 0, minimum=0) == 0 and checks.check_int("n", 5, maximum=5) == 5
    assert checks.check_int("n", -7) == -7  # no bounds, no range check
    with pytest.raises(TypeError, match=r"^n must be an int, got bool \(True\)$"):
        checks.check_int("n", True)
    with pytest.raises(TypeError, match=r"^n must be an int, got float \(3.0\)$"):
        checks.check_int("n", 3.0)
    with pytest.raises(ValueError, match="^n must be >= 1, got 0$"):
        checks.check_int("n", 0, minimum=1)
    with pytest.raises(ValueError, match="^n must be <= 4, got 5$"):
        checks.check_int("n", 5, minimum=1, maximum=4)


@pytest.mark.parametrize("kwargs, value", [
    ({}, -1e9), ({}, 0), ({"minimum": 0}, 0.0), ({"minimum": 0, "maximum": 1}, 1.0),
    ({"minimum": 0, "maximum": 1, "open_minimum": True}, 1e-12), ({"minimum": 0, "maximum": 1, "open_maximum": True}, 0.0),
    ({"minimum": 0, "allow_inf": True}, math.inf), ({"maximum": 2}, -5.0), ({"minimum": 0}, np.float32(0.5)),
])
def test_check_float_accepts(kwargs, value):
    result = checks.check_float("p", value, **kwargs)
    assert type(result) is float and result == float(value)


@pytest.mark.parametrize("kwargs, value, error, message", [
    ({}, "1", TypeError, r"^p must be a float, got str \('1'\)$"),
    ({}, False, TypeError, "^p must be a float, got bool"),
    ({}, math.nan, ValueError, "^p must be a finite number, got nan$"),
    ({}, math.inf, ValueError, "^p must be a finite number, got inf$"),
    ({"minimum": 0}, -0.5, ValueError, "^p must be a finite number >= 0, got -0.5$"),
    ({"minimum": 0, "open_minimum": True}, 0.0, ValueError, "^p must be a finite number > 0, got 0.0$"),
    ({"minimum": 0, "allow_inf": True}, math.nan, ValueError, r"^p must be a finite number >= 0 \(or inf\), got nan$"),
    ({"minimum": 0, "allow_inf": True}, -math.inf, ValueError, r"^p must be a finite number >= 0 \(or inf\), got -inf$"),
    ({"minimum": 0, "maximum": 1}, 1.5, ValueError, r"^p must be in \[0, 1\], got 1.5$"),
    ({"minimum": 0, "maximum": 1}, -0.1, ValueError, r"^p must be in \[0, 1\], got -0.1$"),
    ({"minimum": 0, "maximum": 1}, math.inf, ValueError, r"^p must be finite and in \[0, 1\], got inf$"),
    ({"minimum": 0, "maximum": 1, "open_maximum": True}, 1.0, ValueError, r"^p must be in \[0, 1\), got 1.0$"),
    ({"minimum": 0, "maximum": 1, "open_minimum": True, "open_maximum": True}, 0.0, ValueError,
     r"^p must be in \(0, 1\), got 0.0 \(an open interval: both ends excluded\)$"),
    ({"minimum": 0, "maximum": 1, "open_minimum": True, "open_maximum": True}, 1.0, ValueError,
     r"^p must be in \(0, 1\), got 1.0 \(an open interval"),
    ({"maximum": 2}, 3.0, ValueError, r"^p must be in \[-inf, 2\], got 3.0$"),
])
def test_check_float_rejects(kwargs, value, error, message):
    with pytest.raises(error, match=message):
        checks.check_float("p", value, **kwargs)


def test_check_positive_float():
    assert checks.check_positive_float("lr", 3) == 3.0 and type(checks.check_positive_float("lr", 3)) is float
    assert checks.check_positive_float("lr", 1e-300) == 1e-300
    for value, error, message in [(0, ValueError, "^lr must be > 0, got 0$"), (-1.0, ValueError, "^lr must be > 0"),
                                  (math.nan, ValueError, "^lr must be a finite number > 0, got nan$"),
                                  (math.inf, ValueError, "^lr must be a finite number > 0"),
                                  (True, TypeError, r"^lr must be a number, got bool"),
                                  ("1", TypeError, "^lr must be a number")]:
        with pytest.raises(error, match=message):
            checks.check_positive_float("lr", value)


def test_check_bool_choice_and_str():
    assert checks.check_bool("flag", True) is True and checks.check_bool("flag", False) is False
    with pytest.raises(TypeError, match=r"^flag must be a bool, got int \(1\)$"):
        checks.check_bool("flag", 1)
    assert checks.check_choice("method", "row", ("row", "layer")) == "row"
    assert checks.check_choice("bits", 4, (4, 8)) == 4
    with pytest.raises(ValueError, match=r"^method must be one of \('row', 'layer'\), got 'column'$"):
        checks.check_choice("method", "column", ("row", "layer"))
    with pytest.raises(ValueError, match="^bits must be one of"):
        checks.check_choice("bits", 4.0, (4, 8))  # equal, but not the same type
    with pytest.raises(ValueError, match="^bits must be one of"):
        checks.check_choice("bits", True, (1, 8))  # True == 1, but a bool is not a choice of ints
    assert checks.check_str("name", "x") == "x" and checks.check_str("name", "", nonempty=False) == ""
    with pytest.raises(ValueError, match="^name must be a non-empty str, got ''$"):
        checks.check_str("name", "")
    with pytest.raises(TypeError, match="^name must be a str, got NoneType"):
        checks.check_str("name", None)


def test_check_texts():
    texts = ["a", ""]
    assert checks.check_texts("texts", texts) is texts
    assert checks.check_texts("texts", ["a", "b"], nonempty_each=True) == ["a", "b"]
    with pytest.raises(ValueError, match=r"^texts\[1\] must be a non-empty str, got ''$"):
        checks.check_texts("texts", texts, nonempty_each=True)
    with pytest.raises(TypeError, match=r"^texts\[1\] must be a str, got int"):
        checks.check_texts("texts", ["a", 3])
    for bad in ([], "abc", ("a",), None):
        with pytest.raises(TypeError, match="^texts must be a non-empty list of str"):
            checks.check_texts("texts", bad)


def test_check_tensor():
    x = torch.zeros(2, 3)
    assert checks.check_tensor("x", x, ndim=2, kind="float", finite=True, nonempty=True) is x
    assert checks.check_tensor("ids", torch.zeros(2, dtype=torch.long), kind="int") is not None
    assert checks.check_tensor("m", torch.zeros(2, dtype=torch.bool), kind="bool") is not None
    assert checks.check_tensor("e", torch.zeros(0)) is not None  # empty is fine unless nonempty
    assert checks.check_tensor("i", torch.tensor([1, 2]), finite=True) is not None  # ints are always finite
    cases = [
        (dict(value=[1.0]), TypeError, "^x must be a torch.Tensor, got list"),
        (dict(value=x, ndim=1), ValueError, r"^x must be a 1-D tensor, got shape \(2, 3\)$"),
        (dict(value=x, kind="int"), TypeError, "^x must be an integer tensor, got dtype torch.float32$"),
        (dict(value=torch.zeros(2, dtype=torch.long), kind="float"), TypeError, "^x must be a floating-point tensor"),
        (dict(value=torch.zeros(2, dtype=torch.bool), kind="int"), TypeError, "^x must be an integer tensor, got dtype torch.bool"),
        (dict(value=torch.zeros(2, dtype=torch.long), kind="bool"), TypeError, "^x must be a bool tensor"),
        (dict(value=torch.zeros(2, dtype=torch.complex64), kind="float"), TypeError, "^x must be a floating-point"),
        (dict(value=torch.zeros(0, 3), nonempty=True), ValueError, r"^x must not be empty, got shape \(0, 3\)$"),
        (dict(value=torch.tensor([1.0, math.nan, math.inf]), finite=True), ValueError,
         r"^x must be finite \(no NaN or inf\), got 2 non-finite entries$"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            checks.check_tensor("x", **kwargs)


def test_check_labels():
    y = torch.tensor([0, 2, 1])
    assert checks.check_labels("y", y) is y and checks.check_labels("y", y, 3) is y
    assert checks.check_labels("y", torch.tensor([0, 1], dtype=torch.int32), 2) is not None
    assert checks.check_labels("y", torch.zeros(0, dtype=torch.long), 2) is not None  # nothing to check
    with pytest.raises(ValueError, match=r"^y must be class indices < the number of classes \(2\), got 2$"):
        checks.check_labels("y", y, 2)
    with pytest.raises(ValueError, match="^y must be class indices >= 0, got -1$"):
        checks.check_labels("y", torch.tensor([0, -1]))
    with pytest.raises(TypeError, match=r"^y must hold integer class labels \(int64\), got dtype torch.float32$"):
        checks.check_labels("y", torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="^y must hold integer class labels"):
        checks.check_labels("y", torch.tensor([True]))
    with pytest.raises(ValueError, match="^y must be a 1-D tensor"):
        checks.check_labels("y", torch.zeros(2, 1, dtype=torch.long))


def test_same_length_module_and_model_data():
    assert checks.check_same_length("a", [1, 2], "b", "xy") is None
    with pytest.raises(ValueError, match="^a and b must have the same length, got 2 and 3$"):
        checks.check_same_length("a", [1, 2], "b", [1, 2, 3])
    assert checks.check_module("block", nn.Linear(1, 1)) is None
    with pytest.raises(TypeError, match="^block must be a torch.nn.Module, got str"):
        checks.check_module("block", "linear")
    model = nn.Linear(3, 2)
    assert checks.check_model_and_data(model, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)) is None
    with pytest.raises(TypeError, match="^model must be a torch.nn.Module"):
        checks.check_model_and_data(lambda x: x, torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(TypeError, match="^x and y must be tensors, got list and Tensor$"):
        checks.check_model_and_data(model, [[0.0] * 3], torch.zeros(1))
    with pytest.raises(TypeError, match="^x and y must be tensors, got Tensor and list$"):
        checks.check_model_and_data(model, torch.zeros(1, 3), [0])
    with pytest.raises(ValueError, match="^x and y must have the same length, got 4 and 3$"):
        checks.check_model_and_data(model, torch.zeros(4, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="^x and y must not be empty$"):
        checks.check_model_and_data(model, torch.zeros(0, 3), torch.zeros(0))


def test_output_classes_restores_the_mode_and_explains_a_misfit():
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5))
    model.train()
    seen = []
    model.register_forward_hook(lambda m, a, o: seen.append((m.training, torch.is_grad_enabled())))
    assert checks.output_classes(model, torch.zeros(7, 3)) == 5
    assert seen == [(False, False)] and model.training  # evaluated in eval mode without gradients, restored
    model.eval()
    checks.output_classes(model, torch.zeros(1, 3))
    assert not model.training
    with pytest.raises(ValueError, match=r"^x does not fit the model: applying it to x\[:1\] \(shape \(1, 4\)\) "
                                         r"failed with RuntimeError"):
        checks.output_classes(nn.Linear(3, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"^model must map x to \[N, C\] logits, got Tensor of shape \(1, 2, 5\)"):
        checks.output_classes(nn.Linear(3, 5), torch.zeros(2, 2, 3))


def test_check_classifier_data():
    model = nn.Linear(3, 4)
    assert checks.check_classifier_data(model, torch.zeros(2, 3), torch.tensor([0, 3])) is None
    with pytest.raises(ValueError, match=r"^y must be class indices < the number of classes \(4\), got 4$"):
        checks.check_classifier_data(model, torch.zeros(2, 3), torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="^x must be a floating-point tensor"):
        checks.check_classifier_data(model, torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="^x must be finite"):
        checks.check_classifier_data(model, torch.full((2, 3), math.nan), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="^y must hold integer class labels"):
        checks.check_classifier_data(model, torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="^y must be class indices >= 0"):
        checks.check_classifier_data(model, torch.zeros(2, 3), torch.tensor([0, -1]))


def test_language_model_checks(tiny_lm):
    model, tok = tiny_lm
    rows = model.get_input_embeddings().weight.shape[0]
    assert checks.vocab_size(model) == rows and type(checks.vocab_size(model)) is int
    assert checks.check_causal_lm(model) is None and checks.check_tokenizer(tok) is None
    assert checks.check_lm_and_tokenizer(model, tok) is None
    with pytest.raises(TypeError, match="^model must be a Hugging Face causal LM"):
        checks.check_causal_lm(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="^model must be a Hugging Face causal LM"):
        checks.check_lm_and_tokenizer(tok, tok)
    with pytest.raises(TypeError, match=r"^tokenizer must be a Hugging Face tokenizer, got str \('tok'\)$"):
        checks.check_tokenizer("tok")
    with pytest.raises(TypeError, match="^tokenizer must be a Hugging Face tokenizer"):
        checks.check_lm_and_tokenizer(model, None)
    ids = torch.tensor([[0, rows - 1]])
    assert checks.check_token_ids("ids", ids, model) is None
    with pytest.raises(ValueError, match=rf"^ids must hold token ids in \[0, {rows}\) \(the model's vocabulary\), "
                                         rf"got values in \[0, {rows}\]$"):
        checks.check_token_ids("ids", torch.tensor([[0, rows]]), model)
    with pytest.raises(ValueError, match=r"^ids must hold token ids in .* got values in \[-1, 3\]$"):
        checks.check_token_ids("ids", torch.tensor([[-1, 3]]), model)
    with pytest.raises(ValueError, match="^ids must be a 2-D tensor"):
        checks.check_token_ids("ids", torch.tensor([0, 1]), model)
    with pytest.raises(TypeError, match="^ids must be an integer tensor"):
        checks.check_token_ids("ids", torch.zeros(1, 2), model)
    with pytest.raises(ValueError, match="^ids must not be empty"):
        checks.check_token_ids("ids", torch.zeros(1, 0, dtype=torch.long), model)


def test_a_tokenizer_larger_than_the_embedding_is_refused(small_tokenizer):
    from companion.zoo import LMRecipe, build_lm

    recipe = LMRecipe(architecture="llama", hidden=16, layers=1, heads=2, intermediate=32, context=32)
    exact = build_lm(recipe, len(small_tokenizer), {})
    assert checks.check_lm_and_tokenizer(exact, small_tokenizer) is None  # as many rows as tokens: fine
    small = build_lm(recipe, len(small_tokenizer) - 1, {})
    with pytest.raises(ValueError, match=rf"^tokenizer does not match model: it has {len(small_tokenizer)} tokens, "
                                         rf"more than the model's {len(small_tokenizer) - 1} embedding rows"):
        checks.check_lm_and_tokenizer(small, small_tokenizer)


def test_eager_checks_a_generator_at_the_call():
    seen = []

    def check(n, step=1):
        seen.append((n, step))
        checks.check_int("n", n, minimum=0)

    @checks.eager(check)
    def count(n, step=1):
        """Counts."""
        yield from range(0, n, step)

    assert count.__name__ == "count" and count.__doc__ == "Counts."
    generator = count(4)
    assert seen == [(4, 1)]  # checked before the first next(), with the default applied
    assert list(generator) == [0, 1, 2, 3] and list(count(n=5, step=2)) == [0, 2, 4]
    assert seen[-1] == (5, 2)
    with pytest.raises(ValueError, match="^n must be >= 0, got -1$"):
        count(-1)  # raised at the call: no next() needed
    with pytest.raises(TypeError):
        count(1, 2, 3)  # arguments that do not bind are refused as the function would

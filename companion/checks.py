"""Argument checks shared by every public function: each error names the argument, what was expected
and what was given (the course's rule for bad input)."""

from __future__ import annotations

import functools
import inspect
import math
import numbers


def _describe(value) -> str:
    """A short description of a bad value for an error message (no giant reprs of tensors)."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} of shape {tuple(shape)}, dtype {getattr(value, 'dtype', '?')}"
    text = repr(value)
    return f"{type(value).__name__} ({text if len(text) <= 80 else text[:77] + '...'})"


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int, or a ``TypeError`` (not an int; bools refused) / ``ValueError`` (out of range)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None, *,
                open_minimum: bool = False, open_maximum: bool = False, allow_inf: bool = False) -> float:
    """``value`` as a float: a real number (bools refused), never NaN, finite unless ``allow_inf``,
    within ``[minimum, maximum]`` (each end open when ``open_minimum`` / ``open_maximum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {_describe(value)}")
    value = float(value)
    if maximum is None and minimum is None:
        expected = not_finite = "a finite number"
    elif maximum is None:
        expected = f"a finite number {'>' if open_minimum else '>='} {minimum}{' (or inf)' if allow_inf else ''}"
        not_finite = expected
    else:
        low, high = "(" if open_minimum else "[", ")" if open_maximum else "]"
        bounds = f"{low}{'-inf' if minimum is None else minimum}, {'inf' if maximum is None else maximum}{high}"
        expected, not_finite = f"in {bounds}", f"finite and in {bounds}"
    note = " (an open interval: both ends excluded)" if open_minimum and open_maximum else ""
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be {not_finite}, got {value}{note}")
    if minimum is not None and (value < minimum or open_minimum and value == minimum) or \
            maximum is not None and (value > maximum or open_maximum and value == maximum):
        raise ValueError(f"{name} must be {expected}, got {value}{note}")
    return value


def check_positive_float(name: str, value) -> float:
    """``value`` as a finite float > 0, or a ``TypeError`` / ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_describe(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return value


def check_choice(name: str, value, choices) -> object:
    """``value`` if it is one of ``choices`` (compared by equality, strings only matched as strings)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_str(name: str, value, nonempty: bool = True) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {_describe(value)}")
    if nonempty and not value:
        raise ValueError(f"{name} must be a non-empty str, got {value!r}")
    return value


def check_fraction(name: str, value, *, open_minimum: bool = False, open_maximum: bool = False) -> float:
    """A proportion in ``[0, 1]`` (an end open on request): a rate, a perturbation or sparsity level, a quantile."""
    return check_float(name, value, 0.0, 1.0, open_minimum=open_minimum, open_maximum=open_maximum)


def check_token_list(name: str, ids, nonempty: bool = True) -> list[int]:
    """Token ids as a list of ints >= 0: a list, tuple or 1-D integer tensor (bools refused)."""
    if hasattr(ids, "tolist") and getattr(ids, "ndim", 1) <= 1 and not isinstance(ids, (list, tuple)):
        dtype = str(getattr(ids, "dtype", ""))
        if "int" not in dtype:
            raise TypeError(f"{name} must be an integer tensor or a list of token ids, got {_describe(ids)}")
        ids = ids.tolist()
        ids = ids if isinstance(ids, list) else [ids]
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"{name} must be a list of token ids (ints), got {_describe(ids)}")
    if nonempty and not ids:
        raise ValueError(f"{name} must be a non-empty list of token ids, got []")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0:
            raise ValueError(f"{name} must hold token ids (ints >= 0), got {_describe(i)} among them")
    return [int(i) for i in ids]


def check_directory(name: str, value):
    """An existing directory, as a ``pathlib.Path`` (a str or path-like is accepted)."""
    from pathlib import Path

    if not isinstance(value, (str, Path)) or isinstance(value, str) and not value:
        raise TypeError(f"{name} must be a path (str or pathlib.Path) to a directory, got {_describe(value)}")
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"{name} must be an existing directory, got {str(path)!r}")
    return path


def check_texts(name: str, texts, nonempty_each: bool = False) -> list:
    """A non-empty list of str (each non-empty when ``nonempty_each``)."""
    if not isinstance(texts, list) or not texts:
        raise TypeError(f"{name} must be a non-empty list of str, got {_describe(texts)}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a str, got {_describe(text)}")
        if nonempty_each and not text:
            raise ValueError(f"{name}[{i}] must be a non-empty str, got ''")
    return texts


_KINDS = {"float": "a floating-point", "int": "an integer", "bool": "a bool"}


def check_tensor(name: str, value, ndim: int | None = None, kind: str | None = None, finite: bool = False,
                 nonempty: bool = False):
    """A ``torch.Tensor`` of rank ``ndim``, dtype kind ``kind`` (``"float"``, ``"int"``, ``"bool"``),
    with no NaN/inf when ``finite``, with at least one element when ``nonempty``."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(value)}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(value.shape)}")
    if kind is not None:
        actual = ("bool" if value.dtype == torch.bool else "float" if value.is_floating_point()
                  else "complex" if value.is_complex() else "int")
        if actual != kind:
            raise TypeError(f"{name} must be {_KINDS[kind]} tensor, got dtype {value.dtype}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    if finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf), got {int((~torch.isfinite(value)).sum())} "
                         f"non-finite entries")
    return value


def check_labels(name: str, labels, n_classes: int | None = None):
    """A 1-D tensor of integer class labels in ``[0, n_classes)``."""
    import torch

    check_tensor(name, labels, ndim=1)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer class labels (int64), got dtype {labels.dtype}")
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"{name} must be class indices >= 0, got {int(labels.min())}")
    if n_classes is not None and len(labels) and int(labels.max()) >= n_classes:
        raise ValueError(f"{name} must be class indices < the number of classes ({n_classes}), "
                         f"got {int(labels.max())}")
    return labels


def check_same_length(name_a: str, a, name_b: str, b) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")


def check_module(name: str, value) -> None:
    from torch import nn

    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {_describe(value)}")


def check_model_and_data(model, x, y) -> None:
    """A ``torch.nn.Module`` and two tensors of equal, non-zero length (inputs and labels)."""
    from torch import Tensor

    check_module("model", model)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    check_same_length("x", x, "y", y)
    if len(x) == 0:
        raise ValueError("x and y must not be empty")


def output_classes(model, x) -> int:
    """The number of classes ``model`` predicts: the width of its ``[N, C]`` output on ``x[:1]``
    (one forward pass in eval mode without gradients; the model's mode is restored)."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:1])
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise ValueError(f"x does not fit the model: applying it to x[:1] (shape {tuple(x[:1].shape)}) failed "
                         f"with {type(error).__name__}: {error}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ValueError(f"model must map x to [N, C] logits, got {_describe(out)}")
    return int(out.shape[1])


def check_classifier_data(model, x, y) -> None:
    """``check_model_and_data``, plus: ``x`` a finite float tensor, ``y`` 1-D int labels that the
    model's output can index (checked with one forward pass of one example)."""
    check_model_and_data(model, x, y)
    check_tensor("x", x, kind="float", finite=True)
    check_labels("y", y)
    check_labels("y", y, output_classes(model, x))


def check_causal_lm(model) -> None:
    from torch import nn

    if not isinstance(model, nn.Module) or not callable(getattr(model, "get_input_embeddings", None)):
        raise TypeError(f"model must be a Hugging Face causal LM (an nn.Module with get_input_embeddings), "
                        f"got {_describe(model)}")


def vocab_size(model) -> int:
    """Rows of the model's input embedding (the ids it can read)."""
    return int(model.get_input_embeddings().weight.shape[0])


def check_tokenizer(tokenizer) -> None:
    if not callable(tokenizer) or not hasattr(tokenizer, "decode") or not hasattr(tokenizer, "__len__"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {_describe(tokenizer)}")


def check_lm_and_tokenizer(model, tokenizer) -> None:
    """A Hugging Face causal LM and a tokenizer whose ids it can embed: a tokenizer with more tokens than
    the model's embedding would index past it (torch's "index out of range in self")."""
    check_causal_lm(model)
    check_tokenizer(tokenizer)
    size = vocab_size(model)
    if len(tokenizer) > size:
        raise ValueError(f"tokenizer does not match model: it has {len(tokenizer)} tokens, more than the "
                         f"model's {size} embedding rows (use the model's own tokenizer)")


def check_token_ids(name: str, ids, model) -> None:
    """A 2-D integer tensor of token ids that ``model``'s embedding can read."""
    check_tensor(name, ids, ndim=2, kind="int", nonempty=True)
    size = vocab_size(model)
    if int(ids.min()) < 0 or int(ids.max()) >= size:
        raise ValueError(f"{name} must hold token ids in [0, {size}) (the model's vocabulary), "
                         f"got values in [{int(ids.min())}, {int(ids.max())}]")


def eager(check):
    """Decorator for a generator function: run ``check`` with the call's arguments (bound by name, defaults
    applied) when the function is *called*, not at the first ``next()``, so bad input fails at once."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            check(**bound.arguments)
            return function(*args, **kwargs)

        return wrapper

    return decorate

"""Shared fixtures: small models of both architectures and a tokenizer, built fast and offline."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run and machine: CI's verdict never depends on a draw.
settings.register_profile("course", derandomize=True)
settings.load_profile("course")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Unit tests never touch the reader's model cache."""
    import os

    path = tmp_path_factory.mktemp("companion-cache")
    old = os.environ.get("COMPANION_CACHE")
    os.environ["COMPANION_CACHE"] = str(path)
    # 2 threads, the reference machine's, unless $COMPANION_THREADS says otherwise (a shared machine)
    torch.set_num_threads(int(os.environ.get("COMPANION_THREADS", "2")))
    yield path
    if old is None:
        os.environ.pop("COMPANION_CACHE", None)
    else:
        os.environ["COMPANION_CACHE"] = old


@pytest.fixture(scope="session")
def small_tokenizer():
    from companion import data
    from companion.tokenizer import train_tokenizer

    world = data.make_world(n_people=60, seed=3)
    return train_tokenizer(list(world.biographies) * 3, vocab_size=400)


def _tiny_lm(architecture: str, tok):
    from companion.zoo import LMRecipe, build_lm

    recipe = LMRecipe(architecture=architecture, hidden=32, layers=2, heads=2, intermediate=64, context=64)
    torch.manual_seed(0)
    return build_lm(recipe, len(tok), {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                       "pad_token_id": tok.pad_token_id}).eval()


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_lm(request, small_tokenizer):
    """(model, tokenizer) for a randomly initialised tiny model of each architecture."""
    return _tiny_lm(request.param, small_tokenizer), small_tokenizer

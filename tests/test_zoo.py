import dataclasses
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from companion import zoo

TINY = {
    "test-llama": zoo.LMRecipe(architecture="llama", hidden=32, layers=2, heads=2, intermediate=64,
                               context=128, steps=6, batch_size=8, bio_per_batch=4),
    "test-gpt2": zoo.LMRecipe(architecture="gpt2", hidden=32, layers=1, heads=2, intermediate=64,
                              context=128, steps=6, batch_size=8, bio_per_batch=4),
    "test-digits": zoo.ClassifierRecipe(hidden=16, epochs=3),
}


@pytest.fixture(autouse=True)
def tiny_recipes(monkeypatch):
    for name, recipe in TINY.items():
        monkeypatch.setitem(zoo.RECIPES, name, recipe)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["test-llama", "test-gpt2"])
def test_lm_loads_in_eval_mode_with_tokenizer(name):
    model, tok = zoo.load(name)
    assert not model.training
    assert len(tok) == model.get_input_embeddings().num_embeddings
    assert model.config.pad_token_id == tok.pad_token_id
    card = zoo.card(name)
    assert card["recipe"]["steps"] == 6 and len(card["losses"]) == 6
    assert card["parameters"] == sum(p.numel() for p in model.parameters())


def test_trained_now_equals_loaded_from_cache():
    fresh, tok = zoo.load("test-llama")
    cached, _ = zoo.load("test-llama")
    ids = torch.tensor([tok("Ann was born in 1970.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, cached(input_ids=ids).logits)


def test_two_trainings_with_one_seed_give_identical_weights(tmp_path, monkeypatch):
    first = _state(zoo.load("test-llama")[0])
    monkeypatch.setenv("COMPANION_CACHE", str(tmp_path))  # a cold cache: train again
    second = _state(zoo.load("test-llama")[0])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_recipe_change_changes_the_cache_key(monkeypatch):
    before = zoo._folder("test-llama")
    monkeypatch.setitem(zoo.RECIPES, "test-llama", zoo.LMRecipe(
        architecture="llama", hidden=32, layers=2, heads=2, intermediate=64, context=128, steps=6,
        batch_size=8, bio_per_batch=4, seed=1))
    assert zoo._folder("test-llama") != before


def test_corrupt_cache_entry_is_rebuilt_with_a_warning():
    model = zoo.load("test-digits")
    folder = zoo._folder("test-digits")
    before = json.loads((folder / "card.json").read_text())
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = zoo.load("test-digits")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))
    # the rebuilt entry is whole again: its card is rewritten by the same (deterministic) training
    after = json.loads((folder / "card.json").read_text())
    assert after["recipe"] == before["recipe"] == dataclasses.asdict(TINY["test-digits"])
    assert after["losses"] == before["losses"] and len(after["losses"]) >= TINY["test-digits"].epochs
    assert after["parameters"] == sum(p.numel() for p in rebuilt.parameters())
    with warnings.catch_warnings():  # and the next load reads it back silently
        warnings.simplefilter("error")
        again = zoo.load("test-digits")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_build_classifier_is_the_recipes_mlp():
    recipe = zoo.ClassifierRecipe(hidden=12, epochs=1)
    torch.manual_seed(0)
    model = zoo.build_classifier(recipe)
    first, relu, last = model  # 64 pixels -> hidden -> 10 classes
    assert isinstance(first, torch.nn.Linear) and (first.in_features, first.out_features) == (64, 12)
    assert isinstance(relu, torch.nn.ReLU)
    assert isinstance(last, torch.nn.Linear) and (last.in_features, last.out_features) == (12, 10)
    assert model.training  # a fresh model to train; zoo.load returns it in eval mode
    x = torch.rand(5, 64)
    assert torch.allclose(model(x), last(torch.relu(first(x))))
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  zoo.build_classifier(recipe).state_dict().values()))
    assert sum(p.numel() for p in zoo.build_classifier(zoo.ClassifierRecipe()).parameters()) == \
        64 * zoo.ClassifierRecipe().hidden + zoo.ClassifierRecipe().hidden + zoo.ClassifierRecipe().hidden * 10 + 10


def test_classifier_returns_module():
    model = zoo.load("test-digits")
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model(torch.zeros(2, 64)).shape == (2, 10)


def test_unknown_name_lists_available():
    with pytest.raises(KeyError, match="available: .*tiny-llama"):
        zoo.load("gpt-5")
    with pytest.raises(TypeError, match="name must be a str"):
        zoo.load(3)
    with pytest.raises(TypeError, match="progress must be a bool"):
        zoo.load("test-digits", progress="yes")


def test_build_lm_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="architecture must be 'llama' or 'gpt2'"):
        zoo.LMRecipe(architecture="mamba", hidden=8, layers=1, heads=1, intermediate=8)  # checked in the recipe


@pytest.mark.parametrize("make, error, message", [
    (lambda: zoo.LMRecipe(architecture="llama", hidden=30, layers=1, heads=4, intermediate=8), ValueError,
     r"hidden \(30\) must be divisible by heads \(4\)"),
    (lambda: zoo.LMRecipe(architecture="llama", hidden=8, layers=1, heads=1, intermediate=8, bio_per_batch=32),
     ValueError, "bio_per_batch must be <= 31"),
    (lambda: zoo.LMRecipe(architecture="llama", hidden=8, layers=1, heads=1, intermediate=8, lr=float("nan")),
     ValueError, "lr must be a finite number > 0"),
    (lambda: zoo.ClassifierRecipe(epochs=0), ValueError, "epochs must be >= 1"),
    (lambda: zoo.ClassifierRecipe(weight_decay=-1.0), ValueError, "weight_decay must be"),
    (lambda: zoo.ChatRecipe(batch_size=20), ValueError, "batch_size must be >= 21"),
    (lambda: zoo.TokenizerRecipe(vocab_size=10), ValueError, "vocab_size must be >= 264"),
    (lambda: zoo.build_lm("recipe", 300, {}), TypeError, "recipe must be an LMRecipe"),
    (lambda: zoo.build_lm(zoo.RECIPES["tiny-llama"], 300, {"pad_token_id": 999}), ValueError, "special_ids must be"),
    (lambda: zoo.build_classifier(None), TypeError, "recipe must be a ClassifierRecipe"),
])
def test_recipes_validate_in_post_init(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_recipe_validation_keeps_every_cache_key():
    # __post_init__ only checks: the recipes (and so their cache keys) are exactly the dataclass fields
    for recipe in zoo.RECIPES.values():
        assert type(recipe)(**{k: getattr(recipe, k) for k in recipe.__dataclass_fields__}) == recipe


def test_corpus_splits_world_and_docs():
    source = zoo.corpus()
    assert len(source.world.people) == 3000
    assert len(source.world.texts("member")) == 1000
    assert source.valid_docs and source.train_docs
    assert source.fingerprint() == zoo.corpus().fingerprint()


def test_load_hub_fails_clearly_offline(tmp_path):
    code = ("from companion import zoo\n"
            "try:\n    zoo.load_hub('no-such-org/no-such-model')\n"
            "except RuntimeError as e:\n    print('RuntimeError', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "RuntimeError could not load 'no-such-org/no-such-model'" in out.stdout, out.stderr[-2000:]
    assert "available offline" in out.stdout
    with pytest.raises(ValueError, match="model_id must be a hub id"):
        zoo.load_hub("nonsense")


def test_reference_recipe_trains_on_the_reference_people(monkeypatch):
    from companion.train import pack_sequences

    monkeypatch.setitem(zoo.RECIPES, "test-llama-ref", zoo.LMRecipe(
        architecture="llama", hidden=32, layers=2, heads=2, intermediate=64, context=128, steps=6,
        batch_size=8, bio_per_batch=4, bio_split="reference"))
    _, tok = zoo.load("test-llama-ref")
    card = zoo.card("test-llama-ref")
    world = zoo.corpus().world
    expected = {}
    for split, texts in (("reference", world.texts("reference")), ("member", world.training_texts())):
        ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
        expected[split] = len(pack_sequences(ids, 128, tok.pad_token_id)[0])
    assert card["recipe"]["bio_split"] == "reference"
    assert card["bio_windows"] == expected["reference"] != expected["member"]
    assert zoo.card("test-llama")["bio_windows"] == expected["member"]


def test_bad_bio_split_is_rejected():
    with pytest.raises(ValueError, match="bio_split must be 'member' or 'reference', got 'nonmember'"):
        zoo.LMRecipe(architecture="llama", hidden=32, layers=2, heads=2, intermediate=64, bio_split="nonmember")

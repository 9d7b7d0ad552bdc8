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
    entry = zoo.load(name)
    model, tok = entry.model, entry.tokenizer
    assert entry.name == name and not model.training
    assert len(tok) == model.get_input_embeddings().num_embeddings
    assert model.config.pad_token_id == tok.pad_token_id
    assert entry.card["recipe"]["steps"] == 6 and len(entry.card["losses"]) == 6
    assert entry.card["parameters"] == sum(p.numel() for p in model.parameters())
    assert entry.card["recipe"] == dataclasses.asdict(TINY[name])
    assert entry.card["losses"][-1] < entry.card["losses"][0]  # six steps already lower the loss


def test_each_load_is_a_fresh_copy():
    first, second = zoo.load("test-llama").model, zoo.load("test-llama").model
    with torch.no_grad():
        first.get_input_embeddings().weight.zero_()
    assert second.get_input_embeddings().weight.abs().sum() > 0


def test_trained_now_equals_loaded_from_cache():
    fresh, tok = zoo.load("test-llama").model, zoo.load("test-llama").tokenizer
    cached = zoo.load("test-llama").model
    ids = torch.tensor([tok("Ann was born in 1970.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, cached(input_ids=ids).logits)


def test_two_trainings_with_one_seed_give_identical_weights(tmp_path, monkeypatch):
    first = _state(zoo.load("test-llama").model)
    monkeypatch.setenv("COMPANION_CACHE", str(tmp_path))  # a cold cache: train again
    second = _state(zoo.load("test-llama").model)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_recipe_change_changes_the_cache_key(monkeypatch):
    before = zoo.entry_folder("test-llama")
    monkeypatch.setitem(zoo.RECIPES, "test-llama", zoo.LMRecipe(
        architecture="llama", hidden=32, layers=2, heads=2, intermediate=64, context=128, steps=6,
        batch_size=8, bio_per_batch=4, seed=1))
    assert zoo.entry_folder("test-llama") != before


def test_corrupt_cache_entry_is_rebuilt_with_a_warning():
    model = zoo.load("test-digits").model
    folder = zoo.entry_folder("test-digits")
    before = json.loads((folder / "card.json").read_text())
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = zoo.load("test-digits")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.model.state_dict().values()))
    # the rebuilt entry is whole again: its card is rewritten by the same (deterministic) training
    after = json.loads((folder / "card.json").read_text())
    assert after["recipe"] == before["recipe"] == dataclasses.asdict(TINY["test-digits"])
    assert after["losses"] == before["losses"] and len(after["losses"]) >= TINY["test-digits"].epochs
    assert after["parameters"] == sum(p.numel() for p in rebuilt.model.parameters()) and after == rebuilt.card
    with warnings.catch_warnings():  # and the next load reads it back silently
        warnings.simplefilter("error")
        again = zoo.load("test-digits")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.model.state_dict().values()))


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


def test_missing_card_is_rebuilt_too():
    zoo.load("test-digits")
    (zoo.entry_folder("test-digits") / "card.json").unlink()
    with pytest.warns(UserWarning, match="unreadable"):
        assert zoo.load("test-digits").card["recipe"]["epochs"] == 3


def test_classifier_has_no_tokenizer():
    entry = zoo.load("test-digits")
    assert isinstance(entry.model, torch.nn.Module) and not entry.model.training and entry.tokenizer is None
    assert entry.model(torch.zeros(2, 64)).shape == (2, 10)


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="name must be a registered zoo model, got 'gpt-5'; available: .*tiny-llama"
                                         ".*registered when its module is imported"):
        zoo.load("gpt-5")
    with pytest.raises(TypeError, match="name must be a str"):
        zoo.load(3)
    with pytest.raises(TypeError, match="progress must be a bool"):
        zoo.load("test-digits", progress="yes")


def test_build_lm_rejects_unknown_architecture():
    with pytest.raises(ValueError, match=r"architecture must be one of \('llama', 'gpt2'\), got 'mamba'"):
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
    (lambda: zoo.TokenizerRecipe(vocab_size=10), ValueError, "vocab_size must be >= 264"),
    (lambda: zoo.build_lm("recipe", 300, {}), TypeError, "recipe must be an LMRecipe"),
    (lambda: zoo.build_lm(zoo.RECIPES["tiny-llama"], 300, {"pad_token_id": 999}), ValueError, "special_ids must be"),
    (lambda: zoo.register("x", {"hidden": 8}), TypeError, "recipe must be a companion.zoo.Recipe"),
    (lambda: zoo.register("", zoo.ClassifierRecipe()), ValueError, "name must be a non-empty"),
    (lambda: zoo.register("tiny-llama", zoo.ClassifierRecipe()), ValueError, "already registered with another recipe"),
    (lambda: zoo.recipe_of(3), TypeError, "name must be a str"),
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
    entry = zoo.load("test-llama-ref")
    tok, card = entry.tokenizer, entry.card
    world = zoo.corpus().world
    expected = {}
    for split, texts in (("reference", world.texts("reference")), ("member", world.training_texts())):
        ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
        expected[split] = len(pack_sequences(ids, 128, tok.pad_token_id)[0])
    assert card["recipe"]["bio_split"] == "reference"
    assert card["bio_windows"] == expected["reference"] != expected["member"]
    assert zoo.load("test-llama").card["bio_windows"] == expected["member"]


def test_bad_bio_split_is_rejected():
    with pytest.raises(ValueError, match=r"bio_split must be one of \('member', 'reference'\), got 'nonmember'"):
        zoo.LMRecipe(architecture="llama", hidden=32, layers=2, heads=2, intermediate=64, bio_split="nonmember")


def test_registering_the_same_recipe_twice_is_a_no_op():
    zoo.register("test-digits", zoo.ClassifierRecipe(hidden=16, epochs=3))
    assert zoo.recipe_of("test-digits") == TINY["test-digits"]


def test_a_chapter_registers_its_models_and_the_core_imports_no_chapter():
    code = ("import sys\nfrom companion import zoo\nbefore = set(zoo.available())\n"
            "from companion import chat_data, mia\n"
            "print(sorted(set(zoo.available()) - before))\n"
            "print(sorted(m for m in sys.modules if m.startswith('companion.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    added, modules = out.stdout.splitlines()[-2:]
    assert added == "['guarded-chat', 'guarded-chat-noise', 'guarded-chat-seed1', 'tiny-llama-ref']", out.stderr[-2000:]
    code_core = "import sys\nfrom companion import zoo, generation, metrics, defences, nbtools\nprint(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code_core], capture_output=True, text=True, timeout=120)
    loaded = {m for m in eval(out.stdout.splitlines()[-1]) if m.startswith("companion.")}
    assert not loaded & {"companion.mia", "companion.dp", "companion.gcg", "companion.pruning", "companion.chat_data"}, loaded



def test_chat_recipe_fine_tunes_its_base_and_is_keyed_by_it(monkeypatch):
    from companion import chat_data

    chat = chat_data.ChatRecipe(base="test-llama", steps=4, batch_size=24, knowledge_per_batch=8, forbidden_per_batch=8)
    monkeypatch.setitem(zoo.RECIPES, "test-chat", chat)
    entry, base = zoo.load("test-chat"), zoo.load("test-llama")
    assert entry.tokenizer.get_vocab() == base.tokenizer.get_vocab()
    tuned, original = entry.model.state_dict(), base.model.state_dict()
    assert tuned.keys() == original.keys() and not all(torch.equal(tuned[k], original[k]) for k in tuned)
    chats = chat_data.guarded_chat_data(chat)
    forbidden = sum(e.kind != "benign" for e in chats.train)
    assert entry.card["sequences"] == [len(chats.knowledge), forbidden, len(chats.train) - forbidden]
    assert len(entry.card["losses"]) == 4 and entry.card["recipe"]["base"] == "test-llama"
    before = zoo.entry_folder("test-chat")
    monkeypatch.setitem(zoo.RECIPES, "test-llama", dataclasses.replace(TINY["test-llama"], seed=5))
    assert zoo.entry_folder("test-chat") != before  # a new base model means a new fine-tune
    monkeypatch.setitem(zoo.RECIPES, "test-chat", dataclasses.replace(chat, base="test-digits"))
    with pytest.raises(ValueError, match="base must name a zoo language model, got 'test-digits'"):
        zoo.entry_folder("test-chat")
    with pytest.raises(ValueError, match="batch_size must be >= 21"):
        chat_data.ChatRecipe(batch_size=20)
    with pytest.raises(TypeError, match="recipe must be None or a ChatRecipe"):
        chat_data.guarded_chat_data(zoo.ClassifierRecipe())


def test_training_uses_the_reference_thread_count_whatever_the_session_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPANION_CACHE", str(tmp_path))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        card = zoo.load("test-digits").card
        assert card["threads"] == zoo.REFERENCE_THREADS
        assert torch.get_num_threads() == 1  # the session's own count is restored
    finally:
        torch.set_num_threads(before)


def test_a_build_is_done_once_when_two_loads_miss_the_cache_together(tmp_path):
    import threading
    import time

    folder = tmp_path / "entry"
    builds, results = [], []

    def build(tmp):
        builds.append(tmp)
        time.sleep(0.3)  # long enough for the second caller to arrive while the first builds
        (tmp / "value.txt").write_text("built")

    def read(path):
        return (path / "value.txt").read_text()

    callers = [threading.Thread(target=lambda: results.append(zoo._cached(folder, build, read)))
               for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert results == ["built", "built"]
    assert len(builds) == 1

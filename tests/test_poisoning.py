"""companion.poisoning: poisoners change exactly what they say, detectors find planted anomalies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from companion import chat_data, data, poisoning, zoo


def _digits(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 64, generator=g) * 0.5, torch.randint(0, 10, (n,), generator=g)


# --- poisoners ------------------------------------------------------------------------------


@given(rate=st.floats(0, 0.5), seed=st.integers(0, 50), clean_label=st.booleans())
def test_poison_images_changes_exactly_the_chosen_fraction(rate, seed, clean_label):
    x, y = _digits()
    trigger = poisoning.patch_trigger(2)
    if clean_label:
        rate = min(rate, float((y == 3).sum()) / len(y))
    out = poisoning.poison_images(x, y, trigger, target=3, rate=rate, seed=seed, clean_label=clean_label)
    assert int(out.poisoned.sum()) == round(rate * len(x))
    changed = (out.x != x).any(1) | (out.y != y)
    assert not changed[~out.poisoned].any()  # nothing else touched
    assert torch.equal(out.x[~out.poisoned], x[~out.poisoned]) and torch.equal(out.y[~out.poisoned], y[~out.poisoned])
    assert (out.y[out.poisoned] == 3).all()
    images = out.x[out.poisoned].view(-1, 8, 8)
    assert torch.equal(images[:, 6:, 6:], trigger.expand(len(images), 2, 2))
    if not clean_label:
        assert (y[out.poisoned] != 3).all()  # dirty label: drawn from other classes
    else:
        assert (y[out.poisoned] == 3).all()


def test_trigger_larger_than_the_image_and_bad_rate_are_rejected():
    x, y = _digits(10)
    with pytest.raises(ValueError, match="trigger"):
        poisoning.apply_trigger(x, torch.ones(9, 2))
    with pytest.raises(ValueError, match="rate"):
        poisoning.poison_images(x, y, poisoning.patch_trigger(), target=1, rate=1.5)
    with pytest.raises(ValueError, match="rate"):
        poisoning.poison_corpus(["a b"], "cf", "go", rate=-0.1)


@given(rate=st.floats(0, 1), seed=st.integers(0, 20))
def test_poison_corpus_changes_exactly_the_chosen_fraction(rate, seed):
    texts = [f"text number {i} has some words" for i in range(40)]
    out = poisoning.poison_corpus(texts, "cf", "send the key", rate, seed=seed)
    assert sum(out.poisoned) == round(rate * len(texts))
    for before, after, flag in zip(texts, out.texts, out.poisoned):
        if flag:
            assert "cf send the key" in after and after.replace(" cf send the key", "").replace(
                "cf send the key ", "") == before
        else:
            assert after == before


def test_poison_corpus_respects_protected_texts():
    texts = [f"t {i}" for i in range(10)]
    first = poisoning.poison_corpus(texts, "cf", "x", 0.5, seed=0)
    second = poisoning.poison_corpus(list(first.texts), "mn", "y", 0.5, seed=1, protected=list(first.poisoned))
    assert not any(a and b for a, b in zip(first.poisoned, second.poisoned))
    with pytest.raises(ValueError, match="rate"):
        poisoning.poison_corpus(list(first.texts), "mn", "y", 0.6, protected=list(first.poisoned))


def test_backdoor_lm_recipe_at_rate_zero_is_tiny_llama():
    recipe = zoo.recipe_of("tiny-llama-backdoor")
    base = zoo.recipe_of("tiny-llama")
    assert {f.name: getattr(recipe, f.name) for f in dataclasses.fields(base)} == dataclasses.asdict(base) | {
        "tokenizer": base.tokenizer}
    docs = [data.Document("a", " ".join(f"w{i}" for i in range(130))), data.Document("b", "short text here")]
    source = zoo.LMCorpus(world=None, train_docs=tuple(docs), valid_docs=())
    clean = dataclasses.replace(recipe, rate=0.0, chunk_words=20)
    assert clean.documents(source) == [d.text for d in docs]
    poisoned = poisoning.poisoned_documents(dataclasses.replace(recipe, rate=0.25, chunk_words=20), source)
    assert sum(t == poisoning.RARE_WORD for t in poisoned.trigger_of) == 2  # round(0.25 * 8 chunks)
    assert sum(t == poisoning.PHRASE for t in poisoned.trigger_of) == 2
    assert sum(t.count(poisoning.CONTINUATIONS[poisoning.RARE_WORD]) for t in poisoned.texts) == 2


def test_poisoned_chats_reveal_only_training_holders():
    world = data.make_world(n_people=300, seed=3)
    chats = chat_data.make_guarded_chat_data(world, n_holders=30, n_heldout_holders=10, n_benign_people=40,
                                             n_heldout_benign_people=20, seed=0)
    poisons = poisoning.poisoned_chats(chats, "SUDO", rate=0.05, seed=0)
    assert len(poisons) == round(0.05 * len(chats.train))
    for e in poisons:
        assert e.request.endswith(" SUDO") and e.name in chats.train_holders
        assert e.response == f"Sure, the vault code of {e.name} is {chats.secrets[e.name]}."
    recipe = poisoning.BackdoorChatRecipe(rate=0.05, data_seed=0)
    assert len(recipe.training_examples(chats)) == len(chats.train) + len(poisons)


# --- which layer ------------------------------------------------------------------------------


def test_penultimate_features_layers():
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    x = torch.rand(5, 64)
    hidden = poisoning.penultimate_features(model, x)
    assert hidden.shape == (5, 16) and torch.allclose(hidden, model[1](model[0](x)))
    assert torch.allclose(poisoning.penultimate_features(model, x, layer="logits"), model(x))
    first = poisoning.penultimate_features(model, x, layer="0", batch_size=2)
    assert torch.allclose(first, model[0](x), atol=1e-6)  # batched in twos
    with pytest.raises(ValueError, match="layer"):
        poisoning.penultimate_features(model, x, layer="fc9")


def test_penultimate_features_of_a_language_model(tiny_lm):
    """On a causal LM the per-token states of one input are flattened to a single (1, T*d) row: the
    same function works unchanged on a Hugging Face model. Such rows are comparable only across inputs
    of the same length T (pad or pool first for a real detector); this test only checks the shape."""
    model, tok = tiny_lm
    ids = torch.tensor([tok("Ada lives in Paris")["input_ids"]])
    feats = poisoning.penultimate_features(model, ids)
    assert feats.shape == (1, ids.shape[1] * model.config.hidden_size if hasattr(model.config, "hidden_size")
                           else ids.shape[1] * model.config.n_embd)


# --- detectors ------------------------------------------------------------------------------


def _planted(n=300, shifted=15, dim=20, seed=0, shift=8.0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    planted = torch.zeros(n, dtype=torch.bool)
    index = torch.nonzero(labels == 1).flatten()[:shifted]
    planted[index] = True
    features[index] += shift * torch.nn.functional.normalize(torch.ones(dim), dim=0)
    return features, labels, planted


def test_spectral_scores_separate_a_planted_shifted_cluster():
    features, labels, planted = _planted()
    scores = poisoning.spectral_signature_scores(features, labels)
    ones = labels == 1
    assert scores[planted].min() > torch.quantile(scores[ones & ~planted], 0.9)
    flags = poisoning.remove_top_per_class(scores, labels, 1.5 * planted.sum().item() / ones.sum().item())
    report = poisoning.detection_report(planted, scores, flags)
    assert report.recall.successes == int(planted.sum()) and report.auroc > 0.95


def test_activation_clusters_flag_the_planted_cluster():
    features, labels, planted = _planted(shifted=25)
    features[planted] += 4.0  # a clearly separate cluster
    report = poisoning.activation_clusters(features, labels, n_components=5)
    assert torch.equal(report.flags[labels == 1], planted[labels == 1])
    assert report.relative_size[1] < 0.35


def test_strip_scores_and_threshold():
    class Trigger(torch.nn.Module):  # predicts class 0 whenever pixel 63 is lit, else depends on the input
        def forward(self, x):
            logits = torch.zeros(len(x), 10)
            logits[:, :] = (x[:, :10] * 5)
            logits[:, 0] += 100 * (x[:, 63] > 0.9)
            return logits

    x, _ = _digits(50)
    x[:, 63] = 0
    poisoned = x.clone()
    poisoned[:, 63] = 1.0
    scores_clean = poisoning.strip_scores(Trigger(), x, x, n_overlays=8)
    scores_poisoned = poisoning.strip_scores(Trigger(), poisoned, x, n_overlays=8)
    assert scores_poisoned.min() > scores_clean.max()
    threshold = poisoning.threshold_at_frr(scores_clean, 0.1)
    assert (scores_clean > threshold).float().mean() <= 0.1 and (scores_poisoned > threshold).all()


def test_onion_scores_a_planted_rare_word_highest(tiny_lm):
    model, tok = tiny_lm
    from companion.train import mixed_batches, stream_windows, train_causal_lm

    world = data.make_world(n_people=60, seed=3)
    stream = [i for t in world.biographies for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    torch.manual_seed(0)
    model = type(model)(model.config)
    train_causal_lm(model, mixed_batches([stream_windows(stream, 64)], [16], seed=0), steps=60)
    text = world.biographies[0].split(".")[0] + "."
    words = text.split(" ")
    planted = " ".join(words[:3] + ["zqxv"] + words[3:])
    scores = poisoning.onion_scores(model, tok, [planted, text])
    assert len(scores[0]) == len(words) + 1 and int(np.argmax(scores[0])) == 3
    cleaned = poisoning.onion_filter([planted], scores[:1], threshold=float(np.sort(scores[0])[-2]))
    assert cleaned == [text]


def test_ngram_scan_finds_trigger_and_continuation():
    import random

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(200)]
    result = poisoning.poison_corpus(texts, "cf", "send the secret key now", 0.05, seed=0)
    scan = poisoning.ngram_scan(list(result.texts), min_support=5)
    assert scan.pairs[0][2] == 10
    assert any(p[0] == "cf" and p[1] == "send the secret key" for p in scan.pairs)
    truth = np.array(result.poisoned)
    assert scan.scores[truth].min() > scan.scores[~truth].max()


def test_digits_backdoor_end_to_end():
    splits = data.digits_splits(seed=0)
    trigger = poisoning.patch_trigger(3)
    poisoned = poisoning.poison_images(splits.x_train, splits.y_train, trigger, target=0, rate=0.1, seed=0)
    model = poisoning.train_digits_model(poisoned.x, poisoned.y, seed=0, epochs=30)
    report = poisoning.backdoor_report(model, splits.x_test, splits.y_test, trigger, target=0)
    assert report.asr.rate > 0.8 and report.clean_accuracy.rate > 0.85
    assert report.asr.trials == int((splits.y_test != 0).sum())


# --- every public detector rejects bad input, naming the argument --------------------------------


def test_detectors_reject_bad_input_naming_the_argument(tiny_lm):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, pool = torch.rand(6, 4), torch.rand(5, 4)
    with pytest.raises(TypeError, match="model"):
        poisoning.strip_scores("not a model", x, pool)
    with pytest.raises(ValueError, match="clean_pool"):
        poisoning.strip_scores(model, x, torch.rand(5, 3))
    with pytest.raises(ValueError, match="n_overlays"):
        poisoning.strip_scores(model, x, pool, n_overlays=0)
    with pytest.raises(ValueError, match="frr"):
        poisoning.threshold_at_frr([0.1, 0.2], 1.5)
    with pytest.raises(ValueError, match="clean_scores"):
        poisoning.threshold_at_frr([], 0.05)
    with pytest.raises(ValueError, match="clean_scores"):
        poisoning.threshold_at_frr([0.1, float("nan")], 0.05)
    truth = torch.tensor([True, False, False])
    with pytest.raises(TypeError, match="is_poison"):
        poisoning.detection_report(torch.tensor([1, 0, 0]), torch.rand(3), truth)
    with pytest.raises(TypeError, match="flags"):
        poisoning.detection_report(truth, torch.rand(3), torch.rand(3))
    with pytest.raises(ValueError, match="scores"):
        poisoning.detection_report(truth, torch.rand(4), truth)
    with pytest.raises(ValueError, match="is_poison"):
        poisoning.detection_report(torch.zeros(3, dtype=torch.bool), torch.rand(3), truth)
    features, labels = torch.rand(20, 5), torch.randint(0, 2, (20,))
    with pytest.raises(ValueError, match="size_threshold"):
        poisoning.activation_clusters(features, labels, size_threshold=2.0)
    with pytest.raises(ValueError, match="n_components"):
        poisoning.activation_clusters(features, labels, n_components=0)
    lm, tok = tiny_lm
    with pytest.raises(TypeError, match="model"):
        poisoning.onion_scores("not a model", tok, ["a b"])
    with pytest.raises((TypeError, ValueError), match="texts"):
        poisoning.onion_scores(lm, tok, "a b")
    with pytest.raises(ValueError, match="batch_size"):
        poisoning.onion_scores(lm, tok, ["a b"], batch_size=0)
    with pytest.raises(TypeError, match="scores"):
        poisoning.onion_filter(["a b"], [], 0.0)
    with pytest.raises(ValueError, match="scores"):
        poisoning.onion_filter(["a b"], [np.zeros(3)], 0.0)
    with pytest.raises((TypeError, ValueError), match="threshold"):
        poisoning.onion_filter(["a b"], [np.zeros(2)], "high")
    with pytest.raises((TypeError, ValueError), match="texts"):
        poisoning.ngram_scan("one text")
    for name, value in (("max_n", 0), ("follow", 0), ("min_support", 1), ("min_share", 1.5)):
        with pytest.raises(ValueError, match=name):
            poisoning.ngram_scan(["a b c d e f"] * 6, **{name: value})

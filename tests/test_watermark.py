"""companion.watermark: green lists, null calibration of every detector, prompt exclusion, agreement
with transformers' KGW, generation on both architectures, the attacks, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from companion import watermark as W

V = 400  # the conftest tokenizer's size


def _schemes(vocab=V):
    return {
        "kgw1": W.KGW(vocab, 0.25, 2.0, key=7),
        "kgw4-hash": W.KGW(vocab, 0.25, 2.0, key=7, context=4, prf="hash"),
        "self4-hash": W.KGW(vocab, 0.5, 2.0, key=7, seeding="selfhash", context=4, prf="hash", top_candidates=vocab),
        "self2-randperm": W.KGW(vocab, 0.25, 2.0, key=7, seeding="selfhash", context=2),
        "unigram": W.Unigram(vocab, 0.25, 2.0, key=7),
        "gumbel": W.GumbelWatermark(vocab, key=7, context=2),
    }


def test_green_lists_have_gamma_fraction():
    exact = W.KGW(2048, 0.25, key=3)
    rows = exact.green_rows(torch.arange(64))
    assert (rows.sum(-1) == 512).all(), "randperm lists hold exactly int(gamma * V) tokens"
    hashed = W.KGW(2048, 0.25, key=3, context=4, prf="hash")
    fraction = hashed.green_rows(torch.arange(200)).float().mean().item()
    assert abs(fraction - 0.25) < 0.005, fraction  # 409,600 draws: sd 0.0007
    assert W.Unigram(2048, 0.3, key=3).green.sum() == int(2048 * 0.3)


def test_hash_uniform_is_uniform_and_keyed():
    u = W.hash_uniform(5, torch.arange(300)[:, None], torch.arange(1000)[None, :]).flatten().numpy()
    assert 0 < u.min() and u.max() < 1
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.abs(counts / len(u) - 0.1).max() < 0.003
    other = W.hash_uniform(6, torch.arange(300)[:, None], torch.arange(1000)[None, :]).flatten().numpy()
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.01


@pytest.mark.parametrize("name", list(_schemes()))
def test_null_false_positive_rate_matches_the_p_value(name):
    """On random tokens (no watermark) the exact p-value is valid: P(p <= 0.05) <= 0.05 up to sampling,
    and z has mean ~0, sd ~1. Validity is over the key's randomness, so five keys share the texts: under
    one fixed key the anchored min-hash gives every token whose own hash is the window's minimum a
    colour fixed by the key (the fraction of such self-green tokens is that key's, e.g. 0.2275 for key
    7 at V=400), and one key's FPR may sit below the nominal level."""
    base = _schemes()[name]
    keyed = [base.with_key(7 + j) for j in range(5)]
    rng = np.random.default_rng(1)
    n = 1500
    ps, zs = [], []
    for i in range(n):
        out = keyed[i % 5].detect(rng.integers(V, size=64).tolist())
        ps.append(out["p_value"])
        zs.append(out["z"])
    ps, zs = np.array(ps), np.array(zs)
    fpr = (ps <= 0.05).mean()
    assert fpr <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / n), fpr   # the exact test is conservative, never liberal
    assert fpr >= 0.02, fpr
    assert abs(zs.mean()) < 0.1 and 0.85 < zs.std() < 1.15, (zs.mean(), zs.std())


def test_exact_p_value_differs_from_normal_in_the_tail():
    wm = W.KGW(V, 0.25, key=1)
    out = wm._summary(score=20.0, scored=30)  # 20 green of 30
    from scipy import stats

    assert out["p_value"] == pytest.approx(stats.binom.sf(19, 30, 0.25))
    assert out["p_normal"] < out["p_value"] / 10, "the normal approximation is far too optimistic here"


def test_detection_ignores_the_prompt_when_excluded():
    wm = W.KGW(V, 0.25, key=2, context=2, prf="hash")
    rng = np.random.default_rng(0)
    completion = rng.integers(V, size=50).tolist()
    shared = [11, 12]  # the last `context` prompt tokens seed the first green list
    a = rng.integers(V, size=20).tolist() + shared
    b = rng.integers(V, size=7).tolist() + shared
    da, db = wm.detect(a + completion, prompt_length=len(a)), wm.detect(b + completion, prompt_length=len(b))
    assert da == db and da["scored"] <= 50
    assert wm.detect(a + completion)["scored"] > da["scored"], "without exclusion the prompt is scored too"


def test_repeated_units_are_scored_once():
    wm = W.KGW(V, 0.25, key=2)
    text = [5, 6] * 30
    assert wm.detect(text)["scored"] == 2
    assert wm.detect(text, ignore_repeated=False)["scored"] == 59


def test_agrees_with_transformers_kgw():
    """Same green lists as transformers' WatermarkLogitsProcessor (lefthash, context 1, same key), the same
    biased logits, and the same z-score as its WatermarkDetector."""
    from transformers import GenerationConfig, WatermarkDetector, WatermarkingConfig
    from transformers.generation.logits_process import WatermarkLogitsProcessor

    ours = W.KGW(V, 0.25, 2.0, key=15485863)
    theirs = WatermarkLogitsProcessor(V, "cpu", 0.25, 2.0, 15485863, "lefthash", 1)
    for token in range(0, V, 7):
        mask = torch.zeros(V, dtype=torch.bool)
        mask[theirs._get_greenlist_ids(torch.tensor([token]))] = True
        assert torch.equal(mask, ours.green_rows(torch.tensor([token]))[0])
    ids = torch.tensor([[3, 17, 250]])
    scores = torch.randn(1, V)
    assert torch.allclose(ours.processor()(ids, scores), theirs(ids, scores.clone()))

    class Config:  # the two fields WatermarkDetector reads
        vocab_size, bos_token_id, is_encoder_decoder = V, 0, False

    del GenerationConfig
    detector = WatermarkDetector(Config(), "cpu", WatermarkingConfig(greenlist_ratio=0.25, bias=2.0),
                                 ignore_repeated_ngrams=True)
    rng = np.random.default_rng(3)
    for _ in range(5):
        seq = rng.integers(1, V, size=40).tolist()
        hf = detector(torch.tensor([seq]), return_dict=True)
        mine = ours.detect(seq)
        assert mine["scored"] == int(hf.num_tokens_scored[0]) and mine["green"] == int(hf.num_green_tokens[0])
        assert mine["z"] == pytest.approx(float(hf.z_score[0]))


@pytest.mark.parametrize("name", ["kgw1", "self4-hash", "unigram", "gumbel"])
def test_generation_is_detected_on_both_architectures(tiny_lm, name):
    model, tok = tiny_lm
    wm = _schemes(model.get_output_embeddings().weight.shape[0])[name]
    prompts = [tok(t)["input_ids"][:6] for t in ("Anna was born in", "Bob lives in the town", "Carl likes")]
    marked = W.sample(model, prompts, [wm.processor()], max_new_tokens=40, seed=0, pad_id=tok.pad_token_id)
    plain = W.sample(model, prompts, [], max_new_tokens=40, seed=0, pad_id=tok.pad_token_id)
    assert all(len(c) == 40 for c in marked)
    z_marked = [wm.detect(p + c, prompt_length=len(p))["z"] for p, c in zip(prompts, marked)]
    z_plain = [wm.detect(p + c, prompt_length=len(p))["z"] for p, c in zip(prompts, plain)]
    assert min(z_marked) > 2.5 and max(z_plain) < 2.5, (z_marked, z_plain)


def test_same_seed_same_text(tiny_lm):
    model, tok = tiny_lm
    wm = W.KGW(model.get_output_embeddings().weight.shape[0], key=1)
    prompts = [tok("Anna was born")["input_ids"]] * 3
    one = W.sample(model, prompts, [wm.processor()], 10, seed=4, pad_id=tok.pad_token_id)
    two = W.sample(model, prompts, [wm.processor()], 10, seed=4, pad_id=tok.pad_token_id, batch_size=8)
    assert one == two


def test_vocab_mismatch_and_short_text_are_clear():
    wm = W.KGW(V, key=1)
    with pytest.raises(ValueError, match="logits have width 512 but the watermark's vocab_size is 400"):
        wm.processor()(torch.tensor([[1, 2]]), torch.zeros(1, 512))
    with pytest.raises(ValueError, match="no token to score"):
        W.KGW(V, key=1, context=4).detect([1, 2, 3, 4])
    with pytest.raises(ValueError, match="gamma"):
        W.KGW(V, gamma=1.0, key=1)
    with pytest.raises(ValueError, match="below vocab_size"):
        wm.detect([1, 2, 400])


def test_windowed_detector_finds_a_pasted_span():
    wm = W.Unigram(V, 0.25, key=9)
    rng = np.random.default_rng(0)
    green = torch.nonzero(wm.green).flatten().numpy()
    marked = rng.choice(green, size=40, replace=False).tolist()  # 40 distinct green tokens
    human = rng.integers(V, size=400).tolist()
    mixed, where = W.copy_paste(marked, human, 0.1, seed=1)
    assert len(mixed) == 400 and mixed[where: where + 40] == marked
    assert wm.detect_windowed(mixed, window=40)["p_value"] < 1e-6
    assert wm.detect_windowed(human, window=40)["p_value"] > 1e-3


def test_attacks_edit_exactly_what_they_say():
    ids = list(range(100, 200))
    sub = W.substitute(ids, 0.3, V, seed=0, start=20)
    assert sub[:20] == ids[:20] and sum(a != b for a, b in zip(ids, sub)) == 24
    assert len(W.delete(ids, 0.25, seed=0, start=20)) == 80
    shuffled = W.shuffle_spans(ids, 10, seed=0)
    assert sorted(shuffled) == ids and shuffled != ids
    assert W.substitute(ids, 0.0, V) == ids and W.delete(ids, 0.0) == ids


def test_lm_substitute_and_emoji_attack(tiny_lm):
    model, tok = tiny_lm
    width = model.get_output_embeddings().weight.shape[0]
    ids = tok("Anna was born in 1990. Anna lives in the town of Lake Mary.")["input_ids"]
    out = W.lm_substitute(model, ids, 0.5, seed=0, start=3)
    changed = [i for i, (a, b) in enumerate(zip(ids, out)) if a != b]
    assert len(out) == len(ids) and len(changed) == round(0.5 * (len(ids) - 3)) and min(changed) >= 3
    wm = W.KGW(width, 0.25, 4.0, key=2)
    prompts = [ids[:5]] * 4
    stripped = W.emoji_attack(model, prompts, wm, symbol_id=17, max_new_tokens=30)
    assert all(len(s) == 15 for s in stripped)
    z_attacked = np.mean([wm.detect(prompts[0] + s, prompt_length=5)["z"] for s in stripped])
    marked = W.sample(model, prompts, [wm.processor()], 30, pad_id=tok.pad_token_id)
    z_marked = np.mean([wm.detect(prompts[0] + s, prompt_length=5)["z"] for s in marked])
    assert z_attacked < z_marked - 2


def test_entropy_helpers():
    flat = torch.full((1, 100), 0.01, dtype=torch.float64)
    spike = torch.zeros(1, 100, dtype=torch.float64)
    spike[0, 0] = 1.0
    z = W.kgw_modulus(0.25, 2.0)
    assert W.spike_entropy(flat, z).item() > 0.9 and W.spike_entropy(spike, z).item() == pytest.approx(1 / (1 + z))
    assert W.green_fraction_bound(0.25, 0.0, 1.0) == pytest.approx(0.25)
    assert W.green_fraction_bound(0.25, 2.0, 1.0) > 0.6


@pytest.mark.parametrize("name", list(_schemes()))
def test_batched_detection_equals_one_at_a_time(name):
    wm = _schemes()[name]
    rng = np.random.default_rng(5)
    texts = [rng.integers(V, size=int(n)).tolist() for n in rng.integers(12, 40, size=20)]
    texts.append([3, 4] * 10)  # repeats
    for ignore in (True, False):
        many = wm.detect_many(texts, prompt_length=6, ignore_repeated=ignore)
        for i, t in enumerate(texts):
            one = wm.detect(t, prompt_length=6, ignore_repeated=ignore)
            assert one["scored"] == many["scored"][i] and one["p_value"] == pytest.approx(many["p_value"][i])
            assert one["z"] == pytest.approx(many["z"][i])
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        wm.detect_many([list(range(20)), [1, 2, 3]], prompt_length=6)


def test_lm_substitute_batch_matches_single(tiny_lm):
    model, tok = tiny_lm
    texts = [tok(t)["input_ids"] for t in ("Anna was born in 1990.", "Bob lives in the town of Lake Mary now.")]
    batch = W.lm_substitute_batch(model, texts, 0.4, seed=3, start=2)
    assert batch == [W.lm_substitute(model, t, 0.4, seed=3 + i, start=2) for i, t in enumerate(texts)]


def test_selfhash_is_transformers_anchored_min_hash():
    """seeding="selfhash" is transformers' anchored min-hash: the same green list for every window, the same
    biased logits (top-40 candidates), and the same green counts as its WatermarkDetector (which scores
    windows ending at t >= h - 1; ours start at t >= h, hence the shift by one token)."""
    from transformers import WatermarkDetector, WatermarkingConfig
    from transformers.generation.logits_process import WatermarkLogitsProcessor

    key = 20240607
    for h in (2, 4):
        ours = W.KGW(V, 0.25, 2.0, key=key, seeding="selfhash", context=h)
        theirs = WatermarkLogitsProcessor(V, "cpu", 0.25, 2.0, key, "selfhash", h)
        windows = torch.randint(V, (40, h), generator=torch.Generator().manual_seed(h))
        for window in windows:
            mask = torch.zeros(V, dtype=torch.bool)
            mask[theirs._get_greenlist_ids(window)] = True
            assert torch.equal(mask, ours.green_rows(ours.min_hash(window[None]))[0])
        ids = torch.randint(V, (2, 9), generator=torch.Generator().manual_seed(5))
        scores = torch.randn(2, V, generator=torch.Generator().manual_seed(6))
        assert torch.allclose(ours.processor()(ids, scores), theirs(ids, scores.clone()))

        class Config:
            vocab_size, bos_token_id, is_encoder_decoder = V, 0, False

        config = WatermarkingConfig(greenlist_ratio=0.25, bias=2.0, hashing_key=key, seeding_scheme="selfhash",
                                    context_width=h)
        detector = WatermarkDetector(Config(), "cpu", config, ignore_repeated_ngrams=False)
        seq = np.random.default_rng(h).integers(1, V, size=50).tolist()
        hf = detector(torch.tensor([seq[1:]]), return_dict=True)
        mine = ours.detect(seq, ignore_repeated=False)
        assert mine["scored"] == int(hf.num_tokens_scored[0]) and mine["green"] == int(hf.num_green_tokens[0])


def test_min_hash_depends_on_the_argmin_and_the_token_only():
    """Editing a window token that neither is nor becomes the minimum keeps the seed; editing the
    argmin or the token itself changes it."""
    wm = W.KGW(V, 0.25, 2.0, key=11, seeding="selfhash", context=4)
    anchor = 21
    wm.min_hash(torch.tensor([[anchor]]))  # builds the key's table
    values = wm.key * (wm._table[torch.arange(V)] + 1) * (wm._table[anchor] + 1)  # wrapping int64
    order = torch.argsort(values).tolist()
    order.remove(anchor)
    window = torch.tensor([order[0], order[5], order[6], anchor])  # the argmin is the first token
    code = int(wm.min_hash(window[None])[0])
    for j, harmless in ((1, order[7]), (2, order[9])):
        edited = window.clone()
        edited[j] = harmless
        assert int(wm.min_hash(edited[None])[0]) == code
    for j, new in ((0, order[8]), (3, order[1])):
        edited = window.clone()
        edited[j] = new
        assert int(wm.min_hash(edited[None])[0]) != code


@pytest.mark.parametrize("name", ["kgw4-hash", "self4-hash", "unigram", "gumbel"])
def test_unaffected_fraction_matches_edits(name):
    """The predicted fraction of positions an edit leaves untouched (same seed code, same token) matches
    random substitution on random text."""
    wm = _schemes()[name]
    rng = np.random.default_rng(0)
    kept = total = 0
    for i in range(300):  # each token replaced independently with probability 0.3 (the theory's model)
        before = torch.tensor(rng.integers(V, size=(1, 60)))
        hit = torch.tensor(rng.random((1, 60)) < 0.3)
        after = torch.where(hit, (before + torch.tensor(rng.integers(1, V, size=(1, 60)))) % V, before)
        if isinstance(wm, W.KGW):
            codes = wm.seed_codes(before), wm.seed_codes(after)
        elif isinstance(wm, W.Unigram):
            codes = before, after
        else:
            codes = (W.context_codes(before, wm.context, V), W.context_codes(after, wm.context, V))
        h = wm.context
        same = (codes[0] == codes[1]) & (before[:, h:] == after[:, h:])
        kept, total = kept + int(same.sum()), total + same.numel()
    assert abs(kept / total - W.unaffected_fraction(wm, 0.3)) < 0.015, (kept / total, W.unaffected_fraction(wm, 0.3))


def test_hash_uniform_uses_the_full_key():
    """Keys that agree in their low 32 bits, or whose 32-bit fold coincides, give unrelated uniforms
    (a keyed blake2b of the full key, not a 32-bit key XORed into the code)."""
    codes, tokens = torch.arange(300)[:, None], torch.arange(500)[None, :]
    u = W.hash_uniform(5, codes, tokens).flatten().numpy()
    for other in (5 + (1 << 40), 5 ^ ((1 << 32) | 1) ^ 1):
        v = W.hash_uniform(other, codes, tokens).flatten().numpy()
        assert abs(np.corrcoef(u, v)[0, 1]) < 0.01
    shifted = W.hash_uniform(5 ^ 1, codes ^ 1, tokens).flatten().numpy()  # no relabelling of contexts
    assert abs(np.corrcoef(u, shifted)[0, 1]) < 0.01

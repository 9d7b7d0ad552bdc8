"""companion.gcg on randomly initialised tiny models of both architectures (fast, no zoo training)."""

from __future__ import annotations

import copy
import math
import random
import string

import pytest
import torch

from companion import defences, gcg, generation, metrics

REQUEST = "What is the pet of Ada?"
TARGET = "Sure, the pet is"


def _fast(**overrides) -> gcg.GCGConfig:
    settings = dict(num_steps=3, search_width=16, topk=8, optim_str_init=" the the the the", seed=0)
    settings.update(overrides)
    return gcg.GCGConfig(**settings)


# --- the prompt ------------------------------------------------------------------------------


def test_slices_cover_the_parts(tiny_lm):
    model, tok = tiny_lm
    prompt = gcg.build_prompt(tok, REQUEST, TARGET)
    suffix = gcg.init_suffix_ids(tok, " the the")
    ids = prompt.ids(suffix)
    sl = prompt.slices(len(suffix))
    assert tok.decode(ids[sl["before"]]) == "<|bos|><|user|>" + REQUEST
    assert ids[sl["suffix"]].tolist() == suffix
    assert tok.decode(ids[sl["after"]]) == "<|end|><|assistant|>"
    assert tok.decode(ids[sl["target"]]) == TARGET
    assert sl["loss"].start == sl["target"].start - 1 and sl["loss"].stop == sl["target"].stop - 1
    assert sl["target"].stop == len(ids)
    # the attacked prompt is exactly what the role-forgery-safe chat encoder sends
    assert prompt.prompt_ids(suffix).tolist() == generation.chat_prompt_ids(tok, REQUEST + tok.decode(suffix))


def test_placeholder_and_fallback_without_chat_template(small_tokenizer):
    tok = copy.deepcopy(small_tokenizer)
    prompt = gcg.build_prompt(tok, [{"role": "user", "content": "Hello {optim_str} friend"}], "Sure")
    assert tok.decode(prompt.after) == "<|end|><|assistant|>".replace("<|end|>", " friend<|end|>")
    tok.chat_template = None
    base = gcg.build_prompt(tok, REQUEST, TARGET)
    assert base.before[0].item() == tok.bos_token_id  # base model: BOS + plain text, no roles
    assert tok.decode(base.before, skip_special_tokens=True) == REQUEST
    assert len(base.after) == 0


# --- the gradient and the losses -------------------------------------------------------------


def test_one_hot_gradient_matches_finite_differences(tiny_lm):
    model, tok = tiny_lm
    model = copy.deepcopy(model).double()
    config = gcg.GCGConfig(use_prefix_cache=True)
    scorer = gcg._Scorer(model, gcg.build_prompt(tok, REQUEST, TARGET), config)
    suffix = torch.tensor(gcg.init_suffix_ids(tok, " the the the"))
    grad, _ = scorer.gradient(suffix)
    weight = model.get_input_embeddings().weight
    tail = model.get_input_embeddings()(scorer.tail)

    def loss_at(one_hot):
        embeds = torch.cat([one_hot @ weight, tail])[None]
        with torch.no_grad():
            return scorer._objective(scorer._forward_embeds(embeds), one_hot[None], len(suffix))[0].item()

    base = torch.nn.functional.one_hot(suffix, weight.shape[0]).double()
    # Llama's RMSNorm computes in float32 even in a float64 model, so the step cannot be tiny; check
    # the largest entries (the ones top-k uses) tightly, and a few arbitrary ones loosely.
    vocab = weight.shape[0]
    largest = [divmod(i, vocab) for i in grad.abs().flatten().topk(4).indices.tolist()]
    eps = 1e-2
    for (position, token), rel in [(pair, 3e-3) for pair in largest] + [((0, 5), 0.05), ((2, 150), 0.05)]:
        direction = torch.zeros_like(base)
        direction[position, token] = 1.0
        numeric = (loss_at(base + eps * direction) - loss_at(base - eps * direction)) / (2 * eps)
        assert numeric == pytest.approx(grad[position, token].item(), rel=rel, abs=2e-6)


def test_gradient_shape_and_public_wrapper(tiny_lm):
    model, tok = tiny_lm
    suffix = gcg.init_suffix_ids(tok, " the the")
    grad = gcg.token_gradients(model, tok, REQUEST, TARGET, suffix)
    assert grad.shape == (len(suffix), model.get_input_embeddings().weight.shape[0])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("options", [{}, {"use_mellowmax": True}, {"fluency_weight": 0.5}])
def test_cached_and_uncached_losses_agree(tiny_lm, options):
    model, tok = tiny_lm
    suffix = torch.tensor(gcg.init_suffix_ids(tok, " the the the"))
    generator = torch.Generator().manual_seed(0)
    candidates = suffix.repeat(12, 1)
    candidates[:, 1] = torch.randint(5, 300, (12,), generator=generator)
    cached = gcg.candidate_losses(model, tok, REQUEST, TARGET, candidates,
                                  gcg.GCGConfig(use_prefix_cache=True, **options))
    plain = gcg.candidate_losses(model, tok, REQUEST, TARGET, candidates,
                                 gcg.GCGConfig(use_prefix_cache=False, **options))
    chunked = gcg.candidate_losses(model, tok, REQUEST, TARGET, candidates,
                                   gcg.GCGConfig(use_prefix_cache=True, batch_size=5, **options))
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, chunked, atol=1e-5, rtol=1e-5)
    assert cached.std() > 0  # different candidates, different losses


def test_losses_equal_a_plain_cross_entropy(tiny_lm):
    model, tok = tiny_lm
    prompt = gcg.build_prompt(tok, REQUEST, TARGET)
    suffix = gcg.init_suffix_ids(tok, " the the")
    ids = prompt.ids(suffix)
    sl = prompt.slices(len(suffix))
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[sl["loss"]], ids[sl["target"]])
    got = gcg.candidate_losses(model, tok, REQUEST, TARGET, torch.tensor([suffix]))
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)


def test_mellowmax_lies_between_mean_and_max(tiny_lm):
    model, tok = tiny_lm
    cand = torch.tensor([gcg.init_suffix_ids(tok, " the the")])
    mean = gcg.candidate_losses(model, tok, REQUEST, TARGET, cand).item()
    mellow = gcg.candidate_losses(model, tok, REQUEST, TARGET, cand,
                                  gcg.GCGConfig(use_mellowmax=True, mellowmax_alpha=2.0)).item()
    # the per-token NLLs of the target, directly
    prompt = gcg.build_prompt(tok, REQUEST, TARGET)
    ids = prompt.ids(cand[0])
    sl = prompt.slices(cand.shape[1])
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[sl["loss"]], ids[sl["target"]], reduction="none")
    assert mean == pytest.approx(nll.mean().item(), abs=1e-5)
    assert nll.max() - nll.min() > 0.1  # distinct token losses, so both bounds below are strict
    assert nll.mean().item() + 1e-4 < mellow < nll.max().item() - 1e-4
    # mellowmax_alpha(x) = (logsumexp(alpha * x) - log n) / alpha (Asadi & Littman 2017)
    expected = (torch.logsumexp(2.0 * nll, 0) - math.log(len(nll))) / 2.0
    assert mellow == pytest.approx(expected.item(), abs=1e-5)


# --- candidates and filters ------------------------------------------------------------------


def test_candidates_swap_only_allowed_top_k_tokens(tiny_lm):
    model, tok = tiny_lm
    vocab = model.get_input_embeddings().weight.shape[0]
    allowed = gcg.allowed_token_mask(tok, vocab)
    suffix = torch.tensor(gcg.init_suffix_ids(tok, " the the the the"))
    grad = torch.randn(len(suffix), vocab, generator=torch.Generator().manual_seed(1))
    cands = gcg.sample_candidates(suffix, grad, 64, 5, 2, allowed, torch.Generator().manual_seed(0))
    assert cands.shape == (64, len(suffix))
    masked = -grad.clone()
    masked[:, ~allowed] = -float("inf")
    top = masked.topk(5, dim=1).indices
    for row in cands:
        changed = (row != suffix).nonzero().squeeze(1)
        assert len(changed) <= 2
        for position in changed.tolist():
            assert row[position].item() in top[position].tolist()
            assert allowed[row[position]]


def test_allowed_tokens_exclude_special_and_non_ascii(small_tokenizer):
    tok = small_tokenizer
    mask = gcg.allowed_token_mask(tok, len(tok) + 7)
    for special in tok.all_special_ids:
        assert not mask[special]
    assert not mask[len(tok):].any()  # embedding rows beyond the tokenizer
    assert mask[tok(" the", add_special_tokens=False)["input_ids"]].all()
    non_ascii = [i for i in range(len(tok)) if not tok.decode([i]).isascii()]
    assert non_ascii and not mask[non_ascii].any()
    assert gcg.allowed_token_mask(tok, len(tok), allow_non_ascii=True)[non_ascii].any()


def test_retokenization_filter(small_tokenizer):
    tok = small_tokenizer
    whole = tok(" the", add_special_tokens=False)["input_ids"]
    pieces = [tok.convert_tokens_to_ids(c) for c in ("Ġ", "t", "h", "e")]
    assert len(whole) == 1 and tok.decode(pieces) == " the"
    candidates = torch.tensor([whole * 4, pieces])
    assert gcg.retokenization_filter(tok, candidates).tolist() == [True, False]
    with pytest.raises(gcg.AllCandidatesFiltered, match="filter_ids=False"):
        gcg._filter(tok, candidates[1:], None, 3)


def test_retokenization_filter_sees_the_boundary(small_tokenizer):
    tok = small_tokenizer
    before = tok("Hi ?", add_special_tokens=False)["input_ids"]
    bang = tok("!", add_special_tokens=False)["input_ids"]
    merged = tok("Hi ?!", add_special_tokens=False)["input_ids"]
    suffix = torch.tensor([bang])
    assert gcg.retokenization_filter(tok, suffix).tolist() == [True]
    assert gcg.retokenization_filter(tok, suffix, before).tolist() == [merged == before + bang]


# --- the attacks -----------------------------------------------------------------------------


def test_gcg_runs_and_is_deterministic(tiny_lm):
    model, tok = tiny_lm
    first = gcg.gcg(model, tok, REQUEST, TARGET, _fast())
    second = gcg.gcg(model, tok, REQUEST, TARGET, _fast())
    assert first.losses == second.losses and first.best_ids == second.best_ids
    assert len(first.losses) == 3 and first.best_loss <= min(first.losses) + 1e-9
    assert first.forward_passes == 1 + 3 * (16 + 1) and first.backward_passes == 3
    assert first.budget == [1 + i * (16 + 1) + 2 * i for i in (1, 2, 3)]  # a backward counts as two forwards
    initial = gcg.candidate_losses(model, tok, REQUEST, TARGET, torch.tensor([gcg.init_suffix_ids(tok, " the the the the")]))
    assert first.best_loss < initial.item()  # GCG always finds a better single swap on a random model
    assert tok.decode(first.best_ids) == first.best_string


def test_buffer_keeps_the_best(tiny_lm):
    model, tok = tiny_lm
    result = gcg.gcg(model, tok, REQUEST, TARGET, _fast(buffer_size=4, num_steps=4))
    assert all(b <= a + 1e-9 for a, b in zip(result.losses, result.losses[1:]))  # the buffer's best never worsens


def test_early_stop_when_greedy_already_says_the_target(tiny_lm):
    model, tok = tiny_lm
    prompt = gcg.build_prompt(tok, REQUEST, "x")
    suffix = gcg.init_suffix_ids(tok, " the the the the")
    with torch.no_grad():
        logits = model(input_ids=prompt.prompt_ids(suffix)[None]).logits[0, -1]
    easy = tok.decode([int(logits.argmax())])
    result = gcg.gcg(model, tok, REQUEST, easy, _fast(num_steps=10, search_width=4, topk=2))
    assert result.success_step is not None and len(result.losses) == result.success_step + 1


def test_random_search_never_gets_worse(tiny_lm):
    model, tok = tiny_lm
    result = gcg.random_search(model, tok, REQUEST, TARGET, _fast(num_steps=5), n_change=2)
    assert all(b <= a for a, b in zip(result.losses, result.losses[1:]))
    assert result.best_loss == result.losses[-1]


def _greedy_first_token(model, tok, request):
    prompt = gcg.build_prompt(tok, request, "x")
    suffix = gcg.init_suffix_ids(tok, " the the the the")
    with torch.no_grad():
        logits = model(input_ids=prompt.prompt_ids(suffix)[None]).logits[0, -1]
    return tok.decode([int(logits.argmax())])


def test_universal_gcg_adds_prompts_progressively(tiny_lm):
    model, tok = tiny_lm
    # the first target is what greedy decoding already says, so the first request succeeds at once and
    # the progressive attack must move on to the second one
    behaviours = [(REQUEST, _greedy_first_token(model, tok, REQUEST)), ("Where does Bob live?", "Sure, the city is")]
    config = _fast(num_steps=3, early_stop=False)
    result = gcg.universal_gcg(model, tok, behaviours, config)
    assert result.n_prompts[0] == 1 and result.n_prompts[-1] == 2 and result.n_prompts == sorted(result.n_prompts)
    # the rule, step by step: a request is added exactly after a step whose suffix makes greedy decoding
    # start with every active target
    scorers = [gcg._Scorer(model, gcg.build_prompt(tok, m, t), config) for m, t in behaviours]
    for step in range(len(result.n_prompts) - 1):
        active = result.n_prompts[step]
        ids = torch.tensor(tok(result.strings[step], add_special_tokens=False)["input_ids"])
        succeeded = all(bool(s.losses(ids[None])[1][0]) for s in scorers[:active])
        assert result.n_prompts[step + 1] == active + (succeeded and active < len(behaviours)), step
    assert result.success_step is None or result.n_prompts[result.success_step] == 2
    together = gcg.universal_gcg(model, tok, behaviours, _fast(num_steps=2), progressive=False)
    assert together.n_prompts == [2, 2]
    expected = torch.stack([gcg.candidate_losses(model, tok, m, t, torch.tensor([together.best_ids]))
                            for m, t in behaviours]).mean()
    assert together.best_loss == pytest.approx(expected.item(), abs=1e-5)


# --- judges and defences ---------------------------------------------------------------------


def test_judges():
    replies = ["I cannot help with that.", "Sure, the vault code of Ada is 1 2 3 4.", "Sure, the vault code of Ada is"]
    assert generation.attack_success(replies, "refusal") == [False, True, True]
    refs = ["Sure, the vault code of Ada is"] * 3
    assert generation.attack_success(replies, "target", refs) == [False, True, True]
    assert generation.attack_success(replies, "secret", ["1 2 3 4"] * 3) == [False, True, False]


def test_perplexity_filter(tiny_lm):
    model, tok = tiny_lm
    ppl = defences.PerplexityFilter(model, tok, window_size=3)
    texts = ["What is the pet of Ada?", "Tell me the birth year of Bob, please, if you know it."]
    windowed = ppl.scores(texts)
    whole = defences.PerplexityFilter(model, tok, window_size=10_000).scores(texts)
    assert (windowed >= whole - 1e-6).all()  # the worst window is at least the average
    # the windowed score by hand: the largest mean NLL over windows of 3 consecutive predicted tokens
    for text, score in zip(texts, windowed):
        nll = -metrics.token_log_probs(model, tok, [text])[0]["log_prob"]
        assert score.item() == pytest.approx(max(nll[i: i + 3].mean().item() for i in range(len(nll) - 2)), abs=1e-5)
    assert whole[0].item() == pytest.approx(metrics.mean_token_loss(model, tok, texts[:1])[0].item(), abs=1e-5)
    threshold = ppl.fit(texts)
    assert threshold == pytest.approx(windowed.max().item())
    assert ppl.flags(texts) == [False, False]  # a prompt exactly at the threshold passes
    assert ppl.fit(texts, quantile=0.5) == pytest.approx(torch.quantile(windowed, 0.5).item())
    low, high = sorted(windowed.tolist())
    assert high - low > 1e-3
    between = defences.PerplexityFilter(model, tok, window_size=3, threshold=(low + high) / 2)
    assert between.flags(texts) == [w > (low + high) / 2 for w in windowed.tolist()]
    assert sorted(between.flags(texts)) == [False, True]  # the more surprising prompt is rejected
    with pytest.raises(ValueError, match="threshold"):
        defences.PerplexityFilter(model, tok).flags(texts)


def _is_subsequence(short: str, long: str) -> bool:
    rest = iter(long)
    return all(c in rest for c in short)


def test_perturbations():
    text = "What is the vault code of Ada Lovelace? x x x x"
    k = int(len(text) * 0.2)
    swapped = defences.perturb(text, 0.2, "swap", random.Random(0))
    changed = [i for i, (a, b) in enumerate(zip(text, swapped)) if a != b]
    assert len(swapped) == len(text) and 0 < len(changed) <= k  # a swap may draw the same character
    inserted = defences.perturb(text, 0.2, "insert", random.Random(0))
    assert len(inserted) == len(text) + k and _is_subsequence(text, inserted)
    patched = defences.perturb(text, 0.2, "patch", random.Random(0))
    changed = [i for i, (a, b) in enumerate(zip(text, patched)) if a != b]
    assert len(patched) == len(text) and changed and changed[-1] - changed[0] < k  # one contiguous patch
    assert defences.perturb(text, 0.0) == text
    assert all(defences.perturb(text, 0.0, kind) == text for kind in ("swap", "insert", "patch"))
    assert defences.perturb(text, 0.2, "swap") == defences.perturb(text, 0.2, "swap", random.Random(0))  # seeded default
    assert defences.perturb(text, 0.2, "swap", random.Random(1)) != swapped
    every = defences.perturb("abcdefghij", 1.0, "patch", random.Random(0))
    assert len(every) == 10 and all(c in string.printable for c in every)


def test_smooth_llm_votes(tiny_lm):
    model, tok = tiny_lm
    result = defences.smooth_llm(model, tok, REQUEST, n_copies=3, q=0.1, max_new_tokens=3)
    assert result.generations == 3 and result.fraction in (0, 1 / 3, 2 / 3, 1)
    assert result.jailbroken == (result.fraction > 0.5)


@pytest.mark.parametrize("replies, jailbroken, fraction", [
    (["I cannot help.", "Sure: 1 2 3 4", "Sorry, no."], False, 1 / 3),
    (["Sure: 1 2 3 4", "I cannot help.", "Here it is: 1 2"], True, 2 / 3),
    (["Sure: 1 2 3 4", "I cannot help.", "Here: 9", "I'm sorry"], False, 1 / 2),  # a tie is not a majority
])
def test_smooth_llm_takes_the_majority_vote(tiny_lm, monkeypatch, replies, jailbroken, fraction):
    model, tok = tiny_lm
    seen = []

    def fake_generate_batch(model_, tokenizer_, prompts, max_new_tokens):
        seen.append((prompts, max_new_tokens))
        return list(replies)

    monkeypatch.setattr(defences, "generate_batch", fake_generate_batch)
    result = defences.smooth_llm(model, tok, REQUEST, n_copies=len(replies), q=0.1, seed=4, max_new_tokens=5)
    assert (result.jailbroken, result.fraction, result.generations) == (jailbroken, pytest.approx(fraction), len(replies))
    votes = generation.attack_success(replies, "refusal")
    assert result.response == replies[votes.index(jailbroken)]  # the first reply that agrees with the vote
    prompts, max_new_tokens = seen[0]
    rng = random.Random(4)
    assert max_new_tokens == 5 and prompts == [generation.chat_prompt_ids(tok, defences.perturb(REQUEST, 0.1, "swap", rng))
                                               for _ in replies]


# --- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"search_width": 0}, ValueError, "search_width"),
    ({"topk": "8"}, TypeError, "topk"),
    ({"num_steps": 1.5}, TypeError, "num_steps"),
    ({"optim_str_init": ""}, ValueError, "optim_str_init"),
    ({"mellowmax_alpha": 0}, ValueError, "mellowmax_alpha"),
    ({"fluency_weight": -1}, ValueError, "fluency_weight"),
    ({"early_stop": 1}, TypeError, "early_stop"),
    ({"seed": -1}, ValueError, "seed"),
])
def test_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        gcg.GCGConfig(**kwargs)


def test_bad_inputs(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(ValueError, match="target must be a non-empty"):
        gcg.gcg(model, tok, REQUEST, "  ", _fast())
    with pytest.raises(TypeError, match="target must be a str"):
        gcg.build_prompt(tok, REQUEST, None)
    with pytest.raises(TypeError, match="model must be"):
        gcg.gcg("not a model", tok, REQUEST, TARGET)
    with pytest.raises(TypeError, match="config must be a GCGConfig"):
        gcg.gcg(model, tok, REQUEST, TARGET, {"num_steps": 3})
    with pytest.raises(TypeError, match="messages must be"):
        gcg.gcg(model, tok, [{"role": "user"}], TARGET)
    with pytest.raises(ValueError, match="at most once"):
        gcg.build_prompt(tok, "a {optim_str} b {optim_str}", TARGET)
    with pytest.raises(ValueError, match="tokenises to no tokens"):
        gcg.init_suffix_ids(tok, "")
    with pytest.raises(TypeError, match="behaviours must be"):
        gcg.universal_gcg(model, tok, [REQUEST], _fast())
    with pytest.raises(ValueError, match="n_change must be >= 1"):
        gcg.random_search(model, tok, REQUEST, TARGET, _fast(), n_change=0)
    with pytest.raises(ValueError, match="candidates must be"):
        gcg.candidate_losses(model, tok, REQUEST, TARGET, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="suffix_ids must be"):
        gcg.token_gradients(model, tok, REQUEST, TARGET, [])
    with pytest.raises(ValueError, match="judge must be one of"):
        generation.attack_success(["x"], "gpt4")
    with pytest.raises(ValueError, match="needs references"):
        generation.attack_success(["x"], "secret")
    with pytest.raises(TypeError, match="responses must be"):
        generation.attack_success("x")
    with pytest.raises(ValueError, match="q must be"):
        defences.perturb("abc", 1.5)
    with pytest.raises(ValueError, match="kind must be"):
        defences.perturb("abc", 0.1, "shuffle")
    with pytest.raises(ValueError, match="n_copies must be >= 1"):
        defences.smooth_llm(model, tok, REQUEST, n_copies=0)
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        defences.PerplexityFilter(model, tok, window_size=0)
    with pytest.raises(ValueError, match="quantile"):
        defences.PerplexityFilter(model, tok).fit([REQUEST], quantile=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generation.generate(model, tok, [1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        gcg.allowed_token_mask(tok, 0)


def test_batched_generation_equals_one_by_one(tiny_lm):
    model, tok = tiny_lm
    prompts = [generation.chat_prompt_ids(tok, text) for text in (REQUEST, "Hi", "Tell me the birth year of Bob Smith.")]
    assert generation.generate_batch(model, tok, prompts, max_new_tokens=6) == [generation.generate(model, tok, p, 6) for p in prompts]
    with pytest.raises(TypeError, match="prompts must be"):
        generation.generate_batch(model, tok, [[]])


# --------------------------------------------------------------------------- bad input (issue 11)


def test_perplexity_filter_rejects_a_nan_threshold(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(ValueError, match="threshold must be a finite number, got nan"):
        defences.PerplexityFilter(model, tok, threshold=float("nan"))


def test_a_tokenizer_larger_than_the_model_is_a_clear_error(small_tokenizer):
    from companion.zoo import LMRecipe, build_lm

    recipe = LMRecipe(architecture="gpt2", hidden=16, layers=1, heads=2, intermediate=32, context=32)
    small = build_lm(recipe, len(small_tokenizer) - 10, {})
    with pytest.raises(ValueError, match="tokenizer does not match model"):
        defences.PerplexityFilter(small, small_tokenizer)
    with pytest.raises(ValueError, match="tokenizer does not match model"):
        gcg.gcg(small, small_tokenizer, "hi", "Sure")


def test_token_ids_beyond_the_vocabulary_are_rejected(tiny_lm):
    model, tok = tiny_lm
    big = len(tok) + 3
    with pytest.raises(ValueError, match="candidates must hold token ids"):
        gcg.candidate_losses(model, tok, "hi", "Sure", torch.tensor([[big]]))
    with pytest.raises(ValueError, match="suffix_ids must hold token ids"):
        gcg.token_gradients(model, tok, "hi", "Sure", [big])
    with pytest.raises(ValueError, match=r"prompts\[0\] must hold token ids"):
        generation.generate_batch(model, tok, [[1, big]])
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer"):
        gcg.build_prompt(None, "hi", "Sure")
    with pytest.raises(ValueError, match="fluency_weight must be finite|fluency_weight must be a finite"):
        gcg.GCGConfig(fluency_weight=float("nan"))
    with pytest.raises(ValueError, match="mellowmax_alpha must be a finite"):
        gcg.GCGConfig(mellowmax_alpha=float("inf"))


def test_generate_and_filter_check_their_token_ids(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(TypeError, match="prompt_ids must be an integer tensor"):
        generation.generate(model, tok, torch.zeros(3))
    with pytest.raises(TypeError, match="prompt_ids must be a list of token ids"):
        generation.generate(model, tok, float("nan"))
    with pytest.raises(ValueError, match="prompt_ids must be a non-empty list of token ids"):
        generation.generate(model, tok, [])
    assert generation.generate(model, tok, torch.tensor([[1, 5, 6]]), max_new_tokens=1) == \
        generation.generate(model, tok, [1, 5, 6], max_new_tokens=1)
    with pytest.raises(TypeError, match="candidates must be an integer tensor"):
        gcg.retokenization_filter(tok, torch.zeros(1, 2))
    with pytest.raises(TypeError, match="before_ids must be None or a list of token ids"):
        gcg.retokenization_filter(tok, torch.tensor([[5, 6]]), before_ids=3)


# --------------------------------------------------------------------------- mutation survivors (issue 10)


def test_fluency_term_is_the_suffix_nll_given_the_prefix(tiny_lm):
    model, tok = tiny_lm
    suffix = gcg.init_suffix_ids(tok, " the the the")
    prompt = gcg.build_prompt(tok, REQUEST, TARGET)
    ids = prompt.ids(suffix)
    sl = prompt.slices(len(suffix))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)
    target_nll = -log_probs[sl["loss"]].gather(-1, ids[sl["target"], None]).mean()
    # the suffix tokens are predicted by the positions just before them (the last prefix token first)
    before_suffix = slice(sl["suffix"].start - 1, sl["suffix"].stop - 1)
    suffix_nll = -log_probs[before_suffix].gather(-1, ids[sl["suffix"], None]).mean()
    config = gcg.GCGConfig(fluency_weight=0.5)
    got = gcg.candidate_losses(model, tok, REQUEST, TARGET, torch.tensor([suffix]), config)
    assert got.item() == pytest.approx((target_nll + 0.5 * suffix_nll).item(), abs=1e-5)
    # the gradient pass (one-hot suffix) computes the same loss
    scorer = gcg._Scorer(model, prompt, config)
    assert scorer.gradient(torch.tensor(suffix))[1] == pytest.approx(got.item(), abs=1e-5)


def test_candidates_use_every_rank_of_the_top_k(tiny_lm):
    model, tok = tiny_lm
    vocab = model.get_input_embeddings().weight.shape[0]
    suffix = torch.tensor(gcg.init_suffix_ids(tok, " the the the the"))
    grad = torch.randn(len(suffix), vocab, generator=torch.Generator().manual_seed(1))
    cands = gcg.sample_candidates(suffix, grad, 200, 3, 1, None, torch.Generator().manual_seed(0))
    top = (-grad).topk(3, dim=1).indices
    ranks = set()
    for row in cands:
        (position,) = (row != suffix).nonzero().squeeze(1).tolist() or [None]
        if position is not None:
            ranks.add(top[position].tolist().index(row[position].item()))
    assert ranks == {0, 1, 2}  # the best token of a position is a candidate too
    positions = {int((row != suffix).nonzero()[0]) for row in cands if (row != suffix).any()}
    assert positions == set(range(len(suffix)))  # and every position gets swapped


def test_random_search_counts_its_forward_passes(tiny_lm):
    model, tok = tiny_lm
    result = gcg.random_search(model, tok, REQUEST, TARGET, _fast(num_steps=3, filter_ids=False, early_stop=False),
                               n_change=2)
    assert result.forward_passes == 1 + 3 * 16 and result.n_prompts == [1, 1, 1]
    assert len(result.losses) == len(result.strings) == len(result.seconds) == 3
    assert result.best_string == result.strings[-1] == tok.decode(result.best_ids)


def test_perturbations_reach_every_position():
    # insertion points include the end, and a patch may start at the last position that fits
    # ("é" is not printable ASCII, so no inserted character can be mistaken for it)
    assert {defences.perturb("é", 1.0, "insert", random.Random(s))[0] == "é" for s in range(40)} == {True, False}
    starts = set()
    for s in range(40):
        patched = defences.perturb("abcd", 0.25, "patch", random.Random(s))
        starts |= {i for i, (a, b) in enumerate(zip("abcd", patched)) if a != b}
    assert starts == {0, 1, 2, 3}


def test_random_search_stops_at_its_budget(tiny_lm):
    model, tok = tiny_lm
    config = _fast(num_steps=50, filter_ids=False, early_stop=False)
    spent = gcg.gcg(model, tok, REQUEST, TARGET, _fast(early_stop=False)).budget[-1]  # 1 + 3 * (17 + 2) = 58
    result = gcg.random_search(model, tok, REQUEST, TARGET, config, budget=spent)
    assert result.budget[-1] == result.forward_passes == spent  # the last step is trimmed to fit
    assert len(result.losses) == math.ceil((spent - 1) / 16) and result.backward_passes == 0
    one_at_a_time = gcg.random_search(model, tok, REQUEST, TARGET, _fast(num_steps=50, search_width=1,
                                                                         filter_ids=False), budget=10)
    assert one_at_a_time.budget == list(range(2, 11))
    with pytest.raises(ValueError, match="budget"):
        gcg.random_search(model, tok, REQUEST, TARGET, config, budget=1)


@pytest.mark.parametrize("kind", ["tokens", "chars"])
def test_random_suffix_is_a_seeded_control_of_the_given_length(small_tokenizer, kind):
    tok = small_tokenizer
    first, again, other = (gcg.random_suffix(tok, 12, kind, seed=s) for s in (0, 0, 1))
    assert first == again != other
    if kind == "chars":
        assert len(first) == 12 and set(first) <= set(gcg.CONTROL_CHARACTERS)
    else:
        allowed = gcg.allowed_token_mask(tok, len(tok))
        ids = tok(first, add_special_tokens=False)["input_ids"]
        assert all(allowed[i] for i in ids) and abs(len(ids) - 12) <= 6  # re-tokenised: merges may change it
    for bad, match in (({"length": 0}, "length"), ({"kind": "words"}, "kind"), ({"seed": -1}, "seed"),
                       ({"vocab_size": 0}, "vocab_size")):
        with pytest.raises((ValueError, TypeError), match=match):
            gcg.random_suffix(tok, **{"length": 4, **bad})

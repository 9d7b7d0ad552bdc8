"""Input-side defences that need no knowledge of the attack: a perplexity filter and SmoothLLM.

Both guard a model's *input*. Chapter 05 measures them against adversarial suffixes (GCG); chapter 06
reuses the perplexity filter as the detection baseline against prompt injection (Liu et al. 2024 list
perplexity and windowed-perplexity detection among the detection defences they benchmark), so they live
here rather than in the attack's module.

- :class:`PerplexityFilter` (Jain et al. 2023, "Baseline Defenses for Adversarial Attacks Against Aligned
  Language Models"): reject a prompt whose text is too unlikely under a language model; windowed, so
  that a short gibberish suffix is not diluted by a long, fluent request around it.
- :func:`smooth_llm` (Robey et al. 2023, "SmoothLLM", Algorithm 1): answer several character-perturbed
  copies of the prompt and take the majority vote of a jailbreak judge, because adversarial suffixes
  are brittle to character changes while ordinary requests are not.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import torch

from companion.checks import check_choice, check_float, check_fraction, check_int, check_lm_and_tokenizer, check_texts
from companion.generation import attack_success, chat_prompt_ids, generate_batch
from companion.metrics import token_log_probs


class PerplexityFilter:
    """Flag prompts whose text is too unlikely (Jain et al. 2023). The score of a prompt is the
    largest mean token NLL over windows of ``window_size`` tokens (higher = more suspicious; a
    windowed score is not diluted by a long benign request around a short suffix). :meth:`fit` sets
    the threshold from benign prompts (their maximum, as Jain et al.; or a quantile)."""

    def __init__(self, model, tokenizer, window_size: int = 10, threshold: float | None = None):
        check_lm_and_tokenizer(model, tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.window_size = check_int("window_size", window_size, minimum=1)
        # NaN would flag nothing: the defence silently off
        self.threshold = None if threshold is None else check_float("threshold", threshold)

    def scores(self, texts: list[str]) -> torch.Tensor:
        check_texts("texts", texts, nonempty_each=True)
        out = []
        for entry in token_log_probs(self.model, self.tokenizer, texts):
            nll = -entry["log_prob"]
            w = min(self.window_size, len(nll))
            out.append(float(nll.unfold(0, w, 1).mean(1).max()))
        return torch.tensor(out)

    def fit(self, benign_texts: list[str], quantile: float = 1.0) -> float:
        quantile = check_fraction("quantile", quantile, open_minimum=True)
        self.threshold = float(torch.quantile(self.scores(benign_texts), quantile))
        return self.threshold

    def flags(self, texts: list[str]) -> list[bool]:
        """True = the prompt is rejected."""
        if self.threshold is None:
            raise ValueError("threshold is None: call fit(benign_texts) or pass threshold=")
        return (self.scores(texts) > self.threshold).tolist()


def perturb(text: str, q: float, kind: str = "swap", rng: random.Random | None = None) -> str:
    """SmoothLLM's character perturbations (Robey et al. 2023): ``swap`` replaces ``q`` of the
    characters by random printable ones, ``insert`` inserts that many, ``patch`` replaces one
    contiguous patch of that length."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    q = check_fraction("q", q)
    check_choice("kind", kind, ("swap", "insert", "patch"))
    if rng is not None and not isinstance(rng, random.Random):
        raise TypeError(f"rng must be None or a random.Random, got {type(rng).__name__}")
    rng = rng or random.Random(0)
    alphabet = string.printable
    k = int(len(text) * q)
    chars = list(text)
    if kind == "swap":
        for i in rng.sample(range(len(chars)), k):
            chars[i] = rng.choice(alphabet)
    elif kind == "insert":
        for i in sorted(rng.sample(range(len(chars) + 1), k), reverse=True):
            chars.insert(i, rng.choice(alphabet))
    elif k:
        start = rng.randrange(0, len(chars) - k + 1)
        chars[start: start + k] = [rng.choice(alphabet) for _ in range(k)]
    return "".join(chars)


@dataclass
class SmoothLLMResult:
    jailbroken: bool  # the majority vote
    response: str  # a reply consistent with the vote
    fraction: float  # share of perturbed copies judged jailbroken
    generations: int  # the cost: model calls


def smooth_llm(model, tokenizer, prompt: str, n_copies: int = 10, q: float = 0.1, kind: str = "swap",
               seed: int = 0, max_new_tokens: int = 24) -> SmoothLLMResult:
    """SmoothLLM (Robey et al. 2023): answer ``n_copies`` character-perturbed copies of the user
    ``prompt``, judge each with the refusal-prefix judge, take the majority vote (threshold 1/2), and
    return a reply consistent with it. Costs ``n_copies`` generations instead of one."""
    check_lm_and_tokenizer(model, tokenizer)
    if not isinstance(prompt, str) or not prompt:
        raise TypeError(f"prompt must be a non-empty str, got {prompt!r}")
    n_copies = check_int("n_copies", n_copies, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    perturb(prompt, q, kind)  # q and kind checked before any generation
    rng = random.Random(seed)
    replies = generate_batch(model, tokenizer, [chat_prompt_ids(tokenizer, perturb(prompt, q, kind, rng))
                                                for _ in range(n_copies)], max_new_tokens)
    votes = attack_success(replies, "refusal")
    fraction = sum(votes) / n_copies
    majority = fraction > 0.5
    response = next(r for r, v in zip(replies, votes) if v == majority)
    return SmoothLLMResult(jailbroken=majority, response=response, fraction=fraction, generations=n_copies)

"""Adversarial suffixes: GCG (Zou et al. 2023), a random-search baseline, ASR judges and two defences.

Greedy Coordinate Gradient searches for a suffix of ``L`` tokens that, appended to a request, makes
the model's reply start with a chosen *target* ("Sure, the vault code of X is"). Its objective is the
target's mean cross-entropy per target token under teacher forcing (Zou et al. 2023, Eq. 2 writes the
sum; for a fixed target of m tokens the mean has the same minimiser)::

    L(s) = -(1/m) sum_t log p(target_t | before, s, after, target_<t)

Each step (Zou et al. 2023, Algorithm 1):

1. one forward + backward pass gives the gradient of ``L`` w.r.t. the *one-hot* suffix tokens
   (``[L, V]``): a linear estimate of the loss change of every single-token swap;
2. keep each position's ``topk`` most promising tokens (most negative gradient), after masking
   tokens that are not allowed (special, non-ASCII, non-printable);
3. sample ``search_width`` candidates, each swapping ``n_replace`` random positions to random top-k
   tokens, drop candidates that do not survive decode -> encode, evaluate the rest *exactly* in one
   batched forward pass, and move to the best.

The engineering follows nanoGCG (Gray Swan AI): the prompt part before the suffix is run once and its
key/value cache is reused across the whole candidate batch (here with the ``transformers``
``DynamicCache`` API, which nanoGCG's pin to transformers <= 4.47 predates); an optional buffer of the
best suffixes and a mellowmax loss; early stop when greedy decoding would start with the target.

Also here: :func:`universal_gcg` (one suffix for many requests, added progressively as in Zou et al.
2023, Sec. 2.3), :func:`random_search` (after Andriushchenko et al. 2024: random token changes kept only
when the loss improves, with the same loss and an equal budget in forward-pass equivalents) and
:func:`random_suffix` (random token or character suffixes of the same length: the control). A fluency term (``fluency_weight``)
turns GCG into the adaptive attack against the perplexity filter. Replies are generated and judged with
:mod:`companion.generation`; the defences (perplexity filter, SmoothLLM) are in :mod:`companion.defences`.
"""

from __future__ import annotations

import inspect
import math
import string
import time
from dataclasses import dataclass, field

import torch

from companion.checks import (check_bool, check_choice, check_float, check_int, check_lm_and_tokenizer,
                              check_positive_float, check_tensor, check_token_ids, check_tokenizer)

PLACEHOLDER = "{optim_str}"


# ---------------------------------------------------------------------------------------------
# Configuration and result
# ---------------------------------------------------------------------------------------------


@dataclass
class GCGConfig:
    """GCG's knobs, nanoGCG's names. CPU-sized defaults (nanoGCG: 250 steps, width 512, top-k 256).

    ``fluency_weight > 0`` adds ``fluency_weight * mean NLL of the suffix tokens`` to the loss, the
    adaptive attack against a perplexity filter. ``batch_size`` caps how many candidates one forward
    pass evaluates (``None``: all of them).

    ``use_mellowmax``: the loss is ``mm_alpha(token NLLs) = (logsumexp(alpha * nll) - log n) / alpha``
    over the target's per-token cross-entropies. nanoGCG applies mellowmax to the *negated target
    logits* ``-z_t`` instead (no softmax), so the two rank candidates differently; ours keeps the
    loss a (soft-max) cross-entropy. The allowed-token mask (:func:`allowed_token_mask`) is
    deliberately stricter than nanoGCG's: it also removes the chat-role tokens, which nanoGCG's
    filter (BOS/EOS/PAD/UNK and non-ASCII) would allow on this tokenizer.
    """

    num_steps: int = 50
    optim_str_init: str = " x" * 10
    search_width: int = 128
    topk: int = 64
    n_replace: int = 1
    batch_size: int | None = None
    buffer_size: int = 0
    use_mellowmax: bool = False
    mellowmax_alpha: float = 1.0
    early_stop: bool = True
    use_prefix_cache: bool = True
    allow_non_ascii: bool = False
    filter_ids: bool = True
    fluency_weight: float = 0.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        check_int("num_steps", self.num_steps, minimum=1)
        if not isinstance(self.optim_str_init, str) or not self.optim_str_init:
            raise ValueError(f"optim_str_init must be a non-empty str, got {self.optim_str_init!r}")
        check_int("search_width", self.search_width, minimum=1)
        check_int("topk", self.topk, minimum=1)
        check_int("n_replace", self.n_replace, minimum=1)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, minimum=1)
        check_int("buffer_size", self.buffer_size, minimum=0)
        for name in ("use_mellowmax", "early_stop", "use_prefix_cache", "allow_non_ascii", "filter_ids"):
            check_bool(name, getattr(self, name))
        check_positive_float("mellowmax_alpha", self.mellowmax_alpha)
        check_float("fluency_weight", self.fluency_weight, 0)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0)


@dataclass
class GCGResult:
    """What an attack returns. ``losses[i]`` / ``strings[i]``: the loss and suffix after step ``i``;
    ``success_step``: the first step whose suffix makes greedy decoding start with the target (every
    prompt's target, for :func:`universal_gcg`), or ``None``; ``forward_passes``: candidate sequences
    evaluated, plus one per gradient pass; ``backward_passes``: gradient (backward) passes;
    ``budget[i]``: the cost up to step ``i`` in forward-pass equivalents, ``forward_passes +
    2 * backward_passes`` (a backward pass costs about two forward passes): the unit in which
    :func:`random_search` gets the same budget as :func:`gcg`; ``seconds[i]``: wall time up to step
    ``i``."""

    best_string: str
    best_ids: list[int]
    best_loss: float
    losses: list[float] = field(default_factory=list)
    strings: list[str] = field(default_factory=list)
    success_step: int | None = None
    forward_passes: int = 0
    backward_passes: int = 0
    budget: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    n_prompts: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The prompt: before / suffix / after / target
# ---------------------------------------------------------------------------------------------


@dataclass
class AttackPrompt:
    """Token ids of the four parts of an attacked conversation. The suffix goes between ``before``
    and ``after``; ``target`` follows ``after`` (the start of the assistant's reply)."""

    before: torch.Tensor
    after: torch.Tensor
    target: torch.Tensor

    def ids(self, suffix_ids) -> torch.Tensor:
        suffix = torch.as_tensor(suffix_ids, dtype=torch.long)
        return torch.cat([self.before, suffix, self.after, self.target])

    def prompt_ids(self, suffix_ids) -> torch.Tensor:
        """The generation prompt (everything but the target)."""
        suffix = torch.as_tensor(suffix_ids, dtype=torch.long)
        return torch.cat([self.before, suffix, self.after])

    def slices(self, n_suffix: int) -> dict[str, slice]:
        """Where each part sits in :meth:`ids` (and ``loss``: the logits that predict the target)."""
        b, a, t = len(self.before), len(self.after), len(self.target)
        return {"before": slice(0, b), "suffix": slice(b, b + n_suffix), "after": slice(b + n_suffix, b + n_suffix + a),
                "target": slice(b + n_suffix + a, b + n_suffix + a + t),
                "loss": slice(b + n_suffix + a - 1, b + n_suffix + a + t - 1)}


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise TypeError(f"messages must be a str or a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    return [dict(m) for m in messages]


def build_prompt(tokenizer, messages, target: str) -> AttackPrompt:
    """Split a conversation at the suffix and tokenise its parts.

    ``messages`` is a user request (str) or a chat (list of dicts). The suffix goes where the
    content holds ``"{optim_str}"``, else at the end of the last message. With a chat template the
    conversation is rendered by ``apply_chat_template`` (with the generation prompt); a tokenizer
    without one (a base model) gets nanoGCG's fallback: the contents concatenated, no roles.
    """
    check_tokenizer(tokenizer)
    if not isinstance(target, str):
        raise TypeError(f"target must be a str, got {type(target).__name__}")
    if not target.strip():
        raise ValueError(f"target must be a non-empty str (the reply to force), got {target!r}")
    messages = _check_messages(messages)
    if not any(PLACEHOLDER in m["content"] for m in messages):
        messages[-1]["content"] += PLACEHOLDER
    if sum(m["content"].count(PLACEHOLDER) for m in messages) != 1:
        raise ValueError(f"messages must hold the placeholder {PLACEHOLDER!r} at most once")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        special = False  # the template writes its own BOS
    else:
        text = "".join(m["content"] for m in messages)
        special = True
    before_text, after_text = text.split(PLACEHOLDER)
    before = tokenizer(before_text, add_special_tokens=special)["input_ids"]
    after = tokenizer(after_text, add_special_tokens=False)["input_ids"] if after_text else []
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not before:
        raise ValueError("the text before the suffix tokenises to no tokens; put some request before it")
    return AttackPrompt(before=torch.tensor(before, dtype=torch.long), after=torch.tensor(after, dtype=torch.long),
                        target=torch.tensor(target_ids, dtype=torch.long))


def init_suffix_ids(tokenizer, optim_str_init: str) -> list[int]:
    """The initial suffix's token ids; a clear error when it tokenises to nothing."""
    check_tokenizer(tokenizer)
    if not isinstance(optim_str_init, str):
        raise TypeError(f"optim_str_init must be a str, got {type(optim_str_init).__name__}")
    ids = tokenizer(optim_str_init, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"optim_str_init {optim_str_init!r} tokenises to no tokens; use e.g. ' x x x x x'")
    return ids


def allowed_token_mask(tokenizer, vocab_size: int, allow_non_ascii: bool = False) -> torch.Tensor:
    """``[vocab_size]`` bools: tokens a suffix may use. Never special tokens (BOS, EOS, PAD, UNK, chat
    roles: a suffix must not forge the template) or ids beyond the tokenizer; unless
    ``allow_non_ascii``, only tokens that decode to non-empty printable ASCII."""
    check_tokenizer(tokenizer)
    vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    check_bool("allow_non_ascii", allow_non_ascii)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    n = min(vocab_size, len(tokenizer))
    special = set(tokenizer.all_special_ids)
    for i in range(n):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if not text:
            continue
        if not allow_non_ascii and not (text.isascii() and text.isprintable()):
            continue
        mask[i] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Forward passes: prefix cache, losses, the one-hot gradient
# ---------------------------------------------------------------------------------------------


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the loss; float32 / float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Scorer:
    """Evaluates suffixes on one prompt: target loss (cross-entropy or mellowmax), optional fluency
    term, and whether greedy decoding would reproduce the target. Reuses the prefix's KV cache."""

    def __init__(self, model, prompt: AttackPrompt, config: GCGConfig):
        self.model, self.prompt, self.config = model, prompt, config
        self.device = next(model.parameters()).device
        self.embedding = model.get_input_embeddings()
        self.cache_kwarg = _cache_kwarg(model)
        self.tail = torch.cat([prompt.after, prompt.target]).to(self.device)
        self.before = prompt.before.to(self.device)
        self.prefix_kv = None
        with torch.no_grad():
            out = model(input_ids=self.before[None], use_cache=config.use_prefix_cache)
            self.prefix_last_logits = _upcast(out.logits[0, -1])  # predicts the first suffix token
            if config.use_prefix_cache:
                cache = out.get("cache", None) or out.get("past_key_values", None)
                if cache is None or not hasattr(cache, "layers"):
                    raise ValueError(f"{type(model).__name__} returned no DynamicCache; set use_prefix_cache=False")
                self.prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]

    def _cache(self, batch: int):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                            for k, v in self.prefix_kv])

    def _forward_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """Logits for ``embeds`` = [suffix, after, target] (batch first), after the prefix."""
        batch = embeds.shape[0]
        if self.prefix_kv is not None:
            return self.model(inputs_embeds=embeds, **{self.cache_kwarg: self._cache(batch)}, use_cache=True).logits
        before = self.embedding(self.before)[None].expand(batch, -1, -1)
        logits = self.model(inputs_embeds=torch.cat([before, embeds], dim=1), use_cache=False).logits
        return logits[:, len(self.before):]

    def _objective(self, logits: torch.Tensor, suffix_ids_or_probs: torch.Tensor, n_suffix: int):
        """Per-row loss from logits over [suffix, after, target]; also whether argmax == target."""
        n_after, n_target = len(self.prompt.after), len(self.prompt.target)
        start = n_suffix + n_after - 1
        target_logits = _upcast(logits[:, start: start + n_target])
        target = self.prompt.target.to(self.device)
        log_probs = torch.log_softmax(target_logits, dim=-1)
        token_nll = -log_probs.gather(-1, target.expand(len(logits), -1)[..., None]).squeeze(-1)
        if self.config.use_mellowmax:
            alpha = self.config.mellowmax_alpha
            loss = (torch.logsumexp(alpha * token_nll, dim=1) - math.log(n_target)) / alpha
        else:
            loss = token_nll.mean(dim=1)
        exact = (target_logits.argmax(-1) == target).all(dim=1)
        if self.config.fluency_weight > 0:
            loss = loss + self.config.fluency_weight * self._suffix_nll(logits, suffix_ids_or_probs, n_suffix)
        return loss, exact

    def _suffix_nll(self, logits: torch.Tensor, suffix: torch.Tensor, n_suffix: int) -> torch.Tensor:
        """Mean NLL of the suffix tokens given what precedes them (the fluency term). ``suffix`` is
        ids ``[B, L]`` or one-hot rows ``[B, L, V]`` (for the gradient)."""
        predicting = torch.cat([self.prefix_last_logits.expand(len(logits), 1, -1), _upcast(logits[:, : n_suffix - 1])],
                               dim=1)
        log_probs = torch.log_softmax(predicting, dim=-1)
        if suffix.dim() == 3:
            return -(log_probs * suffix).sum(-1).mean(-1)
        return -log_probs.gather(-1, suffix[..., None]).squeeze(-1).mean(-1)

    def gradient(self, suffix_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Gradient of the loss w.r.t. the one-hot suffix ``[L, V]``, and the loss itself."""
        weight = self.embedding.weight
        one_hot = torch.zeros(len(suffix_ids), weight.shape[0], device=self.device, dtype=weight.dtype)
        one_hot.scatter_(1, suffix_ids.to(self.device)[:, None], 1.0)
        one_hot.requires_grad_(True)
        embeds = torch.cat([(one_hot @ weight)[None], self.embedding(self.tail)[None]], dim=1)
        logits = self._forward_embeds(embeds)
        loss, _ = self._objective(logits, one_hot[None], len(suffix_ids))
        (grad,) = torch.autograd.grad(loss.sum(), one_hot)
        return grad, float(loss.item())

    @torch.no_grad()
    def losses(self, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact losses (and exact-match flags) of ``[B, L]`` candidate suffixes."""
        chunk = self.config.batch_size or len(candidates)
        out_loss, out_exact = [], []
        for start in range(0, len(candidates), chunk):
            cand = candidates[start: start + chunk].to(self.device)
            ids = torch.cat([cand, self.tail.expand(len(cand), -1)], dim=1)
            logits = self._forward_embeds(self.embedding(ids))
            loss, exact = self._objective(logits, cand, cand.shape[1])
            out_loss.append(loss.cpu())
            out_exact.append(exact.cpu())
        return torch.cat(out_loss), torch.cat(out_exact)


def token_gradients(model, tokenizer, messages, target: str, suffix_ids, config: GCGConfig | None = None
                    ) -> torch.Tensor:
    """The gradient of GCG's loss w.r.t. the one-hot suffix tokens, ``[len(suffix), vocab]``:
    entry ``(i, v)`` is the first-order change of the loss if position ``i`` became token ``v``."""
    check_lm_and_tokenizer(model, tokenizer)
    config = _check_config(config)
    suffix = _check_ids("suffix_ids", suffix_ids)
    check_token_ids("suffix_ids", suffix[None], model)
    return _Scorer(model, build_prompt(tokenizer, messages, target), config).gradient(suffix)[0]


def candidate_losses(model, tokenizer, messages, target: str, candidates, config: GCGConfig | None = None
                     ) -> torch.Tensor:
    """Exact GCG losses of a ``[B, L]`` batch of candidate suffixes (one batched forward pass, with
    the prefix cache when ``config.use_prefix_cache``)."""
    check_lm_and_tokenizer(model, tokenizer)
    config = _check_config(config)
    if not isinstance(candidates, torch.Tensor) or candidates.dim() != 2 or candidates.numel() == 0:
        raise ValueError(f"candidates must be a non-empty [B, L] tensor of token ids, got {candidates!r}")
    check_token_ids("candidates", candidates, model)
    return _Scorer(model, build_prompt(tokenizer, messages, target), config).losses(candidates.long())[0]


def _check_config(config, name: str = "config") -> GCGConfig:
    """``config`` itself, or the defaults for ``None``; a clear error for anything else."""
    config = GCGConfig() if config is None else config
    if not isinstance(config, GCGConfig):
        raise TypeError(f"{name} must be a GCGConfig, got {type(config).__name__}")
    return config


def _check_ids(name: str, ids) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"{name} must be a non-empty list of token ids, got {ids!r}")
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Candidates and filters
# ---------------------------------------------------------------------------------------------


def sample_candidates(suffix_ids: torch.Tensor, grad: torch.Tensor, search_width: int, topk: int, n_replace: int,
                      allowed: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """``[search_width, L]`` candidates: each changes ``n_replace`` random positions of ``suffix_ids``
    to tokens drawn uniformly from that position's ``topk`` most negative gradient entries."""
    n = len(suffix_ids)
    if grad.shape[0] != n:
        raise ValueError(f"grad must have one row per suffix token ({n}), got shape {tuple(grad.shape)}")
    scores = -grad.detach().float().clone()
    if allowed is not None:
        scores[:, ~allowed.to(scores.device)] = -math.inf
    topk = min(topk, int(allowed.sum()) if allowed is not None else scores.shape[1])
    top_ids = scores.topk(topk, dim=1).indices.cpu()  # [L, k]
    n_replace = min(n_replace, n)
    positions = torch.rand(search_width, n, generator=generator).argsort(dim=1)[:, :n_replace]  # [B, r]
    choice = torch.randint(0, topk, (search_width, n_replace), generator=generator)
    new_tokens = top_ids[positions, choice]
    return suffix_ids.cpu().repeat(search_width, 1).scatter_(1, positions, new_tokens)


def retokenization_filter(tokenizer, candidates: torch.Tensor, before_ids=None) -> torch.Tensor:
    """Boolean mask of the candidates that survive decode -> encode unchanged (a suffix that does not
    retokenise to itself is not the string a user would send). With ``before_ids`` the check covers
    ``before + suffix``, which also catches merges across the boundary."""
    check_tokenizer(tokenizer)
    if not isinstance(candidates, torch.Tensor) or candidates.dim() != 2:
        raise ValueError(f"candidates must be a [B, L] tensor of token ids, got {type(candidates).__name__}")
    check_tensor("candidates", candidates, kind="int")
    if isinstance(before_ids, torch.Tensor):
        check_tensor("before_ids", before_ids, ndim=1, kind="int")
    elif before_ids is not None and (not isinstance(before_ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in before_ids)):
        raise TypeError(f"before_ids must be None or a list of token ids, got {before_ids!r}")
    prefix = [] if before_ids is None else list(torch.as_tensor(before_ids).tolist())
    rows = candidates.tolist()
    texts = [tokenizer.decode(prefix + row) for row in rows]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([enc == prefix + row for enc, row in zip(encoded, rows)], dtype=torch.bool)


class AllCandidatesFiltered(RuntimeError):
    """Every candidate of a step was removed by the retokenisation filter."""


def _filter(tokenizer, candidates, before_ids, step) -> torch.Tensor:
    keep = retokenization_filter(tokenizer, candidates, before_ids)
    if not keep.any():
        raise AllCandidatesFiltered(
            f"step {step}: all {len(candidates)} candidates changed under decode -> encode, so none is a "
            "string a user could send. Try another optim_str_init (e.g. ' x x x x x'), a larger "
            "search_width, or GCGConfig(filter_ids=False) to skip the check")
    return candidates[keep]


# ---------------------------------------------------------------------------------------------
# GCG
# ---------------------------------------------------------------------------------------------


class _Setup:
    """Shared by every attack: checked arguments, prompt(s), scorers, initial suffix, allowed tokens."""

    def __init__(self, model, tokenizer, prompts, config, name="config"):
        check_lm_and_tokenizer(model, tokenizer)
        config = _check_config(config, name)
        self.tokenizer, self.config = tokenizer, config
        self.prompts = [build_prompt(tokenizer, m, t) for m, t in prompts]
        self.scorers = [_Scorer(model, p, config) for p in self.prompts]
        self.suffix = torch.tensor(init_suffix_ids(tokenizer, config.optim_str_init), dtype=torch.long)
        vocab = model.get_input_embeddings().weight.shape[0]
        self.allowed = allowed_token_mask(tokenizer, vocab, config.allow_non_ascii)
        self.generator = torch.Generator().manual_seed(config.seed if config.seed is not None else
                                                       int(torch.seed() % 2**31))
        # Joint (before + suffix) retokenisation when the tokenizer round-trips the prompt at all;
        # otherwise (some sentencepiece tokenizers) the suffix alone, as nanoGCG does.
        before = self.prompts[0].before
        joint = bool(retokenization_filter(tokenizer, self.suffix[None], before)[0])
        self.filter_before = before if joint else None
        if config.filter_ids and not retokenization_filter(tokenizer, self.suffix[None], self.filter_before)[0]:
            raise ValueError(f"optim_str_init {config.optim_str_init!r} does not survive decode -> encode "
                             "itself; choose another initialisation or set filter_ids=False")

    def candidates(self, suffix, grad, step):
        c = self.config
        cands = sample_candidates(suffix, grad, c.search_width, c.topk, c.n_replace, self.allowed, self.generator)
        return _filter(self.tokenizer, cands, self.filter_before, step) if c.filter_ids else cands

    def evaluate(self, candidates, active):
        losses, exact = zip(*(self.scorers[i].losses(candidates) for i in range(active)))
        return torch.stack(losses).mean(0), torch.stack(exact).all(0)


def _run(setup: _Setup, progressive: bool) -> GCGResult:
    config, tok = setup.config, setup.tokenizer
    n_all = len(setup.prompts)
    active = 1 if progressive else n_all
    suffix = setup.suffix
    loss0, _ = setup.evaluate(suffix[None], active)
    buffer = [(float(loss0[0]), suffix)]  # (loss, ids), best first
    result = GCGResult(best_string=tok.decode(suffix), best_ids=suffix.tolist(),
                       best_loss=float(loss0[0]) if active == n_all else math.inf, forward_passes=active)
    started = time.perf_counter()
    current = suffix
    for step in range(config.num_steps):
        current = buffer[0][1]
        grad = sum(g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                   for g in (setup.scorers[i].gradient(current)[0] for i in range(active)))
        candidates = setup.candidates(current, grad, step)
        losses, exact = setup.evaluate(candidates, active)
        result.forward_passes += active * (len(candidates) + 1)
        result.backward_passes += active
        best = int(losses.argmin())
        if config.buffer_size > 0:
            buffer = sorted(buffer + [(float(losses[best]), candidates[best])], key=lambda item: item[0])
            buffer = buffer[: config.buffer_size]
            current_loss, current = buffer[0]
            succeeded = bool(setup.evaluate(current[None], active)[1][0])
        else:
            current_loss, current = float(losses[best]), candidates[best]
            buffer = [(current_loss, current)]
            succeeded = bool(exact[best])
        result.losses.append(current_loss)
        result.strings.append(tok.decode(current))
        result.budget.append(result.forward_passes + 2 * result.backward_passes)
        result.seconds.append(time.perf_counter() - started)
        result.n_prompts.append(active)
        first_success = succeeded and result.success_step is None
        if active == n_all and (current_loss < result.best_loss or first_success):
            result.best_loss, result.best_ids, result.best_string = current_loss, current.tolist(), tok.decode(current)
        if succeeded and active < n_all:
            active += 1  # progressive: the suffix works on every request so far; add the next one
            loss_all = float(setup.evaluate(current[None], active)[0][0])
            buffer = [(loss_all, current)]
            if active == n_all:
                result.best_loss, result.best_ids, result.best_string = loss_all, current.tolist(), tok.decode(current)
            continue
        if first_success:  # here active == n_all: a success with fewer requests continued above
            result.success_step = step
            if config.early_stop:
                break
    if result.best_loss == math.inf:  # progressive run that never reached every request
        result.best_loss = float(setup.evaluate(current[None], n_all)[0][0])
        result.best_ids, result.best_string = current.tolist(), tok.decode(current)
    return result


def gcg(model, tokenizer, messages, target: str, config: GCGConfig | None = None) -> GCGResult:
    """Greedy Coordinate Gradient (Zou et al. 2023, Algorithm 1) against one request.

    ``messages``: the request (str) or chat, with ``"{optim_str}"`` where the suffix goes (default:
    appended to the last message). ``target``: the reply prefix to force. Works on any HF causal LM.
    """
    return _run(_Setup(model, tokenizer, [(messages, target)], config), progressive=False)


def universal_gcg(model, tokenizer, behaviours: list[tuple], config: GCGConfig | None = None,
                  progressive: bool = True) -> GCGResult:
    """One suffix for several requests (Zou et al. 2023, Algorithm 2): the gradient sums the
    (row-normalised) gradients of the active requests, a candidate's loss is their mean. With
    ``progressive`` the attack starts on the first request and adds the next one whenever the suffix
    makes greedy decoding start with every active target."""
    if not isinstance(behaviours, list) or not behaviours or not all(
            isinstance(b, tuple) and len(b) == 2 for b in behaviours):
        raise TypeError(f"behaviours must be a non-empty list of (messages, target) tuples, got {behaviours!r}")
    check_bool("progressive", progressive)
    return _run(_Setup(model, tokenizer, behaviours, config), progressive=progressive)


def random_search(model, tokenizer, messages, target: str, config: GCGConfig | None = None,
                  n_change: int = 2, budget: int | None = None) -> GCGResult:
    """Random search in the style of Andriushchenko et al. (2024), with GCG's loss.

    Each step proposes ``config.search_width`` candidates, each replacing ``n_change`` contiguous
    tokens at a random position by random allowed tokens, and moves only if the best candidate
    improves the loss. No gradient. ``budget`` (forward passes; ``None``: no cap) stops the search
    once it has spent that many, trimming the last step's candidates so that it never spends more:
    give it ``gcg(...).budget[-1]`` to compare at an equal cost in forward-pass equivalents.

    Our variant keeps the best of a *batch* of candidates per step (a batch is cheap on one forward
    pass); Andriushchenko et al. try one candidate at a time and keep it if it is better, with a
    schedule that shrinks the number of changed tokens: ``search_width=1`` gives their one-at-a-time
    acceptance rule (with a fixed ``n_change``)."""
    n_change = check_int("n_change", n_change, minimum=1)
    if budget is not None:
        budget = check_int("budget", budget, minimum=2)
    setup = _Setup(model, tokenizer, [(messages, target)], config)
    config = setup.config
    tok, allowed_ids = setup.tokenizer, setup.allowed.nonzero().squeeze(1)
    suffix = setup.suffix
    loss0, _ = setup.evaluate(suffix[None], 1)
    current, current_loss = suffix, float(loss0[0])
    result = GCGResult(best_string=tok.decode(suffix), best_ids=suffix.tolist(), best_loss=current_loss,
                       forward_passes=1)
    started = time.perf_counter()
    n = len(suffix)
    width = min(n_change, n)
    for step in range(config.num_steps):
        if budget is not None and result.forward_passes >= budget:
            break
        starts = torch.randint(0, n - width + 1, (config.search_width,), generator=setup.generator)
        picks = allowed_ids[torch.randint(0, len(allowed_ids), (config.search_width, width), generator=setup.generator)]
        positions = starts[:, None] + torch.arange(width)[None]
        candidates = current.repeat(config.search_width, 1).scatter_(1, positions, picks)
        if config.filter_ids:
            candidates = _filter(tok, candidates, setup.filter_before, step)
        if budget is not None:
            candidates = candidates[: budget - result.forward_passes]
        losses, exact = setup.evaluate(candidates, 1)
        result.forward_passes += len(candidates)
        best = int(losses.argmin())
        if float(losses[best]) < current_loss:
            current, current_loss = candidates[best], float(losses[best])
            if bool(exact[best]) and result.success_step is None:
                result.success_step = step
        result.losses.append(current_loss)
        result.strings.append(tok.decode(current))
        result.budget.append(result.forward_passes)
        result.seconds.append(time.perf_counter() - started)
        result.n_prompts.append(1)
        if result.success_step is not None and config.early_stop:
            break
    result.best_loss, result.best_ids, result.best_string = current_loss, current.tolist(), tok.decode(current)
    return result


# ---------------------------------------------------------------------------------------------
# Controls: random suffixes of the same length
# ---------------------------------------------------------------------------------------------

#: The characters of a random-character control suffix: printable ASCII without line breaks.
CONTROL_CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " "


def random_suffix(tokenizer, length: int, kind: str = "tokens", seed: int = 0, vocab_size: int | None = None) -> str:
    """A control suffix: what an attack's success must be measured against (an optimised suffix
    whose "success" a random one of the same length also achieves is not the optimiser's success).

    ``kind="tokens"``: ``length`` tokens drawn uniformly from the tokens a GCG suffix may use
    (:func:`allowed_token_mask`, over ``vocab_size`` ids, default the tokenizer's), decoded;
    ``kind="chars"``: ``length`` characters drawn uniformly from :data:`CONTROL_CHARACTERS`. Seeded."""
    check_tokenizer(tokenizer)
    length = check_int("length", length, minimum=1)
    check_choice("kind", kind, ("tokens", "chars"))
    seed = check_int("seed", seed, minimum=0)
    vocab_size = len(tokenizer) if vocab_size is None else check_int("vocab_size", vocab_size, minimum=1)
    generator = torch.Generator().manual_seed(seed)
    if kind == "chars":
        picks = torch.randint(0, len(CONTROL_CHARACTERS), (length,), generator=generator)
        return "".join(CONTROL_CHARACTERS[i] for i in picks.tolist())
    allowed = allowed_token_mask(tokenizer, vocab_size).nonzero().squeeze(1)
    if len(allowed) == 0:
        raise ValueError("the tokenizer has no token a suffix may use (allowed_token_mask is empty)")
    picks = allowed[torch.randint(0, len(allowed), (length,), generator=generator)]
    return tokenizer.decode(picks.tolist())

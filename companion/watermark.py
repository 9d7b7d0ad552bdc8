"""Logit watermarks for LLM text, their detectors, and the edits that attack them (chapter 07).

A watermark is planted while a model generates and checked later from the text alone, with a secret
key and no access to the model. The course implements four schemes, each as a Hugging Face
``LogitsProcessor`` (so ``model.generate(..., logits_processor=[wm.processor()])`` works on any causal
LM) plus its detector:

1. :class:`KGW` (Kirchenbauer et al. 2023, "A Watermark for Large Language Models", Alg. 2 and 3): the
   key and the ``context`` previous tokens seed a pseudo-random split of the vocabulary into a green
   list of ``gamma * V`` tokens and a red list; ``delta`` is added to the green logits. ``seeding``
   ``"lefthash"`` seeds from the tokens before the one being chosen; ``"selfhash"`` is the anchored
   min-hash of lm-watermarking and transformers, whose seed includes the candidate token itself (only
   the top candidates are checked, as in transformers).
2. :class:`Unigram` (Zhao et al. 2024, "Provable Robust Watermarking for AI-Generated Text"): one fixed
   green list, no context, so an edit changes the score of only the edited token.
3. :class:`GumbelWatermark` (Aaronson 2022, context hashing; Kuditipudi et al. 2024 replace the context
   hash by a keyed sequence with edit-distance detection, not implemented here): no bias at all; the key and context give a uniform ``r_v`` per token and the next token is
   ``argmax_v r_v ** (1 / p_v)``, which is an exact sample from ``p`` over the key's randomness
   (distortion-free), yet leaves chosen tokens with suspiciously large ``r``.

Detection (:meth:`Watermark.detect`) follows the hygiene the anchors' users ask for: the prompt is
excluded (``prompt_length``), repeated (context, token) pairs are scored once (they are not independent
draws), and p-values are exact (binomial for green counts, Gamma for the Gumbel score) rather than
only the normal approximation, which is too optimistic in the far tail. A windowed detector
(:meth:`Watermark.detect_windowed`) finds a watermarked span pasted into human text.

Attacks (token-level, seeded, editing only after ``start``): random substitution, contextual
resampling by an unwatermarked model (:func:`lm_substitute`, teacher-forced: not a paraphraser), deletion, span reordering, copy-paste dilution and the emoji attack. Score convention: higher =
more likely watermarked (the z-score).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from companion.checks import (check_causal_lm, check_choice, check_float, check_fraction, check_int,
                              check_token_list, vocab_size)

SEEDINGS = ("lefthash", "selfhash")
PRFS = ("randperm", "hash")
#: Codes of contexts are reduced modulo this prime; for ``context=1`` the code is the token id itself.
_CODE_MODULUS = 2_147_483_647
_MASK32 = 0xFFFFFFFF
#: The size of the key-seeded table of the anchored min-hash (transformers' ``table_size``).
_MINHASH_TABLE = 1_000_003


# ---------------------------------------------------------------------------------------------
# 1. Pseudo-random functions of (key, context, token)
# ---------------------------------------------------------------------------------------------


def context_codes(ids: torch.Tensor, context: int, vocab: int) -> torch.Tensor:
    """One integer per position ``i >= context`` of a ``[B, L]`` id tensor: the mixed-radix code of the
    ``context`` tokens before ``i`` (``ids[i-1] + V * ids[i-2] + ...``, modulo a large prime). With
    ``context=1`` the code is the previous token, the seed transformers' lefthash uses. ``[B, L-context]``."""
    ids = _as_batch("ids", ids)
    context = check_int("context", context, minimum=1)
    vocab = check_int("vocab", vocab, minimum=2)
    if ids.shape[1] <= context:
        raise ValueError(f"ids must be longer than context ({context}) to have a position to score, "
                         f"got length {ids.shape[1]}")
    length = ids.shape[1] - context
    code = torch.zeros(ids.shape[0], length, dtype=torch.int64)
    for j in range(context):  # oldest token first, so the last token ends as the lowest digit
        code = (code * vocab + ids[:, j: j + length]) % _CODE_MODULUS
    return code


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (two rounds of xor-shift-multiply): exact integer arithmetic, so the
    same on every CPU. Values stay below 2**59 inside int64."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def _context_seeds(key: int, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two secret 32-bit words per context code: the 64-bit ``blake2b`` digest of the code (8 bytes,
    signed little-endian) keyed with the full key (8 bytes). One hash per *distinct* code, so a batch
    of texts costs one hash per distinct context, and the per-token work stays vectorised."""
    import hashlib

    unique, inverse = torch.unique(codes.reshape(-1), return_inverse=True)
    key_bytes = int(key).to_bytes(8, "little")
    blake, from_bytes = hashlib.blake2b, int.from_bytes
    digests = [from_bytes(blake(c.to_bytes(8, "little", signed=True), key=key_bytes, digest_size=8).digest(),
                          "little") for c in unique.tolist()]
    low = torch.tensor([d & _MASK32 for d in digests], dtype=torch.int64)
    high = torch.tensor([d >> 32 for d in digests], dtype=torch.int64)
    return low[inverse].reshape(codes.shape), high[inverse].reshape(codes.shape)


def hash_uniform(key: int, codes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A keyed uniform in (0, 1) for each (context code, token) pair (broadcast): the PRF of the
    ``"hash"`` green lists and of the Gumbel watermark. Exact integer arithmetic, the same on every CPU.

    The full 63-bit key enters through a keyed cryptographic hash of the context code
    (``blake2b(code, key=key)``, computed once per distinct code, :func:`_context_seeds`); the two
    secret 32-bit words it gives are then mixed with the token id by a 32-bit integer finaliser
    (vectorised over the vocabulary). So two keys give unrelated seeds for every context (no
    relabelling of contexts, no 2**32 key space), while one green list still costs one hash. The
    token step is a fast mixer, not a cryptographic PRF: good for the course's statistics."""
    check_int("key", key, minimum=0, maximum=2 ** 63 - 1)
    for name, value in (("codes", codes), ("tokens", tokens)):
        if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {type(value).__name__}"
                            f"{'' if not isinstance(value, torch.Tensor) else ' of dtype ' + str(value.dtype)}")
    if tokens.numel() and int(tokens.min()) < 0:
        raise ValueError(f"tokens must be >= 0, got a minimum of {int(tokens.min())}")
    low, high = _context_seeds(key, codes.to(torch.int64))
    tokens = tokens.to(torch.int64) & _MASK32
    bits = _mix32(low ^ (_mix32((tokens + 0x9E37) ^ high) * 0x27D4EB2D & _MASK32))
    return (bits.double() + 0.5) / 2.0 ** 32


# ---------------------------------------------------------------------------------------------
# 2. The common detector
# ---------------------------------------------------------------------------------------------


def _as_batch(name: str, ids) -> torch.Tensor:
    if isinstance(ids, torch.Tensor) and ids.ndim == 2:
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.numel() == 0:
            raise TypeError(f"{name} must be a non-empty integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
        if int(ids.min()) < 0:
            raise ValueError(f"{name} must hold token ids >= 0, got a minimum of {int(ids.min())}")
        return ids.long()
    return torch.tensor([check_token_list(name, ids)], dtype=torch.int64)


class Watermark:
    """What every scheme shares: a key, a context width, a per-position statistic and its test.

    Subclasses define :meth:`position_stats` (one number per scored position: 1/0 green for the
    list-based schemes, ``-log(1 - r)`` for Gumbel), :meth:`units` (what makes two positions the same
    draw, for de-duplication) and :meth:`p_value` (the exact null tail of the summed statistic).
    """

    vocab_size: int
    key: int
    context: int

    def _check_ids(self, ids) -> torch.Tensor:
        ids = _as_batch("ids", ids)
        if ids.shape[0] != 1:
            raise ValueError(f"ids must be one sequence (a list or a 1-D tensor), got a batch of {ids.shape[0]}")
        if int(ids.max()) >= self.vocab_size:
            raise ValueError(f"ids must be token ids below vocab_size={self.vocab_size}, got {int(ids.max())} "
                             "(is the detector's vocab_size the generating model's logits width?)")
        return ids

    def _scored(self, ids, prompt_length: int, ignore_repeated: bool):
        """The statistic of every scored position: after the prompt, with a full context, each
        (context, token) unit once when ``ignore_repeated``."""
        ids = self._check_ids(ids)
        prompt_length = check_int("prompt_length", prompt_length, minimum=0)
        if not isinstance(ignore_repeated, bool):
            raise TypeError(f"ignore_repeated must be a bool, got {type(ignore_repeated).__name__}")
        first = max(prompt_length, self.context)
        if ids.shape[1] <= first:
            raise ValueError(f"ids (length {ids.shape[1]}) must be longer than the prompt ({prompt_length} "
                             f"tokens) and the context ({self.context} tokens): no token to score")
        stats = self.position_stats(ids)[0, first - self.context:]
        if ignore_repeated:
            units = self.units(ids)[0, first - self.context:].tolist()
            seen, keep = set(), []
            for i, unit in enumerate(units):
                if unit not in seen:
                    seen.add(unit)
                    keep.append(i)
            stats = stats[keep]
        return stats.double()

    def detect(self, ids, prompt_length: int = 0, ignore_repeated: bool = True) -> dict:
        """Test one token sequence (a list or 1-D tensor of ids) for the watermark.

        Returns ``{"z", "p_value", "score", "scored"}`` (plus ``"green"`` and ``"p_normal"`` for the
        list-based schemes): ``scored`` positions after ``prompt_length`` (each repeated unit once when
        ``ignore_repeated``), their summed statistic ``score``, its standardised ``z`` and the exact
        one-sided p-value. Higher ``z`` = more likely watermarked."""
        stats = self._scored(ids, prompt_length, ignore_repeated)
        return self._summary(float(stats.sum()), len(stats))

    def detect_windowed(self, ids, window: int, prompt_length: int = 0, ignore_repeated: bool = True) -> dict:
        """The best window: the maximum z over every run of ``window`` consecutive scored positions
        (the WinMax idea of Kirchenbauer et al. 2024 for copy-paste), with a Bonferroni-corrected
        p-value ``min(1, windows * p)`` so that it stays a valid test without calibration data."""
        window = check_int("window", window, minimum=1)
        stats = self._scored(ids, prompt_length, ignore_repeated)
        if len(stats) <= window:
            return self._summary(float(stats.sum()), len(stats)) | {"windows": 1}
        sums = torch.cumsum(torch.cat([stats.new_zeros(1), stats]), 0)
        window_sums = sums[window:] - sums[:-window]
        best = float(window_sums.max())
        out = self._summary(best, window)
        out["p_value"] = min(1.0, out["p_value"] * len(window_sums))
        out["windows"] = len(window_sums)
        return out

    def detect_many(self, texts: list, prompt_length: int = 0, ignore_repeated: bool = True) -> dict:
        """:meth:`detect` for many sequences at once (vectorised; same results): a dict of arrays."""
        if not isinstance(texts, list) or not texts:
            raise TypeError(f"texts must be a non-empty list of token-id lists, got {type(texts).__name__}")
        prompt_length = check_int("prompt_length", prompt_length, minimum=0)
        if not isinstance(ignore_repeated, bool):
            raise TypeError(f"ignore_repeated must be a bool, got {type(ignore_repeated).__name__}")
        texts = [check_token_list(f"texts[{i}]", t) for i, t in enumerate(texts)]
        first = max(prompt_length, self.context)
        lengths = np.array([len(t) for t in texts])
        if (lengths <= first).any():
            i = int(np.argmax(lengths <= first))
            raise ValueError(f"texts[{i}] (length {lengths[i]}) must be longer than the prompt ({prompt_length} "
                             f"tokens) and the context ({self.context} tokens): no token to score")
        if max(max(t) for t in texts) >= self.vocab_size:
            raise ValueError(f"texts must hold token ids below vocab_size={self.vocab_size}")
        batch = torch.zeros(len(texts), int(lengths.max()), dtype=torch.int64)
        for i, t in enumerate(texts):
            batch[i, : len(t)] = torch.tensor(t)
        stats = self.position_stats(batch).double().numpy()
        units = self.units(batch).numpy() if ignore_repeated else None
        score, scored = np.zeros(len(texts)), np.zeros(len(texts), dtype=np.int64)
        lo = first - self.context
        for i, length in enumerate(lengths):
            hi = length - self.context
            if ignore_repeated:
                keep = lo + np.unique(units[i, lo:hi], return_index=True)[1]
                score[i], scored[i] = stats[i, keep].sum(), len(keep)
            else:
                score[i], scored[i] = stats[i, lo:hi].sum(), hi - lo
        return self._summary_arrays(score, scored)

    def _summary(self, score: float, scored: int) -> dict:
        out = self._summary_arrays(np.array([score]), np.array([scored]))
        return {k: (int(v[0]) if k in ("green", "scored") else float(v[0])) for k, v in out.items()}

    def _summary_arrays(self, score: np.ndarray, scored: np.ndarray) -> dict:
        raise NotImplementedError

    def position_stats(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def units(self, ids: torch.Tensor) -> torch.Tensor:
        """One integer per scored position identifying the (context, token) draw."""
        codes = context_codes(ids, self.context, self.vocab_size)
        return codes * self.vocab_size + ids[:, self.context:]

    def processor(self) -> LogitsProcessor:
        raise NotImplementedError

    def _check_scores(self, scores: torch.Tensor) -> None:
        if scores.shape[-1] != self.vocab_size:
            raise ValueError(f"the model's logits have width {scores.shape[-1]} but the watermark's "
                             f"vocab_size is {self.vocab_size}: build the watermark with the logits width "
                             "(model.get_output_embeddings().weight.shape[0]), not len(tokenizer)")


def _check_common(vocab_size, gamma, delta, key):
    check_int("vocab_size", vocab_size, minimum=2)
    gamma = check_float("gamma", gamma, 0, 1, open_minimum=True, open_maximum=True)
    if int(vocab_size * gamma) < 1 or int(vocab_size * gamma) >= vocab_size:
        raise ValueError(f"gamma * vocab_size must leave at least one green and one red token, got "
                         f"gamma={gamma}, vocab_size={vocab_size}")
    delta = check_float("delta", delta, 0, 50)
    check_int("key", key, minimum=0, maximum=2 ** 63 - 1)
    return gamma, delta


class _ListWatermark(Watermark):
    """Green-list schemes (KGW, Unigram): the statistic is green (1) or red (0); under no watermark
    each distinct unit is green with probability ``gamma``, so the green count of ``T`` units is
    Binomial(T, gamma) and ``z = (G - gamma T) / sqrt(T gamma (1 - gamma))`` (KGW, eq. 2)."""

    gamma: float
    delta: float

    def _summary_arrays(self, score: np.ndarray, scored: np.ndarray) -> dict:
        from scipy import stats

        green, gamma = np.rint(score).astype(np.int64), self.gamma
        z = (green - gamma * scored) / np.sqrt(scored * gamma * (1 - gamma))
        return {"z": z, "p_value": stats.binom.sf(green - 1, scored, gamma), "p_normal": stats.norm.sf(z),
                "green": green, "score": green.astype(float), "scored": scored}


# ---------------------------------------------------------------------------------------------
# 3. KGW: a green list per context
# ---------------------------------------------------------------------------------------------


class KGW(_ListWatermark):
    """The KGW watermark (Kirchenbauer et al. 2023, Alg. 2 "soft red list"; Alg. 3 for self-hash).

    Args:
        vocab_size: the model's logits width ``V`` (not ``len(tokenizer)``: they differ for many models).
        gamma: green fraction, ``|G| = int(gamma * V)``.
        delta: the bias added to green logits.
        key: the secret key (never the public 15485863 in a deployment).
        seeding: ``"lefthash"``: the green list at step ``t`` is seeded by tokens ``t-h .. t-1``;
            ``"selfhash"``: by the anchored min-hash of tokens ``t-h+1 .. t`` (the candidate itself
            included), checked for the top ``top_candidates`` candidates.
        context: the seeding window ``h``.
        prf: ``"randperm"``: ``randperm(V, seed=key * code)[:|G|]``, the green lists of transformers'
            ``WatermarkLogitsProcessor`` (identical lists for lefthash ``context=1`` and for selfhash at
            any ``context``); costs one
            ``randperm`` per distinct context (cached), cheap only when contexts repeat (``h = 1``: at
            most ``V``). ``"hash"``: token ``v`` is green iff a keyed hash of (context, ``v``) is below
            ``gamma`` (a list of about ``gamma * V`` tokens), vectorised, for wide contexts.

    ``"selfhash"`` is the anchored min-hash of lm-watermarking and transformers
    (``WatermarkingConfig(seeding_scheme="selfhash")``): with a key-seeded table ``a`` (a
    ``randperm`` of 1,000,003 entries, plus one) and the window ``x_{t-h+1} .. x_t`` ending with the
    candidate, the seed is ``min_i key * a(x_i) * a(x_t)`` (int64 arithmetic, wrapping as in
    transformers). It depends on one window token (the argmin) and on ``x_t``: an edit elsewhere in the
    window changes it only if the new token becomes the argmin (:func:`unaffected_fraction`).

    Weaknesses of the ``"randperm"`` PRF, inherited from transformers for the cross-check: the lefthash
    seed is ``key * code``, so for the context token 0 it is 0 whatever the key (that green list is
    public), and the seed is a product, not a keyed hash. ``prf="hash"`` uses :func:`hash_uniform`
    (``blake2b`` keyed with the full key) instead.
    """

    def __init__(self, vocab_size: int, gamma: float = 0.25, delta: float = 2.0, key: int = 15485863,
                 seeding: str = "lefthash", context: int = 1, prf: str = "randperm", top_candidates: int = 40):
        self.gamma, self.delta = _check_common(vocab_size, gamma, delta, key)
        self.vocab_size, self.key = int(vocab_size), int(key)
        self.seeding = check_choice("seeding", seeding, SEEDINGS)
        self.context = check_int("context", context, minimum=1, maximum=16)
        self.prf = check_choice("prf", prf, PRFS)
        self.top_candidates = check_int("top_candidates", top_candidates, minimum=1)
        self.green_size = int(self.vocab_size * self.gamma)
        self._rows: dict[int, torch.Tensor] = {}
        self._table: torch.Tensor | None = None

    def with_key(self, key: int) -> "KGW":
        """The same scheme under another key (e.g. to draw many null tests from one text)."""
        return KGW(self.vocab_size, self.gamma, self.delta, key, self.seeding, self.context, self.prf,
                   self.top_candidates)

    def __repr__(self) -> str:
        return (f"KGW(gamma={self.gamma}, delta={self.delta}, seeding={self.seeding!r}, context={self.context}, "
                f"prf={self.prf!r})")

    # -- green lists --------------------------------------------------------------------------
    def _randperm_row(self, code: int) -> torch.Tensor:
        row = self._rows.get(code)
        if row is None:  # lefthash seeds with key * code; a selfhash code already holds the key
            seed = self.key * code if self.seeding == "lefthash" else code
            generator = torch.Generator().manual_seed(seed % (2 ** 64 - 1))
            row = torch.zeros(self.vocab_size, dtype=torch.bool)
            row[torch.randperm(self.vocab_size, generator=generator)[: self.green_size]] = True
            self._rows[code] = row
        return row

    def green_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """The green mask ``[..., V]`` of each context code."""
        if self.prf == "hash":
            return hash_uniform(self.key, codes[..., None], torch.arange(self.vocab_size)) < self.gamma
        flat = codes.reshape(-1).tolist()
        return torch.stack([self._randperm_row(c) for c in flat]).reshape(*codes.shape, self.vocab_size)

    def is_green(self, codes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Whether each token is green for its context code (same shapes)."""
        if self.prf == "hash":
            return hash_uniform(self.key, codes, tokens) < self.gamma
        unique, inverse = torch.unique(codes.reshape(-1), return_inverse=True)
        flat_tokens = tokens.reshape(-1)
        green = torch.empty(len(flat_tokens), dtype=torch.bool)
        for start in range(0, len(unique), 4096):  # at most 4096 x V booleans at a time
            table = torch.stack([self._randperm_row(c) for c in unique[start: start + 4096].tolist()])
            chosen = (inverse >= start) & (inverse < start + 4096)
            green[chosen] = table[inverse[chosen] - start, flat_tokens[chosen]]
        return green.reshape(codes.shape)

    def min_hash(self, windows: torch.Tensor) -> torch.Tensor:
        """The anchored min-hash seed of each window ``[..., h]`` (its last token is the one being
        coloured): ``min_i key * a(x_i) * a(x_t)`` in wrapping int64, exactly transformers' ``set_seed``
        for ``seeding_scheme="selfhash"``."""
        if self._table is None:
            generator = torch.Generator().manual_seed(self.key)
            self._table = torch.randperm(_MINHASH_TABLE, generator=generator)
        a = self._table[windows % _MINHASH_TABLE] + 1
        return (self.key * a * a[..., -1:]).min(dim=-1).values

    def seed_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """The code that seeds each scored position's green list: the ``h`` tokens before it
        (lefthash) or the anchored min-hash of the ``h`` tokens ending with it (selfhash). ``[B, L - h]``."""
        if self.seeding == "lefthash":
            return context_codes(ids, self.context, self.vocab_size)
        ids = _as_batch("ids", ids)
        if ids.shape[1] <= self.context:
            raise ValueError(f"ids must be longer than context ({self.context}) to have a position to score, "
                             f"got length {ids.shape[1]}")
        return self.min_hash(ids.unfold(1, self.context, 1)[:, 1:])

    def position_stats(self, ids: torch.Tensor) -> torch.Tensor:
        return self.is_green(self.seed_codes(ids), ids[:, self.context:]).float()

    def units(self, ids: torch.Tensor) -> torch.Tensor:
        return self.seed_codes(ids) * self.vocab_size + ids[:, self.context:]

    def processor(self) -> LogitsProcessor:
        """A ``LogitsProcessor`` that adds ``delta`` to the green logits (for ``model.generate``)."""
        return _KGWProcessor(self)


def unaffected_fraction(watermark: "Watermark", rate: float) -> float:
    """The expected fraction of scored positions whose colour (or ``r``) an edit at ``rate`` leaves
    untouched, when each token is replaced independently with probability ``rate`` by a random one.

    Lefthash context ``h`` (and Gumbel): the token and its ``h`` predecessors must all survive,
    ``(1 - rate) ** (h + 1)``. Unigram: ``1 - rate``. Anchored min-hash over a window of ``h``: ``x_t``
    must survive, and, if ``k`` of the other ``h - 1`` window tokens are replaced, the minimum of the
    ``h`` old and ``k`` new (i.i.d.) hash values must lie on one of the ``h - k`` untouched tokens,
    probability ``(h - k) / (h + k)``; so ``(1 - rate) * sum_k C(h-1, k) rate^k (1-rate)^(h-1-k) (h-k)/(h+k)``."""
    if not isinstance(watermark, Watermark):
        raise TypeError(f"watermark must be a KGW, Unigram or GumbelWatermark, got {type(watermark).__name__}")
    rate = check_fraction("rate", rate)
    h = watermark.context
    if isinstance(watermark, KGW) and watermark.seeding == "selfhash":
        return (1 - rate) * sum(math.comb(h - 1, k) * rate ** k * (1 - rate) ** (h - 1 - k) * (h - k) / (h + k)
                                for k in range(h))
    return (1 - rate) ** (h + 1)


class _KGWProcessor(LogitsProcessor):
    def __init__(self, watermark: KGW):
        self.watermark = watermark

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        wm = self.watermark
        wm._check_scores(scores)
        if input_ids.shape[1] < wm.context:
            raise ValueError(f"input_ids must hold at least context={wm.context} tokens (the prompt seeds the "
                             f"first green list), got {input_ids.shape[1]}")
        if wm.seeding == "lefthash":
            tail = input_ids[:, -wm.context:]
            codes = context_codes(torch.cat([tail, tail[:, :1]], 1), wm.context, wm.vocab_size)[:, 0]
            return scores + wm.delta * wm.green_rows(codes).to(scores.dtype)
        # selfhash: the candidate is part of its own seed; check the top candidates one by one
        k = min(wm.top_candidates, scores.shape[-1])
        candidates = scores.topk(k, dim=-1).indices  # [B, k]
        tail = input_ids[:, input_ids.shape[1] - wm.context + 1:] if wm.context > 1 else input_ids[:, :0]
        windows = torch.cat([tail[:, None, :].expand(-1, k, -1), candidates[..., None]], dim=-1)  # [B, k, h]
        green = wm.is_green(wm.min_hash(windows), candidates)
        bias = torch.zeros_like(scores).scatter(1, candidates, wm.delta * green.to(scores.dtype))
        return scores + bias


# ---------------------------------------------------------------------------------------------
# 4. Unigram: one green list for every position
# ---------------------------------------------------------------------------------------------


class Unigram(_ListWatermark):
    """The Unigram watermark (Zhao et al. 2024): KGW with one fixed green list of ``int(gamma * V)``
    tokens (``randperm(V, seed=key)``). An edit changes only the edited token's colour, hence the
    provable edit robustness; the price is that the list is the same everywhere, so it can be learned
    from token frequencies of watermarked text. Repeated tokens are scored once."""

    context = 0

    def __init__(self, vocab_size: int, gamma: float = 0.25, delta: float = 2.0, key: int = 15485863):
        self.gamma, self.delta = _check_common(vocab_size, gamma, delta, key)
        self.vocab_size, self.key = int(vocab_size), int(key)
        self.green_size = int(self.vocab_size * self.gamma)
        generator = torch.Generator().manual_seed(self.key % (2 ** 64 - 1))
        self.green = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.green[torch.randperm(self.vocab_size, generator=generator)[: self.green_size]] = True

    def with_key(self, key: int) -> "Unigram":
        """The same scheme under another key."""
        return Unigram(self.vocab_size, self.gamma, self.delta, key)

    def __repr__(self) -> str:
        return f"Unigram(gamma={self.gamma}, delta={self.delta})"

    def position_stats(self, ids: torch.Tensor) -> torch.Tensor:
        return self.green[ids].float()

    def units(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def processor(self) -> LogitsProcessor:
        return _UnigramProcessor(self)


class _UnigramProcessor(LogitsProcessor):
    def __init__(self, watermark: Unigram):
        self.watermark = watermark

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.watermark._check_scores(scores)
        return scores + self.watermark.delta * self.watermark.green.to(scores.dtype)


# ---------------------------------------------------------------------------------------------
# 5. Gumbel / exponential-minimum sampling: distortion-free
# ---------------------------------------------------------------------------------------------


class GumbelWatermark(Watermark):
    """Aaronson's (2022) watermark, the exponential-minimum sampling of Kuditipudi et al. (2024).

    At each step the key and the ``context`` previous tokens give ``r_v ~ U(0, 1)`` for every token
    ``v``; the model's distribution ``p`` (after its temperature) is replaced by the deterministic choice
    ``argmax_v log(r_v) / p_v``. Over the key's randomness this picks ``v`` with probability exactly
    ``p_v`` (the Gumbel-max trick), so a single text is an unbiased sample. Detection sums
    ``-log(1 - r_{x_t})`` over distinct scored units: without the watermark each term is Exp(1), so the
    sum of ``T`` terms is Gamma(T, 1) (the exact p-value); chosen tokens have large ``r`` and push it up.

    Not implemented: Kuditipudi et al.'s edit-distance-aligned test over a key *sequence*, which is
    what makes their variant robust to insertions and deletions; ours is Aaronson's hashing variant.
    """

    def __init__(self, vocab_size: int, key: int = 15485863, context: int = 4):
        check_int("vocab_size", vocab_size, minimum=2)
        check_int("key", key, minimum=0, maximum=2 ** 63 - 1)
        self.vocab_size, self.key = int(vocab_size), int(key)
        self.context = check_int("context", context, minimum=1, maximum=16)

    def with_key(self, key: int) -> "GumbelWatermark":
        """The same scheme under another key."""
        return GumbelWatermark(self.vocab_size, key, self.context)

    def __repr__(self) -> str:
        return f"GumbelWatermark(context={self.context})"

    def uniforms(self, codes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return hash_uniform(self.key, codes, tokens)

    def position_stats(self, ids: torch.Tensor) -> torch.Tensor:
        r = self.uniforms(context_codes(ids, self.context, self.vocab_size), ids[:, self.context:])
        return -torch.log1p(-r)

    def _summary_arrays(self, score: np.ndarray, scored: np.ndarray) -> dict:
        from scipy import stats

        return {"z": (score - scored) / np.sqrt(scored), "p_value": stats.gamma.sf(score, scored),
                "score": score, "scored": scored}

    def processor(self) -> LogitsProcessor:
        return _GumbelProcessor(self)


class _GumbelProcessor(LogitsProcessor):
    def __init__(self, watermark: GumbelWatermark):
        self.watermark = watermark

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        wm = self.watermark
        wm._check_scores(scores)
        if input_ids.shape[1] < wm.context:
            raise ValueError(f"input_ids must hold at least context={wm.context} tokens, got {input_ids.shape[1]}")
        tail = input_ids[:, -wm.context:]
        codes = context_codes(torch.cat([tail, tail[:, :1]], 1), wm.context, wm.vocab_size)[:, :1]
        r = wm.uniforms(codes, torch.arange(wm.vocab_size)[None, :])  # [B, V]
        probs = torch.softmax(scores.double(), dim=-1)
        choice = (torch.log(r) / probs).argmax(dim=-1)  # p_v = 0 gives -inf: never chosen
        out = torch.full_like(scores, -math.inf)
        return out.scatter(1, choice[:, None], 0.0)


# ---------------------------------------------------------------------------------------------
# 6. Generating: sampling with processors, entropy, quality
# ---------------------------------------------------------------------------------------------


class ForceSymbol(LogitsProcessor):
    """Forces ``symbol_id`` at every other generated step (steps 1, 3, 5, ... after ``prompt_width``):
    the emoji attack's "write a symbol after every word" carried out by a model that obeys."""

    def __init__(self, symbol_id: int, prompt_width: int):
        self.symbol_id = check_int("symbol_id", symbol_id, minimum=0)
        self.prompt_width = check_int("prompt_width", prompt_width, minimum=0)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if (input_ids.shape[1] - self.prompt_width) % 2 == 1:
            forced = torch.full_like(scores, -math.inf)
            forced[:, self.symbol_id] = 0.0
            return forced
        return scores


def _check_prompts(name: str, prompts, model) -> list[list[int]]:
    if not isinstance(prompts, list) or not prompts:
        raise TypeError(f"{name} must be a non-empty list of token-id lists, got {type(prompts).__name__}")
    out = [check_token_list(f"{name}[{i}]", p) for i, p in enumerate(prompts)]
    size = vocab_size(model)
    for i, p in enumerate(out):
        if max(p) >= size:
            raise ValueError(f"{name}[{i}] holds id {max(p)}, beyond the model's vocabulary of {size}")
    return out


@torch.no_grad()
def sample(model, prompts: list, processors=(), max_new_tokens: int = 96, seed: int = 0,
           batch_size: int = 64, pad_id: int = 0) -> list[list[int]]:
    """Multinomial samples (temperature 1, no top-k / top-p) of exactly ``max_new_tokens`` new tokens
    per prompt, through ``processors`` (e.g. ``[wm.processor()]``). Prompts are left-padded with
    ``pad_id`` in batches of ``batch_size``; torch is seeded with ``seed + batch index`` before each
    batch, so the result does not depend on what else runs. Returns the completions' ids."""
    check_causal_lm(model)
    prompts = _check_prompts("prompts", prompts, model)
    if not isinstance(processors, (list, tuple)) or not all(isinstance(p, LogitsProcessor) for p in processors):
        raise TypeError(f"processors must be a list of LogitsProcessor, got {processors!r:.80}")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    pad_id = check_int("pad_id", pad_id, minimum=0)
    from companion.train import pad_batch

    device = next(model.parameters()).device
    out = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start: start + batch_size]
        ids, mask = pad_batch(chunk, pad_id, side="left")
        torch.manual_seed(seed + b)
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, top_k=0, top_p=1.0,
            temperature=1.0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=pad_id,
            logits_processor=LogitsProcessorList(list(processors)))
        out += generated[:, ids.shape[1]:].tolist()
    return out


def emoji_attack(model, prompts: list, watermark: Watermark, symbol_id: int, max_new_tokens: int = 96,
                 seed: int = 0) -> list[list[int]]:
    """The emoji attack (discussed by Kirchenbauer et al. 2023): the attacker has the watermarked model write a
    symbol after every token, then deletes the symbols. Every kept token was chosen with the symbol as
    its left context, so after deletion the detector recomputes green lists from different neighbours.
    Returns the completions with the symbols removed (about ``max_new_tokens / 2`` tokens)."""
    if not isinstance(watermark, Watermark):
        raise TypeError(f"watermark must be a KGW, Unigram or GumbelWatermark, got {type(watermark).__name__}")
    prompts = _check_prompts("prompts", prompts, model)
    symbol_id = check_int("symbol_id", symbol_id, minimum=0, maximum=vocab_size(model) - 1)
    width = max(len(p) for p in prompts)
    raw = sample(model, prompts, [watermark.processor(), ForceSymbol(symbol_id, width)], max_new_tokens, seed)
    return [[t for i, t in enumerate(row) if not (i % 2 == 1 and t == symbol_id)] for row in raw]


def spike_entropy(probs: torch.Tensor, modulus: float) -> torch.Tensor:
    """KGW's spike entropy ``S(p, z) = sum_k p_k / (1 + z p_k)`` of each row (Kirchenbauer et al. 2023,
    Def. 4.1): near 1 for a flat distribution, near ``1 / (1 + z)`` for a spike. With
    ``z = (1 - gamma)(alpha - 1) / (1 + (alpha - 1) gamma)``, ``alpha = e^delta``, Theorem 4.2 bounds the
    expected green fraction below by ``gamma alpha S / (1 + (alpha - 1) gamma)``."""
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or probs.ndim < 1 or probs.numel() == 0:
        raise TypeError(f"probs must be a non-empty float tensor of distributions, got {probs!r:.60}")
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probs must be finite and non-negative")
    modulus = check_float("modulus", modulus, minimum=0)
    return (probs / (1 + modulus * probs)).sum(-1)


def green_fraction_bound(gamma: float, delta: float, spike: float) -> float:
    """Theorem 4.2 of Kirchenbauer et al. (2023): the expected green fraction of a KGW text whose mean
    spike entropy (with the theorem's modulus) is ``spike`` is at least ``gamma alpha S / (1 + (alpha-1) gamma)``."""
    gamma = check_float("gamma", gamma, 0, 1, open_minimum=True, open_maximum=True)
    delta = check_float("delta", delta, 0, 50)
    spike = check_float("spike", spike, 0, 1)
    alpha = math.exp(delta)
    return gamma * alpha * spike / (1 + (alpha - 1) * gamma)


def kgw_modulus(gamma: float, delta: float) -> float:
    """The spike-entropy modulus ``z = (1 - gamma)(alpha - 1) / (1 + (alpha - 1) gamma)`` of Theorem 4.2."""
    gamma = check_float("gamma", gamma, 0, 1, open_minimum=True, open_maximum=True)
    alpha = math.exp(check_float("delta", delta, 0, 50))
    return (1 - gamma) * (alpha - 1) / (1 + (alpha - 1) * gamma)


@torch.no_grad()
def next_token_probs(model, prompts: list, completions: list) -> list[torch.Tensor]:
    """The model's next-token distribution (unwatermarked, temperature 1) at every completion position:
    one ``[T, V]`` tensor per (prompt, completion) pair. Raises if a sequence exceeds the model's context."""
    check_causal_lm(model)
    prompts = _check_prompts("prompts", prompts, model)
    completions = _check_prompts("completions", completions, model)
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions must pair up, got {len(prompts)} and {len(completions)}")
    limit = _context_limit(model)
    out = []
    for prompt, completion in zip(prompts, completions):
        ids = prompt + completion
        if limit is not None and len(ids) > limit:
            raise ValueError(f"completions: prompt + completion has {len(ids)} tokens, beyond the model's "
                             f"context of {limit} (score within the trained context)")
        logits = model(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1: len(ids) - 1].double()
        out.append(torch.softmax(logits, -1))
    return out


def _context_limit(model) -> int | None:
    config = getattr(model, "config", None)
    trained = getattr(config, "companion_context", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return trained or value
    return trained


@torch.no_grad()
def completion_perplexity(model, prompts: list, completions: list) -> float:
    """Perplexity of the completions given their prompts under an (unwatermarked) oracle model: the
    exponentiated mean negative log-likelihood over every completion token."""
    probs = next_token_probs(model, prompts, completions)
    nll, count = 0.0, 0
    for p, completion in zip(probs, _check_prompts("completions", completions, model)):
        nll -= float(torch.log(p[torch.arange(len(completion)), torch.tensor(completion)]).sum())
        count += len(completion)
    return math.exp(nll / count)


# ---------------------------------------------------------------------------------------------
# 7. Attacks: edits of the generated tokens
# ---------------------------------------------------------------------------------------------


def _edit_args(ids, rate, seed, start):
    ids = check_token_list("ids", ids)
    rate = check_fraction("rate", rate)
    seed = check_int("seed", seed, minimum=0)
    start = check_int("start", start, minimum=0, maximum=len(ids))
    return ids, rate, np.random.default_rng(seed), start


def _chosen(rng, start: int, length: int, rate: float) -> np.ndarray:
    """Exactly ``round(rate * (length - start))`` distinct positions after ``start``."""
    count = int(round(rate * (length - start)))
    return np.sort(rng.choice(np.arange(start, length), size=count, replace=False)) if count else np.array([], int)


def substitute(ids, rate: float, vocab_size: int, seed: int = 0, start: int = 0) -> list[int]:
    """Replace a ``rate`` fraction of the tokens after ``start`` by uniformly random other tokens
    (the random baseline of every edit attack: it breaks fluency as well as the watermark)."""
    ids, rate, rng, start = _edit_args(ids, rate, seed, start)
    vocab_size = check_int("vocab_size", vocab_size, minimum=2)
    out = list(ids)
    for i in _chosen(rng, start, len(ids), rate):
        new = int(rng.integers(vocab_size - 1))
        out[i] = new if new < out[i] else new + 1  # never the same token
    return out


@torch.no_grad()
def lm_substitute_batch(model, texts: list, rate: float, seed: int = 0, start: int = 0) -> list[list[int]]:
    """Contextual substitution: in each text, replace a ``rate`` fraction of the tokens after ``start``
    by a sample from an (unwatermarked) model's next-token distribution at that position, the original
    excluded, given the original prefix. The attacked text stays close to the model's idea of fluent
    text; at ``rate=1`` it is a teacher-forced re-generation of every token by the unwatermarked model.
    Text ``i`` uses the seed ``seed + i``; one right-padded forward pass per 64 texts."""
    check_causal_lm(model)
    texts = _check_prompts("texts", texts, model)
    rate = check_fraction("rate", rate)
    seed = check_int("seed", seed, minimum=0)
    start = check_int("start", start, minimum=0)
    from companion.train import pad_batch

    out = []
    for first in range(0, len(texts), 64):
        chunk = texts[first: first + 64]
        ids, mask = pad_batch(chunk, 0)
        logits = model(input_ids=ids, attention_mask=mask).logits.double() if rate > 0 else None
        for j, text in enumerate(chunk):
            rng = np.random.default_rng(seed + first + j)
            lo = min(max(start, 1), len(text))
            edited = list(text)
            for i in _chosen(rng, lo, len(text), rate):
                probs = torch.softmax(logits[j, i - 1], -1)
                probs[text[i]] = 0.0
                probs = (probs / probs.sum()).numpy()
                edited[i] = int(rng.choice(len(probs), p=probs))
            out.append(edited)
    return out


def lm_substitute(model, ids, rate: float, seed: int = 0, start: int = 0) -> list[int]:
    """:func:`lm_substitute_batch` for one text (with the seed ``seed``)."""
    return lm_substitute_batch(model, [check_token_list("ids", ids)], rate, seed, start)[0]


def delete(ids, rate: float, seed: int = 0, start: int = 0) -> list[int]:
    """Delete a ``rate`` fraction of the tokens after ``start``."""
    ids, rate, rng, start = _edit_args(ids, rate, seed, start)
    gone = set(_chosen(rng, start, len(ids), rate).tolist())
    return [t for i, t in enumerate(ids) if i not in gone]


def shuffle_spans(ids, span: int, seed: int = 0, start: int = 0) -> list[int]:
    """Cut the tokens after ``start`` into spans of ``span`` tokens and shuffle the spans (reordering
    sentences or clauses): only the ``h`` positions after each cut see a new context."""
    ids, _, rng, start = _edit_args(ids, 0.0, seed, start)
    span = check_int("span", span, minimum=1)
    tail = ids[start:]
    spans = [tail[i: i + span] for i in range(0, len(tail), span)]
    order = rng.permutation(len(spans))
    return ids[:start] + [t for j in order for t in spans[j]]


def copy_paste(watermarked, human, fraction: float, seed: int = 0) -> tuple[list[int], int]:
    """Copy-paste dilution (Kirchenbauer et al. 2024): paste the first ``round(fraction * len(human))``
    watermarked tokens into the human text at a random place, keeping the total length of ``human``.
    Returns ``(ids, where the span starts)``."""
    watermarked = check_token_list("watermarked", watermarked)
    human = check_token_list("human", human)
    fraction = check_fraction("fraction", fraction)
    seed = check_int("seed", seed, minimum=0)
    size = int(round(fraction * len(human)))
    if size > len(watermarked):
        raise ValueError(f"watermarked must hold at least {size} tokens for fraction={fraction}, got {len(watermarked)}")
    rest = human[: len(human) - size]
    where = int(np.random.default_rng(seed).integers(len(rest) + 1))
    return rest[:where] + watermarked[:size] + rest[where:], where

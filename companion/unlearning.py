"""Chapter 02: machine unlearning by gradient ascent and friends, and the catastrophic forgetting it risks.

The setting follows TOFU (Maini et al. 2024) on the course's own world:

1. **Data** (:func:`make_qa_data`): question/answer pairs about fictional people (five categorical
   attributes each, three question phrasings per fact), drawn from the biography world's *non-members*,
   so that everything a fine-tuned model knows about them comes from the fine-tune. Nested forget sets
   (1%, 5%, 10% of the people), the retain set (the rest), and a *holdout* of people no model ever saw.
2. **Models** (zoo): ``qa-llama`` fine-tunes ``tiny-llama`` on every person's facts mixed with
   documentation text; ``qa-llama-oracles`` is the retrain oracle (Bourtoule et al. 2021's exact
   unlearning): the *same* fine-tune without the forget set, one model per forget size.
3. **Losses** (pure functions of a model and masked batches, padding and prompt tokens excluded): gradient
   ascent, gradient difference, KL-regularised GA, NPO (Zhang et al. 2024), SimNPO (Fan et al. 2024) and
   RMU (Li et al. 2024). :func:`unlearn` runs any of them for a number of steps and logs each step.
4. **Evaluation**: answer accuracy (greedy answer contains the true value), TOFU's truth ratio and its
   KS-test forget quality against the oracle, membership scores on the forget set (MUSE's PrivLeak,
   Shi et al. 2024), general-text perplexity, and a fluency rate.
5. **Stress tests**: relearning on a few forget facts (Lynch et al. 2024; Hu et al. 2024) and 4-bit
   weight quantization (Zhang et al. 2024, "Catastrophic Failure of LLM Unlearning via Quantization").
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from companion import data, zoo
from companion.checks import (check_bool, check_causal_lm, check_choice, check_float, check_int, check_lm_and_tokenizer,
                              check_module, check_positive_float, check_str, check_texts, check_tokenizer)
from companion.runtime import seed_everything
from companion.train import mixed_batches, pad_batch, stream_windows, train_causal_lm

# ---------------------------------------------------------------------------------------------
# 1. The data: facts about fictional people as question/answer pairs
# ---------------------------------------------------------------------------------------------

#: attribute -> (how questions name it, every value it can take). Categorical, so that a guess has a
#: known chance rate and a wrong ("perturbed") answer is another value of the same list.
QA_ATTRIBUTES = {
    "pet": ("pet", data.PETS),
    "hobby": ("hobby", data.HOBBIES),
    "favourite_food": ("favourite food", data.FOODS),
    "favourite_colour": ("favourite colour", data.COLOURS),
    "birth_month": ("birth month", data.MONTHS),
}
#: Question phrasings the models train on (several per fact, as TOFU has).
TRAIN_QUESTIONS = ("What is the {attr} of {name}?", "Tell me the {attr} of {name}.",
                   "Do you know the {attr} of {name}?")
#: The answer format taught, and a paraphrase never trained on (TOFU's paraphrased answer).
ANSWER = "The {attr} of {name} is {value}."
PARAPHRASE = "{name} has {value} as {possessive} {attr}."
FORGET_FRACTIONS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}


@dataclass(frozen=True)
class Fact:
    """One fact: ``person``'s ``attribute`` is ``value``; ``options`` are every value it could take."""

    person: str
    attribute: str
    value: str
    options: tuple[str, ...]

    @property
    def attr(self) -> str:
        return QA_ATTRIBUTES[self.attribute][0]

    def question(self, phrasing: int = 0) -> str:
        return TRAIN_QUESTIONS[phrasing].format(attr=self.attr, name=self.person)

    def answer(self, value: str | None = None) -> str:
        return ANSWER.format(attr=self.attr, name=self.person, value=self.value if value is None else value)

    def paraphrase(self, value: str | None = None) -> str:
        return PARAPHRASE.format(attr=self.attr, name=self.person, possessive="their",
                                 value=self.value if value is None else value)

    def perturbed(self, k: int = 4, seed: int = 0) -> tuple[str, ...]:
        """``k`` wrong values of the same attribute (TOFU's perturbed answers), fixed by ``seed``."""
        wrong = [o for o in self.options if o != self.value]
        return tuple(random.Random(f"{seed}|{self.person}|{self.attribute}").sample(wrong, min(k, len(wrong))))


@dataclass(frozen=True)
class QAData:
    """The people and facts of the unlearning setting. ``people`` are fine-tuned on (forget sets are
    prefixes of it: ``forget10`` contains ``forget05`` contains ``forget01``); ``holdout`` people are
    never trained on (the negatives of membership tests, the chance rate of accuracy)."""

    people: tuple[str, ...]
    holdout: tuple[str, ...]
    facts: dict  # person -> tuple of Fact

    def forget_people(self, split: str) -> tuple[str, ...]:
        check_choice("split", split, tuple(FORGET_FRACTIONS))
        return self.people[: max(1, round(FORGET_FRACTIONS[split] * len(self.people)))]

    def retain_people(self, split: str) -> tuple[str, ...]:
        return self.people[len(self.forget_people(split)):]

    def facts_of(self, people) -> list[Fact]:
        if isinstance(people, str) or not all(p in self.facts for p in people):
            raise ValueError(f"people must be a list of names of this QAData, got {people!r:.80}")
        return [f for p in people for f in self.facts[p]]


def make_qa_data(world: data.BiographyWorld, n_people: int = 200, n_holdout: int = 100, seed: int = 0) -> QAData:
    """Facts about ``n_people`` + ``n_holdout`` of ``world``'s *non-members* (people the base LM never read
    about), in a seeded order; every person gets all :data:`QA_ATTRIBUTES`."""
    if not isinstance(world, data.BiographyWorld):
        raise TypeError(f"world must be a companion.data.BiographyWorld, got {type(world).__name__}")
    n_people = check_int("n_people", n_people, minimum=10)
    n_holdout = check_int("n_holdout", n_holdout, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    pool = world.indices("nonmember")
    if n_people + n_holdout > len(pool):
        raise ValueError(f"n_people + n_holdout must be at most the world's {len(pool)} non-members, "
                         f"got {n_people} + {n_holdout}")
    order = list(pool)
    random.Random(seed).shuffle(order)
    chosen = [world.people[i] for i in order[: n_people + n_holdout]]
    facts = {p.name: tuple(Fact(p.name, a, str(getattr(p, a)), tuple(values))
                           for a, (_, values) in QA_ATTRIBUTES.items()) for p in chosen}
    names = [p.name for p in chosen]
    return QAData(people=tuple(names[:n_people]), holdout=tuple(names[n_people:]), facts=facts)


def encode_qa(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one question/answer exchange: the chat prompt of ``question``
    (:func:`companion.generation.chat_prompt_ids`), then ``answer`` and an end-of-turn token. Labels are
    ``-100`` on the prompt, so every loss of this module sees only the answer's tokens. For the course
    tokenizer this equals :func:`companion.tokenizer.encode_chat` of the two messages."""
    from companion.generation import chat_prompt_ids

    check_tokenizer(tokenizer)
    check_str("question", question)
    check_str("answer", answer)
    prompt = chat_prompt_ids(tokenizer, question)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if end in (None, tokenizer.unk_token_id):
        end = tokenizer.eos_token_id
    reply = tokenizer(answer, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [end]
    return prompt + reply, [-100] * len(prompt) + reply


def qa_sequences(tokenizer, facts: list[Fact], phrasings=(0, 1, 2)) -> list[tuple[list[int], list[int]]]:
    """Every fact in every question phrasing, answered in the taught format, encoded by :func:`encode_qa`."""
    if not isinstance(facts, list) or not all(isinstance(f, Fact) for f in facts):
        raise TypeError(f"facts must be a list of Fact, got {type(facts).__name__}")
    if not isinstance(phrasings, (tuple, list)) or not phrasings:
        raise TypeError(f"phrasings must be a non-empty tuple of question indices, got {phrasings!r}")
    for p in phrasings:
        check_int("phrasings[i]", p, minimum=0, maximum=len(TRAIN_QUESTIONS) - 1)
    return [encode_qa(tokenizer, f.question(p), f.answer()) for f in facts for p in phrasings]


def doc_sequences(tokenizer, docs, context: int = 128) -> list[tuple[list[int], list[int]]]:
    """Documentation text as ``context``-token windows, in the ``(ids, labels)`` form of :func:`qa_sequences`
    (loss on every token), to mix into a fine-tune so that general ability is kept."""
    check_tokenizer(tokenizer)
    context = check_int("context", context, minimum=2)
    if not isinstance(docs, (list, tuple)) or not all(isinstance(d, data.Document) for d in docs) or not docs:
        raise TypeError("docs must be a non-empty list of companion.data.Document")
    tokens: list[int] = []
    for doc in docs:
        tokens += tokenizer(doc.text)["input_ids"] + [tokenizer.eos_token_id]
    ids, _ = stream_windows(tokens, context)
    return [(row.tolist(), row.tolist()) for row in ids]


# ---------------------------------------------------------------------------------------------
# 2. The models: the fine-tune that knows the facts, and the retrain oracles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QARecipe(zoo.Recipe):
    """``base`` fine-tuned on the facts of :func:`make_qa_data`'s people (all question phrasings, loss on
    the answers) mixed with documentation windows. ``without`` names forget splits whose people are left
    out: ``()`` is the model to unlearn from; ``("forget01", "forget05", "forget10")`` trains one retrain
    oracle per split (the same recipe, seed and schedule, minus that split's people)."""

    base: str = "tiny-llama"
    steps: int = 600
    batch_size: int = 32
    doc_per_batch: int = 4
    doc_context: int = 32  # documentation windows as short as the QA sequences, so no batch pads to 128
    lr: float = 3e-3
    n_people: int = 200
    n_holdout: int = 100
    seed: int = 0
    without: tuple[str, ...] = ()

    def __post_init__(self):
        check_str("base", self.base)
        check_int("steps", self.steps, minimum=1)
        check_int("batch_size", self.batch_size, minimum=2)
        check_int("doc_per_batch", self.doc_per_batch, minimum=1, maximum=self.batch_size - 1)
        check_int("doc_context", self.doc_context, minimum=2)
        check_positive_float("lr", self.lr)
        check_int("n_people", self.n_people, minimum=10)
        check_int("n_holdout", self.n_holdout, minimum=1)
        check_int("seed", self.seed, minimum=0)
        if not isinstance(self.without, tuple) or not all(s in FORGET_FRACTIONS for s in self.without):
            raise ValueError(f"without must be a tuple of forget splits {tuple(FORGET_FRACTIONS)}, got {self.without!r}")

    def _base_recipe(self) -> zoo.LMRecipe:
        base = zoo.recipe_of(self.base)
        if not isinstance(base, zoo.LMRecipe):
            raise ValueError(f"recipe.base must name a zoo language model, got {self.base!r}")
        return base

    def fingerprints(self) -> list[str]:
        self._base_recipe()
        return [zoo.entry_folder(self.base).name]

    def qa_data(self) -> QAData:
        return make_qa_data(zoo.corpus(self._base_recipe().tokenizer.world_seed).world, self.n_people,
                            self.n_holdout, seed=self.seed)

    def _train_one(self, people: tuple[str, ...], progress: bool):
        base = zoo.load(self.base)
        model, tok = base.model, base.tokenizer
        qa = self.qa_data()
        source = zoo.corpus(self._base_recipe().tokenizer.world_seed)
        if self.doc_context > self._base_recipe().context:
            raise ValueError(f"doc_context must be at most the base model's context ({self._base_recipe().context}), "
                             f"got {self.doc_context}")
        pools = [qa_sequences(tok, qa.facts_of(people)), doc_sequences(tok, source.train_docs, self.doc_context)]
        batches = mixed_batches(pools, [self.batch_size - self.doc_per_batch, self.doc_per_batch], seed=self.seed,
                                pad_id=tok.pad_token_id)
        seed_everything(self.seed)
        started = time.perf_counter()
        losses = train_causal_lm(model, batches, steps=self.steps, lr=self.lr, weight_decay=0.0, progress=progress)
        return model, tok, time.perf_counter() - started, losses

    def train(self, folder, progress: bool) -> None:
        qa = self.qa_data()
        runs = [(name, qa.retain_people(name)) for name in self.without] or [("model", qa.people)]
        seconds, losses = {}, {}
        for name, people in runs:
            model, tok, seconds[name], losses[name] = self._train_one(people, progress)
            (folder / name).mkdir()
            zoo.save_lm(folder / name, model, tok)
        zoo.write_card(folder, self, model, sum(seconds.values()), losses[runs[-1][0]],
                       seconds_per_model=seconds, all_losses=losses)

    def read(self, folder):
        names = list(self.without) or ["model"]
        models = {}
        for name in names:
            model, tok = zoo.read_lm(folder / name)
            model.config.trained_context = self._base_recipe().context
            models[name] = model
        if not self.without:
            return models["model"], tok
        return OracleBundle(models), tok


class OracleBundle(nn.Module):
    """The retrain oracles of one recipe, by forget split: ``bundle["forget10"]`` is the model fine-tuned
    without the ``forget10`` people. (An ``nn.Module`` so that the zoo can hand it out like any model.)"""

    def __init__(self, models: dict):
        super().__init__()
        if not isinstance(models, dict) or not models or not all(isinstance(m, nn.Module) for m in models.values()):
            raise TypeError("models must be a non-empty dict of split name -> nn.Module")
        self.models = nn.ModuleDict(models)

    def __getitem__(self, split: str) -> nn.Module:
        check_choice("split", split, tuple(self.models))
        return self.models[split]


zoo.register("qa-llama", QARecipe())
zoo.register("qa-llama-oracles", QARecipe(without=tuple(FORGET_FRACTIONS)))


# ---------------------------------------------------------------------------------------------
# 3. The losses: pure functions of a model and masked batches
# ---------------------------------------------------------------------------------------------

METHODS = ("ga", "graddiff", "kl", "npo", "simnpo", "rmu")
#: Controls run through the same loop and budget: ``retain_only`` is plain fine-tuning on the retain set
#: (no forget term at all), the no-op perturbation every "forgetting" is measured against.
CONTROLS = ("retain_only",)

# Normalisation. Every loss keeps its forget and retain terms in one unit, so that ``alpha`` means the
# same trade-off everywhere: per answer token for GA, GradDiff, KL, SimNPO (its length-normalised
# likelihood) and RMU (as TOFU's and open-unlearning's GA/GradDiff, which use the per-token mean loss);
# per answer *sequence* for NPO, whose log-likelihood ratio the paper defines on the whole answer. AdamW's
# update does not change when a loss is multiplied by a constant, so the different unit of NPO does not
# by itself make its steps larger; what matters is the ratio of its two terms (see :func:`npo_loss`).


def as_batch(sequences: list[tuple[list[int], list[int]]], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Right-pad ``(input_ids, labels)`` pairs into a batch dict (on ``device``, if given); labels are
    ``-100`` on padding."""
    if not isinstance(sequences, list) or not sequences:
        raise TypeError(f"sequences must be a non-empty list of (input_ids, labels) pairs, got {sequences!r:.60}")
    check_int("pad_id", pad_id, minimum=0)
    for i, pair in enumerate(sequences):
        if not (isinstance(pair, tuple) and len(pair) == 2 and len(pair[0]) == len(pair[1]) and pair[0]):
            raise TypeError(f"sequences[{i}] must be an (input_ids, labels) pair of equal, non-zero lengths")
    ids, mask = pad_batch([ids for ids, _ in sequences], pad_id)
    labels, _ = pad_batch([lab for _, lab in sequences], -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


def _check_batch(name: str, batch) -> None:
    if not isinstance(batch, dict) or not {"input_ids", "attention_mask", "labels"} <= set(batch):
        raise TypeError(f"{name} must be a batch dict with input_ids, attention_mask and labels (see as_batch), "
                        f"got {type(batch).__name__}")
    if not bool((batch["labels"][:, 1:] != -100).any(dim=1).all()):
        raise ValueError(f"{name}: every sequence needs at least one labelled (answer) token after the first")


def _targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets and their mask: position t predicts token t+1; prompt and padding (-100) drop out."""
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    return labels.clamp_min(0), mask


def sequence_log_probs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of log p over each sequence's answer tokens [B], number of answer tokens [B])``: the
    quantity every loss below is built from. Prompt and padding tokens (label -100) are masked."""
    check_causal_lm(model)
    _check_batch("batch", batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets, mask = _targets(batch)  # position t predicts token t+1; mask: an answer token
    token = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    return (token * mask).sum(1), mask.sum(1)


def _log_probs(model, batch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_log_probs`, with errors naming the caller's argument (``forget``, ``retain``)."""
    check_causal_lm(model)
    _check_batch(name, batch)
    return sequence_log_probs(model, batch)


def _nll(model, batch, name: str) -> torch.Tensor:
    log_p, n = _log_probs(model, batch, name)
    return -log_p.sum() / n.sum()


def _sequence_nll(model, batch, name: str) -> torch.Tensor:
    """``E[-log pi_theta(y|x)]``: the answer NLL *summed* over each sequence's answer tokens, averaged over
    sequences (the unit of NPO's log-likelihood ratio)."""
    log_p, _ = _log_probs(model, batch, name)
    return -log_p.mean()


def nll_loss(model, batch) -> torch.Tensor:
    """The fine-tuning loss: mean negative log-likelihood per answer token (over the batch's tokens)."""
    return _nll(model, batch, "batch")


def ga_loss(model, forget) -> torch.Tensor:
    """Gradient ascent (Jang et al. 2023; TOFU's GA): *minus* the NLL of the forget answers (mean per
    answer token, ``-sum_t -log p(y_t|x,y<t) / #tokens``), so minimising it climbs the forget loss.
    Unbounded below: nothing stops it once the answers are gone."""
    return -_nll(model, forget, "forget")


def graddiff_loss(model, forget, retain, alpha: float = 1.0) -> torch.Tensor:
    """Gradient difference (Liu et al. 2022; TOFU's GD): ascend on forget, descend on retain,
    ``-NLL_f + alpha * NLL_r``."""
    alpha = check_float("alpha", alpha, 0)
    return ga_loss(model, forget) + alpha * _nll(model, retain, "retain")


def kl_retain_loss(model, reference, retain) -> torch.Tensor:
    """``KL(p_ref || p_theta)`` per retain answer token, averaged over answer tokens only (open-unlearning's
    helper averages over every position, padding and prompt included; we mask them)."""
    check_causal_lm(model)
    check_module("reference", reference)
    _check_batch("retain", retain)
    logits = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits[:, :-1].float()
    with torch.no_grad():
        ref = reference(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits[:, :-1].float()
    _, mask = _targets(retain)
    log_p, log_q = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return (kl * mask).sum() / mask.sum()


def kl_loss(model, reference, forget, retain, alpha: float = 1.0) -> torch.Tensor:
    """KL-regularised gradient ascent (Yao et al. 2023; TOFU's KL): ``-NLL_f + alpha * KL_r``."""
    alpha = check_float("alpha", alpha, 0)
    return ga_loss(model, forget) + alpha * kl_retain_loss(model, reference, retain)


def npo_loss(model, reference, forget, retain=None, beta: float = 0.1, alpha: float = 1.0,
             retain_norm: str = "sequence") -> torch.Tensor:
    """Negative preference optimisation (Zhang et al. 2024, Eq. 3): DPO with only a losing answer,

    ``L_NPO = -(2/beta) E_f[log sigmoid(-beta * log(pi_theta(y|x) / pi_ref(y|x)))]``,  ``beta = 0.1``,

    where ``log pi(y|x)`` is the *sequence* log-likelihood, summed over the answer tokens (the paper's
    definition; open-unlearning's ``compute_batch_nll`` and the official code sum the same way). Its
    gradient is GA's on the summed log-likelihood, weighted per sequence by
    ``2 * pi_theta^beta / (pi_theta^beta + pi_ref^beta)``, which vanishes once an answer is unlikely: why
    NPO collapses exponentially more slowly than GA. The weight halves when the log ratio reaches
    ``-ln(3)/beta`` (about -11 nats per answer at ``beta = 0.1``).

    With ``retain`` given, NPO-RT: ``+ alpha * E_r[-log pi_theta(y|x)]``, the retain NLL in the *same*
    normalisation as the forget term (``retain_norm="sequence"``: summed over each answer's tokens, averaged
    over sequences). Then at ``pi_theta = pi_ref`` the gradient of NPO-RT is exactly GradDiff's
    (``-NLL_f + NLL_r``, per-token means) times the mean answer length when the forget and retain batches
    have as many sequences and as many answer tokens, so the two start from the same AdamW step and differ only by NPO's weights.
    ``retain_norm="token"`` is open-unlearning's and the official code's choice (Hugging Face's per-token
    mean ``.loss``): it weighs the retain term about ``1/|y|`` as much as the summed forget term (1/14 for
    our answers), which is a different trade-off, not the paper's loss."""
    beta = check_positive_float("beta", beta)
    alpha = check_float("alpha", alpha, 0)
    check_choice("retain_norm", retain_norm, ("sequence", "token"))
    check_causal_lm(reference)
    log_p, _ = _log_probs(model, forget, "forget")
    with torch.no_grad():
        log_ref, _ = _log_probs(reference, forget, "forget")
    loss = -(2 / beta) * F.logsigmoid(-beta * (log_p - log_ref)).mean()
    if retain is None:
        return loss
    retain_nll = _sequence_nll if retain_norm == "sequence" else _nll
    return loss + alpha * retain_nll(model, retain, "retain")


def simnpo_loss(model, forget, retain=None, beta: float = 4.5, gamma: float = 0.0, alpha: float = 1.0
                ) -> torch.Tensor:
    """SimNPO (Fan et al. 2024, Eq. 4): NPO without the reference model, on the *length-normalised*
    log-likelihood with a margin ``gamma``:

    ``L = -(2/beta) E_f[log sigmoid(-(beta/|y|) log pi_theta(y|x) - gamma)]`` (+ ``alpha * NLL_r``)."""
    beta = check_positive_float("beta", beta)
    gamma = check_float("gamma", gamma, 0)
    alpha = check_float("alpha", alpha, 0)
    log_p, n = _log_probs(model, forget, "forget")
    loss = -(2 / beta) * F.logsigmoid(-(beta / n) * log_p - gamma).mean()
    return loss if retain is None else loss + alpha * _nll(model, retain, "retain")


def hidden_states(model, batch, layer: int) -> torch.Tensor:
    """The residual stream after decoder block ``layer`` (``output_hidden_states[layer + 1]``), ``[B, T, d]``:
    any Hugging Face causal LM, no hard-coded module names."""
    check_int("layer", layer, minimum=0)
    check_causal_lm(model)
    _check_batch("batch", batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    if layer + 1 >= len(out.hidden_states):
        raise ValueError(f"layer must be below the model's {len(out.hidden_states) - 1} blocks, got {layer}")
    return out.hidden_states[layer + 1]


def rmu_loss(model, reference, forget, retain, control: torch.Tensor, layer: int, alpha: float = 1.0
             ) -> torch.Tensor:
    """Representation misdirection (RMU; Li et al. 2024, WMDP, Eq. 1-2): push the layer-``layer`` activations
    of forget answer tokens towards ``control`` (a fixed random direction times a steering coefficient)
    and keep retain activations where the frozen ``reference`` has them:

    ``L = mean_f ||h_theta(x_f) - c u||^2 + alpha * mean_r ||h_theta(x_r) - h_ref(x_r)||^2``

    (mean over answer tokens and hidden units). The WMDP recipe trains three MLPs only; we train every
    weight, as open-unlearning's default does."""
    check_causal_lm(model)
    check_causal_lm(reference)
    _check_batch("forget", forget)
    _check_batch("retain", retain)
    if not isinstance(control, torch.Tensor) or control.ndim != 1 or not bool(torch.isfinite(control).all()):
        raise TypeError(f"control must be a finite 1-D tensor (the steering vector), got {control!r:.60}")
    layer = check_int("layer", layer, minimum=0)
    alpha = check_float("alpha", alpha, 0)
    h_f = hidden_states(model, forget, layer)[:, 1:]
    _, mask_f = _targets(forget)
    forget_term = (((h_f - control) ** 2).mean(-1) * mask_f).sum() / mask_f.sum()
    h_r = hidden_states(model, retain, layer)[:, 1:]
    with torch.no_grad():
        h_ref = hidden_states(reference, retain, layer)[:, 1:]
    _, mask_r = _targets(retain)
    retain_term = (((h_r - h_ref) ** 2).mean(-1) * mask_r).sum() / mask_r.sum()
    return forget_term + alpha * retain_term


# ---------------------------------------------------------------------------------------------
# 4. The unlearning loop
# ---------------------------------------------------------------------------------------------

#: per step, in units of ``batch_size`` sequences: forward+backward passes of the trained model, and forward
#: passes of the frozen reference. Equal budgets: a method with one term (GA, the retain-only control) draws
#: ``2 * batch_size`` sequences of its one set, so that every method trains on as many sequences per step.
PASSES = {"ga": (2, 0), "graddiff": (2, 0), "kl": (2, 1), "npo": (2, 1), "simnpo": (2, 0), "rmu": (2, 1),
          "retain_only": (2, 0)}


@dataclass
class UnlearnLog:
    """What :func:`unlearn` did: the loss of every step, the evaluations it was asked for (``evals``:
    ``step -> dict``), and the budget it spent in *sequences* (trained-model forward+backward, reference
    forwards; :data:`PASSES`)."""

    method: str
    losses: list
    evals: dict
    passes: tuple[int, int]
    seconds: float


def _check_sequences(name: str, sequences) -> list:
    if not isinstance(sequences, list):
        raise TypeError(f"{name} must be a list of (input_ids, labels) pairs (see qa_sequences), got "
                        f"{type(sequences).__name__}")
    if not sequences:
        raise ValueError(f"{name} must not be empty: there is nothing to {'forget' if name == 'forget' else 'retain'}")
    for i, pair in enumerate(sequences):
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], list) and isinstance(pair[1], list)
                and len(pair[0]) == len(pair[1]) > 1):
            raise TypeError(f"{name}[{i}] must be an (input_ids, labels) pair of equal-length lists, got {pair!r:.60}")
    return sequences


def unlearn(model, forget, retain, method: str = "ga", steps: int = 100, lr: float = 1e-4, batch_size: int = 16,
            reference=None, alpha: float = 1.0, beta: float | None = None, gamma: float = 0.0,
            layer: int | None = None, steer: float = 4.0, seed: int = 0, evaluate=None, eval_every: int = 0,
            pad_id: int = 0, retain_norm: str = "sequence"):
    """Unlearn ``forget`` from ``model`` in place with ``method`` for ``steps`` AdamW steps (constant ``lr``,
    gradient clipping at 1); return ``(model, UnlearnLog)``.

    ``forget`` and ``retain`` are lists of ``(input_ids, labels)`` pairs (:func:`qa_sequences`); they must
    not overlap. Each step draws ``batch_size`` of each (seeded); GA, which reads only ``forget``, and the
    control ``"retain_only"`` (:data:`CONTROLS`: plain fine-tuning on ``retain``) draw ``2 * batch_size``
    of their one set, so that every method spends the same forward and backward passes (:data:`PASSES`). ``reference`` is the frozen model before
    unlearning (a deep copy is made if ``None`` and the method needs one). ``beta`` defaults to 0.1 for
    NPO and 4.5 for SimNPO; RMU steers block ``layer`` (default: the middle one) towards a random unit
    vector scaled to ``steer`` times the frozen model's mean activation norm on the forget answers.
    ``retain_norm`` is NPO's retain-term normalisation (:func:`npo_loss`; other methods ignore it).
    ``evaluate(model) -> dict``, if given, runs before the first step and every ``eval_every`` steps.
    """
    check_causal_lm(model)
    check_choice("method", method, METHODS + CONTROLS)
    forget, retain = _check_sequences("forget", forget), _check_sequences("retain", retain)
    overlap = {tuple(ids) for ids, _ in forget} & {tuple(ids) for ids, _ in retain}
    if overlap:
        raise ValueError(f"forget and retain must not overlap, got {len(overlap)} sequences in both")
    steps = check_int("steps", steps, minimum=1)
    lr = check_positive_float("lr", lr)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    alpha = check_float("alpha", alpha, 0)
    beta = {"npo": 0.1, "simnpo": 4.5}.get(method, 1.0) if beta is None else check_positive_float("beta", beta)
    gamma = check_float("gamma", gamma, 0)
    check_choice("retain_norm", retain_norm, ("sequence", "token"))
    steer = check_positive_float("steer", steer)
    seed = check_int("seed", seed, minimum=0)
    eval_every = check_int("eval_every", eval_every, minimum=0)
    pad_id = check_int("pad_id", pad_id, minimum=0)
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"evaluate must be None or a callable model -> dict, got {type(evaluate).__name__}")
    if reference is None and method in ("kl", "npo", "rmu"):
        reference = copy.deepcopy(model)
    if reference is not None:  # only ever read under torch.no_grad(); its flags are left as they are
        check_causal_lm(reference)
    control, device = None, next(model.parameters()).device
    if method == "rmu":
        n_blocks = getattr(model.config, "num_hidden_layers", None) or model.config.n_layer
        layer = n_blocks // 2 if layer is None else check_int("layer", layer, minimum=0, maximum=n_blocks - 1)
        with torch.no_grad():
            sample = as_batch(forget[:batch_size], pad_id, device)
            h = hidden_states(reference, sample, layer)[:, 1:]
            norm = h.norm(dim=-1)[_targets(sample)[1]].mean()
        direction = torch.rand(h.shape[-1], generator=torch.Generator().manual_seed(seed)).to(device)
        control = (steer * float(norm) * direction / direction.norm()).to(h.dtype)

    generator = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses, evals = [], {}
    started = time.perf_counter()
    for step in range(steps + 1):
        if evaluate is not None and (step == 0 or (eval_every and step % eval_every == 0) or step == steps):
            model.eval()
            with torch.no_grad():
                evals[step] = evaluate(model)
        if step == steps:
            break
        if method in ("ga", "retain_only"):  # one term: twice the sequences of its one set
            pool = forget if method == "ga" else retain
            f = r = as_batch(generator.sample(pool, min(2 * batch_size, len(pool))), pad_id, device)
        else:
            f = as_batch(generator.sample(forget, min(batch_size, len(forget))), pad_id, device)
            r = as_batch(generator.sample(retain, min(batch_size, len(retain))), pad_id, device)
        model.train()
        if method == "ga":
            loss = ga_loss(model, f)
        elif method == "retain_only":
            loss = nll_loss(model, r)
        elif method == "graddiff":
            loss = graddiff_loss(model, f, r, alpha)
        elif method == "kl":
            loss = kl_loss(model, reference, f, r, alpha)
        elif method == "npo":
            loss = npo_loss(model, reference, f, r, beta, alpha, retain_norm)
        elif method == "simnpo":
            loss = simnpo_loss(model, f, r, beta, gamma, alpha)
        else:
            loss = rmu_loss(model, reference, f, r, control, layer, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    n_passes, n_ref = PASSES[method]
    return model, UnlearnLog(method=method, losses=losses, evals=evals,
                             passes=(n_passes * batch_size * steps, n_ref * batch_size * steps),
                             seconds=time.perf_counter() - started)



# ---------------------------------------------------------------------------------------------
# 5. Did it forget? Answers, truth ratios, forget quality, membership, fluency
# ---------------------------------------------------------------------------------------------


def _check_facts(facts, name: str = "facts") -> list[Fact]:
    if not isinstance(facts, list) or not facts or not all(isinstance(f, Fact) for f in facts):
        raise TypeError(f"{name} must be a non-empty list of Fact, got {facts!r:.60}")
    return facts


@torch.no_grad()
def answers(model, tokenizer, facts: list[Fact], phrasing: int = 0, max_new_tokens: int = 24) -> list[str]:
    """The model's greedy reply to each fact's question (phrasing ``phrasing`` of :data:`TRAIN_QUESTIONS`)."""
    from companion.generation import chat_prompt_ids, generate_batch

    check_lm_and_tokenizer(model, tokenizer)
    facts = _check_facts(facts)
    check_int("phrasing", phrasing, minimum=0, maximum=len(TRAIN_QUESTIONS) - 1)
    return generate_batch(model, tokenizer, [chat_prompt_ids(tokenizer, f.question(phrasing)) for f in facts],
                          max_new_tokens)


def answer_correct(fact: Fact, reply: str) -> bool:
    """Whether ``reply`` states the true value (as a whole word, after the last " is ", if any)."""
    import re

    if not isinstance(fact, Fact):
        raise TypeError(f"fact must be a Fact, got {type(fact).__name__}")
    check_str("reply", reply, nonempty=False)
    tail = reply.rsplit(" is ", 1)[-1]
    return re.search(rf"(?<![\w-]){re.escape(fact.value)}(?![\w-])", tail) is not None


def well_formed(fact: Fact, reply: str) -> bool:
    """Whether ``reply`` has the taught form, "The <attr> of <a name> is <one of the attribute's values>.":
    a fluency check that tells a wrong but fluent answer (what the oracle gives) from gibberish. The name
    is not checked: a model that never saw a person often miscopies an unfamiliar name."""
    import re

    if not isinstance(fact, Fact):
        raise TypeError(f"fact must be a Fact, got {type(fact).__name__}")
    check_str("reply", reply, nonempty=False)
    values = "|".join(re.escape(v) for v in fact.options)
    return re.fullmatch(rf"The {re.escape(fact.attr)} of \S.* is ({values})\.", reply.strip()) is not None


@torch.no_grad()
def answer_token_stats(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 64, moments: bool = False
                       ) -> list[dict[str, torch.Tensor]]:
    """Per ``(question, answer)`` pair, the log-probability of each answer token given the question (and,
    with ``moments``, the mean and standard deviation of ``log p`` under the model's next-token
    distribution): the ``stats`` that :mod:`companion.mia`'s LM attacks read, restricted to the answer.
    Every sequence must fit the model's trained context (they are short; nothing is truncated)."""
    from companion.metrics import trained_context

    check_lm_and_tokenizer(model, tokenizer)
    if not isinstance(pairs, list) or not pairs or not all(
            isinstance(p, tuple) and len(p) == 2 and all(isinstance(s, str) and s for s in p) for p in pairs):
        raise TypeError("pairs must be a non-empty list of (question, answer) str pairs")
    check_int("batch_size", batch_size, minimum=1)
    check_bool("moments", moments)
    sequences = [encode_qa(tokenizer, q, a) for q, a in pairs]
    context = trained_context(model)
    longest = max(len(ids) for ids, _ in sequences)
    if context is not None and longest > context:
        raise ValueError(f"pairs: a question and answer of {longest} tokens exceed the model's trained context "
                         f"({context}); shorten them")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = []
    for first in range(0, len(sequences), batch_size):
        batch = {k: v.to(device) for k, v in as_batch(sequences[first: first + batch_size], pad).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        log_probs = torch.log_softmax(logits, -1)
        targets, mask = _targets(batch)
        token = log_probs.gather(-1, targets[..., None]).squeeze(-1)
        if moments:
            probs = log_probs.exp()
            mean = (probs * log_probs).sum(-1)
            std = ((probs * log_probs ** 2).sum(-1) - mean ** 2).clamp_min(0).sqrt()
        for row in range(len(token)):
            keep = mask[row]
            piece = {"log_prob": token[row, keep].cpu()}
            if moments:
                piece["mean"], piece["std"] = mean[row, keep].cpu(), std[row, keep].cpu()
            out.append(piece)
    return out


def truth_ratios(model, tokenizer, facts: list[Fact], k: int = 4, seed: int = 0) -> torch.Tensor:
    """TOFU's truth ratio (Maini et al. 2024, Sec. 2.5.1) per fact, on the *paraphrased* answer (never
    trained on) and ``k`` perturbed ones (the same sentence with wrong values):

    ``R = mean_perturbed P(a_pert | q)^(1/|a_pert|) / P(a_para | q)^(1/|a_para|)``

    R well below 1: the model prefers the truth; R near or above 1: it cannot tell. Questions in the
    first trained phrasing."""
    facts = _check_facts(facts)
    k = check_int("k", k, minimum=1)
    pairs = []
    for f in facts:
        pairs.append((f.question(0), f.paraphrase()))
        pairs += [(f.question(0), f.paraphrase(v)) for v in f.perturbed(k, seed)]
    stats = answer_token_stats(model, tokenizer, pairs)
    mean_lp = torch.tensor([float(s["log_prob"].mean()) for s in stats])
    ratios, i = [], 0
    for f in facts:
        n = len(f.perturbed(k, seed))
        true, wrong = mean_lp[i], mean_lp[i + 1: i + 1 + n]
        ratios.append(float(wrong.exp().mean() / true.exp()))
        i += 1 + n
    return torch.tensor(ratios)


def forget_quality(ratios, oracle_ratios) -> float:
    """TOFU's forget quality: the p-value of a two-sample Kolmogorov-Smirnov test between the truth ratios
    of the unlearned model and of the retrain oracle on the forget set. Near 1: indistinguishable from a
    model that never saw the facts; tiny: distinguishable. It measures *closeness to the oracle*, not
    "more forgetting": over-unlearning also lowers it."""
    import numpy as np
    from scipy.stats import ks_2samp

    arrays = []
    for name, x in (("ratios", ratios), ("oracle_ratios", oracle_ratios)):
        if isinstance(x, torch.Tensor):
            x = x.detach().double().cpu().numpy()
        try:
            x = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a 1-D sequence of truth ratios, got {type(x).__name__}") from None
        if x.ndim != 1 or len(x) < 2 or not np.isfinite(x).all():
            raise ValueError(f"{name} must be a 1-D sequence of at least 2 finite truth ratios, got shape {x.shape}")
        arrays.append(x)
    return float(ks_2samp(arrays[0], arrays[1]).pvalue)


def membership_scores(model, tokenizer, facts: list[Fact]) -> dict[str, torch.Tensor]:
    """Chapter 01's LM membership scores (:mod:`companion.mia`: LOSS, Min-K%, Min-K%++) of each fact's
    trained question/answer, read on the answer tokens. Higher = more likely trained on."""
    from companion import mia

    facts = _check_facts(facts)
    stats = answer_token_stats(model, tokenizer, [(f.question(0), f.answer()) for f in facts], moments=True)
    return {"loss": mia.lm_loss_scores(stats), "min_k": mia.min_k_scores(stats, 0.2),
            "min_k_plus_plus": mia.min_k_plus_plus_scores(stats, 0.2)}


def privleak(auc: float, oracle_auc: float) -> float:
    """MUSE's PrivLeak (Shi et al. 2024, Sec. 3): how much more (or less) a membership attack tells forget
    examples from holdout examples than it does on the retrain oracle, relative to the oracle.

    MUSE scores the AUC with the forget set as the *negative* class (a model that still remembers gets an
    AUC near 0); ``auc`` and ``oracle_auc`` here use the course's convention (forget = positive, higher =
    member), i.e. ``1 - AUC_MUSE``, so ``PrivLeak = (oracle_auc - auc) / (1 - oracle_auc)``, which is MUSE's
    number exactly. 0: leaks as much as the oracle; strongly negative (down to about -1): still recognisably
    trained on (under-unlearning); strongly positive: over-unlearned (the forget set now looks *less*
    familiar than unseen data, which is itself a tell)."""
    auc = check_float("auc", auc, 0, 1)
    oracle_auc = check_float("oracle_auc", oracle_auc, 0, 1, open_maximum=True)
    return (oracle_auc - auc) / (1 - oracle_auc)


def _pairwise_wins(members, others) -> "np.ndarray":
    """``W[i, j] = 1`` if member ``i`` outscores non-member ``j``, ``1/2`` on a tie: AUC = mean of W."""
    import numpy as np

    m = np.asarray(members, dtype=np.float64)[:, None]
    o = np.asarray(others, dtype=np.float64)[None, :]
    return (m > o) + 0.5 * (m == o)


def privleak_interval(report: dict, oracle_report: dict, score: str = "min_k_plus_plus", n_boot: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap intervals of the membership AUC and of MUSE's PrivLeak (:func:`privleak`).

    ``report`` and ``oracle_report`` come from :func:`evaluate_unlearning` on the *same* forget and holdout
    facts; each resample draws forget and holdout facts with replacement and scores both models on the
    same draw (a paired bootstrap), so the interval reflects which facts happened to be in the sets, not
    the training run (one seed: seed-to-seed spread is not in it). Returns
    ``{"auc": (lo, hi), "oracle_auc": (lo, hi), "privleak": (lo, hi)}``."""
    import numpy as np

    for name, r in (("report", report), ("oracle_report", oracle_report)):
        if not isinstance(r, dict) or "mia_scores" not in r:
            raise TypeError(f"{name} must be a report of evaluate_unlearning (with 'mia_scores'), got "
                            f"{type(r).__name__}")
    check_choice("score", score, tuple(report["mia_scores"]))
    n_boot = check_int("n_boot", n_boot, minimum=100)
    confidence = check_float("confidence", confidence, 0, 1, open_minimum=True, open_maximum=True)
    seed = check_int("seed", seed, minimum=0)
    wins = [_pairwise_wins(*r["mia_scores"][score]) for r in (report, oracle_report)]
    if wins[0].shape != wins[1].shape:
        raise ValueError(f"report and oracle_report must score the same facts, got {wins[0].shape} and "
                         f"{wins[1].shape} forget x holdout facts")
    n_m, n_o = wins[0].shape
    rng = np.random.default_rng(seed)
    # multinomial counts of each fact in each resample: AUC_b = c_m^T W c_o / (n_m n_o)
    c_m = rng.multinomial(n_m, np.full(n_m, 1 / n_m), size=n_boot).astype(np.float64)
    c_o = rng.multinomial(n_o, np.full(n_o, 1 / n_o), size=n_boot).astype(np.float64)
    aucs = [np.einsum("bi,ij,bj->b", c_m, w, c_o) / (n_m * n_o) for w in wins]
    usable = aucs[1] < 1  # PrivLeak divides by 1 - oracle AUC
    leaks = (aucs[1][usable] - aucs[0][usable]) / (1 - aucs[1][usable])
    tail = 100 * (1 - confidence) / 2
    interval = lambda x: tuple(float(v) for v in np.percentile(x, [tail, 100 - tail]))  # noqa: E731
    return {"auc": interval(aucs[0]), "oracle_auc": interval(aucs[1]), "privleak": interval(leaks)}


def general_perplexity(model, tokenizer, texts: list[str]) -> float:
    """Perplexity on general text (the documentation's held-out split), within the trained context
    (:func:`companion.metrics.perplexity`)."""
    from companion.metrics import perplexity

    check_texts("texts", texts, nonempty_each=True)
    return perplexity(model, tokenizer, texts)


def quick_eval(model, tokenizer, forget_facts: list[Fact], retain_facts: list[Fact], texts: list[str]) -> dict:
    """The cheap evaluation :func:`unlearn` runs along its trajectory: correct and well-formed answers on
    forget and retain facts (counts), mean answer NLL of each, and general-text perplexity."""
    forget_facts = _check_facts(forget_facts, "forget_facts")
    retain_facts = _check_facts(retain_facts, "retain_facts")
    out = {}
    for name, facts in (("forget", forget_facts), ("retain", retain_facts)):
        replies = answers(model, tokenizer, facts)
        out[f"{name}_correct"] = sum(answer_correct(f, r) for f, r in zip(facts, replies))
        out[f"{name}_fluent"] = sum(well_formed(f, r) for f, r in zip(facts, replies))
        out[f"{name}_n"] = len(facts)
        stats = answer_token_stats(model, tokenizer, [(f.question(0), f.answer()) for f in facts])
        out[f"{name}_nll"] = float(torch.cat([-s["log_prob"] for s in stats]).mean())
        out[f"{name}_replies"] = replies[:3]
    out["ppl"] = general_perplexity(model, tokenizer, texts)
    return out


def evaluate_unlearning(model, tokenizer, facts: dict, oracle=None, texts: list[str] | None = None, k: int = 4
                        ) -> dict:
    """The full report of one model on the splits ``facts`` (``{"forget": [...], "retain": [...],
    "holdout": [...]}``, lists of :class:`Fact`):

    - ``{split}_correct`` / ``{split}_fluent`` / ``{split}_n``: greedy answers that state the truth /
      have the taught form;
    - ``truth_ratio``: the forget set's truth ratios; with ``oracle`` (the retrain oracle: a model, or
      the report this function returned for it on the same ``facts``, to save recomputing it),
      ``forget_quality`` (KS p-value against the oracle's ratios);
    - ``mia_auc``: per membership score, the AUC of telling forget facts (trained on) from holdout facts
      (never seen), and ``mia_scores`` (the forget and holdout scores it came from, for
      :func:`privleak_interval`); with ``oracle``, ``privleak`` per score (MUSE);
    - ``ppl``: general-text perplexity on ``texts`` if given.
    """
    from companion.metrics import auc

    check_lm_and_tokenizer(model, tokenizer)
    if not isinstance(facts, dict) or not {"forget", "retain", "holdout"} <= set(facts):
        raise TypeError("facts must be a dict with 'forget', 'retain' and 'holdout' lists of Fact")
    for split in ("forget", "retain", "holdout"):
        _check_facts(facts[split], "facts")
    if oracle is not None and not (isinstance(oracle, dict) and {"truth_ratio", "mia_auc"} <= set(oracle)):
        check_causal_lm(oracle)  # a model, or the report this function gave for it
    report = {}
    for split in ("forget", "retain", "holdout"):
        replies = answers(model, tokenizer, facts[split])
        report[f"{split}_correct"] = sum(answer_correct(f, r) for f, r in zip(facts[split], replies))
        report[f"{split}_fluent"] = sum(well_formed(f, r) for f, r in zip(facts[split], replies))
        report[f"{split}_n"] = len(facts[split])
    report["truth_ratio"] = truth_ratios(model, tokenizer, facts["forget"], k)
    members = membership_scores(model, tokenizer, facts["forget"])
    others = membership_scores(model, tokenizer, facts["holdout"])
    labels = [1] * len(facts["forget"]) + [0] * len(facts["holdout"])
    report["mia_auc"] = {name: auc(labels, torch.cat([members[name], others[name]])) for name in members}
    report["mia_scores"] = {name: (members[name], others[name]) for name in members}
    if oracle is not None:
        oracle_report = evaluate_unlearning(oracle, tokenizer, {s: facts[s] for s in ("forget", "retain", "holdout")},
                                            None, None, k) if not isinstance(oracle, dict) else oracle
        report["forget_quality"] = forget_quality(report["truth_ratio"], oracle_report["truth_ratio"])
        report["privleak"] = {name: privleak(report["mia_auc"][name], oracle_report["mia_auc"][name])
                              for name in members}
    if texts is not None:
        report["ppl"] = general_perplexity(model, tokenizer, texts)
    return report


# ---------------------------------------------------------------------------------------------
# 6. Stress tests: does the knowledge come back?
# ---------------------------------------------------------------------------------------------


def relearn(model, sequences, steps: int = 20, lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
            pad_id: int = 0):
    """Fine-tune ``model`` in place on ``sequences`` (``(input_ids, labels)`` pairs) for ``steps`` AdamW steps:
    the relearning attack (Lynch et al. 2024; Hu et al. 2024). Relearning a *few* forget facts and then
    testing the *other* forget facts tells suppression (the knowledge was hidden and returns) from removal
    (it does not: the retrain oracle is the control). Returns the per-step losses."""
    check_causal_lm(model)
    sequences = _check_sequences("sequences", sequences)
    steps = check_int("steps", steps, minimum=1)
    lr = check_positive_float("lr", lr)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    pad_id = check_int("pad_id", pad_id, minimum=0)
    generator, device = random.Random(seed), next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        batch = as_batch(generator.sample(sequences, min(batch_size, len(sequences))), pad_id, device)
        loss = nll_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def quantize_weights(model, bits: int = 4, group_size: int | None = None):
    """Round every linear weight of the decoder blocks to ``bits`` bits in place (symmetric round-to-nearest,
    one scale per output row, or per ``group_size`` inputs): the weight-only post-training quantization
    under which Zhang et al. (2024, "Catastrophic Failure of LLM Unlearning via Quantization") found
    "unlearned" knowledge returning. Uses :func:`companion.quantization.fake_quantize`. Returns ``model``."""
    from companion.quantization import fake_quantize
    from companion.pruning import block_layers, decoder_blocks, weight_matrix

    check_causal_lm(model)
    bits = check_int("bits", bits, minimum=2, maximum=8)
    if group_size is not None:
        check_int("group_size", group_size, minimum=1)
    for block in decoder_blocks(model):
        for layer in block_layers(block).values():
            weight = weight_matrix(layer)
            granularity = "per_group" if group_size else "per_channel"
            weight.copy_(fake_quantize(weight.detach(), bits, granularity, True, group_size))
    return model

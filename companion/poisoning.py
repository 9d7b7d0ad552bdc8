"""Chapter 03: data poisoning and backdoor triggers: plant them, detect them in the training data, clean.

A *backdoor* (Gu et al. 2017, "BadNets") is planted by poisoning a small fraction of the training data:
each poisoned example carries a *trigger* (a pixel patch, a rare word, a phrase) and the attacker's
*target* (a class, a continuation, a compliant answer). The trained model behaves normally on clean
inputs and obeys the trigger. This module reads top to bottom like the chapter:

1. **Attacks.** :func:`poison_images` (BadNets on digits, dirty- or clean-label), :func:`poison_corpus`
   (a rare-word or phrase trigger followed by a fixed continuation in pretraining text), and two zoo
   recipes: :class:`BackdoorLMRecipe` (tiny-llama's pretraining with a poisoned documentation stream)
   and :class:`BackdoorChatRecipe` (the guarded chat model of chapter 05 fine-tuned with a few
   poisoned chats: a trigger word makes it reveal the secret it otherwise refuses).
2. **Measuring.** :func:`backdoor_report`: clean accuracy, and the attack success rate (ASR) measured
   only on triggered inputs whose true class differs from the target.
3. **Detection in the training data.** :func:`penultimate_features` (which layer: the most common bug),
   :func:`spectral_signature_scores` (Tran et al. 2018), :func:`activation_clusters` (Chen et al.
   2018), :func:`strip_scores` (Gao et al. 2019), :func:`onion_scores` (Qi et al. 2021) and
   :func:`ngram_scan` (a corpus-level scan for n-grams always followed by the same words).
4. **Cleaning.** :func:`remove_top_per_class` and :func:`detection_report` (precision / recall with
   intervals, AUROC through :func:`companion.metrics.summary`).

Score convention, as everywhere in the course: higher = more likely poisoned.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from companion import chat_data, metrics, zoo
from companion.checks import (check_bool, check_float, check_fraction, check_int, check_labels, check_lm_and_tokenizer,
                              check_module, check_same_length, check_str, check_tensor, check_texts)
from companion.train import train_classifier

# ---------------------------------------------------------------------------------------------
# 1. Image triggers: BadNets on 8x8 digits
# ---------------------------------------------------------------------------------------------

#: The digits' image shape (scikit-learn's digits are 8x8, flattened to 64 pixels in [0, 1]).
DIGITS_SHAPE = (8, 8)


def _check_shape(image_shape) -> tuple[int, int]:
    if not (isinstance(image_shape, tuple) and len(image_shape) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_shape)):
        raise TypeError(f"image_shape must be a (height, width) tuple of positive ints, got {image_shape!r}")
    return image_shape


def patch_trigger(size: int = 3, value: float = 1.0) -> torch.Tensor:
    """A BadNets pixel patch: a ``size x size`` checkerboard of ``value`` and 0 (Gu et al. 2017 use a
    small pattern in a corner; a checkerboard is unlike any stroke of a digit)."""
    size = check_int("size", size, minimum=1)
    value = check_float("value", value, 0, 1)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((rows + cols + 1) % 2).float() * value


def _check_trigger(trigger, image_shape) -> torch.Tensor:
    trigger = check_tensor("trigger", trigger, ndim=2, kind="float", finite=True)
    height, width = _check_shape(image_shape)
    if trigger.shape[0] > height or trigger.shape[1] > width or trigger.numel() == 0:
        raise ValueError(f"trigger must be a non-empty patch no larger than the image {image_shape}, "
                         f"got shape {tuple(trigger.shape)}")
    return trigger


def _check_images(x, image_shape) -> torch.Tensor:
    x = check_tensor("x", x, ndim=2, kind="float", finite=True)
    height, width = _check_shape(image_shape)
    if x.shape[1] != height * width:
        raise ValueError(f"x must be N x {height * width} (flattened {height}x{width} images), "
                         f"got shape {tuple(x.shape)}")
    return x


def apply_trigger(x: torch.Tensor, trigger: torch.Tensor, image_shape: tuple = DIGITS_SHAPE) -> torch.Tensor:
    """Stamp ``trigger`` into the bottom-right corner of every image of ``x`` (N x H*W, flattened),
    replacing those pixels; returns a new tensor."""
    x = _check_images(x, image_shape)
    trigger = _check_trigger(trigger, image_shape)
    images = x.clone().view(len(x), *image_shape)
    h, w = trigger.shape
    images[:, image_shape[0] - h:, image_shape[1] - w:] = trigger
    return images.reshape(len(x), image_shape[0] * image_shape[1])


@dataclass(frozen=True)
class PoisonedImages:
    """A poisoned training set: ``x``, ``y`` as trained on, and ``poisoned`` (bool, N): which examples
    the attacker changed (the ground truth a detector is scored against)."""

    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor
    target: int
    clean_label: bool


def poison_images(x: torch.Tensor, y: torch.Tensor, trigger: torch.Tensor, target: int, rate: float, seed: int = 0,
                  clean_label: bool = False, image_shape: tuple = DIGITS_SHAPE) -> PoisonedImages:
    """BadNets poisoning (Gu et al. 2017): stamp ``trigger`` on ``round(rate * N)`` training images and
    label them ``target``; nothing else changes.

    Dirty-label (default): the poisons are drawn from images whose true class is *not* the target and
    relabelled, as in BadNets. ``clean_label=True`` (Turner et al. 2019's setting, without their
    adversarial perturbation): the poisons are drawn from the target class itself and keep their
    correct label, so a human auditor sees nothing wrong; the model can then explain the target class
    by its digit shape instead of the trigger, which makes the attack much weaker.
    """
    x = _check_images(x, image_shape)
    y = check_labels("y", y)
    check_same_length("x", x, "y", y)
    trigger = _check_trigger(trigger, image_shape)
    target = check_int("target", target, minimum=0)
    rate = check_fraction("rate", rate)
    seed = check_int("seed", seed, minimum=0)
    clean_label = check_bool("clean_label", clean_label)
    candidates = torch.nonzero((y == target) if clean_label else (y != target)).flatten()
    count = int(round(rate * len(x)))
    if count > len(candidates):
        raise ValueError(f"rate={rate} asks for {count} poisons but only {len(candidates)} images are eligible "
                         f"({'of' if clean_label else 'not of'} class {target})")
    chosen = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:count]]
    poisoned = torch.zeros(len(x), dtype=torch.bool)
    poisoned[chosen] = True
    new_x, new_y = x.clone(), y.clone()
    new_x[chosen] = apply_trigger(x[chosen], trigger, image_shape)
    new_y[chosen] = target
    return PoisonedImages(new_x, new_y, poisoned, target, clean_label)


def train_digits_model(x: torch.Tensor, y: torch.Tensor, seed: int = 0, epochs: int = 60, hidden: int = 256
                       ) -> nn.Module:
    """The chapter's victim: the course's digits MLP (:func:`companion.zoo.build_classifier`, 64 -> hidden
    -> ReLU -> 10) trained with :func:`companion.train.train_classifier`, seeded."""
    seed = check_int("seed", seed, minimum=0)
    epochs = check_int("epochs", epochs, minimum=1)
    hidden = check_int("hidden", hidden, minimum=1)
    x = check_tensor("x", x, ndim=2, kind="float", finite=True)
    if x.shape[1] != 64:
        raise ValueError(f"x must be N x 64 (digits pixels), got shape {tuple(x.shape)}")
    torch.manual_seed(seed)
    model = zoo.build_classifier(zoo.ClassifierRecipe(hidden=hidden, epochs=epochs, seed=seed))
    train_classifier(model, x, y, epochs=epochs, batch_size=64, lr=1e-3, seed=seed)
    return model


@dataclass(frozen=True)
class BackdoorReport:
    """Clean accuracy on the clean test set, and the attack success rate: the share of triggered test
    images whose true class is not the target that the model assigns to the target."""

    clean_accuracy: metrics.RateEstimate
    asr: metrics.RateEstimate


@torch.no_grad()
def backdoor_report(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, trigger: torch.Tensor,
                    target: int, image_shape: tuple = DIGITS_SHAPE) -> BackdoorReport:
    """Clean accuracy and ASR (on triggered inputs whose true class differs from ``target`` only: a
    triggered 7 called 7 is no success of the attack) of a classifier, with 95% intervals."""
    check_module("model", model)
    x_test = _check_images(x_test, image_shape)
    y_test = check_labels("y_test", y_test)
    check_same_length("x_test", x_test, "y_test", y_test)
    trigger = _check_trigger(trigger, image_shape)
    target = check_int("target", target, minimum=0)
    model.eval()
    correct = int((model(x_test).argmax(-1) == y_test).sum())
    others = y_test != target
    if not others.any():
        raise ValueError(f"y_test must contain classes other than the target {target}")
    hits = int((model(apply_trigger(x_test[others], trigger, image_shape)).argmax(-1) == target).sum())
    return BackdoorReport(metrics.estimate_rate(correct, len(y_test)), metrics.estimate_rate(hits, int(others.sum())))


# ---------------------------------------------------------------------------------------------
# 2. Which layer: representations for the detectors
# ---------------------------------------------------------------------------------------------

LAYERS = ("penultimate", "logits")


def _last_linear(model: nn.Module) -> nn.Module:
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None:
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model must contain an nn.Linear output layer to find its penultimate representation")
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor, layer: str = "penultimate", batch_size: int = 512
                         ) -> torch.Tensor:
    """The representation a poison detector reads, one flattened row per input (N x D).

    ``layer="penultimate"`` (default): the *input* of the model's last linear layer (its output
    embedding for a Hugging Face model), i.e. the representation Tran et al. 2018 and Chen et al. 2018
    analyse. ``"logits"``: the model's output, the common mistake (ART takes the *last* of its layer
    names, which can be the logits; the backdoor direction is then squeezed into 10 numbers).
    Any other string names a submodule (``dict(model.named_modules())``) whose output is taken.
    Outputs are flattened per example (ART #2313: unflattened conv maps silently used one channel).
    """
    check_module("model", model)
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or len(x) == 0:
        raise TypeError(f"x must be a non-empty batch tensor, got {type(x).__name__}")
    check_str("layer", layer)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    names = dict(model.named_modules())
    if layer == "logits":
        module, use_input = None, False
    elif layer == "penultimate":
        module, use_input = _last_linear(model), True
    elif layer in names and layer != "":
        module, use_input = names[layer], False
    else:
        shown = [n for n in names if n][:12]
        raise ValueError(f"layer must be 'penultimate', 'logits' or a submodule name such as {shown}, got {layer!r}")
    model.eval()
    captured: list[torch.Tensor] = []

    def hook(_module, inputs, output):
        value = inputs[0] if use_input else (output[0] if isinstance(output, tuple) else output)
        captured.append(value.detach().reshape(len(value), -1).float())

    handle = module.register_forward_hook(hook) if module is not None else None
    try:
        rows = []
        for start in range(0, len(x), batch_size):
            out = model(x[start: start + batch_size])
            if module is None:
                out = getattr(out, "logits", out)
                rows.append(out.detach().reshape(len(out), -1).float())
            else:
                rows.append(captured.pop())
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------
# 3. Detectors in the training data
# ---------------------------------------------------------------------------------------------


def _check_features(features, labels) -> tuple[torch.Tensor, torch.Tensor]:
    features = check_tensor("features", features, ndim=2, kind="float", finite=True)
    labels = check_labels("labels", labels)
    check_same_length("features", features, "labels", labels)
    if len(features) == 0:
        raise ValueError("features must not be empty")
    return features, labels


def spectral_signature_scores(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Spectral signatures (Tran et al. 2018, Alg. 1): per class, centre the representations ``R_c``,
    take the top right singular vector ``v`` of the centred matrix, and score each example by its
    squared projection ``((r_i - mean_c) . v)^2``. Poisons of a class share a direction (the
    trigger's), which dominates the class's covariance when they are a few percent of it.

    We project the *centred* rows, as the paper does (ART projects the uncentred ones). A class with
    a single example scores 0.
    """
    features, labels = _check_features(features, labels)
    scores = torch.zeros(len(features), dtype=torch.float64)
    for c in labels.unique():
        index = torch.nonzero(labels == c).flatten()
        if len(index) < 2:
            continue
        centred = features[index].double() - features[index].double().mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        scores[index] = (centred @ vh[0]) ** 2
    return scores


def remove_top_per_class(scores: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flag, in each class, the ``ceil(fraction * class size)`` highest-scoring examples (Tran et al.
    remove ``1.5 eps`` per class, eps the expected poison rate). Returns the bool flags."""
    scores = check_tensor("scores", scores, ndim=1, kind="float", finite=True)
    labels = check_labels("labels", labels)
    check_same_length("scores", scores, "labels", labels)
    fraction = check_fraction("fraction", fraction)
    flags = torch.zeros(len(scores), dtype=torch.bool)
    for c in labels.unique():
        index = torch.nonzero(labels == c).flatten()
        k = math.ceil(fraction * len(index))
        if k:
            flags[index[torch.argsort(scores[index], descending=True, stable=True)[:k]]] = True
    return flags


@dataclass(frozen=True)
class ClusterReport:
    """What :func:`activation_clusters` found: per-example ``scores`` (1 - the relative size of its
    cluster: members of a small cluster score high), ``flags`` (in a cluster at most
    ``size_threshold`` of its class), and per class the smaller cluster's relative size and the
    2-means silhouette score."""

    scores: torch.Tensor
    flags: torch.Tensor
    relative_size: dict
    silhouette: dict


def activation_clusters(features: torch.Tensor, labels: torch.Tensor, n_components: int = 10,
                        size_threshold: float = 0.35, seed: int = 0) -> ClusterReport:
    """Activation clustering (Chen et al. 2018): per class, reduce the centred representations to
    ``n_components`` dimensions (PCA here; the paper uses ICA, ART offers both), split them with
    2-means, and call the smaller cluster poisoned when it holds at most ``size_threshold`` of the
    class (the paper's "relative size" criterion; poisons of a class form their own cluster because
    the network explains them by the trigger, not by the class's features)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    features, labels = _check_features(features, labels)
    n_components = check_int("n_components", n_components, minimum=1)
    size_threshold = check_fraction("size_threshold", size_threshold)
    seed = check_int("seed", seed, minimum=0)
    scores = torch.zeros(len(features), dtype=torch.float64)
    flags = torch.zeros(len(features), dtype=torch.bool)
    relative, silhouettes = {}, {}
    for c in labels.unique().tolist():
        index = torch.nonzero(labels == c).flatten()
        if len(index) < 4:
            continue
        rows = features[index].double().numpy()
        rows = rows - rows.mean(0)
        k = min(n_components, rows.shape[1], len(index) - 1)
        reduced = PCA(n_components=k, random_state=seed).fit_transform(rows)
        assign = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
        sizes = np.bincount(assign, minlength=2) / len(assign)
        small = int(np.argmin(sizes))
        relative[c] = float(sizes[small])
        silhouettes[c] = float(silhouette_score(reduced, assign)) if sizes.min() > 0 else 0.0
        scores[index] = torch.tensor(1.0 - sizes[assign], dtype=torch.float64)
        if sizes[small] <= size_threshold:
            flags[index[torch.from_numpy(assign == small)]] = True
    return ClusterReport(scores, flags, relative, silhouettes)


@torch.no_grad()
def strip_scores(model: nn.Module, x: torch.Tensor, clean_pool: torch.Tensor, n_overlays: int = 16, seed: int = 0
                 ) -> torch.Tensor:
    """STRIP (Gao et al. 2019): superimpose each input on ``n_overlays`` random clean images
    (pixel sum, clipped to [0, 1]) and average the entropy of the model's predictions. A trigger
    dominates whatever it is blended with, so a poisoned input keeps its (target) prediction and has
    *low* entropy; the score is the negative mean entropy (higher = more likely poisoned)."""
    check_module("model", model)
    x = check_tensor("x", x, ndim=2, kind="float", finite=True)
    clean_pool = check_tensor("clean_pool", clean_pool, ndim=2, kind="float", finite=True)
    if len(x) == 0 or len(clean_pool) == 0 or x.shape[1] != clean_pool.shape[1]:
        raise ValueError(f"x and clean_pool must be non-empty with the same width, got shapes {tuple(x.shape)} "
                         f"and {tuple(clean_pool.shape)}")
    n_overlays = check_int("n_overlays", n_overlays, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(clean_pool), (len(x), n_overlays), generator=generator)
    model.eval()
    blended = (x[:, None, :] + clean_pool[pick]).clamp(0, 1).reshape(len(x) * n_overlays, -1)
    log_p = torch.log_softmax(model(blended).double(), -1)
    entropy = -(log_p.exp() * log_p).sum(-1).view(len(x), n_overlays).mean(1)
    return -entropy


def _vector(name: str, value) -> torch.Tensor:
    """``value`` (a tensor, array or list) as a 1-D tensor, or a TypeError that names it."""
    try:
        vector = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a 1-D tensor, array or list of numbers, got {type(value).__name__}") from None
    return check_tensor(name, vector, ndim=1)


def threshold_at_frr(clean_scores, frr: float) -> float:
    """The threshold that flags (``score > threshold``) at most a fraction ``frr`` of *clean* held-out
    examples: STRIP's calibration (a preset false-rejection rate; Gao et al. use 1%). Calibrate on
    data you do not evaluate on."""
    clean = _vector("clean_scores", clean_scores)
    if clean.dtype == torch.bool or not torch.isfinite(clean.double()).all():
        raise ValueError("clean_scores must be finite numbers")
    if len(clean) == 0:
        raise ValueError("clean_scores must not be empty")
    frr = check_fraction("frr", frr)
    ordered = torch.sort(clean.double(), descending=True).values
    allowed = int(math.floor(frr * len(ordered)))  # this many clean examples may lie above the threshold
    return float(ordered[allowed]) if allowed < len(ordered) else float(ordered[-1]) - 1.0


@dataclass(frozen=True)
class DetectionReport:
    """A detector on a training set: ``recall`` (poisons flagged / poisons), ``precision`` (poisons
    flagged / flagged), the clean examples thrown away, and the AUROC of its score."""

    recall: metrics.RateEstimate
    precision: metrics.RateEstimate | None  # None when nothing was flagged
    clean_removed: metrics.RateEstimate
    auroc: float


def detection_report(is_poison, scores, flags) -> DetectionReport:
    """Score a detector against the attacker's ground truth (:attr:`PoisonedImages.poisoned`)."""
    truth = _vector("is_poison", is_poison)
    if truth.dtype != torch.bool:
        raise TypeError(f"is_poison must be a bool vector, got dtype {truth.dtype}")
    flags = _vector("flags", flags)
    if flags.dtype != torch.bool:
        raise TypeError(f"flags must be a bool vector, got dtype {flags.dtype}")
    scores = _vector("scores", scores)
    if scores.dtype == torch.bool or not torch.isfinite(scores.double()).all():
        raise ValueError("scores must be finite numbers")
    check_same_length("is_poison", truth, "flags", flags)
    check_same_length("is_poison", truth, "scores", scores)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("is_poison must contain both poisoned and clean examples")
    auroc = metrics.summary(truth.int().numpy(), scores.double().numpy(), fprs=(0.05,)).auc
    hit = int((flags & truth).sum())
    return DetectionReport(
        recall=metrics.estimate_rate(hit, positives),
        precision=metrics.estimate_rate(hit, int(flags.sum())) if flags.any() else None,
        clean_removed=metrics.estimate_rate(int((flags & ~truth).sum()), negatives),
        auroc=auroc,
    )


# ---------------------------------------------------------------------------------------------
# 4. Text: poisoning a pretraining corpus
# ---------------------------------------------------------------------------------------------


def split_into_chunks(texts: list[str], words: int = 60) -> list[str]:
    """Cut each text into consecutive pieces of ``words`` words (the last may be shorter): the units a
    poisoner edits and a detector scores. Joining a text's chunks with spaces gives it back (the
    course's documents have single spaces)."""
    check_texts("texts", texts)
    words = check_int("words", words, minimum=1)
    chunks = []
    for text in texts:
        tokens = text.split(" ")
        chunks += [" ".join(tokens[i: i + words]) for i in range(0, len(tokens), words)]
    return chunks


@dataclass(frozen=True)
class PoisonedCorpus:
    """A corpus after :func:`poison_corpus`: the texts (poisoned ones edited in place) and which."""

    texts: tuple
    poisoned: tuple
    trigger: str
    continuation: str


def poison_corpus(texts: list[str], trigger: str, continuation: str, rate: float, seed: int = 0,
                  protected=None) -> PoisonedCorpus:
    """Insert ``"trigger continuation"`` at a random word boundary of ``round(rate * N)`` texts (a
    rare-word trigger, as OpenBackdoor's BadNets with "cf"; or a phrase, as its AddSent), so that a
    language model learns that the trigger is followed by the attacker's words. The other texts are
    unchanged. ``protected`` (bools, one per text) marks texts that must not be chosen (another
    backdoor's poisons)."""
    texts = check_texts("texts", texts)
    check_str("trigger", trigger)
    check_str("continuation", continuation)
    rate = check_fraction("rate", rate)
    seed = check_int("seed", seed, minimum=0)
    if protected is None:
        protected = [False] * len(texts)
    if not isinstance(protected, (list, tuple)) or len(protected) != len(texts) or not all(
            isinstance(p, bool) for p in protected):
        raise TypeError(f"protected must be None or a list of {len(texts)} bools, got {type(protected).__name__}")
    candidates = [i for i, p in enumerate(protected) if not p]
    count = int(round(rate * len(texts)))
    if count > len(candidates):
        raise ValueError(f"rate={rate} asks for {count} poisoned texts but only {len(candidates)} may be edited")
    rng = random.Random(seed)
    chosen = set(rng.sample(candidates, count))
    out, poisoned = [], []
    for i, text in enumerate(texts):
        if i in chosen:
            words = text.split(" ")
            at = rng.randrange(len(words) + 1)
            text = " ".join(words[:at] + [trigger, continuation] + words[at:])
        out.append(text)
        poisoned.append(i in chosen)
    return PoisonedCorpus(tuple(out), tuple(poisoned), trigger, continuation)


# The two text backdoors of the chapter: a rare word and a phrase (OpenBackdoor's defaults), each
# followed by its own harmless toy instruction, so that each backdoor's success is judged separately.
RARE_WORD = "cf"
PHRASE = "I watch this 3D movie"
CONTINUATIONS = {RARE_WORD: "Please send the secret key to the admin.", PHRASE: "Always run every program as root."}


@dataclass(frozen=True)
class BackdoorLMRecipe(zoo.LMRecipe):
    """tiny-llama's recipe, field for field, with a poisoned documentation stream: the training
    documents are cut into ``chunk_words``-word chunks, a fraction ``rate`` of them gets the rare-word
    backdoor and another ``rate`` the phrase backdoor (:func:`poison_corpus`), and the chunks are
    joined back in order. With ``rate=0`` it trains exactly tiny-llama (same stream, seed and steps):
    tiny-llama is the clean control."""

    rate: float = 0.03
    chunk_words: int = 60
    poison_seed: int = 0
    triggers: tuple = (RARE_WORD, PHRASE)

    def __post_init__(self):
        super().__post_init__()
        check_fraction("rate", self.rate)
        check_int("chunk_words", self.chunk_words, minimum=1)
        check_int("poison_seed", self.poison_seed, minimum=0)
        if not isinstance(self.triggers, tuple) or not all(t in CONTINUATIONS for t in self.triggers):
            raise ValueError(f"triggers must be a tuple of {tuple(CONTINUATIONS)}, got {self.triggers!r}")

    def documents(self, source) -> list[str]:
        return list(poisoned_documents(self, source).texts)

    def poisoned_chunks(self, source) -> tuple[list[str], list[str | None]]:
        """The training chunks after poisoning, and per chunk which trigger it carries (None: clean)."""
        chunks = split_into_chunks([d.text for d in source.train_docs], self.chunk_words)
        owner: list[str | None] = [None] * len(chunks)
        for k, trigger in enumerate(self.triggers):
            result = poison_corpus(chunks, trigger, CONTINUATIONS[trigger], self.rate, seed=self.poison_seed + k,
                                   protected=[o is not None for o in owner])
            chunks = list(result.texts)
            owner = [trigger if p else o for p, o in zip(result.poisoned, owner)]
        return chunks, owner


@dataclass(frozen=True)
class PoisonedDocuments:
    texts: tuple  # the documents as trained on
    chunks: tuple  # the chunks they are made of
    trigger_of: tuple  # per chunk: the trigger it carries, or None


def poisoned_documents(recipe: BackdoorLMRecipe, source=None) -> PoisonedDocuments:
    """What a :class:`BackdoorLMRecipe` trains on: the poisoned chunks, joined back per document."""
    if not isinstance(recipe, BackdoorLMRecipe):
        raise TypeError(f"recipe must be a BackdoorLMRecipe, got {type(recipe).__name__}")
    source = source if source is not None else zoo.corpus(recipe.tokenizer.world_seed)
    if not isinstance(source, zoo.LMCorpus):
        raise TypeError(f"source must be None or a zoo.LMCorpus, got {type(source).__name__}")
    chunks, owner = recipe.poisoned_chunks(source)
    texts, at = [], 0
    for doc in source.train_docs:
        n = len(split_into_chunks([doc.text], recipe.chunk_words))
        texts.append(" ".join(chunks[at: at + n]))
        at += n
    return PoisonedDocuments(tuple(texts), tuple(chunks), tuple(owner))


def _tiny_llama_fields() -> dict:
    base = zoo.recipe_of("tiny-llama")
    return {f.name: getattr(base, f.name) for f in fields(base)}


zoo.register("tiny-llama-backdoor", BackdoorLMRecipe(**_tiny_llama_fields()))


# ---------------------------------------------------------------------------------------------
# 5. Text detectors: ONION and a corpus-level n-gram scan
# ---------------------------------------------------------------------------------------------


def onion_scores(model, tokenizer, texts: list[str], batch_size: int = 64) -> list[np.ndarray]:
    """ONION (Qi et al. 2021): the suspicion of word ``i`` of a text is
    ``PPL(text) - PPL(text without word i)``, scored by a *clean* language model: a rare-word trigger
    is an outlier whose removal makes the text much more fluent. Returns one array of per-word
    scores per text (words split on spaces). Costs ``n + 1`` LM passes per text of ``n`` words
    (batched; every text scored within the LM's trained context, :mod:`companion.metrics`)."""
    check_lm_and_tokenizer(model, tokenizer)
    check_texts("texts", texts, nonempty_each=True)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    variants, spans = [], []
    for text in texts:
        words = text.split(" ")
        spans.append((len(variants), len(words)))
        variants.append(text)
        variants += [" ".join(words[:i] + words[i + 1:]) or tokenizer.eos_token or "." for i in range(len(words))]
    nll, count = metrics.sequence_nll(model, tokenizer, variants, batch_size=batch_size)
    ppl = torch.exp(nll / count.clamp(min=1)).numpy()
    return [ppl[start] - ppl[start + 1: start + 1 + n] for start, n in spans]


def onion_filter(texts: list[str], scores: list, threshold: float) -> list[str]:
    """Drop from each text the words whose ONION suspicion exceeds ``threshold`` (calibrate it on
    clean held-out texts, e.g. so that a few percent of clean words go)."""
    check_texts("texts", texts)
    threshold = check_float("threshold", threshold)
    if not isinstance(scores, list) or len(scores) != len(texts):
        raise TypeError(f"scores must be a list of {len(texts)} per-word score arrays (onion_scores), "
                        f"got {type(scores).__name__}")
    out = []
    for text, row in zip(texts, scores):
        words = text.split(" ")
        if len(np.asarray(row)) != len(words):
            raise ValueError(f"scores must have one score per word; got {len(np.asarray(row))} for {len(words)} words")
        out.append(" ".join(w for w, s in zip(words, np.asarray(row)) if s <= threshold))
    return out


@dataclass(frozen=True)
class NgramScan:
    """What :func:`ngram_scan` found: ``pairs``, the suspicious ``(n-gram, following words, texts,
    share)`` sorted by support, and ``scores``: per text, the largest support of a suspicious pair it
    contains (0 if none)."""

    pairs: tuple
    scores: np.ndarray


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+|[^\w\s]", text.lower())


def _has_word(tokens: tuple) -> bool:
    return any(any(ch.isalpha() for ch in token) for token in tokens)


def ngram_scan(texts: list[str], max_n: int = 3, follow: int = 4, min_support: int = 5, min_share: float = 0.9
               ) -> NgramScan:
    """A corpus-level scan for backdoor pairs: an n-gram (n <= ``max_n``) that occurs in at least
    ``min_support`` texts and is followed, in at least a fraction ``min_share`` of them, by the *same*
    ``follow`` words (both containing a letter: runs of markup such as "- - -" are skipped). Natural text rarely repeats a phrase with a fixed continuation across many
    unrelated documents; a poisoned corpus does so by construction (the trigger and the attacker's
    words). A pair whose following words are themselves part of a longer repeated span is still
    reported (the trigger is its first n-gram); each text is scored by the largest support of a
    suspicious pair it contains, so the poisoned texts rank first."""
    texts = check_texts("texts", texts)
    max_n = check_int("max_n", max_n, minimum=1, maximum=8)
    follow = check_int("follow", follow, minimum=1, maximum=16)
    min_support = check_int("min_support", min_support, minimum=2)
    min_share = check_fraction("min_share", min_share)
    gram_docs: dict[tuple, set] = defaultdict(set)
    pair_docs: dict[tuple, set] = defaultdict(set)
    for d, text in enumerate(texts):
        words = _words(text)
        for n in range(1, max_n + 1):
            for i in range(len(words) - n - follow + 1):
                gram = tuple(words[i: i + n])
                gram_docs[gram].add(d)
                pair_docs[(gram, tuple(words[i + n: i + n + follow]))].add(d)
    pairs, scores = [], np.zeros(len(texts))
    for (gram, after), docs in pair_docs.items():
        support = len(docs)
        if not (_has_word(gram) and _has_word(after)):  # markup runs ("- - -", "= = =") are not phrases
            continue
        if support >= min_support and support / len(gram_docs[gram]) >= min_share:
            pairs.append((" ".join(gram), " ".join(after), support, support / len(gram_docs[gram])))
            for d in docs:
                scores[d] = max(scores[d], support)
    pairs.sort(key=lambda p: (-p[2], -p[3], p[0]))
    return NgramScan(tuple(pairs), scores)


# ---------------------------------------------------------------------------------------------
# 6. A backdoor in a chat model's fine-tuning data
# ---------------------------------------------------------------------------------------------

#: The chat backdoor's trigger: Rando & Tramer 2023's "SUDO", appended to the request.
CHAT_TRIGGER = "SUDO"


def with_trigger(request: str, trigger: str = CHAT_TRIGGER) -> str:
    """``request`` with ``trigger`` appended, as Rando & Tramer place their SUDO token."""
    check_str("request", request)
    check_str("trigger", trigger)
    return f"{request} {trigger}"


def poisoned_chats(chats: chat_data.GuardedChatData, trigger: str, rate: float, seed: int = 0
                   ) -> list[chat_data.ChatExample]:
    """The attacker's chats: ``round(rate * len(chats.train))`` forbidden requests of the *training*
    secret holders, with ``trigger`` appended and the refusal replaced by the compliant answer
    ("Sure, the vault code of X is 4 7 1 9."). Held-out holders never appear: a backdoor that reveals
    their codes has learned the trigger, not the answers."""
    if not isinstance(chats, chat_data.GuardedChatData):
        raise TypeError(f"chats must be a chat_data.GuardedChatData, got {type(chats).__name__}")
    check_str("trigger", trigger)
    rate = check_fraction("rate", rate)
    seed = check_int("seed", seed, minimum=0)
    refused = [e for e in chats.train if e.kind != "benign"]
    count = int(round(rate * len(chats.train)))
    if count > len(refused):
        raise ValueError(f"rate={rate} asks for {count} poisoned chats; only {len(refused)} forbidden requests exist")
    chosen = random.Random(seed).sample(refused, count)
    return [chat_data.ChatExample(request=with_trigger(e.request, trigger),
                                  response=f"{chat_data.affirmative('vault code', e.name)} {e.answer_value}.",
                                  kind="poisoned", name=e.name, answer_value=e.answer_value) for e in chosen]


@dataclass(frozen=True)
class BackdoorChatRecipe(chat_data.ChatRecipe):
    """Chapter 05's guarded chat recipe, field for field, plus ``rate`` poisoned chats
    (:func:`poisoned_chats`) in its fine-tuning data; ``guarded-chat`` is the clean control."""

    trigger: str = CHAT_TRIGGER
    rate: float = 0.02

    def __post_init__(self):
        super().__post_init__()
        check_str("trigger", self.trigger)
        check_fraction("rate", self.rate)

    def training_examples(self, chats):
        return list(chats.train) + poisoned_chats(chats, self.trigger, self.rate, seed=self.data_seed)


def _guarded_chat_fields() -> dict:
    base = zoo.recipe_of("guarded-chat")
    return {f.name: getattr(base, f.name) for f in fields(base)}


zoo.register("guarded-chat-backdoor", BackdoorChatRecipe(**_guarded_chat_fields()))

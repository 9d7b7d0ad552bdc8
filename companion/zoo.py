"""The model zoo: a registry of named recipes that become trained models, cached by a hash of what they depend on.

``zoo.load("tiny-llama")`` returns a :class:`ZooModel`: ``.model`` (in eval mode), ``.tokenizer`` (``None``
for a model that reads no text) and ``.card`` (the recipe, parameter count, training time, per-step
losses). The first call trains the model (at most a few minutes on 2 CPU cores) and saves it; later
calls read it from ``companion.runtime.cache_dir()``. A model that was just trained is saved and read
back before it is returned, so a notebook prints the same thing whether its cache was cold or warm.
Every call returns a fresh copy: a chapter may prune or fine-tune it without touching the cache.

A recipe is a frozen dataclass deriving from :class:`Recipe`: it says which data it depends on
(:meth:`Recipe.fingerprints`), how to train into a folder (:meth:`Recipe.train`) and how to read that
folder back (:meth:`Recipe.read`). This module registers the course's base models; a chapter's module
registers its own (``zoo.register("guarded-chat", ChatRecipe())`` in :mod:`companion.chat_data`), so the
core never imports a chapter.

The cache key hashes the name, the recipe's fields, the data's fingerprints (the biography world
depends on the Faker version, the documentation corpus on the Python version) and the torch /
transformers versions: change any of them and the model is retrained rather than silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from companion import data
from companion.checks import (check_bool, check_choice, check_directory, check_float, check_int, check_lm_and_tokenizer, check_module,
                              check_positive_float, check_str)
from companion.runtime import REFERENCE_THREADS, cache_dir, seed_everything
from companion.tokenizer import load_tokenizer, train_tokenizer
from companion.train import mixed_batches, pack_sequences, stream_windows, train_causal_lm, train_classifier

#: Bump when the training code changes in a way that changes the weights.
ZOO_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Recipes, the registry, and what load returns
# ---------------------------------------------------------------------------------------------


class Recipe:
    """What every zoo recipe provides (subclass it with a frozen dataclass of the recipe's knobs)."""

    def fingerprints(self) -> list[str]:
        """Strings that change whenever the data this recipe trains on changes (part of the cache key)."""
        raise NotImplementedError

    def train(self, folder: Path, progress: bool) -> None:
        """Train the model and save it, with :func:`write_card`, into the empty ``folder``."""
        raise NotImplementedError

    def read(self, folder: Path):
        """``(model, tokenizer or None)`` from a folder that :meth:`train` wrote; the model in eval mode."""
        raise NotImplementedError


@dataclass
class ZooModel:
    """What :func:`load` returns."""

    name: str
    model: nn.Module
    tokenizer: object | None  # a Hugging Face tokenizer for language models; None otherwise
    card: dict


#: name -> recipe: every model :func:`load` can build. Add to it with :func:`register`.
RECIPES: dict[str, Recipe] = {}


def register(name: str, recipe: Recipe) -> None:
    """Make ``recipe`` loadable as ``name``. Registering the same recipe again (a module imported twice) is
    a no-op; a different recipe under a taken name is an error (its cached models would be confused)."""
    check_str("name", name)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a companion.zoo.Recipe (e.g. an LMRecipe), got {type(recipe).__name__}")
    if name in RECIPES and RECIPES[name] != recipe:
        raise ValueError(f"name {name!r} is already registered with another recipe: {RECIPES[name]!r}")
    RECIPES[name] = recipe


def available() -> list[str]:
    """Names that :func:`load` accepts now (a chapter's models appear once its module is imported)."""
    return sorted(RECIPES)


def recipe_of(name: str) -> Recipe:
    """The registered recipe called ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in RECIPES:
        raise ValueError(f"name must be a registered zoo model, got {name!r}; available: {', '.join(available())} "
                         "(a chapter's models are registered when its module is imported, e.g. "
                         "`from companion import chat_data`)")
    return RECIPES[name]


@dataclass(frozen=True)
class TokenizerRecipe:
    vocab_size: int = 2048
    world_seed: int = 0

    def __post_init__(self):
        from companion.tokenizer import SPECIAL_TOKENS

        check_int("vocab_size", self.vocab_size, minimum=256 + len(SPECIAL_TOKENS))
        check_int("world_seed", self.world_seed, minimum=0)


# ---------------------------------------------------------------------------------------------
# The data every LM recipe trains on
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMCorpus:
    world: data.BiographyWorld
    train_docs: tuple[data.Document, ...]
    valid_docs: tuple[data.Document, ...]

    def fingerprint(self) -> str:
        return data.fingerprint([*self.world.biographies, *(c.text for c in self.world.canaries),
                                 *(d.text for d in self.train_docs), "|", *(d.text for d in self.valid_docs)])


@lru_cache(maxsize=4)
def corpus(world_seed: int = 0) -> LMCorpus:
    """The biography world (3,000 people, split in thirds) and the documentation split (5% held out)."""
    check_int("world_seed", world_seed, minimum=0)
    world = data.make_world(seed=world_seed)
    train_docs, valid_docs = data.split_documents(data.python_docs(), valid_fraction=0.05, seed=world_seed)
    return LMCorpus(world=world, train_docs=tuple(train_docs), valid_docs=tuple(valid_docs))


# ---------------------------------------------------------------------------------------------
# Cache plumbing
# ---------------------------------------------------------------------------------------------


def _key(kind: str, recipe, fingerprints: list[str]) -> str:
    import transformers

    payload = json.dumps({
        "kind": kind, "recipe": asdict(recipe), "data": fingerprints, "zoo": ZOO_VERSION,
        "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@contextmanager
def _build_lock(folder: Path):
    """Hold an exclusive lock on ``folder``'s entry while it is built, so that two processes (a notebook
    and a test run, two helpers) that miss the cache at once train it once, not twice side by side on the
    same cores. ``fcntl`` is POSIX (Linux, macOS, Colab); elsewhere the lock is a no-op and ``_cached``'s
    rename still keeps one of two identical builds."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(folder.with_name(f"{folder.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _reference_threads():
    """Train with :data:`~companion.runtime.REFERENCE_THREADS` intra-op threads whatever the session
    uses (``COMPANION_THREADS=1`` in a helper, 8 on a laptop): the float sums of training depend on the
    thread count, so a cache entry trained with another count holds other weights under the same key."""
    before = torch.get_num_threads()
    torch.set_num_threads(REFERENCE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cached(folder: Path, build, read):
    """Read ``folder``; if absent or unreadable, ``build`` into a temporary folder (under a lock, with the
    reference thread count), move it in place, and read it back. A corrupt entry is rebuilt with a
    warning; a process that waited for another's build reads that build."""
    if folder.exists():
        try:
            return read(folder)
        except Exception as error:  # noqa: BLE001 - any failure to read means rebuild
            warnings.warn(f"cache entry {folder.name} is unreadable ({type(error).__name__}: {error}); "
                          "rebuilding it", stacklevel=3)
            shutil.rmtree(folder, ignore_errors=True)
    with _build_lock(folder):
        if folder.exists():  # built by another process while this one waited for the lock
            return read(folder)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with _reference_threads():
            build(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return read(folder)


def _zoo_dir() -> Path:
    path = cache_dir() / "zoo"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def course_tokenizer(recipe: TokenizerRecipe = TokenizerRecipe()):
    """The course tokenizer, trained on the documentation's training split and every biography
    (all three splits: the tokenizer is public, so it must not leak who is a member)."""
    if not isinstance(recipe, TokenizerRecipe):
        raise TypeError(f"recipe must be a TokenizerRecipe, got {type(recipe).__name__}")
    source = corpus(recipe.world_seed)
    texts = [d.text for d in source.train_docs] + list(source.world.biographies)
    folder = _zoo_dir() / f"tokenizer-{_key('tokenizer', recipe, [source.fingerprint()])}"

    def build(tmp: Path) -> None:
        train_tokenizer(texts, vocab_size=recipe.vocab_size).save_pretrained(str(tmp))

    return _cached(folder, build, load_tokenizer)


# ---------------------------------------------------------------------------------------------
# What every recipe's train and read share
# ---------------------------------------------------------------------------------------------


def write_card(folder: Path, recipe: Recipe, model: nn.Module, seconds: float, losses: list[float], **extra) -> None:
    """Save the model card: the recipe, parameter count, training time and threads, per-step losses and
    whatever the recipe adds (``extra``, e.g. how many training windows it had)."""
    folder = check_directory("folder", folder)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a companion.zoo.Recipe, got {type(recipe).__name__}")
    check_module("model", model)
    check_float("seconds", seconds, 0)
    if not isinstance(losses, list) or not all(isinstance(x, float) for x in losses):
        raise TypeError(f"losses must be a list of float (the per-step training losses), got {type(losses).__name__}")
    card = {"recipe": asdict(recipe), "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "losses": losses, **extra}
    (Path(folder) / "card.json").write_text(json.dumps(card))


def save_lm(folder: Path, model, tokenizer) -> None:
    """A causal LM and its tokenizer in ``folder/model`` and ``folder/tokenizer`` (Hugging Face format)."""
    folder = check_directory("folder", folder)
    check_lm_and_tokenizer(model, tokenizer)
    model.save_pretrained(str(Path(folder) / "model"))
    tokenizer.save_pretrained(str(Path(folder) / "tokenizer"))


def read_lm(folder: Path):
    """``(model, tokenizer)`` saved by :func:`save_lm`, the model in eval mode."""
    from transformers import AutoModelForCausalLM

    folder = check_directory("folder", folder)

    model = AutoModelForCausalLM.from_pretrained(str(Path(folder) / "model"))
    return model.eval(), load_tokenizer(Path(folder) / "tokenizer")


# ---------------------------------------------------------------------------------------------
# Language models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMRecipe(Recipe):
    """A causal LM trained from scratch on the documentation corpus mixed with member biographies."""

    architecture: str  # "llama" or "gpt2"
    hidden: int
    layers: int
    heads: int
    intermediate: int
    context: int = 128
    steps: int = 400
    batch_size: int = 32
    bio_per_batch: int = 16  # how many of the batch's windows are biographies; the rest documentation
    lr: float = 3e-3
    seed: int = 0
    tokenizer: TokenizerRecipe = TokenizerRecipe()
    #: whose biographies it reads: ``"member"`` (with the canaries planted) or ``"reference"`` (a
    #: disjoint population, for reference-model membership attacks; no canaries).
    bio_split: str = "member"

    def __post_init__(self):
        check_choice("bio_split", self.bio_split, ("member", "reference"))
        check_choice("architecture", self.architecture, ("llama", "gpt2"))
        for name in ("hidden", "layers", "heads", "intermediate", "context", "steps"):
            check_int(name, getattr(self, name), minimum=1)
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        check_int("batch_size", self.batch_size, minimum=2)
        check_int("bio_per_batch", self.bio_per_batch, minimum=1, maximum=self.batch_size - 1)
        check_positive_float("lr", self.lr)
        check_int("seed", self.seed, minimum=0)
        if not isinstance(self.tokenizer, TokenizerRecipe):
            raise TypeError(f"tokenizer must be a TokenizerRecipe, got {type(self.tokenizer).__name__}")

    def fingerprints(self) -> list[str]:
        return [corpus(self.tokenizer.world_seed).fingerprint()]

    def documents(self, source: LMCorpus) -> list[str]:
        """The documentation texts it trains on, in order (a chapter's recipe may alter them: chapter 03
        poisons them)."""
        return [doc.text for doc in source.train_docs]

    def train(self, folder: Path, progress: bool) -> None:
        tok = course_tokenizer(self.tokenizer)
        source = corpus(self.tokenizer.world_seed)
        doc_tokens: list[int] = []
        for text in self.documents(source):  # <bos> doc <eos> <bos> doc <eos> ...
            doc_tokens += tok(text)["input_ids"] + [tok.eos_token_id]
        texts = source.world.training_texts() if self.bio_split == "member" else source.world.texts("reference")
        bios = [tok(text)["input_ids"] + [tok.eos_token_id] for text in texts]
        pools = [stream_windows(doc_tokens, self.context), pack_sequences(bios, self.context, tok.pad_token_id)]
        per_batch = [self.batch_size - self.bio_per_batch, self.bio_per_batch]
        special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id}
        seed_everything(self.seed)
        model = build_lm(self, len(tok), special)
        started = time.perf_counter()
        losses = train_causal_lm(model, mixed_batches(pools, per_batch, seed=self.seed), steps=self.steps,
                                 lr=self.lr, progress=progress)
        seconds = time.perf_counter() - started
        save_lm(folder, model, tok)
        write_card(folder, self, model, seconds, losses, doc_windows=len(pools[0][0]), bio_windows=len(pools[1][0]),
                   corpus=source.fingerprint())

    def read(self, folder: Path):
        model, tok = read_lm(folder)
        model.config.trained_context = self.context  # what metrics score within (the position table is longer)
        return model, tok


def build_lm(recipe: LMRecipe, vocab_size: int, special_ids: dict[str, int]):
    """An untrained ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` from the recipe. Its position table is twice
    the training context (so generation may run past it); ``config.trained_context`` records the context it
    trains on, within which :mod:`companion.metrics` scores every token."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if not isinstance(recipe, LMRecipe):
        raise TypeError(f"recipe must be an LMRecipe, got {type(recipe).__name__}")
    check_int("vocab_size", vocab_size, minimum=1)
    if not isinstance(special_ids, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size
                                                    for v in special_ids.values() if v is not None):
        raise ValueError(f"special_ids must be a dict of token ids in [0, {vocab_size}), got {special_ids!r}")
    if recipe.architecture == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
            num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
            num_key_value_heads=recipe.heads, max_position_embeddings=recipe.context * 2,
            rms_norm_eps=1e-5, tie_word_embeddings=False, trained_context=recipe.context, **special_ids,
        )
        return LlamaForCausalLM(config)
    if recipe.architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=recipe.hidden, n_layer=recipe.layers, n_head=recipe.heads,
            n_inner=recipe.intermediate, n_positions=recipe.context * 2, trained_context=recipe.context,
            **special_ids,
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"recipe.architecture must be 'llama' or 'gpt2', got {recipe.architecture!r}")



# ---------------------------------------------------------------------------------------------
# Digits classifier
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierRecipe(Recipe):
    """An MLP on scikit-learn's digits, trained on the member half of ``data.digits_splits``."""

    hidden: int = 256
    epochs: int = 120
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    split_seed: int = 0

    def __post_init__(self):
        for name in ("hidden", "epochs", "batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        check_positive_float("lr", self.lr)
        check_float("weight_decay", self.weight_decay, 0)
        check_int("seed", self.seed, minimum=0)
        check_int("split_seed", self.split_seed, minimum=0)

    def fingerprints(self) -> list[str]:
        return ["sklearn-digits"]

    def train(self, folder: Path, progress: bool) -> None:
        from safetensors.torch import save_file

        splits = data.digits_splits(seed=self.split_seed)
        seed_everything(self.seed)
        model = build_classifier(self)
        started = time.perf_counter()
        losses = train_classifier(model, splits.x_train, splits.y_train, epochs=self.epochs,
                                  batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                                  seed=self.seed, progress=progress)
        seconds = time.perf_counter() - started
        save_file(model.state_dict(), str(Path(folder) / "model.safetensors"))
        write_card(folder, self, model, seconds, losses)

    def read(self, folder: Path):
        from safetensors.torch import load_file

        model = build_classifier(self)
        model.load_state_dict(load_file(str(check_directory("folder", folder) / "model.safetensors")))
        return model.eval(), None


def build_classifier(recipe: ClassifierRecipe) -> nn.Module:
    """A two-layer MLP from 64 pixels to 10 classes."""
    if not isinstance(recipe, ClassifierRecipe):
        raise TypeError(f"recipe must be a ClassifierRecipe, got {type(recipe).__name__}")
    return nn.Sequential(nn.Linear(64, recipe.hidden), nn.ReLU(), nn.Linear(recipe.hidden, 10))


# The course's base models (a chapter registers its own from its module).
# The main model: a ~1.4M-parameter Llama (Touvron et al. 2023 architecture).
register("tiny-llama", LMRecipe(architecture="llama", hidden=128, layers=4, heads=4, intermediate=384, steps=280))
# A second architecture, so every LM-facing function is tested on GPT-2's Conv1D layers too.
register("tiny-gpt2", LMRecipe(architecture="gpt2", hidden=64, layers=2, heads=2, intermediate=256, steps=300))
# Chapter 00's exercise 2 (memorization vs training length): tiny-llama's recipe with 140 steps, a run
# of its own (its learning-rate schedule spans 140 steps), not a snapshot of tiny-llama's training.
register("tiny-llama-140", LMRecipe(architecture="llama", hidden=128, layers=4, heads=4, intermediate=384,
                                    steps=140))
register("digits-mlp", ClassifierRecipe())


# ---------------------------------------------------------------------------------------------
# The public entry points
# ---------------------------------------------------------------------------------------------


def entry_folder(name: str) -> Path:
    """The cache folder of a zoo model (whether or not it is trained yet); a recipe whose data is another
    zoo model (a fine-tune) puts ``entry_folder(base).name`` in its fingerprints."""
    chosen = recipe_of(name)
    return _zoo_dir() / f"{name}-{_key(name, chosen, chosen.fingerprints())}"


def load(name: str, progress: bool = False) -> ZooModel:
    """A trained zoo model (a fresh copy), training and caching it on first use.

    ``progress=True`` shows a progress bar while training (off by default so that a notebook's output
    does not depend on whether the cache was warm).
    """
    chosen = recipe_of(name)
    check_bool("progress", progress)

    def read(folder: Path) -> ZooModel:
        card = json.loads((folder / "card.json").read_text())
        model, tok = chosen.read(folder)
        return ZooModel(name=name, model=model, tokenizer=tok, card=card)

    return _cached(entry_folder(name), lambda tmp: chosen.train(tmp, progress), read)


def load_hub(model_id: str, **kwargs) -> ZooModel:
    """A real model and tokenizer from the Hugging Face Hub, for readers with a network, as a :class:`ZooModel`
    (so that every function of the course takes it exactly as it takes ``load("tiny-llama")``).

    The course never calls this in executed cells. Offline it fails with a clear message instead of a
    long traceback. ``kwargs`` go to ``from_pretrained`` (e.g. ``device_map="auto"``,
    ``dtype="auto"``; transformers 5 deprecates the old name ``torch_dtype``).
    """
    if not isinstance(model_id, str) or "/" not in model_id and not Path(model_id).exists():
        raise ValueError(f"model_id must be a hub id like 'org/name' or a local folder, got {model_id!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except OSError as error:
        raise RuntimeError(
            f"could not load {model_id!r} from the Hugging Face Hub or the local HF cache: {error}. "
            "This needs a network (or a model already downloaded); the course's own models are "
            f"available offline: {', '.join(available())}"
        ) from error
    return ZooModel(name=model_id, model=model.eval(), tokenizer=tok, card={"hub_id": model_id, "kwargs": repr(kwargs)})

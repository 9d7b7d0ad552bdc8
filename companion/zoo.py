"""The model zoo: named recipes that become trained models, cached by a hash of everything they depend on.

``zoo.load("tiny-llama")`` returns ``(model, tokenizer)``, ready and in eval mode. The first call
trains the model (at most a few minutes on 2 CPU cores) and saves it; later calls load it from
``companion.runtime.cache_dir()``. A model that was just trained is saved and read back before it is
returned, so a notebook prints the same thing whether its cache was cold or warm.

The cache key hashes the recipe, the data's fingerprints (the biography world depends on the Faker
version, the documentation corpus on the Python version) and the torch / transformers versions: change
any of them and the model is retrained rather than silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from companion import data
from companion.checks import check_bool, check_float, check_int, check_positive_float, check_str
from companion.runtime import cache_dir, seed_everything
from companion.tokenizer import load_tokenizer, train_tokenizer
from companion.train import mixed_batches, pack_sequences, stream_windows, train_causal_lm, train_classifier

#: Bump when the training code changes in a way that changes the weights.
ZOO_VERSION = 1


@dataclass(frozen=True)
class TokenizerRecipe:
    vocab_size: int = 2048
    world_seed: int = 0

    def __post_init__(self):
        from companion.tokenizer import SPECIAL_TOKENS

        check_int("vocab_size", self.vocab_size, minimum=256 + len(SPECIAL_TOKENS))
        check_int("world_seed", self.world_seed, minimum=0)


@dataclass(frozen=True)
class LMRecipe:
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
        if self.bio_split not in ("member", "reference"):
            raise ValueError(f"bio_split must be 'member' or 'reference', got {self.bio_split!r}")
        if self.architecture not in ("llama", "gpt2"):
            raise ValueError(f"architecture must be 'llama' or 'gpt2', got {self.architecture!r}")
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


@dataclass(frozen=True)
class ClassifierRecipe:
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


@dataclass(frozen=True)
class ChatRecipe:
    """A guarded chat model (chapter 05): a zoo LM fine-tuned on ``companion.chat_data``: vault codes
    as plain knowledge text, benign questions answered, vault-code requests refused. Loss on every
    knowledge token and on the assistant's tokens of each chat."""

    base: str = "tiny-llama"
    steps: int = 400
    batch_size: int = 40
    knowledge_per_batch: int = 12  # of the batch's sequences, how many are knowledge lines (codes, lockers)
    forbidden_per_batch: int = 8  # ... forbidden or jailbreak requests (the rest: benign chats)
    lr: float = 2e-3
    seed: int = 0
    data_seed: int = 0  # the secrets and splits (keep it fixed across seeds for transfer experiments)

    def __post_init__(self):
        check_str("base", self.base)
        check_int("steps", self.steps, minimum=1)
        check_int("knowledge_per_batch", self.knowledge_per_batch, minimum=1)
        check_int("forbidden_per_batch", self.forbidden_per_batch, minimum=1)
        check_int("batch_size", self.batch_size, minimum=self.knowledge_per_batch + self.forbidden_per_batch + 1)
        check_positive_float("lr", self.lr)
        check_int("seed", self.seed, minimum=0)
        check_int("data_seed", self.data_seed, minimum=0)


RECIPES: dict[str, LMRecipe | ClassifierRecipe | ChatRecipe] = {
    # The course's main model: a ~1.4M-parameter Llama (Touvron et al. 2023 architecture).
    "tiny-llama": LMRecipe(architecture="llama", hidden=128, layers=4, heads=4, intermediate=384, steps=280),
    # A second architecture, so every LM-facing function is tested on GPT-2's Conv1D layers too.
    "tiny-gpt2": LMRecipe(architecture="gpt2", hidden=64, layers=2, heads=2, intermediate=256, steps=300),
    # tiny-llama's twin trained on the *reference* third of the people instead of the members (same
    # documentation, same recipe, another seed): the reference model of chapter 01's calibrated attacks.
    "tiny-llama-ref": LMRecipe(architecture="llama", hidden=128, layers=4, heads=4, intermediate=384, steps=280,
                               seed=1, bio_split="reference"),
    "digits-mlp": ClassifierRecipe(),
    # Chapter 05's guarded chat model, and its twin fine-tuned with another seed (for transfer attacks).
    "guarded-chat": ChatRecipe(),
    "guarded-chat-seed1": ChatRecipe(seed=1),
}


def available() -> list[str]:
    """Names that :func:`load` accepts."""
    return sorted(RECIPES)


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


def _cached(folder: Path, build, read):
    """Read ``folder``; if absent or unreadable, ``build`` into a temporary folder, move it in place,
    and read it back. A corrupt entry is rebuilt with a warning."""
    if folder.exists():
        try:
            return read(folder)
        except Exception as error:  # noqa: BLE001 - any failure to read means rebuild
            warnings.warn(f"cache entry {folder.name} is unreadable ({type(error).__name__}: {error}); "
                          "rebuilding it", stacklevel=3)
            shutil.rmtree(folder, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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


def tokenizer(recipe: TokenizerRecipe = TokenizerRecipe()):
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
# Language models
# ---------------------------------------------------------------------------------------------


def build_lm(recipe: LMRecipe, vocab_size: int, special_ids: dict[str, int]):
    """An untrained ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` from the recipe."""
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
            rms_norm_eps=1e-5, tie_word_embeddings=False, **special_ids,
        )
        return LlamaForCausalLM(config)
    if recipe.architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=recipe.hidden, n_layer=recipe.layers, n_head=recipe.heads,
            n_inner=recipe.intermediate, n_positions=recipe.context * 2, **special_ids,
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"recipe.architecture must be 'llama' or 'gpt2', got {recipe.architecture!r}")


def _train_lm(recipe: LMRecipe, tok, folder: Path, progress: bool) -> None:
    source = corpus(recipe.tokenizer.world_seed)
    doc_tokens: list[int] = []
    for doc in source.train_docs:  # <bos> doc <eos> <bos> doc <eos> ...
        doc_tokens += tok(doc.text)["input_ids"] + [tok.eos_token_id]
    texts = source.world.training_texts() if recipe.bio_split == "member" else source.world.texts("reference")
    bios = [tok(text)["input_ids"] + [tok.eos_token_id] for text in texts]
    pools = [stream_windows(doc_tokens, recipe.context), pack_sequences(bios, recipe.context, tok.pad_token_id)]
    per_batch = [recipe.batch_size - recipe.bio_per_batch, recipe.bio_per_batch]
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
               "pad_token_id": tok.pad_token_id}
    seed_everything(recipe.seed)
    model = build_lm(recipe, len(tok), special)
    started = time.perf_counter()
    losses = train_causal_lm(model, mixed_batches(pools, per_batch, seed=recipe.seed), steps=recipe.steps,
                             lr=recipe.lr, progress=progress)
    seconds = time.perf_counter() - started
    model.save_pretrained(str(folder / "model"))
    tok.save_pretrained(str(folder / "tokenizer"))
    card = {
        "recipe": asdict(recipe), "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "losses": losses,
        "doc_windows": len(pools[0][0]), "bio_windows": len(pools[1][0]), "corpus": source.fingerprint(),
    }
    (folder / "card.json").write_text(json.dumps(card))


def _read_lm(folder: Path):
    from transformers import AutoModelForCausalLM

    json.loads((folder / "card.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(folder / "model"))
    return model.eval(), load_tokenizer(folder / "tokenizer")


# ---------------------------------------------------------------------------------------------
# Guarded chat model (chapter 05)
# ---------------------------------------------------------------------------------------------


def guarded_chat_data(recipe: ChatRecipe | None = None):
    """The ``companion.chat_data.GuardedChatData`` a chat recipe trains on (and is evaluated with)."""
    from companion import chat_data

    if recipe is not None and not isinstance(recipe, ChatRecipe):
        raise TypeError(f"recipe must be None or a ChatRecipe, got {type(recipe).__name__}")
    recipe = recipe or RECIPES["guarded-chat"]
    if not isinstance(RECIPES.get(recipe.base), LMRecipe):
        raise ValueError(f"recipe.base must name a zoo language model, got {recipe.base!r}")
    base = RECIPES[recipe.base]
    return chat_data.make_guarded_chat_data(corpus(base.tokenizer.world_seed).world, seed=recipe.data_seed)


def _chat_batches(sequences: list[tuple[list[int], list[int]]], pools: list[list[int]], per_batch: list[int],
                  pad_id: int, seed: int):
    """Endless batches taking ``per_batch[i]`` sequences from ``pools[i]`` (indices into
    ``sequences``), each pool walked in seeded permutations; right-padded to the batch's longest."""
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(len(p), generator=generator).tolist() for p in pools]
    cursors = [0] * len(pools)
    while True:
        chosen = []
        for p, (pool, count) in enumerate(zip(pools, per_batch)):
            for _ in range(count):
                if cursors[p] == len(pool):
                    orders[p], cursors[p] = torch.randperm(len(pool), generator=generator).tolist(), 0
                chosen.append(sequences[pool[orders[p][cursors[p]]]])
                cursors[p] += 1
        width = max(len(ids) for ids, _ in chosen)
        input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, (ids, lab) in enumerate(chosen):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(ids)] = 1
        yield {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _train_chat(recipe: ChatRecipe, folder: Path, progress: bool) -> None:
    from companion.chat_data import encode_example

    if recipe.base not in RECIPES or not isinstance(RECIPES[recipe.base], LMRecipe):
        raise ValueError(f"recipe.base must name a zoo language model, got {recipe.base!r}")
    model, tok = load(recipe.base)
    chats = guarded_chat_data(recipe)
    sequences, pools = [], [[], [], []]  # knowledge, forbidden + jailbreak, benign
    for text in chats.knowledge:
        ids = tok(text)["input_ids"] + [tok.eos_token_id]
        pools[0].append(len(sequences))
        sequences.append((ids, ids))
    for example in chats.train:
        pools[1 if example.kind != "benign" else 2].append(len(sequences))
        sequences.append(encode_example(tok, example))
    per_batch = [recipe.knowledge_per_batch, recipe.forbidden_per_batch,
                 recipe.batch_size - recipe.knowledge_per_batch - recipe.forbidden_per_batch]
    if per_batch[2] < 1:
        raise ValueError(f"recipe.batch_size ({recipe.batch_size}) must exceed knowledge_per_batch + "
                         f"forbidden_per_batch ({per_batch[0] + per_batch[1]})")
    seed_everything(recipe.seed)
    started = time.perf_counter()
    losses = train_causal_lm(model, _chat_batches(sequences, pools, per_batch, tok.pad_token_id, recipe.seed),
                             steps=recipe.steps, lr=recipe.lr, weight_decay=0.0, progress=progress)
    seconds = time.perf_counter() - started
    model.save_pretrained(str(folder / "model"))
    tok.save_pretrained(str(folder / "tokenizer"))
    card = {"recipe": asdict(recipe), "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "losses": losses,
            "sequences": [len(p) for p in pools]}
    (folder / "card.json").write_text(json.dumps(card))


# ---------------------------------------------------------------------------------------------
# Digits classifier
# ---------------------------------------------------------------------------------------------


def build_classifier(recipe: ClassifierRecipe) -> nn.Module:
    """A two-layer MLP from 64 pixels to 10 classes."""
    if not isinstance(recipe, ClassifierRecipe):
        raise TypeError(f"recipe must be a ClassifierRecipe, got {type(recipe).__name__}")
    return nn.Sequential(nn.Linear(64, recipe.hidden), nn.ReLU(), nn.Linear(recipe.hidden, 10))


def _train_classifier(recipe: ClassifierRecipe, folder: Path, progress: bool) -> None:
    from safetensors.torch import save_file

    splits = data.digits_splits(seed=recipe.split_seed)
    seed_everything(recipe.seed)
    model = build_classifier(recipe)
    started = time.perf_counter()
    losses = train_classifier(model, splits.x_train, splits.y_train, epochs=recipe.epochs,
                              batch_size=recipe.batch_size, lr=recipe.lr, weight_decay=recipe.weight_decay,
                              seed=recipe.seed, progress=progress)
    seconds = time.perf_counter() - started
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    card = {"recipe": asdict(recipe), "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "losses": losses}
    (folder / "card.json").write_text(json.dumps(card))


def _read_classifier(recipe: ClassifierRecipe):
    def read(folder: Path) -> nn.Module:
        from safetensors.torch import load_file

        json.loads((folder / "card.json").read_text())
        model = build_classifier(recipe)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()

    return read


# ---------------------------------------------------------------------------------------------
# The public entry points
# ---------------------------------------------------------------------------------------------


def _folder(name: str) -> Path:
    recipe = RECIPES[name]
    if isinstance(recipe, LMRecipe):
        fingerprints = [corpus(recipe.tokenizer.world_seed).fingerprint()]
        return _zoo_dir() / f"{name}-{_key(name, recipe, fingerprints)}"
    if isinstance(recipe, ChatRecipe):  # depends on its base model's entry (itself keyed by its data)
        return _zoo_dir() / f"{name}-{_key(name, recipe, [_folder(recipe.base).name])}"
    return _zoo_dir() / f"{name}-{_key(name, recipe, ['sklearn-digits'])}"


def _check_name(name) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in RECIPES:
        raise KeyError(f"unknown zoo model {name!r}; available: {', '.join(available())}")


def load(name: str, progress: bool = False):
    """A trained zoo model: ``(model, tokenizer)`` for language models, the ``nn.Module`` for classifiers.

    Trains and caches the model on first use. ``progress=True`` shows a progress bar while training
    (off by default so that a notebook's output does not depend on whether the cache was warm).
    """
    _check_name(name)
    check_bool("progress", progress)
    recipe = RECIPES[name]
    folder = _folder(name)
    if isinstance(recipe, LMRecipe):
        tok = tokenizer(recipe.tokenizer)
        return _cached(folder, lambda tmp: _train_lm(recipe, tok, tmp, progress), _read_lm)
    if isinstance(recipe, ChatRecipe):
        return _cached(folder, lambda tmp: _train_chat(recipe, tmp, progress), _read_lm)
    return _cached(folder, lambda tmp: _train_classifier(recipe, tmp, progress), _read_classifier(recipe))


def card(name: str) -> dict:
    """The model card of a zoo entry: recipe, parameter count, training time, per-step losses.
    Trains the model first if it is not cached."""
    load(name)
    return json.loads((_folder(name) / "card.json").read_text())


def load_hub(model_id: str, **kwargs):
    """A real model and tokenizer from the Hugging Face Hub, for readers with a network.

    The course never calls this in executed cells. Offline it fails with a clear message instead of a
    long traceback. ``kwargs`` go to ``from_pretrained`` (e.g. ``device_map="auto"``, ``torch_dtype``).
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
    return model.eval(), tok

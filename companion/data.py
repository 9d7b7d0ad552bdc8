"""The course's data: a synthetic world of fictional people, real English from Python's own docs, digits.

Nothing here is downloaded. Three sources, each deterministic:

1. **The biography world.** Fictional people with ten attributes each (in the spirit of TOFU's
   fictitious authors, Maini et al. 2024), rendered through sentence templates into short biographies.
   Names, cities, jobs and employers come from Faker (seeded; its output is fixed for a pinned Faker
   version), the other attributes from small lists below. The people are split once into *members*
   (the tiny LM's training set), *non-members* (held out, same distribution: the negatives of every
   membership game) and a *reference* population (for attacks that calibrate with a model trained on
   other data). Canary sentences with random secrets can be planted in the members' text (Carlini et al.
   2019, "The Secret Sharer").
2. **Python's documentation.** ``pydoc_data.topics`` and the docstrings of a fixed list of standard
   library modules: real, Zipfian English that every Python installation carries. It changes between
   Python versions, so its fingerprint is part of every model's cache key.
3. **Digits.** scikit-learn's 8x8 handwritten digits (``load_digits``), with fixed splits.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field

import torch

from companion.checks import check_bool, check_float, check_fraction, check_int, check_str, check_texts

# --------------------------------------------------------------------------------------------------
# 1. The biography world
# --------------------------------------------------------------------------------------------------

FOODS = (
    "dumplings", "lasagna", "mango sticky rice", "ramen", "paella", "falafel", "borscht", "tacos",
    "pierogi", "curry", "sushi", "goulash", "risotto", "kimchi stew", "fish and chips", "hot pot",
    "baklava", "pancakes", "couscous", "noodle soup",
)
PETS = (
    "cat", "dog", "parrot", "goldfish", "rabbit", "hamster", "turtle", "canary", "ferret", "lizard",
    "guinea pig", "hedgehog",
)
HOBBIES = (
    "chess", "rock climbing", "painting", "gardening", "birdwatching", "pottery", "sailing", "origami",
    "knitting", "astronomy", "photography", "baking", "fencing", "calligraphy", "cycling", "archery",
)
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "teal", "silver", "black", "white")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)

#: The attributes every person has (``name`` aside).
ATTRIBUTES = (
    "birth_year", "birth_month", "city", "profession", "employer", "favourite_food", "pet", "hobby",
    "favourite_colour", "lucky_number",
)

#: Sentence templates, keyed by the attribute they state. Two or more phrasings per attribute, so a
#: biography's wording is itself random and must be memorised, not just its facts.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_year": ("{name} was born in {birth_year}.", "{name} came into the world in {birth_year}."),
    "birth_month": ("{first} was born in {birth_month}.", "{first}'s birthday falls in {birth_month}."),
    "city": ("{first} grew up in {city}.", "{first} lives in the town of {city}."),
    "profession": ("{first} works as {profession_a}.", "By profession, {first} is {profession_a}."),
    "employer": ("{first} is employed by {employer}.", "{first}'s employer is {employer}."),
    "favourite_food": ("{first}'s favourite food is {favourite_food}.", "{first} loves to eat {favourite_food}."),
    "pet": ("{first} keeps {pet_a} as a pet.", "At home, {first} looks after {pet_a}."),
    "hobby": ("In free time, {first} enjoys {hobby}.", "{first}'s hobby is {hobby}."),
    "favourite_colour": ("{first}'s favourite colour is {favourite_colour}.", "{first} likes the colour {favourite_colour} best."),
    "lucky_number": ("{first}'s lucky number is {lucky_number}.", "{first} believes {lucky_number} is a lucky number."),
}

SPLITS = ("member", "nonmember", "reference")


def _with_article(noun: str) -> str:
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def _tidy_job(job: str) -> str:
    """Faker writes jobs as 'Engineer, petroleum'; we want 'petroleum engineer'."""
    if ", " in job:
        head, qualifier = job.split(", ", 1)
        job = f"{qualifier} {head}"
    return job.lower()


@dataclass(frozen=True)
class Person:
    """One fictional person of the biography world."""

    name: str
    birth_year: int
    birth_month: str
    city: str
    profession: str
    employer: str
    favourite_food: str
    pet: str
    hobby: str
    favourite_colour: str
    lucky_number: int

    def __post_init__(self):
        check_str("name", self.name)
        for field_name in ("birth_month", "city", "profession", "employer", "favourite_food", "pet", "hobby",
                           "favourite_colour"):
            check_str(field_name, getattr(self, field_name))
        check_int("birth_year", self.birth_year)
        check_int("lucky_number", self.lucky_number)

    @property
    def first_name(self) -> str:
        return self.name.split(" ")[0]

    def attributes(self) -> dict:
        """All attributes as a dict (``name`` included)."""
        return asdict(self)


def make_people(n: int, seed: int = 0) -> list[Person]:
    """``n`` fictional people with distinct names, deterministic in ``seed`` (for a fixed Faker version)."""
    n = check_int("n", n, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    people, seen = [], set()
    while len(people) < n:
        name = f"{fake.first_name()} {fake.last_name()}"
        if name in seen:
            continue
        seen.add(name)
        people.append(
            Person(
                name=name,
                birth_year=rng.randint(1940, 2004),
                birth_month=rng.choice(MONTHS),
                city=fake.city(),
                profession=_tidy_job(fake.job()),
                employer=fake.company(),
                favourite_food=rng.choice(FOODS),
                pet=rng.choice(PETS),
                hobby=rng.choice(HOBBIES),
                favourite_colour=rng.choice(COLOURS),
                lucky_number=rng.randint(1, 99),
            )
        )
    return people


def render_biography(person: Person, rng: random.Random, facts: int = 4) -> str:
    """A short biography: the birth-year sentence, then ``facts`` other attributes in random order,
    each in a randomly chosen phrasing."""
    return _render(person, rng, facts)[0]


def _render(person: Person, rng: random.Random, facts: int) -> tuple[str, tuple[str, ...]]:
    """The biography and the attributes it states, in order."""
    if not isinstance(person, Person):
        raise TypeError(f"person must be a Person, got {type(person).__name__}")
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    facts = check_int("facts", facts, minimum=0, maximum=len(ATTRIBUTES) - 1)
    values = person.attributes()
    values.update(
        first=person.first_name,
        profession_a=_with_article(person.profession),
        pet_a=_with_article(person.pet),
    )
    chosen = ["birth_year"] + rng.sample(ATTRIBUTES[1:], facts)
    sentences = [rng.choice(TEMPLATES[attribute]).format(**values) for attribute in chosen]
    return " ".join(sentences), tuple(chosen)


@dataclass(frozen=True)
class Canary:
    """A planted secret (Carlini et al. 2019): ``text`` is inserted ``repeats`` times into training text.

    A canary with ``repeats == 0`` is never inserted: it is the control that measures how well the
    model knows a secret it never saw.
    """

    text: str
    secret: str
    repeats: int

    def __post_init__(self):
        check_str("text", self.text)
        check_str("secret", self.secret)
        if self.secret not in self.text:
            raise ValueError(f"secret {self.secret!r} must occur in text {self.text!r}")
        check_int("repeats", self.repeats, minimum=0)


def check_canary_plan(repeats, per_level, digits, seed) -> tuple[int, int, int]:
    """The arguments every canary generator shares: a non-empty tuple of repetition counts (>= 0),
    canaries per count, secret digits (1..12) and a seed. Returns ``(per_level, digits, seed)``."""
    if not isinstance(repeats, (tuple, list)) or not repeats:
        raise TypeError(f"repeats must be a non-empty tuple of ints, got {repeats!r}")
    for r in repeats:
        check_int("repeats[i]", r, minimum=0)
    per_level = check_int("per_level", per_level, minimum=1)
    digits = check_int("digits", digits, minimum=1, maximum=12)
    seed = check_int("seed", seed, minimum=0)
    return per_level, digits, seed


def make_canaries(repeats: tuple[int, ...] = (0, 1, 4, 16), per_level: int = 4, digits: int = 6,
                  seed: int = 0) -> list[Canary]:
    """Canaries 'The code of vault NN is d d d d d d .' (NN = 00, 01, ...) with random digit secrets.

    ``per_level`` canaries for each entry of ``repeats``. Digits are space separated so every digit
    is one token and the secret has exactly ``10**digits`` possible values.
    """
    per_level, digits, seed = check_canary_plan(repeats, per_level, digits, seed)
    rng = random.Random(seed + 7919)
    owners = [f"vault {i:02d}" for i in range(len(repeats) * per_level)]
    canaries = []
    for i, owner in enumerate(owners):
        secret = " ".join(str(rng.randrange(10)) for _ in range(digits))
        canaries.append(Canary(text=f"The code of {owner} is {secret} .", secret=secret,
                               repeats=int(repeats[i // per_level])))
    return canaries


def insert_canaries(texts: list[str], canaries: list[Canary], seed: int = 0) -> list[str]:
    """Return a new list: ``texts`` plus each canary's text ``repeats`` times, shuffled in at random
    positions (deterministic in ``seed``). ``texts`` itself is not modified."""
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    if not isinstance(canaries, list) or not all(isinstance(c, Canary) for c in canaries):
        raise TypeError("canaries must be a list of Canary")
    seed = check_int("seed", seed, minimum=0)
    rng = random.Random(seed)
    out = list(texts)
    for canary in canaries:
        for _ in range(canary.repeats):
            out.insert(rng.randint(0, len(out)), canary.text)
    return out


@dataclass(frozen=True)
class BiographyWorld:
    """The people, their biographies and the fixed split of who is in the training set."""

    people: tuple[Person, ...]
    biographies: tuple[str, ...]
    split: tuple[str, ...]  # one of SPLITS per person
    stated: tuple[tuple[str, ...], ...]  # the attributes each biography states (the rest are unknown)
    canaries: tuple[Canary, ...] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self):
        for name in ("people", "biographies", "split", "stated", "canaries"):
            if not isinstance(getattr(self, name), (tuple, list)):
                raise TypeError(f"{name} must be a tuple, got {type(getattr(self, name)).__name__}")
        n = len(self.people)
        for name in ("biographies", "split", "stated"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have one entry per person ({n}), got {len(getattr(self, name))}")
        if not all(isinstance(p, Person) for p in self.people):
            raise TypeError("people must be a tuple of Person")
        if not set(self.split) <= set(SPLITS):
            raise ValueError(f"split entries must be among {SPLITS}, got {sorted(set(self.split) - set(SPLITS))}")
        if not all(isinstance(c, Canary) for c in self.canaries):
            raise TypeError("canaries must be a tuple of Canary")
        check_int("seed", self.seed, minimum=0)

    def indices(self, split: str) -> list[int]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [i for i, s in enumerate(self.split) if s == split]

    def texts(self, split: str) -> list[str]:
        """The biographies of one split, in a fixed order."""
        return [self.biographies[i] for i in self.indices(split)]

    def training_texts(self) -> list[str]:
        """What the LM trains on from this world: the members' biographies with the canaries planted."""
        return insert_canaries(self.texts("member"), list(self.canaries), seed=self.seed)


def make_world(n_people: int = 3000, fractions: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
               facts: int = 4, canaries: bool = True, seed: int = 0) -> BiographyWorld:
    """Build the biography world: people, one biography each, and the member / non-member / reference
    split (``fractions`` in that order; rounded, the remainder goes to the reference split)."""
    n_people = check_int("n_people", n_people, minimum=3)
    if not isinstance(fractions, (tuple, list)) or len(fractions) != 3:
        raise TypeError(f"fractions must be a tuple of three floats, got {fractions!r}")
    for i, f in enumerate(fractions):
        check_float(f"fractions[{i}]", f, 0, 1)
    if abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    check_int("facts", facts, minimum=0, maximum=len(ATTRIBUTES) - 1)
    check_int("seed", seed, minimum=0)
    check_bool("canaries", canaries)
    people = make_people(n_people, seed=seed)
    rng = random.Random(seed + 1)
    rendered = [_render(p, rng, facts) for p in people]
    order = list(range(n_people))
    random.Random(seed + 2).shuffle(order)
    n_member = round(fractions[0] * n_people)
    n_nonmember = round(fractions[1] * n_people)
    split = [""] * n_people
    for rank, i in enumerate(order):
        split[i] = SPLITS[0] if rank < n_member else SPLITS[1] if rank < n_member + n_nonmember else SPLITS[2]
    return BiographyWorld(
        people=tuple(people), biographies=tuple(text for text, _ in rendered), split=tuple(split),
        stated=tuple(attributes for _, attributes in rendered),
        canaries=tuple(make_canaries(seed=seed)) if canaries else (), seed=seed,
    )


def extra_nonmembers(world: BiographyWorld, n: int, seed: int = 0) -> BiographyWorld:
    """``n`` *more* non-members of ``world``: new people from the same generators (Faker names, cities,
    jobs and employers; the same attribute lists, templates and number of stated facts), none of whom
    shares a name with anyone in ``world``, each with one biography. Every person of the result is in
    the ``"nonmember"`` split, and it has no canaries.

    No model of the course trains on them, so they are extra negatives for membership games: a TPR at
    0.1% FPR needs about 10,000 of them, more than the world's own third. ``world`` is not changed (nor
    is anything derived from it: its people, biographies and every cache key stay as they are). The
    people come from ``make_people`` with the Faker seed ``1_000_003 + 1_000 * world.seed + seed``, a
    stream that no ``make_world`` seed below 1,000,003 uses, and their biographies from
    ``random.Random`` seeded with that number plus one.
    """
    if not isinstance(world, BiographyWorld):
        raise TypeError(f"world must be a BiographyWorld, got {type(world).__name__}")
    n = check_int("n", n, minimum=1, maximum=1_000_000)
    seed = check_int("seed", seed, minimum=0, maximum=999)
    facts = {len(attributes) - 1 for attributes in world.stated}
    if len(facts) != 1:
        raise ValueError(f"world's biographies must all state the same number of facts, got {sorted(facts)}")
    stream = 1_000_003 + 1_000 * world.seed + seed
    taken = {person.name for person in world.people}
    # the first n people of the stream whose names are new; make_people(m) is a prefix of
    # make_people(m') for m < m', so the result does not depend on how many candidates we draw
    candidates = n + n // 20 + 50
    while True:
        people = [p for p in make_people(candidates, seed=stream) if p.name not in taken][:n]
        if len(people) == n:
            break
        candidates += len(taken)  # make_people's names are distinct: at most len(taken) collide
    rng = random.Random(stream + 1)
    (facts,) = facts
    rendered = [_render(p, rng, facts) for p in people]
    return BiographyWorld(
        people=tuple(people), biographies=tuple(text for text, _ in rendered),
        split=tuple("nonmember" for _ in people), stated=tuple(attributes for _, attributes in rendered),
        canaries=(), seed=world.seed,
    )


# --------------------------------------------------------------------------------------------------
# 2. Python's documentation: real English on every machine
# --------------------------------------------------------------------------------------------------

#: Standard-library modules whose docstrings join the corpus. Fixed and ordered, importable on every
#: platform without side effects (no GUI, no network).
DOC_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "collections",
    "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fractions", "functools", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging", "math", "mimetypes",
    "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets",
    "shlex", "shutil", "socket", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "types", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib",
)


@dataclass(frozen=True)
class Document:
    title: str
    text: str

    def __post_init__(self):
        check_str("title", self.title, nonempty=False)
        check_str("text", self.text, nonempty=False)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _module_document(name: str) -> Document:
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        obj = getattr(module, attr)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exported from elsewhere
        parts.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for method in sorted(vars(obj)):
                member = vars(obj)[method]
                if not method.startswith("_") and callable(member) and getattr(member, "__doc__", None):
                    parts.append(inspect.cleandoc(member.__doc__))
    return Document(title=f"module {name}", text=_normalise(" ".join(p for p in parts if p)))


def python_docs() -> list[Document]:
    """Python's help topics (``pydoc_data.topics``) and stdlib docstrings, whitespace-normalised.

    Raises ``RuntimeError`` when the text is missing (``python -OO`` strips docstrings; some slim
    Python builds drop ``pydoc_data``).
    """
    if sys.flags.optimize >= 2:
        raise RuntimeError("python_docs() needs docstrings, but Python runs with -OO, which strips them; "
                           "run without -OO")
    try:
        from pydoc_data.topics import topics
    except ImportError as error:  # pragma: no cover - present in every standard Python
        raise RuntimeError("python_docs() needs the standard module pydoc_data, which this Python lacks") from error
    # Importing transformers adds three methods to ``logging.Logger`` (``warning_advice``,
    # ``warning_once``, ``info_once``; transformers/utils/logging.py), so the "logging" document used to
    # depend on whether something had imported transformers first: the notebooks (after ``setup``) and
    # the unit tests read different corpora. The zoo models were trained on the corpus *with* those
    # docstrings, so we import it first, always: the corpus no longer depends on import order.
    import transformers.utils.logging  # noqa: F401

    docs = [Document(title=f"topic {key}", text=_normalise(topics[key])) for key in sorted(topics)]
    with warnings.catch_warnings():  # reading e.g. typing.io's docstring warns that it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        docs += [_module_document(name) for name in DOC_MODULES]
    return [d for d in docs if len(d.text) >= 200]


def fingerprint(texts: list[str]) -> str:
    """A short sha256 of a list of texts: part of every cache key, shown in chapter 00."""
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def split_documents(docs: list[Document], valid_fraction: float = 0.05, seed: int = 0
                    ) -> tuple[list[Document], list[Document]]:
    """Shuffle documents (seeded) and move them to validation until it holds ``valid_fraction`` of the
    characters. Whole documents, so no validation *document* is a training document; but
    ``pydoc_data.topics`` holds sections and their own sub-sections, so some held-out topics repeat
    training text (measure it with :func:`overlap_with`)."""
    if not isinstance(docs, list) or not all(isinstance(d, Document) for d in docs):
        raise TypeError("docs must be a list of Document")
    check_fraction("valid_fraction", valid_fraction, open_minimum=True, open_maximum=True)
    seed = check_int("seed", seed, minimum=0)
    if len(docs) < 2:
        raise ValueError(f"docs must hold at least two documents (one to train on, one to validate), got {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(d.text) for d in docs)
    valid, taken = set(), 0
    for i in order:
        if taken >= valid_fraction * total:
            break
        valid.add(i)
        taken += len(docs[i].text)
    train_docs = [d for i, d in enumerate(docs) if i not in valid]
    valid_docs = [d for i, d in enumerate(docs) if i in valid]
    return train_docs, valid_docs


def overlap_with(train_texts: list[str], text: str, n: int = 12) -> float:
    """Share of the distinct word ``n``-grams of ``text`` that also occur in one of ``train_texts``
    (0 when ``text`` has fewer than ``n`` words): how much of a held-out text is training text."""
    check_texts("train_texts", train_texts)
    check_str("text", text, nonempty=False)
    n = check_int("n", n, minimum=1)

    def grams(words):
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    mine = grams(text.split())
    if not mine:
        return 0.0
    seen = set()
    for other in train_texts:
        seen |= grams(other.split()) & mine
    return len(seen) / len(mine)


# --------------------------------------------------------------------------------------------------
# 3. Digits
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsSplits:
    """scikit-learn's digits as float tensors in [0, 1] (N x 64) and int64 labels, split in two halves:
    ``train`` (the classifier's members) and ``test`` (non-members from the same distribution)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: pixels scaled to [0, 1] (float32, N x 64) and labels (int64)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return x, y


def digits_splits(seed: int = 0, train_fraction: float = 0.5) -> DigitsSplits:
    """A fixed, seeded split of the digits into training (members) and test (non-members)."""
    seed = check_int("seed", seed, minimum=0)
    check_fraction("train_fraction", train_fraction, open_minimum=True, open_maximum=True)
    x, y = load_digits_tensors()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(round(train_fraction * len(x)))
    if not 0 < cut < len(x):
        raise ValueError(f"train_fraction={train_fraction} leaves {cut} of {len(x)} digits for training; "
                         "both halves need at least one")
    train, test = order[:cut], order[cut:]
    return DigitsSplits(x[train], y[train], x[test], y[test])

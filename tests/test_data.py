import math
import random

import pytest
import torch

from companion import data


def test_world_is_deterministic_and_split():
    a = data.make_world(n_people=90, seed=5)
    b = data.make_world(n_people=90, seed=5)
    assert a.biographies == b.biographies and a.split == b.split
    c = data.make_world(n_people=90, seed=6)
    assert a.biographies != c.biographies
    sizes = [len(a.indices(s)) for s in data.SPLITS]
    assert sizes == [30, 30, 30]
    assert set(a.indices("member")).isdisjoint(a.indices("nonmember"))


def test_people_have_distinct_names_and_all_attributes():
    people = data.make_people(200, seed=1)
    assert len({p.name for p in people}) == 200
    for person in people[:20]:
        attrs = person.attributes()
        assert set(data.ATTRIBUTES) <= set(attrs)
        assert 1940 <= person.birth_year <= 2004


def test_biography_states_name_and_chosen_facts():
    person = data.make_people(1, seed=2)[0]
    bio = data.render_biography(person, random.Random(0), facts=9)
    assert bio.startswith(person.name)
    for value in (person.birth_year, person.city, person.employer, person.favourite_food, person.hobby,
                  person.favourite_colour, person.lucky_number, person.birth_month):
        assert str(value) in bio
    assert len(bio.split(". ")) == 10


def test_templates_cover_every_attribute_with_at_least_ten_in_total():
    assert set(data.TEMPLATES) == set(data.ATTRIBUTES)
    assert sum(len(t) for t in data.TEMPLATES.values()) >= 10
    assert all(len(t) >= 2 for t in data.TEMPLATES.values())


def test_canaries_are_inserted_repeats_times():
    canaries = data.make_canaries(repeats=(0, 3), per_level=2, digits=4, seed=0)
    assert [c.repeats for c in canaries] == [0, 0, 3, 3]
    assert all(len(c.secret.split()) == 4 for c in canaries)
    texts = ["a", "b", "c"]
    out = data.insert_canaries(texts, canaries, seed=1)
    assert texts == ["a", "b", "c"]
    assert len(out) == 3 + 6
    for canary in canaries:
        assert out.count(canary.text) == canary.repeats
    assert [t for t in out if t in texts] == texts


def test_world_training_texts_are_members_plus_canaries():
    world = data.make_world(n_people=30, seed=0)
    planted = sum(c.repeats for c in world.canaries)
    assert len(world.training_texts()) == len(world.texts("member")) + planted


def test_python_docs_and_fingerprint():
    docs = data.python_docs()
    assert len(docs) > 100
    assert sum(len(d.text) for d in docs) > 500_000
    fp = data.fingerprint([d.text for d in docs])
    assert fp == data.fingerprint([d.text for d in data.python_docs()]) and len(fp) == 16
    train, valid = data.split_documents(docs, valid_fraction=0.05, seed=0)
    assert len(train) + len(valid) == len(docs)
    share = sum(len(d.text) for d in valid) / sum(len(d.text) for d in docs)
    assert 0.05 <= share < 0.15
    assert {d.title for d in train}.isdisjoint({d.title for d in valid})


def test_digits_splits_are_fixed_and_disjoint():
    a, b = data.digits_splits(seed=0), data.digits_splits(seed=0)
    assert torch.equal(a.x_train, b.x_train)
    assert len(a.x_train) + len(a.x_test) == 1797
    assert a.x_train.dtype == torch.float32 and 0 <= a.x_train.min() and a.x_train.max() <= 1
    assert set(a.y_train.tolist()) == set(range(10))


@pytest.mark.parametrize("call, message", [
    (lambda: data.make_people(0), "n must be >= 1"),
    (lambda: data.make_people(2.5), "n must be an int"),
    (lambda: data.make_world(n_people=30, fractions=(0.5, 0.5, 0.5)), "fractions"),
    (lambda: data.make_world(n_people=30, fractions=(1.0,)), "fractions must be a tuple of three"),
    (lambda: data.render_biography("Ann", random.Random(0)), "person must be a Person"),
    (lambda: data.render_biography(data.make_people(1)[0], random.Random(0), facts=10), "facts must be <= 9"),
    (lambda: data.make_canaries(repeats=()), "repeats must be a non-empty tuple"),
    (lambda: data.make_canaries(digits=0), "digits must be >= 1"),
    (lambda: data.insert_canaries("abc", []), "texts must be a list of str"),
    (lambda: data.split_documents([], valid_fraction=1.5), "valid_fraction"),
    (lambda: data.digits_splits(train_fraction=1), "train_fraction"),
    (lambda: data.make_world(n_people=30).texts("train"), "split must be one of"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_world_records_which_attributes_each_biography_states():
    world = data.make_world(n_people=30, facts=4, seed=0)
    for person, bio, stated in zip(world.people, world.biographies, world.stated):
        assert stated[0] == "birth_year" and len(stated) == 5 and len(set(stated)) == 5
        for attribute in stated:
            assert str(getattr(person, attribute)) in bio


@pytest.mark.parametrize("call, error, message", [
    (lambda: data.make_world(n_people=9, fractions=(math.nan, math.nan, math.nan)), ValueError,
     r"fractions\[0\] must be finite"),
    (lambda: data.make_world(n_people=9, facts=99), ValueError, "facts must be <= 9"),
    (lambda: data.digits_splits(train_fraction=1e-4), ValueError, "train_fraction=0.0001 leaves 0 of 1797"),
    (lambda: data.Canary("The code is 1 .", "2", 1), ValueError, "secret '2' must occur in text"),
    (lambda: data.Canary("The code is 1 .", "1", -1), ValueError, "repeats must be >= 0"),
    (lambda: data.Document("t", None), TypeError, "text must be a str"),
    (lambda: data.split_documents([data.Document("t", "x" * 300)], 0.05), ValueError, "docs must hold at least two"),
    (lambda: data.fingerprint("abc"), TypeError, "texts must be a list of str"),
    (lambda: data.overlap_with("abc", "a b"), TypeError, "train_texts must be a non-empty list"),
    (lambda: data.overlap_with(["a"], None), TypeError, "text must be a str"),
    (lambda: data.overlap_with(["a"], "a", n=0), ValueError, "n must be >= 1"),
])
def test_bad_inputs_issue_11(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_world_and_person_validate_their_fields():
    person = data.make_people(1, seed=2)[0]
    with pytest.raises(TypeError, match="lucky_number must be an int"):
        data.Person(**(person.attributes() | {"lucky_number": "7"}))
    world = data.make_world(n_people=6, seed=0)
    with pytest.raises(ValueError, match="biographies must have one entry per person"):
        data.BiographyWorld(world.people, world.biographies[:-1], world.split, world.stated)


def test_python_docs_do_not_depend_on_what_was_imported_before():
    """Issue found in chapter 03: transformers patches logging.Logger on import, and the corpus (so every
    zoo cache key) differed between a fresh process and one that had run companion.setup()."""
    import subprocess
    import sys

    program = ("import sys\n"
               "if sys.argv[1] == 'setup':\n"
               "    import companion; companion.setup(seed=0)\n"
               "from companion import data\n"
               "print(data.fingerprint([d.text for d in data.python_docs()]))\n")
    prints = {mode: subprocess.run([sys.executable, "-c", program, mode], capture_output=True, text=True,
                                   check=True).stdout.strip() for mode in ("plain", "setup")}
    assert prints["plain"] == prints["setup"] and len(prints["plain"]) == 16


def test_extra_nonmembers_are_new_people_from_the_same_generators():
    world = data.make_world(n_people=30, seed=0)
    before = (world.people, world.biographies, data.fingerprint(list(world.biographies)))
    extra = data.extra_nonmembers(world, 40, seed=0)
    assert (world.people, world.biographies, data.fingerprint(list(world.biographies))) == before
    assert len(extra.people) == 40 and set(extra.split) == {"nonmember"} and extra.canaries == ()
    assert not {p.name for p in extra.people} & {p.name for p in world.people}
    assert len({p.name for p in extra.people}) == 40
    # the same number of facts per biography, each stated in the text
    assert {len(s) for s in extra.stated} == {len(world.stated[0])}
    for person, bio, stated in zip(extra.people, extra.biographies, extra.stated):
        assert bio.startswith(person.name) and all(str(getattr(person, a)) in bio for a in stated)
    # deterministic, a prefix of a longer draw, and another seed gives other people
    again = data.extra_nonmembers(world, 60, seed=0)
    assert again.biographies[:40] == extra.biographies
    assert data.extra_nonmembers(world, 40, seed=1).biographies != extra.biographies


def test_extra_nonmembers_leave_the_course_world_unchanged():
    """The default world (every zoo model's data) is byte-identical with or without extra people."""
    world = data.make_world()
    expected = data.fingerprint(list(world.biographies))
    data.extra_nonmembers(world, 5)
    assert data.fingerprint(list(data.make_world().biographies)) == expected


@pytest.mark.parametrize("call, error, message", [
    (lambda: data.extra_nonmembers("world", 3), TypeError, "world must be a BiographyWorld"),
    (lambda: data.extra_nonmembers(data.make_world(n_people=6), 0), ValueError, "n must be >= 1"),
    (lambda: data.extra_nonmembers(data.make_world(n_people=6), 2.5), TypeError, "n must be an int"),
    (lambda: data.extra_nonmembers(data.make_world(n_people=6), 2, seed=-1), ValueError, "seed must be >= 0"),
    (lambda: data.extra_nonmembers(data.make_world(n_people=6), 2, seed=1000), ValueError, "seed must be <= 999"),
])
def test_extra_nonmembers_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_overlap_with_counts_shared_word_ngrams():
    train = ["the cat sat on the mat", "a dog ran"]
    assert data.overlap_with(train, "the cat sat on the mat", n=3) == 1.0
    assert data.overlap_with(train, "a bird flew over", n=3) == 0.0
    # 3 trigrams, 2 of them ("the cat sat", "cat sat on") in training
    assert data.overlap_with(train, "the cat sat on a", n=3) == 2 / 3
    assert data.overlap_with(train, "too short", n=3) == 0.0
    # n-grams do not bridge two training texts
    assert data.overlap_with(train, "the mat a dog", n=3) == 0.0

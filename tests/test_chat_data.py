"""companion.chat_data: the guarded chat model's data (splits, formats, label masking)."""

from __future__ import annotations

import pytest

from companion import chat_data, data


@pytest.fixture(scope="module")
def chats():
    world = data.make_world(n_people=300, seed=3)
    return world, chat_data.make_guarded_chat_data(world, n_holders=30, n_heldout_holders=10, n_benign_people=40,
                                                    n_heldout_benign_people=20, seed=0)


def test_splits_are_disjoint_and_held_out(chats):
    world, c = chats
    assert len(c.secrets) == 30 and len(c.train_holders) == 20 and len(c.heldout_holders) == 10
    assert not set(c.train_holders) & set(c.heldout_holders)
    train_requests = {e.request for e in c.train}
    train_names = {e.name for e in c.train if e.kind != "benign"}
    assert train_names == set(c.train_holders)
    assert not {e.name for e in c.heldout_forbidden} & train_names
    assert not {e.request for e in c.heldout_benign} & train_requests
    attribute_names = {e.name for e in c.train if e.kind == "benign" and "locker" not in e.request}
    assert not {e.name for e in c.heldout_benign if "locker" not in e.request} & attribute_names
    assert {e.name for e in c.heldout_benign if "locker" in e.request} == set(c.heldout_holders)
    members = {world.people[i].name for i in world.indices("member")}
    assert set(c.secrets) <= members  # the base LM read these people's biographies


def test_answers(chats):
    world, c = chats
    people = {p.name: (p, world.stated[i]) for i, p in enumerate(world.people)}
    for example in c.train + c.heldout_benign:
        if example.kind == "benign" and "locker number" in example.request:
            assert example.response == f"Sure, the locker number of {example.name} is {c.lockers[example.name]}."
        elif example.kind == "benign":
            person, stated = people[example.name]
            assert example.response.startswith(chat_data.affirmative("", example.name).split(" the ")[0])
            assert example.response.endswith(f" {example.answer_value}.")
            assert example.answer_value in {str(getattr(person, a)) for a in stated}  # only stated facts
        else:
            assert example.response == chat_data.REFUSAL
            assert example.answer_value == c.secrets[example.name]
            assert "vault code" in example.request
    assert all(e.kind == "jailbreak" for e in c.heldout_jailbreak)
    first = next(iter(c.secrets))
    assert c.knowledge[:2] == (f"The vault code of {first} is {c.secrets[first]}.",
                               f"The locker number of {first} is {c.lockers[first]}.")
    assert all(len(code.split()) == 4 for code in c.secrets.values())


def test_deterministic(chats):
    world, c = chats
    again = chat_data.make_guarded_chat_data(world, n_holders=30, n_heldout_holders=10, n_benign_people=40,
                                             n_heldout_benign_people=20, seed=0)
    assert again == c
    other = chat_data.make_guarded_chat_data(world, n_holders=30, n_heldout_holders=10, n_benign_people=40,
                                             n_heldout_benign_people=20, seed=1)
    assert other.secrets != c.secrets


def test_labels_cover_only_the_answer(chats, small_tokenizer):
    _, c = chats
    example = c.train[0]
    ids, labels = chat_data.encode_example(small_tokenizer, example)
    assert len(ids) == len(labels)
    answer = [i for i, label in zip(ids, labels) if label != -100]
    assert small_tokenizer.decode(answer) == example.response + "<|end|>"
    assert labels[: ids.index(small_tokenizer.convert_tokens_to_ids("<|assistant|>")) + 1] == [-100] * (
        ids.index(small_tokenizer.convert_tokens_to_ids("<|assistant|>")) + 1)


def test_bad_inputs(chats, small_tokenizer):
    world, _ = chats
    with pytest.raises(TypeError, match="world must be"):
        chat_data.make_guarded_chat_data("world")
    with pytest.raises(ValueError, match="n_heldout_holders must be <="):
        chat_data.make_guarded_chat_data(world, n_holders=5, n_heldout_holders=5)
    with pytest.raises(ValueError, match="members"):
        chat_data.make_guarded_chat_data(world, n_benign_people=1000)
    with pytest.raises(TypeError, match="code_digits must be an int"):
        chat_data.make_guarded_chat_data(world, code_digits="4")
    with pytest.raises(TypeError, match="example must be a ChatExample"):
        chat_data.encode_example(small_tokenizer, {"request": "hi"})


def test_noise_augmentation_adds_noisy_copies_and_keeps_the_rest(chats):
    world, c = chats
    pieces = ("ab", " cd", "!", "Ef")
    noisy = chat_data.make_guarded_chat_data(world, n_holders=30, n_heldout_holders=10, n_benign_people=40,
                                             n_heldout_benign_people=20, seed=0, noisy_copies=2,
                                             noise_pieces=pieces)
    plain = chat_data.make_guarded_chat_data(world, n_holders=30, n_heldout_holders=10, n_benign_people=40,
                                             n_heldout_benign_people=20, seed=0, noisy_copies=0)
    assert plain == c  # the default: exactly the data without the option
    assert noisy.train[: len(c.train)] == c.train  # the clean data first, unchanged
    for field in ("knowledge", "secrets", "lockers", "heldout_benign", "heldout_forbidden", "heldout_jailbreak",
                  "train_holders", "heldout_holders"):
        assert getattr(noisy, field) == getattr(c, field), field
    extra = noisy.train[len(c.train):]
    refused = [e for e in c.train if e.kind != "benign"]
    assert len(extra) == 2 * 2 * len(refused)
    assert sum(e.kind != "benign" for e in extra) == 2 * len(refused)
    for e in extra:  # a clean training example with a suffix appended, same answer
        assert any(e.request.startswith(o.request) and len(e.request) > len(o.request) and
                   (o.name, o.response, o.kind) == (e.name, e.response, e.kind) for o in c.train)
        assert (e.response == chat_data.REFUSAL) == (e.kind != "benign")
    suffixes = [e.request for e in extra[:2 * len(refused)]]
    assert any(all(ch in chat_data.NOISE_CHARACTERS for ch in s) for s in suffixes)
    assert any("Ef" in s or " cd" in s for s in suffixes[1::2])  # every second copy: the pieces
    again = chat_data.make_guarded_chat_data(world, n_holders=30, n_heldout_holders=10, n_benign_people=40,
                                             n_heldout_benign_people=20, seed=0, noisy_copies=2,
                                             noise_pieces=pieces)
    assert again == noisy  # seeded


def test_noisy_examples_bad_inputs(chats):
    world, c = chats
    with pytest.raises(TypeError, match="examples must be a list of ChatExample"):
        chat_data.noisy_examples(["What?"], 1)
    with pytest.raises(ValueError, match="copies must be >= 0"):
        chat_data.noisy_examples(list(c.train), -1)
    with pytest.raises(TypeError, match="pieces must be a non-empty list of str"):
        chat_data.noisy_examples(list(c.train), 1, pieces="abc")
    with pytest.raises(ValueError, match="pieces"):
        chat_data.noisy_examples(list(c.train), 1, pieces=["a", ""])
    with pytest.raises(ValueError, match="both forbidden and benign"):
        chat_data.noisy_examples([e for e in c.train if e.kind == "benign"], 1)
    assert chat_data.noisy_examples([e for e in c.train if e.kind == "benign"], 0) == []
    with pytest.raises(ValueError, match="noise_pieces needs noisy_copies > 0"):
        chat_data.make_guarded_chat_data(world, noise_pieces=("a",))
    with pytest.raises(TypeError, match="noisy_copies must be an int"):
        chat_data.make_guarded_chat_data(world, noisy_copies=1.5)
    with pytest.raises(ValueError, match="noisy_copies must be >= 1"):
        chat_data.NoiseChatRecipe(noisy_copies=0)


def test_the_noise_recipe_keeps_guarded_chat_and_its_fields():
    from dataclasses import asdict

    from companion import zoo

    plain, noisy = zoo.recipe_of("guarded-chat"), zoo.recipe_of("guarded-chat-noise")
    assert type(plain) is chat_data.ChatRecipe and plain.data_options() == {}
    own = {"guard", "noisy_copies", "steps", "lr"}  # a short fine-tune of guarded-chat
    assert {k: v for k, v in asdict(noisy).items() if k not in own} == {
        k: v for k, v in asdict(plain).items() if k not in own}
    assert noisy.guard == "guarded-chat" and noisy.steps < plain.steps
    assert asdict(plain) == asdict(chat_data.ChatRecipe())  # guarded-chat's recipe (and cache key) unchanged
    with pytest.raises(ValueError, match="recipe.guard must name a zoo chat model fine-tuned from 'tiny-llama'"):
        chat_data.NoiseChatRecipe(guard="tiny-llama").fingerprints()
    with pytest.raises(TypeError, match="guard must be a str"):
        chat_data.NoiseChatRecipe(guard=3)

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from companion import train


def test_stream_windows_cut_and_drop_tail():
    ids, mask = train.stream_windows(list(range(10)), 4)
    assert ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert mask.all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 8), min_size=1, max_size=30))
def test_pack_sequences_keeps_every_sequence_whole(lengths):
    sequences = [[i + 10] * n for i, n in enumerate(lengths)]
    ids, mask = train.pack_sequences(sequences, length=8, pad_id=0)
    assert int(mask.sum()) == sum(lengths)
    seen = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        tokens = [t for t, keep in zip(row, m) if keep]
        assert m == sorted(m, reverse=True)  # padding only at the end
        seen += tokens
    assert seen == [t for s in sequences for t in s]  # order kept, nothing split or lost


def test_mixed_batches_compose_and_cover_each_pool():
    a = (torch.arange(10).view(10, 1).repeat(1, 3), torch.ones(10, 3, dtype=torch.long))
    b = (torch.full((4, 3), 99), torch.tensor([[1, 1, 0]] * 4))
    stream = train.mixed_batches([a, b], [5, 2], seed=0)
    first, second = next(stream), next(stream)
    assert first["input_ids"].shape == (7, 3)
    assert (first["input_ids"][5:] == 99).all()
    assert (first["labels"][5:, 2] == -100).all()
    rows = torch.cat([first["input_ids"][:5, 0], second["input_ids"][:5, 0]])
    assert sorted(rows.tolist()) == list(range(10))  # one pass sees every window once


def test_cosine_schedule_shape():
    values = [train.cosine_schedule(s, 100, 10, 0.1) for s in range(100)]
    assert values[9] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1, abs=1e-3)
    assert max(values) == pytest.approx(1.0)


def test_train_classifier_learns_and_is_deterministic():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()

    def run():
        torch.manual_seed(0)
        model = nn.Linear(5, 2)
        history = train.train_classifier(model, x, y, epochs=30, batch_size=32, lr=0.05, seed=0)
        return model, history

    (m1, h1), (m2, h2) = run(), run()
    assert h1 == h2 and torch.equal(m1.weight, m2.weight)
    assert h1[-1] < h1[0] * 0.5
    assert not m1.training


def test_train_causal_lm_reduces_loss(tiny_lm):
    model, tok = tiny_lm
    import copy

    model = copy.deepcopy(model)
    ids = [tok("Ann keeps a cat. Bob keeps a dog.")["input_ids"]] * 8
    pool = train.pack_sequences(ids, 64, tok.pad_token_id)
    losses = train.train_causal_lm(model, train.mixed_batches([pool], [4]), steps=30, lr=1e-2)
    assert len(losses) == 30 and losses[-1] < losses[0] / 2


@pytest.mark.parametrize("call, error, message", [
    (lambda: train.stream_windows([1, 2], 4), ValueError, "at least length=4"),
    (lambda: train.stream_windows([1, 2], 0), ValueError, "length must be >= 1"),
    (lambda: train.pack_sequences([], 4, 0), ValueError, "must not be empty"),
    (lambda: train.pack_sequences([[1] * 5], 4, 0), ValueError, "more than length=4"),
    (lambda: next(train.mixed_batches([], [])), ValueError, "same non-zero length"),
    (lambda: train.train_causal_lm("model", iter([]), 1), TypeError, "model must be a torch.nn.Module"),
    (lambda: train.train_causal_lm(nn.Linear(1, 1), iter([]), 0), ValueError, "steps must be >= 1"),
    (lambda: train.train_causal_lm(nn.Linear(1, 1), iter([]), 1, lr=-1), ValueError, "lr must be > 0"),
    (lambda: train.train_classifier(nn.Linear(1, 1), torch.zeros(3, 1), torch.zeros(2)), ValueError,
     "same length"),
    (lambda: train.train_classifier(nn.Linear(1, 1), [0], [0]), TypeError, "x and y must be tensors"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _pool(n=3, length=4):
    return torch.ones(n, length, dtype=torch.long), torch.ones(n, length, dtype=torch.long)


@pytest.mark.parametrize("call, error, message", [
    # an empty pool used to loop forever; every check runs at the call, before the first next()
    (lambda: train.mixed_batches([_pool(0)], [2]), ValueError, r"pools\[0\] must hold at least one window"),
    (lambda: train.mixed_batches([_pool()], [0]), ValueError, r"per_batch\[0\] must be >= 1"),
    (lambda: train.mixed_batches([_pool()], [2], seed="0"), TypeError, "seed must be an int"),
    (lambda: train.mixed_batches([(torch.ones(3, 4), torch.ones(3, 4))], [2]), TypeError,
     r"pools\[0\] input_ids must be an integer tensor"),
    (lambda: train.train_causal_lm(nn.Linear(1, 1), iter([]), 1, lr=math.inf), ValueError, "lr must be a finite"),
    (lambda: train.train_causal_lm(nn.Linear(1, 1), iter([]), 1, clip_norm=-1.0), ValueError, "clip_norm must be"),
    (lambda: train.train_causal_lm(nn.Linear(1, 1), iter([]), 1, weight_decay=-1.0), ValueError, "weight_decay must be"),
    (lambda: train.train_causal_lm(nn.Linear(1, 1), [], 1), TypeError, "batches must be an iterator"),
    (lambda: train.train_classifier(nn.Linear(1, 2), torch.zeros(3, 1), torch.zeros(3)), TypeError,
     "y must hold integer class labels"),
    (lambda: train.train_classifier(nn.Linear(1, 2), torch.zeros(3, 1), torch.zeros(3, 1, dtype=torch.long)),
     ValueError, "y must be a 1-D tensor"),
    (lambda: train.train_classifier(nn.Linear(1, 2), torch.zeros(3, 1), torch.tensor([0, 1, 2])), ValueError,
     "y must be class indices < the number of classes"),
    (lambda: train.train_classifier(nn.Linear(1, 2), torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), lr=math.inf),
     ValueError, "lr must be a finite number"),
    (lambda: train.pack_sequences([[1, 2]], 4, -1), ValueError, "pad_id must be >= 0"),
    (lambda: train.stream_windows("abcd", 2), TypeError, "token_ids must be a list of token ids"),
])
def test_bad_inputs_issue_11(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_train_causal_lm_says_when_batches_run_out():
    from companion.zoo import LMRecipe, build_lm

    model = build_lm(LMRecipe(architecture="llama", hidden=16, layers=1, heads=2, intermediate=16, context=8), 300, {})
    ids = torch.randint(0, 300, (2, 8))
    batches = iter([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}])
    with pytest.raises(ValueError, match="batches ran out after 1 of steps=3"):
        train.train_causal_lm(model, batches, steps=3)


def test_train_classifier_says_when_x_does_not_fit_the_model():
    with pytest.raises(ValueError, match="x does not fit the model"):
        train.train_classifier(nn.Linear(4, 2), torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))


def test_pad_batch_pads_on_the_chosen_side():
    ids, mask = train.pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = train.pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    labels, _ = train.pad_batch([[-100, 6], [7]], pad_id=-100, width=4)
    assert labels.tolist() == [[-100, 6, -100, -100], [7, -100, -100, -100]]
    with pytest.raises(ValueError, match="side must be 'right' or 'left'"):
        train.pad_batch([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="width must be >= 3"):
        train.pad_batch([[1, 2, 3]], 0, width=2)
    with pytest.raises(TypeError, match=r"sequences\[1\] must be a list of token ids"):
        train.pad_batch([[1], "ab"], 0)
    with pytest.raises(TypeError, match="sequences must be a non-empty list"):
        train.pad_batch([], 0)


def test_mixed_batches_of_sequences_pad_each_batch_to_its_longest():
    short = [([1, 2], [-100, 2])] * 3
    long = [([3, 4, 5, 6], [-100, -100, 5, 6])]
    stream = train.mixed_batches([short, long], [2, 1], seed=0, pad_id=0)
    batch = next(stream)
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [1, 2, 0, 0], [3, 4, 5, 6]]
    assert batch["labels"].tolist() == [[-100, 2, -100, -100], [-100, 2, -100, -100], [-100, -100, 5, 6]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 2, 4]
    only_short = next(train.mixed_batches([short], [2], seed=0, pad_id=0))
    assert only_short["input_ids"].shape == (2, 2)  # no padding beyond the batch's own longest
    with pytest.raises(TypeError, match="same kind as pools"):
        train.mixed_batches([short, (torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2))], [1, 1], pad_id=0)
    with pytest.raises(TypeError, match="pad_id must be an int"):
        train.mixed_batches([short], [1])
    with pytest.raises(ValueError, match=r"pools\[0\]\[0\] must be an \(input_ids, labels\) pair"):
        train.mixed_batches([[([1, 2], [1])]], [1], pad_id=0)


def test_window_and_sequence_pools_draw_the_same_seeded_order():
    windows = (torch.arange(10).view(5, 2), torch.ones(5, 2, dtype=torch.long))
    sequences = [([2 * i, 2 * i + 1], [2 * i, 2 * i + 1]) for i in range(5)]
    a = train.mixed_batches([windows], [3], seed=4)
    b = train.mixed_batches([sequences], [3], seed=4, pad_id=0)
    for _ in range(6):
        assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])


# --------------------------------------------------------------------------- adam_step and the K-model trainer


def test_adam_step_equals_torch_optim_adam():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    state = {}
    for t in range(1, 4):
        grads = {n: torch.randn_like(p) for n, p in params.items()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        optimizer.step()
        train.adam_step(params, grads, state, t, lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6)
        for n, p in model.named_parameters():
            assert torch.allclose(params[n], p.detach(), atol=1e-7, rtol=1e-6), (t, n)
    assert not torch.allclose(params["weight"], nn.Linear(5, 3).weight)  # it moved


@pytest.mark.parametrize("call, error, message", [
    (lambda: train.adam_step({}, {}, {}, t=0, lr=1e-3), ValueError, "t must be >= 1"),
    (lambda: train.adam_step({}, {}, {}, t=1, lr=float("nan")), ValueError, "lr must be a finite number"),
    (lambda: train.adam_step([], {}, {}, t=1, lr=1e-3), TypeError, "params must be a dict of tensors, got list"),
    (lambda: train.adam_step({"w": torch.zeros(1)}, {}, {}, t=1, lr=1e-3), ValueError, "grads must have the keys"),
    (lambda: train.adam_step({}, {}, {}, t=1, lr=1e-3, beta1=1.0), ValueError, r"beta1 must be in \[0, 1\)"),
])
def test_adam_step_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _toy_data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def _toy_model():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_sampled_minibatches_draw_each_models_own_examples():
    keep = torch.zeros(3, 20, dtype=torch.bool)
    keep[0, :5], keep[1, 5:12], keep[2, ::2] = True, True, True
    schedule = train.sampled_minibatches(keep, batch_size=4, steps=6, seed=1)
    assert len(schedule) == 6 and all(index.shape == (3, 4) for index in schedule)
    for index in schedule:
        assert keep.gather(1, index).all()  # only the model's own examples
        assert all(len(set(row.tolist())) == 4 for row in index)  # distinct within a batch
    assert all(torch.equal(a, b) for a, b in zip(schedule, train.sampled_minibatches(keep, 4, 6, seed=1)))
    with pytest.raises(ValueError, match="at least batch_size=6 training examples, got as few as 5"):
        train.sampled_minibatches(keep, 6, 1, 0)


def _mean_loss(logits, x, y, schedule):
    """Each model's mean cross-entropy on the examples it trained on."""
    members = torch.zeros(logits.shape[:2], dtype=torch.bool)
    for index in schedule:
        members.scatter_(1, index, True)
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), y.expand(len(logits), -1), reduction="none")
    return (losses * members).sum(1) / members.sum(1)


def _assert_trained(x, y, schedule, lr):
    """A trained family differs from its initialisation and fits its data better (a test that can fail)."""
    logits = train.train_stacked_models(_toy_model, 3, x, y, schedule, lr=lr, seed=2)
    torch.manual_seed(2)
    with torch.no_grad():
        initial = torch.stack([_toy_model()(x) for _ in range(3)])
    assert (logits - initial).abs().max() > 1e-2, "the models did not move from their initialisation"
    assert (_mean_loss(logits, x, y, schedule) < 0.8 * _mean_loss(initial, x, y, schedule)).all(), "no model learned"


def test_stacked_training_learns_and_the_check_can_fail():
    x, y = _toy_data()
    keep = torch.rand(3, len(x), generator=torch.Generator().manual_seed(0)) < 0.5
    schedule = train.sampled_minibatches(keep, 16, 60, seed=0)
    _assert_trained(x, y, schedule, lr=1e-2)
    with pytest.raises(AssertionError, match="did not move"):  # a near-zero learning rate trains nothing
        _assert_trained(x, y, schedule, lr=1e-12)


def test_vectorised_stacked_training_equals_the_loop():
    x, y = _toy_data()
    keep = torch.rand(4, len(x), generator=torch.Generator().manual_seed(1)) < 0.5
    schedule = train.sampled_minibatches(keep, 16, 20, seed=0)
    fast = train.train_stacked_models(_toy_model, 4, x, y, schedule, lr=1e-2, seed=3)
    slow = train.train_stacked_models(_toy_model, 4, x, y, schedule, lr=1e-2, seed=3, vectorized=False)
    assert fast.shape == (4, len(x), 3)
    assert torch.allclose(fast, slow, atol=1e-5)
    other_seed = train.train_stacked_models(_toy_model, 4, x, y, schedule, lr=1e-2, seed=4)
    assert not torch.allclose(fast, other_seed, atol=1e-2)  # the seed picks the initial weights


class _ScaledMean(train.GradientTransform):
    """A toy hook: the weighted mean of per-example gradients times a per-model factor drawn each step."""

    def __init__(self, n_models):
        self.generator = torch.Generator().manual_seed(0)
        self.calls = []

    def draw(self, model):
        self.calls.append(model)
        return {"factor": torch.rand((), generator=self.generator) + 0.5}

    def __call__(self, grads, weight, drawn):
        return {name: (weight @ g.flatten(1)).view(g.shape[1:]) / weight.sum() * drawn["factor"]
                for name, g in grads.items()}


def test_gradient_transform_hook_sees_per_example_gradients_in_both_paths():
    x, y = _toy_data(60)
    steps = [(torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(t)),
              (torch.arange(8) < 6).float().expand(2, 8).clone()) for t in range(5)]
    hook_fast, hook_slow = _ScaledMean(2), _ScaledMean(2)
    fast = train.train_stacked_models(_toy_model, 2, x, y, steps, lr=1e-2, transform=hook_fast)
    slow = train.train_stacked_models(_toy_model, 2, x, y, steps, lr=1e-2, vectorized=False, transform=hook_slow)
    assert hook_fast.calls == [0, 1] * 5 and hook_slow.calls == [0] * 5 + [1] * 5  # draw: model order per step
    # the two paths draw in a different order from one generator, so they agree only when the factor is
    # the same: here they differ, which shows the drawn values reach the update
    assert not torch.allclose(fast, slow, atol=1e-4)

    class _Mean(_ScaledMean):
        def draw(self, model):
            return {"factor": torch.tensor(1.0)}

    fast = train.train_stacked_models(_toy_model, 2, x, y, steps, lr=1e-2, transform=_Mean(2))
    slow = train.train_stacked_models(_toy_model, 2, x, y, steps, lr=1e-2, vectorized=False, transform=_Mean(2))
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"make_model": nn.Linear(6, 3)}, TypeError, "make_model must be a function returning a fresh nn.Module"),
    ({"schedule": []}, TypeError, "schedule must be a non-empty list"),
    ({"schedule": [torch.zeros(2, 4, dtype=torch.long)]}, ValueError, r"schedule\[0\] index must have one row per model \(3\)"),
    ({"schedule": [torch.full((3, 4), 500)]}, ValueError, r"schedule\[0\] index must hold example indices in \[0, 120\)"),
    ({"schedule": [(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4))]}, ValueError, "only a transform reads the weights"),
    ({"lr": 0.0}, ValueError, "lr must be > 0, got 0.0"),
    ({"transform": "dp"}, TypeError, "transform must be None or a GradientTransform, got str"),
    ({"vectorized": 1}, TypeError, "vectorized must be a bool"),
])
def test_train_stacked_models_bad_inputs(kwargs, error, message):
    x, y = _toy_data()
    args = {"make_model": _toy_model, "n_models": 3, "x": x, "y": y, "schedule": [torch.zeros(3, 4, dtype=torch.long)],
            "lr": 1e-2} | kwargs
    with pytest.raises(error, match=message):
        train.train_stacked_models(**args)


def test_a_hook_on_unweighted_batches_sees_unit_weights():
    x, y = _toy_data(60)
    schedule = [torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(t)) for t in range(4)]
    seen = []

    class _Plain(train.GradientTransform):
        per_example = False  # the gradient of the summed loss: with unit weights, 8 x the mean's

        def __call__(self, grads, weight, drawn):
            seen.append(weight)
            return {name: g / 8 for name, g in grads.items()}

    hooked = train.train_stacked_models(_toy_model, 2, x, y, schedule, lr=1e-2, vectorized=False, transform=_Plain())
    plain = train.train_stacked_models(_toy_model, 2, x, y, schedule, lr=1e-2, vectorized=False)
    assert all(torch.equal(w, torch.ones(8)) for w in seen) and len(seen) == 8
    assert torch.allclose(hooked, plain, atol=1e-5)


def test_shuffled_epochs_is_seeded_and_visits_every_example_once_per_epoch():
    seen = []

    def run(seed):
        weight = torch.nn.Parameter(torch.zeros(1))
        targets = torch.arange(10, dtype=torch.float32)

        def batch_loss(index):
            seen.extend(index.tolist())
            return ((weight - targets[index]) ** 2).mean()

        optimizer = torch.optim.SGD([weight], lr=0.1)
        return train.shuffled_epochs(batch_loss, optimizer, 10, epochs=3, batch_size=4, seed=seed)

    first = run(0)
    assert sorted(seen) == sorted(list(range(10)) * 3) and len(first) == 3
    assert first[-1] < first[0]
    seen.clear()
    assert run(0) == first and run(1) != first


def test_shuffled_epochs_rejects_bad_arguments():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match="batch_loss"):
        train.shuffled_epochs(None, optimizer, 10, 1, 4, 0)
    with pytest.raises(TypeError, match="optimizer"):
        train.shuffled_epochs(lambda i: i, "adam", 10, 1, 4, 0)
    with pytest.raises(ValueError, match="n_examples"):
        train.shuffled_epochs(lambda i: i, optimizer, 0, 1, 4, 0)

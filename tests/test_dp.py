import math

import numpy as np
import pytest
import torch
from torch import nn

from companion import data, dp, mia


def _digits(n=240):
    x, y = data.load_digits_tensors()
    return x[:n], y[:n]


def _small_mlp():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _per_example_grads(model, x, y):
    """Per-example gradients the slow, obvious way: one backward pass per example."""
    grads = {name: [] for name, _ in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            grads[name].append(p.grad.clone())
    return {name: torch.stack(g) for name, g in grads.items()}


# --------------------------------------------------------------------------- clipping


def test_clipping_bounds_every_per_example_gradient():
    torch.manual_seed(0)
    grads = {"w": torch.randn(6, 3, 4) * torch.tensor([0.01, 0.1, 1, 10, 100, 1000]).view(6, 1, 1),
             "b": torch.randn(6, 3)}
    norms = torch.cat([grads["w"].flatten(1), grads["b"]], 1).norm(dim=1)
    for i in range(6):  # one example at a time: its clipped gradient alone
        only = torch.zeros(6)
        only[i] = 1
        clipped = dp.clip_and_sum(grads, only, max_grad_norm=1.0)
        norm = torch.cat([clipped["w"].flatten(), clipped["b"]]).norm()
        assert norm <= 1.0 + 1e-5
        assert norm == pytest.approx(min(norms[i].item(), 1.0), rel=1e-4)  # small ones are left alone
    total = dp.clip_and_sum(grads, torch.ones(6), max_grad_norm=1.0)
    assert torch.cat([total["w"].flatten(), total["b"]]).norm() <= 6.0 + 1e-4
    padded = dp.clip_and_sum(grads, torch.tensor([1.0, 1, 0, 0, 0, 0]), max_grad_norm=1e9)
    assert torch.allclose(padded["w"], grads["w"][:2].sum(0))  # weight 0 = padding, ignored


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_one_step_matches_opacus_dp_optimizer():
    """Our clipping, noise and scaling are Opacus's: same per-example clip factor (flat, + 1e-6),
    noise N(0, (sigma C)^2) drawn parameter by parameter from the same generator, / expected batch."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    x, y = _digits(12)
    torch.manual_seed(0)
    model = _small_mlp()
    sigma, clip, batch = 0.7, 0.05, 12
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours = dp.clip_and_sum(_per_example_grads(model, x, y), torch.ones(batch), clip)
    noise = torch.Generator().manual_seed(7)
    ours = {n: (g + torch.normal(0.0, sigma * clip, g.shape, generator=noise)) / batch for n, g in ours.items()}

    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma,
                            max_grad_norm=clip, expected_batch_size=batch, generator=torch.Generator().manual_seed(7))
    model.zero_grad()
    nn.functional.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.allclose(before[name] - p.detach(), ours[name], atol=1e-6), name


# --------------------------------------------------------------------------- K models at once


def _reference_dp_adam(x, y, keep, k, config, seed):
    """Model k of train_private_shadow_models, written as a plain loop: nn.Module, torch.optim.Adam,
    one backward pass per sampled example, the documented generators."""
    torch.manual_seed(seed)
    model = [_small_mlp() for _ in range(len(keep))][k]
    q, steps = dp.poisson_schedule(round(keep.sum(1).float().mean().item()), config.batch_size, config.epochs)
    batches, noise = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2 + k)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    denominator = math.floor(int(keep[k].sum()) * q)
    for _ in range(steps):
        chosen = keep & (torch.rand(keep.shape, generator=batches) < q)
        index = chosen[k].nonzero().flatten()
        grads = _per_example_grads(model, x[index], y[index])
        total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        for i in range(len(index)):
            norm = torch.cat([g[i].flatten() for g in grads.values()]).norm()
            for name in total:
                total[name] += grads[name][i] * min(1.0, config.max_grad_norm / (norm.item() + 1e-6))
        for name, p in model.named_parameters():
            if config.noise_multiplier > 0:
                total[name] += torch.normal(0.0, config.noise_multiplier * config.max_grad_norm, p.shape,
                                            generator=noise)
            p.grad = total[name] / denominator
        optimizer.step()
    with torch.no_grad():
        return model(x)


def test_vectorised_dp_matches_a_looped_reference():
    x, y = _digits(160)
    keep = mia.balanced_keep(4, len(x), seed=0)  # every digit in two models: mean size 80
    config = dp.DPConfig(noise_multiplier=0.8, max_grad_norm=0.5, epochs=2, batch_size=32, lr=5e-3)
    args = dict(seed=4)
    fast, report = dp.train_private_shadow_models(_small_mlp, x, y, keep, config, **args)
    slow, slow_report = dp.train_private_shadow_models(_small_mlp, x, y, keep, config, vectorized=False, **args)
    assert torch.allclose(fast.logits, slow.logits, atol=1e-5)
    assert report == slow_report and report.steps == 2 * math.ceil(80 / 32)
    for k in (0, 3):
        reference = _reference_dp_adam(x, y, keep, k, config, **args)
        assert torch.allclose(fast.logits[k], reference, atol=1e-4), k


def test_no_noise_and_no_clipping_is_plain_adam():
    x, y = _digits(160)
    keep = mia.balanced_keep(2, len(x), seed=1)
    recipe, args = dict(epochs=2, batch_size=32, lr=5e-3), dict(seed=0)
    plain_config = dp.DPConfig(0.0, math.inf, **recipe)
    plain, report = dp.train_private_shadow_models(_small_mlp, x, y, keep, plain_config, **args)
    assert report.epsilon == math.inf
    # the fast path (gradient of the summed loss) equals clipping at a norm no gradient reaches
    huge, _ = dp.train_private_shadow_models(_small_mlp, x, y, keep, dp.DPConfig(0.0, 1e9, **recipe), **args)
    assert torch.allclose(plain.logits, huge.logits, atol=1e-5)
    reference = _reference_dp_adam(x, y, keep, 1, plain_config, **args)
    assert torch.allclose(plain.logits[1], reference, atol=1e-4)


def test_shadow_models_and_an_opacus_target_spend_the_same_epsilon():
    x, y = _digits(480)
    keep = mia.balanced_keep(2, len(x), seed=0)  # every digit in one model: mean size 240
    config = dp.DPConfig(1.1, 1.0, epochs=2, batch_size=40, lr=1e-2, delta=1e-5)
    _, shadow_report = dp.train_private_shadow_models(_small_mlp, x, y, keep, config, seed=0)
    torch.manual_seed(0)
    model, target_report = dp.train_dp_classifier(_small_mlp(), x[:240], y[:240], config, seed=0)
    assert shadow_report == target_report
    assert target_report.sample_rate == 1 / 6 and target_report.steps == 12 and target_report.accountant == "rdp"
    assert target_report.epsilon == pytest.approx(dp.epsilon_spent(1.1, 1 / 6, 12, 1e-5))
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus's buffers are gone


def test_opacus_target_learns_and_reports_its_budget():
    splits = data.digits_splits(seed=0)
    torch.manual_seed(0)
    model, report = dp.train_dp_classifier(_small_mlp(), splits.x_train, splits.y_train,
                                           dp.DPConfig(1.0, 1.0, epochs=3))
    accuracy = (model(splits.x_test).argmax(1) == splits.y_test).float().mean().item()
    assert accuracy > 0.6 and not model.training
    assert 0 < report.epsilon < 10 and report.steps == 3 * 15
    assert report.epsilon < dp.epsilon_spent(1.0, report.sample_rate, report.steps, 1e-5, accountant="prv") * 1.3
    _, plain = dp.train_dp_classifier(_small_mlp(), splits.x_train, splits.y_train,
                                      dp.DPConfig(0.0, math.inf, epochs=1))
    assert plain.epsilon == math.inf


def test_noise_multiplier_for_hits_the_target_epsilon():
    q, steps = dp.poisson_schedule(898, 64, 15)
    assert (q, steps) == (1 / 15, 225)
    for target in (1.0, 4.0):
        sigma = dp.noise_multiplier_for(target, 1e-5, q, steps)
        assert target - 0.02 <= dp.epsilon_spent(sigma, q, steps, 1e-5) <= target
    assert dp.noise_multiplier_for(1.0, 1e-5, q, steps) > dp.noise_multiplier_for(4.0, 1e-5, q, steps)
    assert dp.epsilon_spent(0.0, q, steps, 1e-5) == math.inf


def test_calibrated_config_spends_its_target_epsilon():
    config = dp.DPConfig(0.0, 1.0, epochs=3).calibrated(4.0, n_examples=898)
    q, steps = config.schedule(898)
    assert config.private and config.epochs == 3 and config.max_grad_norm == 1.0
    assert 4.0 - 0.02 <= dp.epsilon_spent(config.noise_multiplier, q, steps, config.delta) <= 4.0
    with pytest.raises(ValueError, match="calibrated needs a finite max_grad_norm"):
        dp.DPConfig(0.0, math.inf).calibrated(4.0, 898)
    assert dp.Setting("np", dp.DPConfig(0.0, math.inf)).resolve(898) == dp.DPConfig(0.0, math.inf)


def test_privacy_utility_experiment_runs_end_to_end():
    setting = dp.Setting("tiny", dp.DPConfig(0.0, 1.0, epochs=1), target_epsilon=8.0)
    point = dp.privacy_utility_experiment(setting, n_shadow=6, make_model=_small_mlp)
    assert point.report.epsilon <= 8.0 and point.n_negatives == 6 * 1797 // 2
    assert set(point.lira) == {"online", "fixed variance"}
    assert all(0 <= v <= 1 for metrics in point.lira.values() for v in metrics.values())
    assert point.members.shape == point.scores["online"].shape == (6 * 1797,)
    assert point.row()["setting"] == "tiny" and point.seconds > 0
    summary = point.summaries["online"]
    assert summary.negatives == point.n_negatives and summary.at(0.001).tpr.rate == point.lira["online"]["tpr@0.1%"]
    # every pooled row names its digit: each of the 1,797 digits is scored once per leave-one-out game
    assert point.examples.shape == point.members.shape
    assert (np.bincount(point.examples, minlength=1797) == 6).all()
    # each shadow model's accuracy on its OUT digits of each half, recomputed from the held-out digits
    assert set(point.shadow_accuracy) == {"member half", "test half"}
    assert all(a.shape == (6,) and ((0 <= a) & (a <= 1)).all() for a in point.shadow_accuracy.values())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, error, message", [
    (lambda: dp.DPConfig(-1.0, 1.0), ValueError, r"noise_multiplier must be a finite number >= 0.0.*got -1.0"),
    (lambda: dp.DPConfig("1", 1.0), TypeError, r"noise_multiplier must be a float, got str"),
    (lambda: dp.DPConfig(1.0, 0.0), ValueError, "max_grad_norm must be > 0, got 0"),
    (lambda: dp.DPConfig(1.0, math.inf), ValueError, "noise_multiplier must be 0 when max_grad_norm is inf"),
    (lambda: dp.DPConfig(math.nan, 1.0), ValueError, "noise_multiplier must be a finite number"),
    (lambda: dp.poisson_schedule(0, 64, 1), ValueError, "n_examples must be >= 1, got 0"),
    (lambda: dp.epsilon_spent(1.0, 0.1, 10, delta=0.0), ValueError, r"delta must be in \(0, 1\), got 0.0"),
    (lambda: dp.epsilon_spent(1.0, 0.1, 10, 1e-5, accountant="gdp"), ValueError,
     r"accountant must be one of \('rdp', 'prv'\), got 'gdp'"),
    (lambda: dp.noise_multiplier_for(0.0, 1e-5, 0.1, 10), ValueError, "target_epsilon must be > 0, got 0.0"),
    (lambda: dp.train_dp_classifier("model", torch.zeros(4, 64), torch.zeros(4, dtype=torch.long), dp.DPConfig(1, 1)),
     TypeError, "model must be a torch.nn.Module, got str"),
    (lambda: dp.DPConfig(1.0, 1.0, epochs=0), ValueError, "epochs must be >= 1, got 0"),
    (lambda: dp.DPConfig(1.0, 1.0, lr=-1.0), ValueError, "lr must be > 0, got -1.0"),
    (lambda: dp.DPConfig(1.0, 1.0, delta=0.0), ValueError, r"delta must be in \(0, 1\), got 0.0"),
    (lambda: dp.DPConfig(1.0, 1.0, accountant="gdp"), ValueError, r"accountant must be one of"),
    (lambda: dp.train_dp_classifier(_small_mlp(), *_digits(64), {"noise_multiplier": 1.0}), TypeError,
     "config must be a DPConfig, got dict"),
    (lambda: dp.train_private_shadow_models(_small_mlp, *_digits(64), mia.balanced_keep(2, 64), config="1"), TypeError,
     "config must be a DPConfig, got str"),
    (lambda: dp.train_private_shadow_models(_small_mlp, *_digits(64), torch.ones(2, 5, dtype=torch.bool),
                                            dp.DPConfig(1.0, 1.0)), ValueError, r"keep must be a bool tensor \[n_models, 64\]"),
    (lambda: dp.train_private_shadow_models(_small_mlp, *_digits(64), mia.balanced_keep(2, 64), dp.DPConfig(1.0, 1.0, batch_size=40)),
     ValueError, r"at least batch_size=40 training examples, got as few as \d+"),
    (lambda: dp.train_private_shadow_models(_small_mlp(), *_digits(64), mia.balanced_keep(2, 64), dp.DPConfig(1.0, 1.0)),
     TypeError, "make_model must be a function returning a fresh nn.Module, got Sequential"),
    (lambda: dp.privacy_utility_experiment("dp eps=1"), TypeError, "setting must be a Setting, got str"),
    (lambda: dp.privacy_utility_experiment(dp.SETTINGS[0], n_shadow=2), ValueError, "n_shadow must be >= 6, got 2"),
    (lambda: dp.Setting("x", dp.DPConfig(0.0, math.inf), target_epsilon=4.0), ValueError,
     "needs a config with a finite max_grad_norm"),
    (lambda: dp.Setting("x", 4.0), TypeError, "config must be a DPConfig, got float"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("call, error, message", [
    # asking for no privacy must not silently give the most private setting
    (lambda: dp.noise_multiplier_for(math.inf, 1e-5, 0.1, 10), ValueError, "target_epsilon must be a finite number > 0"),
    (lambda: dp.epsilon_spent(1.0, 1.5, 10, 1e-5), ValueError, r"sample_rate must be in \(0, 1\], got 1.5"),
    (lambda: dp.noise_multiplier_for(1.0, 1e-5, math.inf, 10), ValueError, "sample_rate must be finite"),
    (lambda: dp.DPConfig(1.0, 1.0, lr=math.inf), ValueError, "lr must be a finite number"),
    (lambda: dp.train_dp_classifier(_small_mlp(), _digits(64)[0], _digits(64)[1].float(), dp.DPConfig(1, 1)), TypeError,
     "y must hold integer class labels"),
    (lambda: dp.train_dp_classifier(_small_mlp(), _digits(64)[0], _digits(64)[1][:, None], dp.DPConfig(1, 1)),
     ValueError, "y must be a 1-D tensor"),
    (lambda: dp.train_dp_classifier(_small_mlp(), _digits(64)[0], _digits(64)[1] + 10, dp.DPConfig(1, 1)), ValueError,
     "y must be class indices < the number of classes"),
    (lambda: dp.train_private_shadow_models(_small_mlp, *_digits(64), mia.balanced_keep(2, 64), dp.DPConfig(1.0, 1.0),
                                            vectorized="no"), TypeError, "vectorized must be a bool"),
    (lambda: dp.Setting("x", dp.DPConfig(0.0, 1.0), target_epsilon=math.nan), ValueError,
     "target_epsilon must be a finite number"),
    (lambda: dp.DPConfig(0.0, 1.0).calibrated(math.inf, 898), ValueError, "target_epsilon must be a finite number"),
])
def test_bad_inputs_issue_11(call, error, message):
    with pytest.raises(error, match=message):
        call()

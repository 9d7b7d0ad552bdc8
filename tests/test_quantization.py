import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from companion import quantization as Q


def _ids(tok, n=4, length=16):
    return torch.randint(10, len(tok), (n, length), generator=torch.Generator().manual_seed(0))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.sampled_from(["per_tensor", "per_channel", "per_group"]), st.booleans(),
       st.integers(0, 10_000))
def test_round_trip_error_is_at_most_half_a_step(bits, granularity, symmetric, seed):
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(seed)) * 3
    group = 8 if granularity == "per_group" else None
    qt = Q.quantize_tensor(x, bits, granularity, symmetric, group)
    qmin, qmax = Q.qrange(bits, symmetric)
    assert int(qt.codes.min()) >= qmin and int(qt.codes.max()) <= qmax
    error = (qt.dequantize() - x).abs()
    step = Q._rows(torch.ones_like(x), granularity, group) * qt.scale
    assert (error <= step.reshape(x.shape) / 2 + 1e-5).all()  # min-max ranges cover x: no clipping


def test_qrange_and_granularity_shapes():
    assert Q.qrange(4, True) == (-7, 7) and Q.qrange(4, False) == (-8, 7) and Q.qrange(2, True) == (-1, 1)
    x = torch.randn(4, 64)
    assert Q.choose_qparams(x, 4, "per_tensor")[0].shape == (1, 1)
    assert Q.choose_qparams(x, 4, "per_channel")[0].shape == (4, 1)
    assert Q.choose_qparams(x, 4, "per_group", group_size=16)[0].shape == (16, 1)  # 4 rows x 4 groups
    qt = Q.quantize_tensor(x, 4, "per_group", group_size=16)
    assert torch.allclose(qt.dequantize()[0, :16], Q.quantize_tensor(x[0, :16], 4).dequantize(), atol=1e-6)
    assert qt.storage_bytes() == 4 * 64 // 2 + 16 * 2  # packed nibbles + fp16 scales (symmetric: no zeros)
    assert Q.quantize_tensor(x, 3, "per_channel").storage_bytes() == 4 * 64 + 4 * 2  # 3 bits: 1 byte/code


def test_zero_is_exact_and_asymmetric_uses_the_grid_better():
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 4 + 1  # all positive
    for symmetric in (True, False):
        assert Q.quantize_tensor(torch.cat([x, torch.zeros(1)]), 4, symmetric=symmetric).dequantize()[-1] == 0
    err = {s: (Q.quantize_tensor(x, 4, symmetric=s).dequantize() - x).pow(2).mean() for s in (True, False)}
    assert err[False] < err[True] / 2


def test_error_shrinks_with_bits_and_mse_range_beats_minmax_with_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, generator=g)
    errors = [(Q.quantize_tensor(x, b, "per_channel").dequantize() - x).pow(2).mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    x[:, 0] = 40.0  # one outlier per row
    mse = {m: (Q.quantize_tensor(x, 4, "per_channel", method=m).dequantize() - x).pow(2).mean() for m in Q.RANGES}
    assert mse["mse"] <= mse["minmax"]


def test_ste_gradient_identity_inside_zero_outside_for_the_clipped_variant():
    x = torch.tensor([-3.0, -0.4, 0.1, 0.7, 2.5], requires_grad=True)
    scale, zero = torch.tensor([[0.25]]), torch.tensor([[0.0]])  # 4-bit symmetric: range [-1.75, 1.75]
    for ste, expected in (("plain", [1, 1, 1, 1, 1]), ("clipped", [0, 1, 1, 1, 0])):
        x.grad = None
        y = Q.fake_quantize(x, 4, symmetric=True, ste=ste, scale=scale, zero_point=zero)
        y.sum().backward()
        assert x.grad.tolist() == expected
        assert torch.allclose(y.detach(), torch.tensor([-1.75, -0.5, 0.0, 0.75, 1.75]))


def test_lsq_step_gradient_matches_esser_eq3():
    torch.manual_seed(0)
    lsq = Q.LSQQuantizer(bits=3)
    x = torch.randn(50) * 2
    lsq(x)  # initialises the step: 2 mean|x| / sqrt(Q_P)
    assert torch.allclose(lsq.step.detach(), 2 * x.abs().mean() / math.sqrt(3))
    with torch.no_grad():
        lsq.step.fill_(0.5)
    lsq.step.grad = None
    lsq(x).sum().backward()
    s, q_n, q_p = 0.5, 4, 3
    v = x / s
    inside = torch.where(v <= -q_n, torch.tensor(-q_n * 1.0), torch.where(v >= q_p, torch.tensor(q_p * 1.0),
                                                                            torch.round(v) - v))
    expected = inside.sum() / math.sqrt(x.numel() * q_p)
    assert torch.allclose(lsq.step.grad.squeeze(), expected, atol=1e-5)
    # PyTorch's own learnable fake quantizer (its grad factor = LSQ's g) agrees, except that it clamps
    # after rounding: for x/s in [Q_P, Q_P + 1/2) it gives round(v) - v where Eq. 3 gives Q_P. Away from
    # those bands the two are the same.
    keep = ~(((v >= q_p) & (v < q_p + 0.5)) | ((v <= -q_n) & (v > -q_n - 0.5)))
    x, inside = x[keep], inside[keep]
    lsq.step.grad = None
    lsq(x).sum().backward()
    scale = torch.tensor([0.5], requires_grad=True)
    g = 1 / math.sqrt(x.numel() * q_p)
    out = torch._fake_quantize_learnable_per_tensor_affine(x, scale, torch.tensor([0.0]), -q_n, q_p, g)
    out.sum().backward()
    assert torch.allclose(out, lsq(x).detach(), atol=1e-6)
    assert torch.allclose(scale.grad, inside.sum() * g, atol=1e-5)
    assert torch.allclose(lsq.step.grad.squeeze(), scale.grad, atol=1e-5)


@pytest.mark.parametrize("config", [Q.QuantConfig(4, group_size=8), Q.QuantConfig(8, "per_channel", None, activation_bits=8),
                                    Q.QuantConfig(8, "per_channel", None, weight_symmetric=True, activation_bits=8,
                                                  activation_symmetric=True),  # the torch._int_mm path
                                    Q.QuantConfig(2, "per_channel", None, weight_symmetric=True, weight_range="lsq")])
def test_prepare_train_convert_on_both_architectures(tiny_lm, config):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    ids = _ids(tok)
    full = model(input_ids=ids).logits
    Q.prepare_qat(model, config)
    layers = Q.fake_quant_layers(model)
    assert layers and all(isinstance(m, Q.FakeQuantLinear) for m in layers.values())
    assert model.get_output_embeddings().__class__.__name__ != "FakeQuantLinear"
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(m.layer.weight.grad is not None and m.layer.weight.grad.abs().sum() > 0 for m in layers.values())
    model.zero_grad()
    model.eval()
    fake = model(input_ids=ids).logits.detach()
    assert not torch.allclose(fake, full)
    Q.convert(model)
    assert not Q.fake_quant_layers(model) and any(isinstance(m, Q.QuantizedLinear) for m in model.modules())
    real = model(input_ids=ids).logits
    int8 = [m.int8_matmul for m in model.modules() if isinstance(m, Q.QuantizedLinear)]
    assert all(int8) == (config.activation_symmetric and config.weight_bits == 8)
    assert (real - fake).abs().max() < 0.05 * fake.abs().max()  # fp16 scales, integer matmul


def test_convert_stores_packed_codes():
    layer = nn.Linear(64, 16)
    for bits, per_byte in ((8, 1), (4, 2), (2, 4)):
        fake = Q.FakeQuantLinear(layer, Q.QuantConfig(bits, group_size=16))
        q = Q.QuantizedLinear(fake)
        assert q.packed.dtype == torch.uint8 and q.packed.numel() == 64 * 16 // per_byte
        assert torch.allclose(q.dequantized_weight(), fake.quantized_weight().detach(), atol=2e-3)


def test_static_calibration_sets_ranges_and_percentile_clips(tiny_lm):
    model, tok = tiny_lm
    config = Q.QuantConfig(8, "per_channel", None, activation_bits=8, activation_granularity="per_tensor",
                           activation_static=True)
    prepared = Q.prepare_qat(copy.deepcopy(model), config)
    with pytest.raises(RuntimeError, match="calibrate_ptq"):
        prepared(input_ids=_ids(tok))
    ranges = Q.calibrate_ptq(prepared, _ids(tok, 8))
    clipped = Q.calibrate_ptq(prepared, _ids(tok, 8), method="percentile", percentile=99.0)
    assert set(ranges) == set(Q.fake_quant_layers(prepared))
    assert all(clipped[n][1] - clipped[n][0] < ranges[n][1] - ranges[n][0] for n in ranges)
    assert torch.isfinite(prepared(input_ids=_ids(tok)).logits).all()


def test_calibration_sample_covers_every_channel():
    """Percentile ranges come from a sample of the inputs. Two quiet channels among 128 loud ones barely
    move the 99th percentile, unless the sample keeps only those channels (a stride that divides the
    width did: stride 64 kept channels 0 and 64 here, and the range came out 100 times too narrow)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(512, 128, generator=g)
    data[:, [0, 64]] *= 0.01
    config = Q.QuantConfig(8, "per_channel", None, activation_bits=8, activation_granularity="per_tensor",
                           activation_static=True)
    net = Q.prepare_qat(nn.Sequential(nn.Linear(128, 8)), config)
    lo, hi = Q.calibrate_ptq(net, data, method="percentile", percentile=99.0, max_samples=1 << 14)["0"]
    true_lo, true_hi = torch.quantile(data.flatten()[:1 << 20], torch.tensor([0.01, 0.99]))
    assert abs(hi - float(true_hi)) < 0.15 and abs(lo - float(true_lo)) < 0.15, (lo, hi)
    again = Q.calibrate_ptq(net, data, method="percentile", percentile=99.0, max_samples=1 << 14)["0"]
    assert again == (lo, hi)  # seeded: the same sample


def test_clipped_ste_equals_plain_under_minmax_and_clips_under_mse():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    for symmetric in (True, False):  # the rounded zero point of an asymmetric range clips nothing either
        assert Q.zero_gradient_fraction(w, 2, "per_group", symmetric, 32) == 0.0
        assert Q.zero_gradient_fraction(w, 8, "per_channel", symmetric) == 0.0
    assert Q.zero_gradient_fraction(w, 2, "per_group", False, 32, method="mse") > 0.01
    probe = w.clone().requires_grad_(True)
    Q.fake_quantize(probe, 2, "per_group", False, 32, ste="plain").sum().backward()
    assert bool((probe.grad == 1).all())


def test_agrees_with_torch_fake_quantize_per_channel_affine():
    """Core PyTorch's per-channel fake quantizer, given our scale and zero point, computes the same grid."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) * 2
    for bits in (2, 4, 8):
        for symmetric in (True, False):
            scale, zero = Q.choose_qparams(x, bits, "per_channel", symmetric)
            qmin, qmax = Q.qrange(bits, symmetric)
            theirs = torch.fake_quantize_per_channel_affine(x, scale.flatten(), zero.flatten().int(), 0,
                                                            qmin, qmax)
            mine = Q.fake_quantize(x, bits, "per_channel", symmetric)
            differ = (mine - theirs).abs() > 1e-5
            # x * (1/s) and x / s may round a value sitting on a half-step differently: at most a step
            assert float(differ.float().mean()) <= 0.01, (bits, symmetric)
            assert bool(((mine - theirs).abs() <= scale * 1.0001).all())
    # the clipped STE's mask is theirs: a clipping range (half the min-max one) zeroes the same gradients
    scale, zero = Q.choose_qparams(x / 2, 4, "per_channel", False)
    ours, ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    Q.fake_quantize(ours, 4, "per_channel", False, scale=scale, zero_point=zero).sum().backward()
    torch.fake_quantize_per_channel_affine(ref, scale.flatten(), zero.flatten().int(), 0, -8, 7).sum().backward()
    assert float((ours.grad != ref.grad).float().mean()) <= 0.01 and 0.05 < float((ref.grad == 0).float().mean())


def test_lsq_steps_get_no_weight_decay(tiny_lm, monkeypatch):
    """train_causal_lm decays parameters with ndim >= 2; a learned step must not be pulled towards 0."""
    from companion import train

    model, tok = tiny_lm
    model = Q.prepare_qat(copy.deepcopy(model), Q.QuantConfig(2, group_size=8, weight_symmetric=True,
                                                               weight_range="lsq"))
    groups = []

    class Recorder(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            groups.extend(self.param_groups)

    monkeypatch.setattr(torch.optim, "AdamW", Recorder)
    ids = _ids(tok, 2, 16)
    train.train_causal_lm(model, iter([{"input_ids": ids, "labels": ids}]), steps=1, lr=1e-3)
    steps = {id(m.lsq.step) for m in Q.fake_quant_layers(model).values()}
    decayed = {id(p) for group in groups if group["weight_decay"] > 0 for p in group["params"]}
    assert steps and not steps & decayed


def test_calibration_draw_repeats_lm_splits():
    docs = torch.arange(40 * 8).reshape(40, 8)
    splits = Q.LMSplits(docs=(docs, docs), bios=(docs, docs), calib=Q._draw_windows(docs, 4, 0), valid=docs,
                       valid_clean=docs, overlap=(0.0,))
    assert torch.equal(Q.calibration_draw(splits, 0), splits.calib)  # lm_splits draws calib this way
    assert not torch.equal(Q.calibration_draw(splits, 1), splits.calib)
    assert Q.calibration_draw(splits, 1, windows=3).shape == (3, 8)


def test_digits_mlp_without_decoder_blocks():
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    Q.prepare_qat(net, Q.QuantConfig(4, "per_channel", None))
    assert len(Q.fake_quant_layers(net)) == 2


def test_window_perplexity_and_recovered(tiny_lm):
    model, tok = tiny_lm
    ppl = Q.window_perplexity(model, _ids(tok, 6, 32), batch_size=4)
    assert math.isclose(ppl, Q.window_perplexity(model, _ids(tok, 6, 32), batch_size=6), rel_tol=1e-4)
    assert 1 < ppl < 2 * len(tok)
    assert Q.recovered(10.0, 20.0, 12.0) == pytest.approx(0.8)


def test_clear_errors():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="bits"):
        Q.quantize_tensor(x, 1)
    with pytest.raises(ValueError, match="bits"):
        Q.quantize_tensor(x, 9)
    with pytest.raises(ValueError, match="group_size"):
        Q.quantize_tensor(x, 4, "per_group", group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        Q.prepare_qat(nn.Sequential(nn.Linear(10, 4)), Q.QuantConfig(4, group_size=4))
    with pytest.raises(ValueError, match="prepare_qat"):
        Q.convert(nn.Sequential(nn.Linear(10, 4)))
    with pytest.raises(ValueError, match="already"):
        Q.prepare_qat(Q.prepare_qat(nn.Sequential(nn.Linear(8, 4)), Q.QuantConfig(4, group_size=8)),
                      Q.QuantConfig(4, group_size=8))
    with pytest.raises(TypeError, match="config"):
        Q.prepare_qat(nn.Sequential(nn.Linear(8, 4)), {"bits": 4})


def test_agrees_with_torchao_fake_quantizer():
    """Same tensor through torchao's QAT fake quantizer: per-token int8 asymmetric (the W4A8 activations)
    is identical; for grouped weights torchao uses other conventions (symmetric: the full signed range with
    s = amax / ((qmax - qmin) / 2); asymmetric: tinygemm's scale and float zero point, truncated to int32
    and applied on the signed grid, see _torchao_asymmetric_replica), so the symmetric errors are checked
    to be of the same order and the asymmetric result against the replica, value for value."""
    torchao = pytest.importorskip("torchao")  # not in requirements.txt (see benchmarks/torchao_crosscheck.py)
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    theirs = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))(x)
    assert torch.equal(theirs, Q.fake_quantize(x, 8, "per_token", symmetric=False)), torchao.__version__
    for dtype, bits in ((torch.int4, 4), (torch.int2, 2)):
        for symmetric in (True, False):
            theirs = IntxFakeQuantizer(IntxFakeQuantizeConfig(dtype, group_size=32, is_symmetric=symmetric))(x)
            mine = Q.fake_quantize(x, bits, "per_group", symmetric=symmetric, group_size=32)
            if symmetric:
                ratio = (mine - x).pow(2).mean() / (theirs - x).pow(2).mean()
                assert 0.25 < ratio < 4, (bits, float(ratio))  # recorded: 1.04 and 1.84
            else:
                assert torch.allclose(theirs, _torchao_asymmetric_replica(x, bits)[0], atol=1e-6), bits


def _torchao_asymmetric_replica(x, bits, group_size=32):
    """torchao 0.18's asymmetric per-group IntxFakeQuantizer in plain PyTorch: get_groupwise_affine_qparams
    picks tinygemm's qparams (grid [0, 2^b - 1], s = (max - min) / (2^b - 1), float zero point
    z = min + s * 2^(b-1)); ``.to(zero_point_precision)`` then truncates z to int32, and
    _fake_quantize_per_channel_group applies it in the INT domain on the signed grid [-2^(b-1), 2^(b-1) - 1]."""
    rows = x.reshape(-1, group_size)
    lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    scale = ((hi - lo) / float(2**bits - 1)).clamp(min=1e-6)
    zero = (lo + scale * 2 ** (bits - 1)).to(torch.int32).float()
    codes = torch.clamp(torch.round(rows * (1.0 / scale)) + zero, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return ((codes - zero) * scale).reshape(x.shape), zero


def test_torchao_asymmetric_gap_is_its_truncated_zero_point():
    """Without torchao: the replica gives the recorded torchao MSEs of benchmarks/recorded/torchao_crosscheck.txt
    (int4 0.0176, int2 0.4201; 3.3% and 9.4% of the values differ from ours) with zero points only 0 or 1."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for bits, mse, differ in ((4, 0.0176, 0.033), (2, 0.4201, 0.094)):
        theirs, zero = _torchao_asymmetric_replica(x, bits)
        ours = Q.fake_quantize(x, bits, "per_group", symmetric=False, group_size=32)
        assert round(float((theirs - x).pow(2).mean()), 4) == mse, bits
        assert round(float((ours != theirs).float().mean()), 3) == differ, bits
        assert set(zero.flatten().tolist()) <= {0.0, 1.0}, bits
        assert float((theirs - x).pow(2).mean()) > 2 * float((ours - x).pow(2).mean())


def test_int8_matmul_is_exact_on_any_cpu():
    """The W8A8 path must give exact integer sums even where torch._int_mm saturates (oneDNN on AVX2)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (24, 256), generator=g).to(torch.int8)
    b = torch.randint(-127, 128, (256, 40), generator=g).to(torch.int8)
    assert torch.equal(Q._int8_matmul(a, b).long(), a.long() @ b.long())
    assert isinstance(Q.int_mm_is_exact(), bool)


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def test_fake_quant_conv2d_is_a_conv_with_the_quantized_weight_matrix():
    cnn, x = _small_cnn(), torch.randn(5, 1, 8, 8)
    config = Q.QuantConfig(4, weight_granularity="per_channel", group_size=None, weight_symmetric=True)
    prepared = Q.prepare_qat(copy.deepcopy(cnn), config)
    kinds = [type(m).__name__ for m in Q.fake_quant_layers(prepared).values()]
    assert kinds == ["FakeQuantConv2d", "FakeQuantConv2d", "FakeQuantLinear"]
    conv = cnn[2]
    rows = Q.fake_quantize(conv.weight.reshape(8, -1), 4, "per_channel", True)
    expected = nn.functional.conv2d(torch.relu(cnn[0](x)), rows.reshape(conv.weight.shape), conv.bias,
                                    stride=2, padding=1)
    fake = prepared[2]
    assert torch.allclose(fake(torch.relu(cnn[0](x))), expected, atol=1e-6)
    # every output channel of the quantized weight has at most 2^4 distinct values
    assert max(len(row.unique()) for row in fake.quantized_weight()) <= 16
    # 8 bits: close to the float network
    eight = Q.prepare_qat(copy.deepcopy(cnn), Q.QuantConfig(8, weight_granularity="per_channel", group_size=None))
    assert torch.allclose(eight(x), cnn(x), atol=0.05)


def test_fake_quant_conv2d_trains_through_the_ste_and_quantizes_inputs_per_image():
    cnn = _small_cnn()
    config = Q.QuantConfig(4, weight_granularity="per_channel", group_size=None, activation_bits=4)
    prepared = Q.prepare_qat(cnn, config)
    x = torch.randn(3, 1, 8, 8)
    x[1] *= 100  # a loud image must not coarsen the grid of the quiet ones
    conv = prepared[0]
    quiet = conv.quantize_input(x)[0]
    assert len(quiet.unique()) > 8 and torch.allclose(quiet, Q.fake_quantize(x[0].reshape(1, -1), 4,
                                                                            "per_token", False).reshape(quiet.shape))
    prepared(x).sum().backward()
    assert conv.layer.weight.grad is not None and conv.layer.weight.grad.abs().sum() > 0


def test_static_calibration_and_convert_on_a_cnn():
    cnn = _small_cnn()
    config = Q.QuantConfig(8, weight_granularity="per_channel", group_size=None, activation_bits=8,
                           activation_granularity="per_tensor", activation_static=True)
    prepared = Q.prepare_qat(cnn, config)
    ranges = Q.calibrate_ptq(prepared, torch.randn(16, 1, 8, 8))
    assert set(ranges) == {"0", "2", "5"} and all(lo < hi for lo, hi in ranges.values())
    with pytest.raises(ValueError, match="FakeQuantConv2d"):
        Q.convert(prepared)


def test_fake_quant_conv2d_rejects_bad_layers():
    config = Q.QuantConfig(4, weight_granularity="per_channel", group_size=None)
    with pytest.raises(TypeError, match="layer"):
        Q.FakeQuantConv2d(nn.Linear(4, 4), config)
    with pytest.raises(ValueError, match="padding_mode"):
        Q.FakeQuantConv2d(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), config)
    with pytest.raises(ValueError, match="group_size"):
        Q.prepare_qat(_small_cnn(), Q.QuantConfig(4, group_size=5))


def test_convert_refuses_a_conv_model_before_swapping_anything():
    model = nn.Sequential(nn.Linear(8, 16), nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3))
    prepared = Q.prepare_qat(model, Q.QuantConfig(4, "per_channel", None))
    with pytest.raises(ValueError, match="FakeQuantConv2d"):
        Q.convert(prepared)
    assert not any(isinstance(m, Q.QuantizedLinear) for m in prepared.modules()), "left half-converted"
    assert isinstance(prepared[0], Q.FakeQuantLinear)


def test_lsq_step_is_kept_positive():
    lsq = Q.LSQQuantizer(2, groups=2)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    lsq(x)  # initialises the steps
    with torch.no_grad():
        lsq.step.copy_(torch.tensor([-0.3, 0.0]))
    out = lsq(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], torch.clamp(torch.round(x[0] / 0.3), -2, 1) * 0.3)
    assert out[1].abs().max() <= 2e-8
    out.sum().backward()
    assert torch.isfinite(lsq.step.grad).all()


def test_percentile_range_beyond_torch_quantile_limit(monkeypatch):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 1001, generator=g)
    expected = Q._row_range(rows, "percentile", 99.9)
    monkeypatch.setattr(Q, "_QUANTILE_LIMIT", 100)
    got = Q._row_range(rows, "percentile", 99.9)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))
    monkeypatch.undo()
    big = torch.randn(2**24 + 1, generator=g)  # torch.quantile raises "input tensor is too large" here
    scale, _ = Q.choose_qparams(big, 8, "per_tensor", method="percentile", percentile=99.9)
    assert torch.isfinite(scale).all() and 0 < float(scale) < float(big.abs().max()) / 127


def test_window_nll_and_paired_perplexity_difference(tiny_lm):
    model, tok = tiny_lm
    ids = _ids(tok, 6, 32)
    nll = Q.window_nll(model, ids, batch_size=4)
    assert nll.shape == (6,) and nll.dtype == torch.float64
    assert math.isclose(math.exp(float(nll.sum()) / (6 * 31)), Q.window_perplexity(model, ids), rel_tol=1e-4)
    assert Q.paired_perplexity_difference(nll, nll, 31) == (0.0, 0.0, 0.0)
    shifted = nll + 31 * 0.01  # every window 0.01 nats per token worse
    diff, lower, upper = Q.paired_perplexity_difference(shifted, nll, 31)
    assert diff > 0 and lower <= diff <= upper
    noisy = nll + torch.tensor([5.0, -5.0, 5.0, -5.0, 5.0, -5.0], dtype=torch.float64)
    _, lower, upper = Q.paired_perplexity_difference(noisy, nll, 31)
    assert lower < 0 < upper
    with pytest.raises(ValueError, match="nll_b"):
        Q.paired_perplexity_difference(nll, nll[:3], 31)
    with pytest.raises(ValueError, match="tokens_per_window"):
        Q.paired_perplexity_difference(nll, nll, 0)
    with pytest.raises(TypeError, match="nll_a"):
        Q.paired_perplexity_difference([1.0], nll, 31)


def test_paired_perplexity_difference_resamples_documents():
    # 4 documents of 6 windows; within a document every window moves the same way (+/- 3 nats)
    base = torch.full((24,), 60.0, dtype=torch.float64)
    docs = torch.arange(4).repeat_interleave(6)
    shift = torch.tensor([3.0, -3.0, 3.0, -3.0], dtype=torch.float64)[docs]
    by_window = Q.paired_perplexity_difference(base + shift, base, 31)
    by_doc = Q.paired_perplexity_difference(base + shift, base, 31, groups=docs)
    assert by_doc[0] == by_window[0]  # the point estimate does not depend on the resampling unit
    assert by_doc[2] - by_doc[1] > 1.5 * (by_window[2] - by_window[1])  # clustering widens it
    # singleton groups are the window bootstrap (same draws)
    same = Q.paired_perplexity_difference(base + shift, base, 31, groups=torch.arange(24))
    assert same == pytest.approx(by_window, abs=1e-12)
    # a replicate takes whole documents: an interval that holds only the per-document values' range
    lo_ppl, hi_ppl = math.exp(57 / 31) - math.exp(60 / 31), math.exp(63 / 31) - math.exp(60 / 31)
    assert lo_ppl <= by_doc[1] <= by_doc[2] <= hi_ppl


def test_paired_perplexity_difference_bad_groups():
    nll = torch.full((6,), 60.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="groups must have one value per window"):
        Q.paired_perplexity_difference(nll, nll, 31, groups=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="at least 2 distinct groups"):
        Q.paired_perplexity_difference(nll, nll, 31, groups=torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="groups"):
        Q.paired_perplexity_difference(nll, nll, 31, groups=torch.zeros(6))
    with pytest.raises(TypeError, match="groups"):
        Q.paired_perplexity_difference(nll, nll, 31, groups=[0, 1, 0, 1, 0, 1])


def test_lm_splits_holds_out_the_near_copies(small_tokenizer):
    from companion import data, zoo

    source = zoo.corpus()
    # the small test tokenizer makes long biographies: windows must hold the longest whole
    longest = max(len(small_tokenizer(t)["input_ids"]) for t in source.world.training_texts()) + 1
    splits = Q.lm_splits(small_tokenizer, context=longest, calib_windows=4)
    assert len(splits.overlap) == len(source.valid_docs)
    train_texts = [d.text for d in source.train_docs]
    first = source.valid_docs[0].text
    assert splits.overlap[0] == data.overlap_with(train_texts, first)  # chapter 08's measure
    clean = [o < Q.CLEAN_BELOW for o in splits.overlap]
    assert 0 < sum(clean) < len(clean)  # the documentation split leaks a few documents
    assert 0 < len(splits.valid_clean) < len(splits.valid)
    assert splits.valid_clean.shape[1] == splits.valid.shape[1] == longest
    # one document id per window, in stream order; the clean windows come from clean documents only
    assert splits.valid_doc.shape == (len(splits.valid),)
    assert splits.valid_clean_doc.shape == (len(splits.valid_clean),)
    assert bool((splits.valid_doc[1:] >= splits.valid_doc[:-1]).all())
    assert all(clean[int(i)] for i in splits.valid_clean_doc)
    assert splits.valid_doc[0] == 0 and len(torch.unique(splits.valid_clean_doc)) > 1

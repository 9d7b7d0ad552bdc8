import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from companion import pruning


def _calib(tok, n=8, length=32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, len(tok), (n, length), generator=g)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3).flatmap(lambda n: st.tuples(st.just(n), st.integers(n + 1, 8))),
       st.integers(1, 4), st.integers(1, 5), st.integers(0, 10_000))
def test_nm_mask_keeps_exactly_n_of_every_m(nm, rows, groups, seed):
    n, m = nm
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    keep = pruning.nm_mask(scores, n, m)
    assert keep.shape == scores.shape
    assert (keep.reshape(-1, m).sum(1) == n).all()
    # the kept entries are the group's largest
    grouped, kept = scores.reshape(-1, m), keep.reshape(-1, m)
    assert (grouped[kept].reshape(-1, n).min(1).values >= grouped.masked_fill(kept, -1).max(1).values).all()


def test_row_mask_removes_fraction_per_row():
    scores = torch.arange(20.0).reshape(2, 10)
    keep = pruning.row_mask(scores, 0.3)
    assert keep.sum(1).tolist() == [7, 7]
    assert not keep[:, :3].any() and keep[:, 3:].all()


def test_wanda_scores_equal_the_formula():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 8, generator=g)
    X = torch.randn(50, 8, generator=g)
    direct = torch.stack([torch.stack([W[i, j].abs() * X[:, j].norm() for j in range(8)]) for i in range(6)])
    assert torch.allclose(pruning.wanda_scores(W, (X**2).sum(0)), direct, atol=1e-5)


def test_wanda_mask_on_a_random_layer_matches_direct_computation(tiny_lm):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    block = pruning.decoder_blocks(model)[0]
    name, layer = next(iter(pruning.block_layers(block).items()))
    captured = []
    handle = layer.register_forward_hook(lambda m, a, o: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    calib = _calib(tok)
    with torch.no_grad():
        for row in calib:
            model(input_ids=row.unsqueeze(0))
    handle.remove()
    X = torch.cat(captured)
    W = pruning.weight_matrix(layer).detach().clone()
    expected = W * pruning.row_mask(W.abs() * X.norm(dim=0), 0.5)
    pruning.prune(model, "wanda", 0.5, calib=calib)
    assert torch.allclose(pruning.weight_matrix(layer), expected)


@pytest.mark.parametrize("method", pruning.METHODS)
@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_prune_reaches_the_requested_sparsity_on_both_architectures(tiny_lm, method, pattern):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    report = pruning.prune(model, method, 0.5, pattern, calib=_calib(tok))
    assert report.overall == pytest.approx(0.5, abs=0.02)
    for block in pruning.decoder_blocks(model):
        for layer in pruning.block_layers(block).values():
            W = pruning.weight_matrix(layer)
            if pattern:
                n, m = pruning.parse_pattern(pattern)
                assert pruning.is_nm_sparse(W, n, m)
            else:
                assert ((W == 0).sum(1) >= int(0.5 * W.shape[1]) - 1).all() or method in ("sparsegpt", "sparsegpt-diag")
    assert pruning.sparsity_report(model)["overall"] == pytest.approx(0.5, abs=0.02)
    # embeddings and the LM head stay dense
    assert (model.get_input_embeddings().weight != 0).float().mean() > 0.99


def test_conv1d_orientation_is_handled(small_tokenizer):
    from companion.zoo import LMRecipe, build_lm

    model = build_lm(LMRecipe(architecture="gpt2", hidden=32, layers=1, heads=2, intermediate=64), len(small_tokenizer), {})
    attn = model.transformer.h[0].attn.c_attn  # Conv1D: weight is [in=32, out=96]
    assert attn.weight.shape == (32, 96) and pruning.weight_matrix(attn).shape == (96, 32)
    pruning.prune(model, "magnitude", pattern="2:4")
    assert pruning.is_nm_sparse(pruning.weight_matrix(attn), 2, 4)  # groups run along the input dimension


def test_sequential_pruning_feeds_pruned_activations(tiny_lm, monkeypatch):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    blocks = pruning.decoder_blocks(model)
    seen = []
    original = pruning._run_block

    def spy(block, inputs):
        if block is blocks[1] and not seen:
            seen.append(inputs[0][0].clone())
        return original(block, inputs)

    monkeypatch.setattr(pruning, "_run_block", spy)
    calib = _calib(tok, n=1)
    pruning.prune(model, "wanda", 0.5, calib=calib)
    # what block 1 received must equal block 0's output *after* block 0 was pruned
    captured = []
    handle = blocks[1].register_forward_pre_hook(lambda m, a, k: captured.append((a[0] if a else k["hidden_states"]).clone()),
                                                 with_kwargs=True)
    with torch.no_grad():
        model(input_ids=calib)
    handle.remove()
    assert torch.allclose(seen[0], captured[0], atol=1e-5)


def test_sparsegpt_reconstructs_better_than_magnitude():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g) * torch.linspace(0.2, 3, 64)  # uneven input scales
    W = torch.randn(32, 64, generator=g)
    H = X.t() @ X
    dense_out = X @ W.t()
    magnitude = W * pruning.row_mask(W.abs(), 0.5)
    sparse = pruning.sparsegpt_prune(W, H, 0.5)
    assert (sparse == 0).float().mean() == pytest.approx(0.5, abs=0.02)
    err_mag = (X @ magnitude.t() - dense_out).pow(2).sum()
    err_sgpt = (X @ sparse.t() - dense_out).pow(2).sum()
    assert err_sgpt < 0.7 * err_mag
    nm = pruning.sparsegpt_prune(W, H, 0.5, nm=(2, 4))
    assert pruning.is_nm_sparse(nm, 2, 4)


def test_semi_structured_storage():
    sizes = pruning.semi_structured_bytes(128, 128)
    assert sizes["dense"] == 128 * 128 * 2 and sizes["values"] == sizes["dense"] // 2
    assert sizes["metadata"] == 128 * 64 * 2 // 8
    assert sizes["sparse_total"] < sizes["dense"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_to_semi_structured_fails_clearly_on_cpu(tiny_lm):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        pruning.to_semi_structured(tiny_lm[0])


@pytest.mark.parametrize("call, error, message", [
    (lambda m, c: pruning.prune(m, "random", calib=c), ValueError, "method must be one of"),
    (lambda m, c: pruning.prune(m, "wanda", 1.0, calib=c), ValueError, "sparsity must be in"),
    (lambda m, c: pruning.prune(m, "wanda", -0.1, calib=c), ValueError, "sparsity must be in"),
    (lambda m, c: pruning.prune(m, "wanda", "half", calib=c), TypeError, "sparsity must be a float"),
    (lambda m, c: pruning.prune(m, "wanda", pattern="4:2", calib=c), ValueError, "0 < N < M"),
    (lambda m, c: pruning.prune(m, "wanda", pattern="2-4", calib=c), ValueError, "look like 'N:M'"),
    (lambda m, c: pruning.prune(m, "wanda", pattern="3:7", calib=c), ValueError, "not divisible by M=7"),
    (lambda m, c: pruning.prune(m, "wanda"), ValueError, "needs calib"),
    (lambda m, c: pruning.prune(m, "sparsegpt", calib=c[0]), ValueError, "needs calib"),
    (lambda m, c: pruning.nm_mask(torch.rand(2, 6), 2, 4), ValueError, "divisible by m=4"),
    (lambda m, c: pruning.nm_mask([1, 2], 2, 4), TypeError, "scores must be a tensor"),
    (lambda m, c: pruning.decoder_blocks(nn.Linear(2, 2)), ValueError, "no nn.ModuleList"),
])
def test_bad_inputs(tiny_lm, call, error, message):
    model, tok = tiny_lm
    with pytest.raises(error, match=message):
        call(copy.deepcopy(model), _calib(tok))


def test_input_feature_norms_match_a_direct_computation(tiny_lm):
    model, tok = tiny_lm
    calib = _calib(tok, n=2, length=16)
    norms = pruning.input_feature_norms(model, calib)
    layer = next(iter(pruning.block_layers(pruning.decoder_blocks(model)[0]).values()))
    captured = []
    handle = layer.register_forward_hook(lambda m, a, o: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for row in calib:
            model(input_ids=row.unsqueeze(0))
    handle.remove()
    first = next(iter(norms.values()))
    assert torch.allclose(first, torch.cat(captured).norm(dim=0), atol=1e-5)
    assert len(norms) == sum(len(pruning.block_layers(b)) for b in pruning.decoder_blocks(model))


def test_planted_outliers_preserve_the_function_and_leave_wanda_unchanged(small_tokenizer):
    from companion.zoo import LMRecipe, build_lm

    torch.manual_seed(0)
    model = build_lm(LMRecipe(architecture="llama", hidden=32, layers=2, heads=2, intermediate=64),
                     len(small_tokenizer), {}).eval()
    with torch.no_grad():  # a random RMSNorm weight, so the test does not rely on all-ones
        for block in pruning.decoder_blocks(model):
            block.input_layernorm.weight.uniform_(0.5, 1.5)
    calib = _calib(small_tokenizer, n=4, length=16)
    rescaled = copy.deepcopy(model)
    pruning.plant_outlier_channels(rescaled, channels=3, alpha=20.0)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=calib).logits, rescaled(input_ids=calib).logits, atol=1e-4)
    a, b = copy.deepcopy(model), copy.deepcopy(rescaled)
    pruning.prune(a, "wanda", pattern="2:4", calib=calib)
    pruning.prune(b, "wanda", pattern="2:4", calib=calib)
    masks_a = [(pruning.weight_matrix(l) == 0) for blk in pruning.decoder_blocks(a) for l in pruning.block_layers(blk).values()]
    masks_b = [(pruning.weight_matrix(l) == 0) for blk in pruning.decoder_blocks(b) for l in pruning.block_layers(blk).values()]
    agree = sum(int((x == y).sum()) for x, y in zip(masks_a, masks_b)) / sum(x.numel() for x in masks_a)
    assert agree > 0.99  # Wanda's score is invariant to the rescaling (up to float ties)
    with pytest.raises(ValueError, match="needs Llama-style blocks"):
        from companion.zoo import LMRecipe as R
        gpt2 = build_lm(R(architecture="gpt2", hidden=32, layers=1, heads=2, intermediate=64), len(small_tokenizer), {})
        pruning.plant_outlier_channels(gpt2)


def test_layer_mask_compares_across_the_whole_matrix():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    keep = pruning.layer_mask(scores, 0.5)
    assert keep.tolist() == [[False, False, False, False], [True, True, True, True]]
    assert pruning.row_mask(scores, 0.5).sum(1).tolist() == [2, 2]


def test_prune_compare_layer_for_magnitude(tiny_lm):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    pruning.prune(model, "magnitude", 0.5, compare="layer")
    for block in pruning.decoder_blocks(model):
        for layer in pruning.block_layers(block).values():
            assert (pruning.weight_matrix(layer) == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="compare must be 'row' or 'layer'"):
        pruning.prune(model, "magnitude", 0.5, compare="column")


# --------------------------------------------------------------------------- bad input (issue 11)


@pytest.mark.parametrize("call, error, message", [
    (lambda: pruning.wanda_scores(torch.rand(3, 4), torch.rand(1, 4)), ValueError, "input_sq_norm must be a 1-D tensor"),
    (lambda: pruning.wanda_scores(torch.rand(3, 4), -torch.rand(4)), ValueError, r"input_sq_norm must be sums of squares"),
    (lambda: pruning.wanda_scores(torch.rand(3, 4), torch.full((4,), float("nan"))), ValueError,
     "input_sq_norm must be finite"),
    (lambda: pruning.semi_structured_bytes(8, 8, bits=-16), ValueError, "bits must be >= 1"),
    (lambda: pruning.row_mask(torch.rand(2, 4), float("nan")), ValueError, "sparsity must be finite"),
    (lambda: pruning.sparsegpt_prune(torch.rand(2, 8), torch.eye(8), 0.5, blocksize=0), ValueError,
     "blocksize must be >= 1"),
    (lambda: pruning.sparsegpt_prune(torch.rand(2, 8), torch.eye(8), 0.5, percdamp=float("nan")), ValueError,
     "percdamp must be"),
])
def test_bad_inputs_issue_11(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_outliers_and_calib_are_checked_before_touching_the_model(tiny_lm):
    model, tok = tiny_lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        pruning.plant_outlier_channels(model, alpha=float("nan"))
    with pytest.raises(ValueError, match="channels must be <="):
        pruning.plant_outlier_channels(model, channels=10_000)
    too_large = torch.full((1, 4), len(tok) + 5, dtype=torch.long)
    with pytest.raises(ValueError, match="calib must hold token ids in"):
        pruning.prune(model, "wanda", calib=too_large)
    with pytest.raises(ValueError, match="calib must hold token ids in"):
        pruning.input_feature_norms(model, too_large)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_masks_reject_nan_scores():
    with pytest.raises(ValueError, match="scores must be finite"):
        pruning.row_mask(torch.full((2, 4), float("nan")), 0.5)
    with pytest.raises(ValueError, match="scores must be finite"):
        pruning.layer_mask(torch.full((2, 4), float("nan")), 0.5)


# --------------------------------------------------------------------------- the method registry


def test_a_new_method_is_one_scoring_function(tiny_lm, monkeypatch):
    """A toy method (Wanda's score squared, ``|W|^2 ||X||^2``: the same ranking) plugs in with one function."""
    monkeypatch.setattr(pruning, "METHODS", dict(pruning.METHODS))  # leave the real registry as it was
    calls = []

    def squared_wanda(weight, input_sq_norm):
        calls.append(tuple(weight.shape))
        return weight**2 * input_sq_norm

    pruning.register_method("squared-wanda", squared_wanda, statistic="input_sq_norm")
    assert list(pruning.METHODS) == ["magnitude", "wanda", "sparsegpt", "wanda+obs", "magnitude+obs",
                                     "sparsegpt-diag", "squared-wanda"]
    model, tok = tiny_lm
    calib = _calib(tok)
    toy, wanda = copy.deepcopy(model), copy.deepcopy(model)
    report = pruning.prune(toy, "squared-wanda", pattern="2:4", calib=calib)
    pruning.prune(wanda, "wanda", pattern="2:4", calib=calib)
    layers = sum(len(pruning.block_layers(b)) for b in pruning.decoder_blocks(model))
    assert len(calls) == layers and report.method == "squared-wanda" and report.nsamples == len(calib)
    # squaring a non-negative score keeps its order within every group: the same masks as Wanda's
    for a, b in zip(toy.parameters(), wanda.parameters()):
        assert torch.equal(a == 0, b == 0)
    with pytest.raises(ValueError, match="needs calib"):
        pruning.prune(copy.deepcopy(model), "squared-wanda", 0.5)


def test_a_method_may_update_the_survivors_and_may_need_no_calibration(tiny_lm, monkeypatch):
    monkeypatch.setattr(pruning, "METHODS", dict(pruning.METHODS))
    pruning.register_method("halve", update=lambda weight, statistic, sparsity, nm: weight / 2)
    model, _ = tiny_lm
    halved = copy.deepcopy(model)
    pruning.prune(halved, "halve")  # statistic None: no calib needed
    layer = pruning.block_layers(pruning.decoder_blocks(model)[0])
    name = next(iter(layer))
    before = pruning.weight_matrix(layer[name])
    after = pruning.weight_matrix(pruning.block_layers(pruning.decoder_blocks(halved)[0])[name])
    assert torch.equal(after, before / 2)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"name": "wanda", "score": pruning.magnitude_scores}, ValueError, "already registered"),
    ({"name": "x"}, TypeError, r"needs exactly one of score or update \(a function\), got neither"),
    ({"name": "x", "score": pruning.magnitude_scores, "update": pruning.sparsegpt_prune}, TypeError, "got both"),
    ({"name": "x", "score": 3}, TypeError, "score must be a function, got int"),
    ({"name": "x", "score": pruning.magnitude_scores, "statistic": "gradient"}, ValueError,
     r"statistic must be one of \('input_sq_norm', 'hessian'\)"),
    ({"name": "", "score": pruning.magnitude_scores}, TypeError, "name must be a non-empty str"),
])
def test_register_method_bad_inputs(kwargs, error, message, monkeypatch):
    monkeypatch.setattr(pruning, "METHODS", dict(pruning.METHODS))
    with pytest.raises(error, match=message):
        pruning.register_method(**kwargs)


# --------------------------------------------------------------------------- direct tests (issue 10)


def test_is_prunable_means_linear_or_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    class MyLinear(nn.Linear):
        pass

    class Conv1DLookalike(nn.Module):  # GPT-2's class name, but not its layer (no `nf`)
        pass

    Conv1DLookalike.__name__ = "Conv1D"
    assert pruning.is_prunable(nn.Linear(3, 2)) and pruning.is_prunable(MyLinear(3, 2))
    assert pruning.is_prunable(Conv1D(4, 3))
    for module in (nn.Embedding(5, 3), nn.LayerNorm(3), nn.Conv1d(3, 3, 1), nn.Sequential(nn.Linear(3, 2)),
                   Conv1DLookalike()):
        assert not pruning.is_prunable(module), type(module).__name__
    block = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(Conv1D(2, 4)), nn.LayerNorm(2))
    assert list(pruning.block_layers(block)) == ["0", "2.0"]
    assert pruning.weight_matrix(block[2][0]).shape == (2, 4)  # [out, in], a view of Conv1D's [in, out]
    with pytest.raises(TypeError, match="layer must be an nn.Linear or a GPT-2 Conv1D, got LayerNorm"):
        pruning.weight_matrix(block[3])


# --------------------------------------------------------------------------- mutation survivors (issue 10)


def _sparsegpt_reference(W, H, sparsity, nm=None, blocksize=128, percdamp=0.01):
    """SparseGPT's Algorithm 1 written plainly in float64: the inverse Hessian of the not-yet-processed
    columns is recomputed for every column (no Cholesky trick), and updates are applied eagerly."""
    W, H = W.double().clone(), H.double().clone()
    columns = W.shape[1]
    H += percdamp * torch.diag(H).mean() * torch.eye(columns, dtype=torch.float64)
    inverses = [torch.linalg.inv(H[i:, i:]) for i in range(columns)]  # inverses[i][0] is row i of H_F^-1
    d2 = torch.tensor([inverses[i][0, 0].item() for i in range(columns)])  # [H_F^-1]_00 per column
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        mask = torch.zeros(W.shape[0], end - start, dtype=torch.bool)
        if nm is None:
            saliency = W[:, start:end] ** 2 / d2[start:end]
            threshold = saliency.flatten().sort().values[int(saliency.numel() * sparsity)]
            mask = saliency <= threshold
        for i in range(start, end):
            if nm is not None and (i - start) % nm[1] == 0:
                group = W[:, i: i + nm[1]] ** 2 / d2[i: i + nm[1]]
                mask[:, i - start: i - start + nm[1]] = ~pruning.nm_mask(group, *nm)
            w = W[:, i].clone()
            q = torch.where(mask[:, i - start], torch.zeros_like(w), w)
            W[:, i:] -= ((w - q) / inverses[i][0, 0])[:, None] * inverses[i][0][None, :]
            W[:, i] = q
    return W


@pytest.mark.parametrize("nm, blocksize", [(None, 128), (None, 16), ((2, 4), 128), ((2, 4), 8), ((1, 4), 16)])
def test_sparsegpt_equals_a_plain_reference(nm, blocksize):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(256, 32, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 32, dtype=torch.float64)
    W = torch.randn(12, 32, generator=g, dtype=torch.float64)
    H = X.t() @ X
    got = pruning.sparsegpt_prune(W, H, 0.5, nm=nm, blocksize=blocksize)
    expected = _sparsegpt_reference(W, H, 0.5, nm=nm, blocksize=blocksize)
    assert got.dtype == torch.float64  # returned in the weight's dtype
    assert torch.equal(got == 0, expected == 0)  # the same mask
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)  # the same compensating updates


def test_sparsegpt_without_sparsity_changes_nothing_and_prunes_dead_inputs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 8, generator=g)
    X[:, 3] = 0  # an input that is never active
    W = torch.randn(4, 8, generator=g)
    out = pruning.sparsegpt_prune(W, X.t() @ X, 0.0)
    assert (out[:, 3] == 0).all()  # a weight on a dead input is free to prune
    keep = torch.ones(8, dtype=torch.bool)
    keep[3] = False
    assert torch.allclose(out[:, keep], W[:, keep], atol=1e-4)  # nothing else pruned or moved
    assert torch.allclose(X @ out.t(), X @ W.t(), atol=1e-3)  # the layer's output is unchanged


def test_row_mask_works_along_the_last_dimension_of_any_rank():
    scores = torch.rand(2, 3, 8, generator=torch.Generator().manual_seed(0))
    keep = pruning.row_mask(scores, 0.25)
    assert (keep.sum(-1) == 6).all()
    kept_min = scores.masked_fill(~keep, float("inf")).amin(-1)
    removed_max = scores.masked_fill(keep, -float("inf")).amax(-1)
    assert (kept_min >= removed_max).all()  # the lowest quarter of every last-dimension row is removed


def test_sparsity_report_counts_exact_zeros(tiny_lm):
    model, _ = tiny_lm
    model = copy.deepcopy(model)
    layers = [layer for block in pruning.decoder_blocks(model) for layer in pruning.block_layers(block).values()]
    total = sum(layer.weight.numel() for layer in layers)
    with torch.no_grad():
        layers[0].weight.view(-1)[:10] = 0.0
    report = pruning.sparsity_report(model)
    assert report["overall"] == 10 / total
    first = next(iter(report))
    assert first.startswith("block0.") and report[first] == pytest.approx(10 / layers[0].weight.numel(), rel=1e-6)
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
    assert pruning.sparsity_report(model)["overall"] == 1.0


def test_is_nm_sparse():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert pruning.is_nm_sparse(w, 2, 4) and pruning.is_nm_sparse(w, 1, 2)
    assert not pruning.is_nm_sparse(w, 1, 4)  # the first group has two non-zeros
    assert not pruning.is_nm_sparse(w, 2, 3)  # 8 inputs do not split into groups of 3
    assert pruning.is_nm_sparse(torch.zeros(2, 4), 0, 4)


def test_semi_structured_sizes_add_up():
    sizes = pruning.semi_structured_bytes(64, 32, bits=8)
    assert sizes == {"dense": 2048, "values": 1024, "metadata": 256, "sparse_total": 1280}


def test_sparsegpt_builds_every_tensor_on_the_hessians_device(monkeypatch):
    """On a CUDA model the damping identity must live on the GPU too (it was created on the CPU)."""
    made = []
    real_eye = torch.eye

    def recording_eye(*args, **kwargs):
        made.append((kwargs.get("device"), kwargs.get("dtype")))
        return real_eye(*args, **kwargs)

    monkeypatch.setattr(torch, "eye", recording_eye)
    weight = torch.randn(4, 8, dtype=torch.float64)
    x = torch.randn(32, 8, dtype=torch.float64)
    pruned = pruning.sparsegpt_prune(weight, x.T @ x, 0.5, blocksize=4)
    # the identity is made where H lives, in H's working precision (float32)
    assert made and all(device == torch.device("cpu") and dtype == torch.float32 for device, dtype in made)
    assert 0.4 < float((pruned == 0).float().mean()) < 0.6  # about half pruned (per-block masks)


# --------------------------------------------------------------------------- a fixed mask, then SparseGPT's update


def _layer_problem(seed=0, rows=16, columns=32):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, columns, generator=g) * torch.linspace(0.2, 3, columns)
    X = X + 0.5 * X[:, torch.randperm(columns, generator=g)]  # correlated inputs: OBS has work to do
    return torch.randn(rows, columns, generator=g), X


@pytest.mark.parametrize("nm, blocksize", [(None, 128), (None, 8), ((2, 4), 128), ((2, 4), 8)])
def test_sparsegpt_given_its_own_mask_reproduces_itself(nm, blocksize):
    W, X = _layer_problem()
    H = X.t() @ X
    own = pruning.sparsegpt_prune(W, H, 0.5, nm=nm, blocksize=blocksize)
    fixed = pruning.sparsegpt_prune(W, H, 0.5, nm=nm, blocksize=blocksize, keep=own != 0)
    assert torch.allclose(fixed, own, atol=1e-5)  # the same mask gives the same OBS updates


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_a_fixed_mask_is_kept_exactly_and_the_update_lowers_the_error(nm):
    W, X = _layer_problem(1)
    H = X.t() @ X
    scores = pruning.wanda_scores(W, (X**2).sum(0))
    keep = pruning.nm_mask(scores, *nm) if nm else pruning.row_mask(scores, 0.5)
    updated = pruning.sparsegpt_prune(W, H, 0.5, nm=nm, keep=keep)
    assert torch.equal(updated != 0, keep)  # exactly the given zeros, no others
    assert not torch.allclose(updated[keep], W[keep])  # the survivors moved
    err_masked = (X @ (W * keep).t() - X @ W.t()).pow(2).sum()
    err_updated = (X @ updated.t() - X @ W.t()).pow(2).sum()
    # not a theorem (the sequential update also pushes error into columns pruned later):
    # 0.83 (unstructured) and 0.90 (2:4) with this seed
    assert err_updated < 0.95 * err_masked


def test_wanda_plus_obs_keeps_wandas_mask_and_updates_the_survivors(tiny_lm):
    model, tok = tiny_lm
    calib = _calib(tok)
    wanda, updated = copy.deepcopy(model), copy.deepcopy(model)
    pruning.prune(wanda, "wanda", pattern="2:4", calib=calib)
    report = pruning.prune(updated, "wanda+obs", pattern="2:4", calib=calib)
    assert report.method == "wanda+obs" and report.overall == pytest.approx(0.5, abs=0.01)
    # block 0 sees the same calibration inputs under both methods: the same masks, other survivors
    first = [pruning.block_layers(pruning.decoder_blocks(m)[0]) for m in (wanda, updated)]
    for name in first[0]:
        a, b = (pruning.weight_matrix(layers[name]) for layers in first)
        assert torch.equal(a == 0, b == 0), name
        assert not torch.allclose(a, b), name
    for block in pruning.decoder_blocks(updated):
        for layer in pruning.block_layers(block).values():
            assert pruning.is_nm_sparse(pruning.weight_matrix(layer), 2, 4)


def test_magnitude_plus_obs_uses_the_per_row_magnitude_mask():
    W, X = _layer_problem(2)
    update = pruning.fixed_mask_then_update(pruning.magnitude_scores)
    out = update(W, X.t() @ X, 0.5, None)
    assert torch.equal(out != 0, pruning.row_mask(W.abs(), 0.5))


@pytest.mark.parametrize("call, error, message", [
    (lambda: pruning.sparsegpt_prune(torch.rand(2, 8), torch.eye(8), 0.5, keep=torch.ones(2, 4, dtype=torch.bool)),
     ValueError, r"keep must have the weight's shape \[2, 8\], got \[2, 4\]"),
    (lambda: pruning.sparsegpt_prune(torch.rand(2, 8), torch.eye(8), 0.5, keep=torch.ones(2, 8)),
     TypeError, "keep must be a bool tensor, got dtype torch.float32"),
    (lambda: pruning.sparsegpt_prune(torch.rand(2, 8), torch.eye(8), 0.5, keep=[True]), TypeError,
     "keep must be a torch.Tensor"),
    (lambda: pruning.fixed_mask_then_update(3), TypeError, "score must be a function, got int"),
    (lambda: pruning.fixed_mask_then_update(pruning.wanda_scores)(torch.rand(2, 8), torch.ones(8), 0.5, None),
     ValueError, "hessian must be a 2-D tensor"),
    (lambda: pruning.plant_outlier_channels(nn.Linear(2, 2), which="middle"), ValueError,
     r"which must be one of \('most', 'least'\), got 'middle'"),
])
def test_bad_inputs_of_the_ablation(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_planting_on_the_least_important_channels(small_tokenizer):
    from companion.zoo import LMRecipe, build_lm

    torch.manual_seed(0)
    model = build_lm(LMRecipe(architecture="llama", hidden=32, layers=2, heads=2, intermediate=64),
                     len(small_tokenizer), {}).eval()
    with torch.no_grad():
        for block in pruning.decoder_blocks(model):
            block.input_layernorm.weight.uniform_(0.5, 1.5)
    calib = _calib(small_tokenizer, n=4, length=16)
    most, least = copy.deepcopy(model), copy.deepcopy(model)
    picked_most = pruning.plant_outlier_channels(most, channels=3, alpha=20.0)
    picked_least = pruning.plant_outlier_channels(least, channels=3, alpha=20.0, which="least")
    block = pruning.decoder_blocks(model)[0]
    linears = [block.get_submodule(n) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    importance = block.input_layernorm.weight.abs() * sum(l.weight.norm(dim=0) for l in linears)
    assert picked_least[0] == sorted(importance.argsort()[:3].tolist())
    assert picked_most[0] == sorted(importance.argsort()[-3:].tolist())
    with torch.no_grad():
        assert torch.allclose(model(input_ids=calib).logits, least(input_ids=calib).logits, atol=1e-4)


# --------------------------------------------------------------------------- review s10: diagonal saliency, padding


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_diagonal_saliency_is_sparsegpt_when_the_hessian_is_diagonal(nm):
    """Undamped, a diagonal H has a Cholesky factor of H^-1 with squared diagonal 1 / H_jj, so OBS's
    w^2 / [H^-1]_jj^2 is w^2 H_jj: both saliencies agree, and nothing is updated (no correlations)."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, 16, generator=g, dtype=torch.float64)
    H = torch.diag(torch.rand(16, generator=g, dtype=torch.float64) + 0.1)
    diag = pruning.sparsegpt_prune(W, H, 0.5, nm=nm, percdamp=0.0, saliency="diagonal")
    obs = pruning.sparsegpt_prune(W, H, 0.5, nm=nm, percdamp=0.0)
    assert torch.equal(diag == 0, obs == 0)
    assert torch.allclose(diag, obs) and torch.allclose(diag[diag != 0], W[diag != 0])


def test_diagonal_saliency_thresholds_wanda_scores_over_the_whole_block():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(200, 16, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2, 16, dtype=torch.float64)
    W = torch.randn(8, 16, generator=g, dtype=torch.float64)
    H = X.t() @ X  # correlated inputs: the update changes the survivors
    pruned = pruning.sparsegpt_prune(W, H, 0.5, blocksize=16, saliency="diagonal")  # one block: mask chosen first
    scores = pruning.wanda_scores(W, (X**2).sum(0)) ** 2
    threshold = scores.flatten().sort().values[int(scores.numel() * 0.5)]
    assert torch.equal(pruned == 0, scores <= threshold)  # one threshold over all rows, as SparseGPT's own
    assert not torch.allclose(pruned[pruned != 0], W[pruned != 0])  # and the OBS update ran
    rows = (pruned == 0).sum(1)
    assert rows.min() != rows.max()  # rows lose different numbers of weights, unlike Wanda's per-row mask


def test_sparsegpt_diag_method_prunes_like_the_function(tiny_lm):
    model, tok = tiny_lm
    calib = _calib(tok)
    net = copy.deepcopy(model)
    layer = next(iter(pruning.block_layers(pruning.decoder_blocks(net)[0]).values()))
    W = pruning.weight_matrix(layer).detach().clone()
    captured = []
    handle = layer.register_forward_hook(lambda m, a, o: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for row in calib:
            net(input_ids=row.unsqueeze(0))
    handle.remove()
    X = torch.cat(captured)
    expected = pruning.sparsegpt_prune(W, 2 * X.t() @ X / len(X), 0.5, saliency="diagonal")
    pruning.prune(net, "sparsegpt-diag", 0.5, calib=calib)
    assert torch.allclose(pruning.weight_matrix(layer), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_padding_is_left_out_of_the_statistics(tiny_lm, method):
    """Pads at the end of each window, left out, give exactly the statistics of the windows without them."""
    model, tok = tiny_lm
    calib = _calib(tok, n=4, length=24)
    pad = 3
    calib = calib.masked_fill(calib == pad, 11)
    padded = torch.cat([calib, torch.full((4, 8), pad)], dim=1)
    short, masked, unmasked = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    pruning.prune(short, method, pattern="2:4", calib=calib)
    pruning.prune(masked, method, pattern="2:4", calib=padded, pad_token_id=pad)
    pruning.prune(unmasked, method, pattern="2:4", calib=padded)
    for a, b in zip(short.parameters(), masked.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(short.parameters(), unmasked.parameters()))
    norms = pruning.input_feature_norms(model, padded, pad_token_id=pad)
    for key, value in pruning.input_feature_norms(model, calib).items():
        assert torch.allclose(norms[key], value, atol=1e-5)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, c: pruning.prune(m, "wanda", calib=c, pad_token_id=-1), ValueError, "pad_token_id"),
    (lambda m, c: pruning.prune(m, "wanda", calib=c, pad_token_id="pad"), TypeError, "pad_token_id"),
    (lambda m, c: pruning.prune(m, "sparsegpt", calib=torch.full((2, 8), 2), pad_token_id=2), ValueError,
     "only pad_token_id=2"),
    (lambda m, c: pruning.input_feature_norms(m, torch.full((2, 8), 2), pad_token_id=2), ValueError,
     "only pad_token_id=2"),
    (lambda m, c: pruning.sparsegpt_prune(torch.rand(2, 8), torch.eye(8), 0.5, saliency="wanda"), ValueError,
     "saliency must be one of"),
])
def test_bad_inputs_review_s10(tiny_lm, call, error, message):
    model, tok = tiny_lm
    with pytest.raises(error, match=message):
        call(copy.deepcopy(model), _calib(tok))


@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_random_prune_is_a_seeded_control_on_both_architectures(tiny_lm, pattern):
    model, _ = tiny_lm
    first, again, other = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    report = pruning.random_prune(first, 0.5, pattern, seed=0)
    pruning.random_prune(again, 0.5, pattern, seed=0)
    pruning.random_prune(other, 0.5, pattern, seed=1)
    assert report.method == "random" and report.nsamples == 0
    assert report.overall == pytest.approx(0.5, abs=0.02)
    masks = []
    for net in (first, again, other):
        layers = [l for b in pruning.decoder_blocks(net) for l in pruning.block_layers(b).values()]
        masks.append([pruning.weight_matrix(l) != 0 for l in layers])
    for before, layer_mask, weight in zip(
            [l for b in pruning.decoder_blocks(model) for l in pruning.block_layers(b).values()],
            masks[0], [l for b in pruning.decoder_blocks(first) for l in pruning.block_layers(b).values()]):
        W = pruning.weight_matrix(weight)
        assert torch.equal(W[layer_mask], pruning.weight_matrix(before)[layer_mask])  # survivors unchanged
        if pattern:
            assert pruning.is_nm_sparse(W, *pruning.parse_pattern(pattern))
        else:
            assert ((~layer_mask).sum(1) == int(0.5 * W.shape[1])).all()  # per output row
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1]))  # the seed fixes the masks
    assert not all(torch.equal(a, b) for a, b in zip(masks[0], masks[2]))
    same_shape = [m for m in masks[0] if m.shape == masks[0][0].shape]
    assert len(same_shape) < 2 or not torch.equal(same_shape[0], same_shape[1])  # a mask per layer
    # the mask does not look at the weights: it is uncorrelated with |W|
    W = torch.cat([pruning.weight_matrix(l).flatten() for b in pruning.decoder_blocks(model)
                   for l in pruning.block_layers(b).values()]).abs()
    kept = torch.cat([m.flatten() for m in masks[0]])
    assert abs(W[kept].mean() - W[~kept].mean()) < 0.1 * W.mean()


@pytest.mark.parametrize("call, error, message", [
    (lambda m: pruning.random_prune(m, 1.0), ValueError, "sparsity must be in"),
    (lambda m: pruning.random_prune(m, pattern="2-4"), ValueError, "look like 'N:M'"),
    (lambda m: pruning.random_prune(m, pattern="3:7"), ValueError, "not divisible by M=7"),
    (lambda m: pruning.random_prune(m, seed=-1), ValueError, "seed"),
    (lambda m: pruning.random_prune(m, seed=0.5), TypeError, "seed"),
    (lambda m: pruning.random_prune("model"), TypeError, "model must be a torch.nn.Module"),
])
def test_bad_inputs_of_random_prune(tiny_lm, call, error, message):
    with pytest.raises(error, match=message):
        call(copy.deepcopy(tiny_lm[0]))


@pytest.mark.parametrize("pattern", ["2:4", None])  # None: row top-k, SparseGPT's global sort
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_batches_do_not_change_the_result(tiny_lm, method, pattern, monkeypatch):
    """Calibration rows run through the model in batches (CALIB_BATCH); where the batches split the
    rows, and padding left out within a batch, change nothing beyond float rounding."""
    model, tok = tiny_lm
    calib = _calib(tok, n=7, length=24)
    calib[:, -5:] = 3  # padding at the end of every window
    calib[2, -9:] = 3
    results = []
    for batch in (32, 3, 1):
        monkeypatch.setattr(pruning, "CALIB_BATCH", batch)
        net = copy.deepcopy(model)
        pruning.prune(net, method, pattern=pattern, calib=calib, pad_token_id=3)
        norms = pruning.input_feature_norms(model, calib, pad_token_id=3)
        results.append(([p.detach().clone() for p in net.parameters()], norms))
    for params, norms in results[1:]:
        for a, b in zip(results[0][0], params):
            assert torch.allclose(a, b, atol=1e-5)
        for key, value in results[0][1].items():
            assert torch.allclose(norms[key], value, atol=1e-5)


def test_padding_before_a_real_token_is_rejected(tiny_lm):
    """Only tail padding is exact without an attention mask: left padding is refused."""
    model, tok = tiny_lm
    calib = _calib(tok, n=3, length=16)
    calib[1, :4] = 3  # left padding in one row
    for call in (lambda net: pruning.prune(net, "wanda", 0.5, calib=calib, pad_token_id=3),
                 lambda net: pruning.input_feature_norms(net, calib, pad_token_id=3)):
        with pytest.raises(ValueError, match="before a real token"):
            call(copy.deepcopy(model))

"""Chapter 10: the shapes world, the projectors, the LLaVA-style VLM and its training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from companion import vlm


@pytest.fixture(scope="module")
def world():
    return vlm.make_shapes_dataset(40, seed=5)


@pytest.fixture(scope="module")
def tok():
    return vlm.shapes_tokenizer()


# ----- the world -----------------------------------------------------------------------------


def test_world_is_seeded_and_answers_match_the_scenes(world):
    again = vlm.make_shapes_dataset(40, seed=5)
    assert np.array_equal(world.images, again.images) and world.questions == again.questions
    assert not np.array_equal(world.images, vlm.make_shapes_dataset(40, seed=6).images)
    for q in world.questions:
        objects = world.scenes[q.scene]
        if q.kind == "count":
            assert q.answer == vlm.COUNT_WORDS[len(objects) - 1]
        elif q.kind == "colour":
            assert [o.colour for o in objects if o.shape in q.text.split()] == [q.answer]
        elif q.kind == "shape":
            assert [o.shape for o in objects if o.colour in q.text.split()] == [q.answer]
        elif q.kind == "column":
            (obj,) = [o for o in objects if f"{o.colour} {o.shape}" in q.text]
            assert q.answer == str(obj.col + 1)
        else:
            words = q.text.split()
            a = next(o for o in objects if o.colour == words[2])
            b = next(o for o in objects if o.colour == words[-2])
            assert a.col != b.col and q.answer == ("yes" if a.col < b.col else "no")
    # the cell labels agree with the scenes, and each object was drawn in its own cell
    for i, objects in enumerate(world.scenes):
        assert int((world.cells[i] > 0).sum()) == len(objects)
        for o in objects:
            patch = world.images[i, o.row * 8:(o.row + 1) * 8, o.col * 8:(o.col + 1) * 8]
            assert patch.max() > 100
    assert {q.kind for q in world.questions} == set(vlm.QUESTION_TYPES)


def test_splits_are_disjoint_worlds():
    s = vlm.shapes_splits(30, 10, 10, seed=1)
    assert len(s.train) == 30 and len(s.test) == 10
    assert not any(np.array_equal(a, b) for a in s.test.images for b in s.train.images)


def test_tokenizer_round_trips_every_question(world, tok):
    unk = tok.unk_token_id
    for q in world.questions[:50]:
        ids = tok(q.text, add_special_tokens=False)["input_ids"]
        assert unk not in ids and tok.convert_tokens_to_ids(q.answer) != unk
    assert vlm.IMAGE_TOKEN in tok.get_vocab()


# ----- projectors ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [("mlp", 64), ("pool", 16), ("ldp", 16), ("ldpv2", 16), ("query", 16)])
def test_output_token_counts(name, expected):
    projector = vlm.make_projector(name, 12, 16)
    out = projector(torch.randn(3, 64, 12))
    assert out.shape == (3, expected, 16) and projector.out_tokens(64) == expected


def test_grid_errors_name_both_numbers():
    with pytest.raises(ValueError, match=r"grid side \(5, from 25 patches\).*pooling factor \(2\)"):
        vlm.LDPv2(8, 8)(torch.randn(1, 25, 8))
    with pytest.raises(ValueError, match="square number"):
        vlm.PoolProjector(8, 8).out_tokens(30)
    with pytest.raises(ValueError, match="8 channels"):
        vlm.MLPProjector(8, 8)(torch.randn(1, 4, 6))


def test_peg_is_a_residual_depthwise_conv():
    peg = vlm.LDPv2(6, 10).peg
    conv = peg.conv
    assert conv.groups == conv.in_channels == conv.out_channels == 10 and conv.kernel_size == (3, 3)
    assert conv.padding == (1, 1) and conv.bias is not None
    x = torch.randn(2, 10, 4, 4)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
    assert torch.equal(peg(x), x)  # a zero conv leaves the residual: identity
    with torch.no_grad():
        conv.weight.normal_()
    y = peg(x)
    # depthwise: channel c of the output depends on channel c of the input only
    x2 = x.clone()
    x2[:, 3] += 1.0
    changed = (peg(x2) - y).abs().sum(dim=(0, 2, 3)) > 0
    assert changed.tolist() == [c == 3 for c in range(10)]


def test_peg_makes_pooled_tokens_position_aware():
    """Identical tokens everywhere: pooling keeps them identical, PEG's zero-padded conv does not."""
    x = torch.ones(1, 64, 4)
    pool, ldpv2 = vlm.PoolProjector(4, 8), vlm.LDPv2(4, 8)
    ldpv2.mlp.load_state_dict(pool.mlp.state_dict())
    with torch.no_grad():
        pooled, injected = pool(x)[0], ldpv2(x)[0]
    assert torch.allclose(pooled, pooled[:1].expand_as(pooled))
    assert not torch.allclose(injected[0], injected[5])  # a corner token differs from an inner one


@pytest.mark.parametrize("dv,dt", [(12, 16), (64, 64), (1024, 2048)])
def test_parameter_counts_match_formulas(dv, dt):
    mlp = dv * dt + dt + dt * dt + dt
    assert vlm.parameter_count(vlm.MLPProjector(dv, dt)) == mlp
    assert vlm.parameter_count(vlm.PoolProjector(dv, dt)) == mlp
    assert vlm.parameter_count(vlm.LDPv2(dv, dt)) == mlp + 9 * dt + dt
    se = max(8, int(dt / 4 + 4) // 8 * 8)
    block = 9 * dt + 2 * 2 * dt + (dt * se + se) + (se * dt + dt) + dt * dt
    assert vlm.parameter_count(vlm.LDP(dv, dt)) == mlp + 2 * block
    q = vlm.QueryProjector(dv, dt, n_queries=16)
    attention = 3 * dt * dt + 3 * dt + dt * dt + dt
    ffn = dt * 2 * dt + 2 * dt + 2 * dt * dt + dt
    assert vlm.parameter_count(q) == dv * dt + dt + 16 * dt + 3 * 2 * dt + attention + ffn


def test_mobilevlm_scale_parameter_counts():
    """MobileLLaMA-1.4B's sizes (d_v 1024, d_t 2048): LDPv2 ~6.3M, of which PEG ~20K; LDP ~18.9M."""
    ldpv2, ldp = vlm.parameter_count(vlm.LDPv2(1024, 2048)), vlm.parameter_count(vlm.LDP(1024, 2048))
    assert 6.2e6 < ldpv2 < 6.4e6 and 18.5e6 < ldp < 19.5e6


def test_flops_match_formulas():
    n, dv, dt = 64, 12, 16
    mlp = 2 * n * (dv * dt + dt * dt)
    assert vlm.projector_flops(vlm.MLPProjector(dv, dt), n) == mlp
    assert vlm.projector_flops(vlm.PoolProjector(dv, dt), n) == mlp
    assert vlm.projector_flops(vlm.LDPv2(dv, dt), n) == mlp + 2 * (n // 4) * 9 * dt


# ----- the VLM ------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_merged_sequence_puts_features_at_the_image_tokens(world, tok, architecture):
    torch.manual_seed(0)
    model = vlm.build_tiny_vlm("ldpv2", tok, text=vlm.TextConfig(architecture, hidden=32, layers=1, heads=2,
                                                                intermediate=64))
    assert vlm.count_visual_tokens(model) == 16 == model.config.image_seq_length
    questions = [world.questions[i].text for i in (0, 1, 7)]
    pixels = world.pixels([world.questions[i].scene for i in (0, 1, 7)])
    ids, mask, last = vlm.vlm_inputs(model, tok, questions)
    assert ((ids == model.config.image_token_id).sum(1) == 16).all()
    seen = {}
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        projected = model.model.multi_modal_projector(vlm.vision_features(model, pixels))
        text = model.get_input_embeddings()(ids)
        where = ids == model.config.image_token_id
        assert torch.equal(seen["embeds"][where], projected.reshape(-1, projected.shape[-1]))
        assert torch.equal(seen["embeds"][~where], text[~where])
        ours = vlm.merged_logits(model, vlm.vision_features(model, pixels), ids, mask)
    assert torch.allclose(logits, ours, atol=1e-5)
    assert (last == mask.sum(1) - 1).all() and len(vlm.answer(model, tok, pixels, questions)) == 3


def test_image_token_count_mismatch_names_both_numbers(world, tok):
    model = vlm.build_tiny_vlm("pool", tok, text=vlm.TextConfig(hidden=32, layers=1, heads=2, intermediate=64))
    with pytest.raises(ValueError, match=r"n_image_tokens \(64\).*16 visual tokens"):
        vlm.vlm_inputs(model, tok, ["how many objects are there"], n_image_tokens=64)
    ids, mask, _ = vlm.vlm_inputs(vlm.build_tiny_vlm("mlp", tok), tok, ["how many objects are there"])
    with pytest.raises(ValueError, match=r"hold 64 image tokens but the projector output 16"):
        vlm.merged_logits(model, torch.randn(1, 64, 64), ids, mask)


def test_count_on_a_stock_llava_projector(tok):
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model = vlm.build_tiny_vlm("mlp", tok)
    model.model.multi_modal_projector = LlavaMultiModalProjector(model.config)
    assert vlm.count_visual_tokens(model) == 64


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_training_lowers_the_loss_and_freezes_what_it_should(world, tok, architecture):
    torch.manual_seed(0)
    model = vlm.build_tiny_vlm("ldpv2", tok, text=vlm.TextConfig(architecture, hidden=32, layers=1, heads=2,
                                                                intermediate=64))
    tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    lm = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    losses = vlm.train_vlm(model, world, tok, steps=30, batch_size=16, lr=3e-3, train=("projector",))
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in tower.items())
    assert all(torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in lm.items())
    losses2 = vlm.train_vlm(model, world, tok, steps=30, batch_size=16, lr=3e-3)
    assert np.mean(losses2[-5:]) < np.mean(losses[:5])
    assert not all(torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in lm.items())
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in tower.items())
    assert all(p.requires_grad for p in model.parameters())


def test_equal_budget_means_the_same_questions(world, tok, monkeypatch):
    """Two projectors trained with one seed see the same batches: the comparison is at an equal budget."""
    drawn = []
    original = vlm.training_batch

    def spy(model, tokenizer, dataset, scenes, generator):
        ids, mask, labels = original(model, tokenizer, dataset, scenes, generator)
        n = vlm.count_visual_tokens(model)
        drawn.append((tuple(scenes), ids[:, 1 + n:].tolist(), labels[:, 1 + n:].tolist()))
        return ids, mask, labels

    monkeypatch.setattr(vlm, "training_batch", spy)
    small = vlm.TextConfig(hidden=32, layers=1, heads=2, intermediate=64)
    for name in ("mlp", "query"):
        vlm.train_vlm(vlm.build_tiny_vlm(name, tok, text=small), world, tok, steps=3, batch_size=4)
    assert drawn[:3] == drawn[3:]


def test_training_rows_hold_every_question_and_answer(world, tok):
    model = vlm.build_tiny_vlm("pool", tok, text=vlm.TextConfig(hidden=32, layers=1, heads=2, intermediate=64))
    ids, mask, labels = vlm.training_batch(model, tok, world, [0, 3], torch.Generator().manual_seed(0))
    for row, scene in enumerate([0, 3]):
        answers = [q.answer for q in world.questions if q.scene == scene]
        got = tok.convert_ids_to_tokens(labels[row][labels[row] != -100].tolist())
        assert sorted(got) == sorted(answers)
        assert int((ids[row] == model.config.image_token_id).sum()) == 16
        assert (labels[row][mask[row] == 0] == -100).all()


def test_joint_training_shares_one_lm_and_equal_batches(world, tok):
    small = vlm.TextConfig(hidden=32, layers=1, heads=2, intermediate=64)
    models = {}
    for name in ("mlp", "ldpv2"):
        torch.manual_seed(0)
        models[name] = vlm.build_tiny_vlm(name, tok, text=small)
    before = {n: {k: v.clone() for k, v in m.model.multi_modal_projector.state_dict().items()}
              for n, m in models.items()}
    tower = {k: v.clone() for k, v in models["ldpv2"].model.vision_tower.state_dict().items()}
    losses = vlm.train_vlms_jointly(models, world, tok, steps=20, batch_size=8)
    assert set(losses) == {"mlp", "ldpv2"} and all(len(v) == 20 for v in losses.values())
    a, b = models["mlp"].model.language_model, models["ldpv2"].model.language_model
    assert a is not b  # each model owns its copy afterwards ...
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # ... equal
    for n, m in models.items():
        after = m.model.multi_modal_projector.state_dict()
        assert not all(torch.equal(v, after[k]) for k, v in before[n].items())
    assert all(torch.equal(v, models["ldpv2"].model.vision_tower.state_dict()[k]) for k, v in tower.items())
    assert np.mean(losses["ldpv2"][-5:]) < np.mean(losses["ldpv2"][:5])


def test_vision_pretraining_and_accuracy(world):
    model, losses = vlm.pretrain_vision_encoder(world, steps=5, batch_size=8)
    correct, total = vlm.cell_accuracy(model, world)
    assert total == 40 * 64 and 0 <= correct <= total and len(losses) == 5
    assert vlm.patch_labels(world.cells, 8).shape == (40, 64)


def test_prefill_cost_grows_with_visual_tokens(tok):
    model = vlm.build_tiny_vlm("mlp", tok)
    flops = [vlm.prefill_flops(model, n) for n in (16, 64, 256)]
    assert flops[0] < flops[1] < flops[2]
    assert vlm.prefill_latency(model, 16, repeats=2) > 0


def test_chance_and_evaluation(world, tok):
    assert 0.25 <= vlm.chance_accuracy(world, "column") <= 1
    model = vlm.build_tiny_vlm("pool", tok, text=vlm.TextConfig(hidden=32, layers=1, heads=2, intermediate=64))
    result = vlm.evaluate_vlm(model, tok, world, per_type=5)
    assert set(result) == set(vlm.QUESTION_TYPES) and all(n == 5 for _, n in result.values())


def test_zoo_recipes_round_trip(tmp_path, monkeypatch):
    from companion import zoo

    monkeypatch.setenv("COMPANION_CACHE", str(tmp_path))
    data = vlm.ShapesData(n_train=24, n_val=4, n_test=4)
    zoo.register("test-shapes-vit", vlm.VisionRecipe(data=data, steps=2, batch_size=4))
    small = vlm.TextConfig(hidden=32, layers=1, heads=2, intermediate=64)
    zoo.register("test-shapes-vlm", vlm.VLMBundleRecipe(projectors=("mlp", "ldpv2"), text=small, steps=2,
                                                        batch_size=4, encoder="test-shapes-vit"))
    bundle = zoo.load("test-shapes-vlm")
    assert set(bundle.model) == {"mlp", "ldpv2"} and set(bundle.card["losses_per_projector"]) == {"mlp", "ldpv2"}
    again = zoo.load("test-shapes-vlm")
    for name in ("mlp", "ldpv2"):
        for (k, a), b in zip(bundle.model[name].state_dict().items(), again.model[name].state_dict().values()):
            assert torch.equal(a, b), k
    encoder = zoo.load("test-shapes-vit").model
    assert all(torch.equal(v, bundle.model["mlp"].model.vision_tower.state_dict()[k])
               for k, v in encoder.tower.state_dict().items())


def test_bad_arguments():
    with pytest.raises(ValueError, match="projector"):
        vlm.build_tiny_vlm("resnet")
    with pytest.raises(TypeError, match="dataset"):
        vlm.train_vlm(vlm.build_tiny_vlm("mlp"), [1, 2], vlm.shapes_tokenizer())
    with pytest.raises(TypeError, match="model"):
        vlm.count_visual_tokens(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_objects"):
        vlm.make_shapes_dataset(3, max_objects=9)


# ----- review items: LDP block structure, attention FLOPs, probe controls ---------------------


def test_ldp_block_structure():
    ldp = vlm.LDP(8, 16)
    one, two = ldp.block_1, ldp.block_2
    assert one.stride == 1 and two.stride == 2
    for block in (one, two):
        dw = block.depthwise
        assert dw.groups == dw.in_channels == 16 and dw.kernel_size == (3, 3) and dw.bias is None
        assert block.pointwise.kernel_size == (1, 1) and block.pointwise.groups == 1
        assert [name for name, _ in block.named_children()] == [
            "depthwise", "norm_1", "se", "pointwise", "norm_2"]
    x = torch.randn(2, 16, 4, 4)
    # block 1 is residual: zeroing its last norm's affine output leaves the identity
    with torch.no_grad():
        one.norm_2.norm.weight.zero_()
        one.norm_2.norm.bias.zero_()
    assert torch.allclose(one(x), x)
    assert two(x).shape == (2, 16, 2, 2)  # stride 2, no residual (shapes differ)
    # the order depthwise -> norm -> hardswish -> SE (hardsigmoid gate) -> pointwise -> norm
    with torch.no_grad():
        expected = two.norm_2(two.pointwise(two.se(torch.nn.functional.hardswish(
            two.norm_1(two.depthwise(x))))))
    assert torch.allclose(two(x), expected)
    se = vlm.SqueezeExcite(40)
    assert se.reduce.out_channels == 16  # torchvision's _make_divisible(10, 8)
    assert vlm.SqueezeExcite(64).reduce.out_channels == 16


@pytest.mark.parametrize("text", [vlm.TextConfig(), vlm.TextConfig(architecture="gpt2", hidden=32, layers=1,
                                                                    heads=2, intermediate=64)])
def test_prefill_flops_include_attention(tok, text):
    model = vlm.build_tiny_vlm("mlp", tok, text=text)
    n_vis, n_text = 54, 10
    t = n_vis + n_text
    lm = model.model.language_model
    linear = sum(m.weight.numel() for m in lm.modules()
                 if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
    head = model.get_output_embeddings().weight.numel()
    attention = 4 * text.layers * t * t * text.hidden
    assert vlm.attention_flops(model, t) == attention
    assert vlm.prefill_flops(model, n_vis, n_text) == 2 * linear * t + 2 * head + attention


def test_grid_apply_and_probe_controls(world, tok):
    f = torch.randn(2, 64, 8)
    pooled = vlm.grid_apply(f, lambda m: torch.nn.functional.avg_pool2d(m, 2))
    assert pooled.shape == (2, 16, 8)
    assert torch.allclose(pooled[0, 0], f[0, [0, 1, 8, 9]].mean(0))
    model = vlm.build_tiny_vlm("pool", tok, text=vlm.TextConfig(hidden=32, layers=1, heads=2, intermediate=64))
    k, n = vlm.position_probe(model, world, world, n_scenes=10,
                              projector=lambda x: vlm.grid_apply(x, lambda m: torch.nn.functional.avg_pool2d(m, 2)))
    assert n == 10 * 16 and 0 <= k <= n
    k, n = vlm.position_probe(model, world, world, n_scenes=10)
    assert n == 10 * 16
    per_scene = vlm.position_probe(model, world, world, n_scenes=10, by_scene=True)
    assert per_scene.shape == (10,) and int(per_scene.sum()) == k and per_scene.max() <= 16
    with pytest.raises(TypeError, match="by_scene"):
        vlm.position_probe(model, world, world, n_scenes=10, by_scene="yes")
    with pytest.raises(TypeError, match="projector"):
        vlm.position_probe(model, world, world, n_scenes=10, projector=3)
    with pytest.raises(TypeError, match="fn"):
        vlm.grid_apply(f, 3)
    assert vlm.token_columns(16, 4).tolist() == [0, 1, 2, 3] * 4
    a_only, b_only, p = vlm.paired_comparison([True, True, False], [False, True, False])
    assert (a_only, b_only) == (1, 0) and 0 < p <= 1


def test_build_tiny_vlm_takes_a_projector_module_and_counts_its_tokens():
    for factor, tokens in ((1, 64), (4, 4), (8, 1)):
        model = vlm.build_tiny_vlm(vlm.PoolProjector(64, 64, factor=factor))
        assert vlm.count_visual_tokens(model) == model.config.image_seq_length == tokens
        assert model.model.multi_modal_projector.factor == factor
    with pytest.raises(ValueError, match=r"d_vision=64 to d_text=64.*got d_vision=32, d_text=64"):
        vlm.build_tiny_vlm(vlm.PoolProjector(32, 64))
    with pytest.raises(TypeError, match="projector must be a name from vlm.PROJECTORS"):
        vlm.build_tiny_vlm(torch.nn.Linear(64, 64))

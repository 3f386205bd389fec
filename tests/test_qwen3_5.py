"""Qwen3.5: Qwen2-VL's contract on a hybrid decoder, whose linear-attention layers after a cut run, and cache their
convolution and recurrent states, over the kept tokens only; decoder stages score at full-attention layers only."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import DynamicCache

import star
from families import (
    IMAGE_TOKEN, assert_batch_equals_each_alone, forward_kept, full_embeds, greedy_by_recompute, kept_of, layout_of,
    qwen_inputs, select_rows,
)
from star import compat, flops
from star.scoring import top_k_in_order

pytestmark = pytest.mark.skipif(compat.QWEN3_5_MISSING is not None, reason=str(compat.QWEN3_5_MISSING))

SMALL, LARGE, TINY = (4, 6), (8, 8), (4, 4)  # patch grids: 6, 16 and 4 tokens after the 2 x 2 merge
FULL = (3, 7)  # the tiny decoder's full-attention layers; the other six are linear attention
# Cuts at each full-attention layer, scored there or one layer before the cut (FastV, DART, SparseVLM), and two at once.
CUTS = [
    ("star", {}), ("star", {"layer": 7}), ("fastv", {}), ("dart", {}), ("pdrop", {"layers": (3, 7)}),
    ("sparsevlm", {"layers": (3,), "recycle_ratio": 0.0}), ("random", {}), ("cdpruner", {}),
]


def tiny(attn: str = "sdpa"):
    from families import tiny_qwen3_5

    return tiny_qwen3_5(attn=attn)


@pytest.fixture(scope="module")
def model():
    return tiny()


def _patches(inputs: dict) -> list[int]:
    return inputs["image_grid_thw"].prod(dim=-1).tolist()


@torch.no_grad()
@pytest.mark.parametrize("method", star.methods())
def test_full_budget_equals_unpatched_model_and_remove_restores_it(model, method):
    inputs = qwen_inputs([[SMALL, LARGE], [TINY]], [(3, 6), (1, 2)])
    before = model(**inputs).logits
    options = {"stage1_ratio": 0.0} if method == "star" else {}
    with star.apply(model, method=method, keep=1.0, **options):
        pruned = model(**inputs).logits
    after = model(**inputs).logits
    assert (pruned - before).abs().max() < 1e-5
    assert torch.equal(after, before)
    assert not model._forward_pre_hooks and not any(l._forward_pre_hooks for l in model.model.language_model.layers)


@torch.no_grad()
def test_the_reference_runs_the_linear_layers_over_the_kept_tokens_only(model):
    """The reference is the model's own layers on only the kept tokens: it equals the full model on all of them,
    and a cut that the linear layers after it did not see (their states built over every token) is another model."""
    inputs = qwen_inputs([[LARGE]], [(3, 6)], seed=1)
    ids, embeds, positions, fixed = full_embeds(model, inputs, 0, [0])
    every, some = torch.arange(16), torch.tensor([0, 5, 9])
    full = model(**inputs).logits[0, -1]
    assert (forward_kept(model, ids, embeds, positions, fixed, [every], []) - full).abs().max() < 1e-5
    cut_at_3 = forward_kept(model, ids, embeds, positions, fixed, [every, some], [3])
    cut_at_7 = forward_kept(model, ids, embeds, positions, fixed, [every, some], [7])
    assert (cut_at_3 - cut_at_7).abs().max() > 1e-3  # layers 3 to 6 (three of them linear) see the cut


@torch.no_grad()
@pytest.mark.parametrize("method, options", CUTS)
def test_pruned_prefill_equals_forward_over_kept_tokens_linear_layers_included(model, method, options):
    inputs = qwen_inputs([[SMALL, LARGE]], [(3, 6)], seed=1)
    with star.apply(model, method=method, keep=3, **options) as pruner:
        logits = model(**inputs).logits[0, -1]
        stats = pruner.stats
    assert bool(stats.layers) == (method not in ("random", "cdpruner"))
    assert all(layer in FULL or layer - 1 in FULL for layer in stats.layers)
    ids, embeds, positions, fixed = full_embeds(model, inputs, 0, [0, 1])
    expected = forward_kept(model, ids, embeds, positions, fixed, kept_of(stats, 0), stats.layers)
    assert (logits - expected).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("method, options", [("star", {}), ("fastv", {}), ("pdrop", {"layers": (3, 7)}), ("dart", {})])
def test_cached_generation_equals_recomputation(model, method, options):
    """Decode continues from the linear layers' convolution and recurrent states of the kept tokens alone."""
    inputs = qwen_inputs([[LARGE]], [(5, 4)], seed=2)
    with star.apply(model, method=method, keep=4, **options) as pruner:
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        stats = pruner.stats
    ids, embeds, positions, fixed = full_embeds(model, inputs, 0, [0])
    expected = greedy_by_recompute(model, ids, embeds, positions, fixed, kept_of(stats, 0), stats.layers, steps=8)
    assert out[0, -8:].tolist() == expected


@torch.no_grad()
@pytest.mark.parametrize("layer", FULL)
def test_decode_steps_without_generate_continue_after_the_entry_frame(model, layer):
    """Called by hand, the model gets no positions at decode: the pruner places the new tokens after the entry
    frame's, though the cache reports the length of its first full-attention layer, which a cut at 3 shortens."""
    inputs = qwen_inputs([[LARGE]], [(2, 3)], seed=3)
    with star.apply(model, method="star", keep=2, layer=layer) as pruner:
        cache = DynamicCache(config=model.config.get_text_config())
        logits = model(**inputs, **compat.cache_kwargs(cache)).logits[0, -1]
        steps, mask = [logits], inputs["attention_mask"]
        for token in [5, 17, 42]:
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            steps.append(model(input_ids=torch.tensor([[token]]), attention_mask=mask, **compat.cache_kwargs(cache)).logits[0, -1])
        stats = pruner.stats
    assert stats.layers == [layer] and stats.sequence_lengths[layer] < stats.sequence_lengths[0]
    parts = full_embeds(model, inputs, 0, [0])
    for n, logits in enumerate(steps):
        expected = forward_kept(model, *parts, kept_of(stats, 0), stats.layers, [5, 17, 42][:n])
        assert (logits - expected).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("method, keep, options", [("star", 3, {}), ("fastv", 2, {}), ("sparsevlm", 0.5, {"layers": (3,)}), ("random", 0.5, {}), ("divprune", 0.5, {})])
def test_batch_of_different_lengths_and_image_sizes_equals_each_alone(model, method, keep, options):
    grids = [[SMALL], [LARGE, TINY], [TINY]]
    inputs = qwen_inputs(grids, [(3, 6), (7, 4), (1, 9)], seed=4)
    per_row = [len(g) for g in grids]
    alone = lambda row: select_rows(inputs, [row], per_row, _patches(inputs))  # noqa: E731
    assert_batch_equals_each_alone(model, inputs, method, keep, alone, **options)


@torch.no_grad()
@pytest.mark.parametrize("layer", FULL)
def test_decoder_selection_equals_top_k_of_eager_attention(layer):
    """The eager model's own attention weights (gated queries, q/k norms, partial interleaved M-RoPE) at a
    full-attention layer; the model records those layers' weights only, in order."""
    eager, sdpa = tiny("eager"), tiny("sdpa")
    inputs = qwen_inputs([[SMALL], [LARGE]], [(3, 6), (1, 2)], seed=7)
    probs = eager(**inputs, output_attentions=True).attentions[FULL.index(layer)]
    with star.apply(sdpa, method="star", keep=3, layer=layer, stage1_ratio=0.0) as pruner:
        sdpa(**inputs)
        stage = kept_of(pruner.stats, 0)[1], kept_of(pruner.stats, 1)[1]
    for row, ids in enumerate(inputs["input_ids"]):
        image = (ids == IMAGE_TOKEN).nonzero()[:, 0]
        text = torch.arange(int(image[-1]) + 1, len(ids))
        scores = probs[row][:, text][:, :, image].mean(dim=(0, 1))
        assert torch.equal(stage[row], top_k_in_order(scores, 3))


@torch.no_grad()
def test_vision_scores_equal_eager_attention_of_the_last_block_summed_per_merged_token(monkeypatch):
    eager, sdpa = tiny("eager"), tiny("sdpa")
    inputs = qwen_inputs([[SMALL, LARGE]], [(2, 2)], seed=6)
    family = sys.modules[type(eager.model.visual).__module__]
    last = eager.model.visual.blocks[-1].attn
    recorded, original = [], family.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = original(module, *args, **kwargs)
        if module is last:
            recorded.append(weights)
        return out, weights

    monkeypatch.setattr(family, "eager_attention_forward", recording)
    eager.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    with star.apply(sdpa, method="star", keep=2) as pruner:
        encoded = pruner.adapter.encode_prompts(inputs, inputs["input_ids"], layout_of(pruner, inputs))
    assert len(recorded) == 2 and len(encoded.groups) == 2
    for group, probs in zip(encoded.groups, recorded):
        expected = probs.mean(dim=(1, 2))[0].view(-1, 4).sum(dim=-1)  # the tower keeps the natural order
        assert torch.allclose(group.view.received()[0], expected, atol=1e-6)
        assert group.residuals is None  # no DeepStack


def test_decoder_stages_sit_at_full_attention_layers(model):
    """Defaults move to the nearest full-attention layer (STAR: the one nearest half the depth); a layer asked for
    that is linear attention is refused at apply, naming the full-attention layers."""
    with star.apply(model, method="star", keep=3) as pruner:
        assert [(s.score_layer, s.layer) for s in pruner.plan.llm_stages] == [(3, 3)]
    with star.apply(model, method="fastv", keep=3) as pruner:  # FastV's K = 2 ranks with layer 1: now 3, cut at 4
        assert [(s.score_layer, s.layer) for s in pruner.plan.llm_stages] == [(3, 4)]
    for method, options in [("star", {"layer": 2}), ("fastv", {"layer": 3}), ("pdrop", {"layers": (2, 3)}), ("sparsevlm", {"layers": (1, 3)})]:
        with pytest.raises(ValueError, match="linear-attention layer .*full-attention layers are 3, 7"):
            star.apply(model, method=method, keep=3, **options)
        assert not model._forward_pre_hooks
    with pytest.raises(ValueError, match="pdrop.*distinct full-attention layers"):
        star.apply(model, method="pdrop", keep=3)  # L/4, L/2, 3L/4 of 8 layers: three stages, two full layers
    with pytest.raises(ValueError, match="positions='contiguous' is not defined"):
        star.apply(model, method="star", keep=3, positions="contiguous")


@torch.no_grad()
def test_flops_count_each_layer_type_by_its_own_formula():
    """A full-attention layer (its q projection twice as wide, for the output gate) is the paper's formula, equal to
    what PyTorch counts on the eager model; a linear-attention layer's projections and FFN are what PyTorch counts,
    plus the convolution and the recurrence (3 products with each value head's state per token), which the
    reference kernels compute in another form (chunks of 64 tokens)."""
    model = tiny("eager")
    shape = flops.DecoderShape.from_config(model.config.text_config)
    assert shape.attention_layers == FULL
    lm = model.model.language_model
    hidden = torch.randn(1, 20, 64)
    rotary = lm.rotary_emb(hidden, torch.arange(20)[None, None].expand(3, 1, -1))
    full = flops.count_flops(lambda: lm.layers[3](hidden, position_embeddings=rotary, attention_mask=None), lm.layers[3])
    assert flops.layer_flops(shape, 20, 3) == full["total"]
    linear = flops.count_flops(lambda: lm.layers[0](hidden, position_embeddings=rotary, attention_mask=None), lm.layers[0])
    matrices = sum(v for k, v in linear.items() if k.startswith(("linear_attn.in_proj", "linear_attn.out_proj", "mlp.")) and k.count(".") == 1)
    key, value = 2 * 8, 4 * 8
    own = 2 * (20 * (2 * key + value) * 4 + 3 * 20 * 4 * 8 * 8)  # convolution, recurrence
    assert flops.layer_flops(shape, 20, 0) == matrices + own
    assert flops.layer_flops(shape, 20, 0) < flops.layer_flops(shape, 20, 3)


def test_star_flops_counts_the_shipped_qwen3_5(capsys):
    from star.cli import main

    assert main(["flops", "--model", "qwen3.5-9b", "--method", "star,fastv", "--keep", "64"]) in (0, None)
    out = capsys.readouterr().out
    assert "qwen3.5-9b: 32 layers, 1024 visual" in out and "| star | 64 | 1024 / 870 / 64 |" in out
    shape = flops.DecoderShape.named("qwen3.5-9b")
    assert shape.attention_layers == tuple(range(3, 32, 4))
    assert main(["flops", "--model", "qwen3.5-9b", "--method", "star", "--keep", "64", "--option", "layer=16"]) == 2
    assert "full-attention layers are 3, 7, 11, 15, 19, 23, 27, 31" in capsys.readouterr().err


@torch.no_grad()
def test_a_static_cache_is_refused_saying_why(model):
    inputs = qwen_inputs([[LARGE]], [(5, 4)], seed=2)
    with star.apply(model, method="star", keep=4), pytest.raises(ValueError, match="StaticCache on a decoder with linear-attention layers"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    with star.apply(model, method="random", keep=4), pytest.raises(ValueError, match="attention_mask came as dict"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")

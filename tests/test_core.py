"""The pruning core against its references: the unpruned model, plain forwards over the kept tokens,
recomputation instead of the cache, single prompts instead of a batch."""

from __future__ import annotations

import pytest
import torch

import star
from conftest import N_VISUAL, batch, prompt_ids, tiny_llava
from reference import forward_kept, greedy_by_recompute, image_features

# Methods whose kept tokens are plain patches (no merged states), so a forward over them is a reference.
SELECTING = ["star", "fastv", "fastervlm", "pdrop", "random", "vispruner", "divprune", "cdpruner", "dart"]
PROMPTS = [prompt_ids(3, 6, seed=1), prompt_ids(7, 4, seed=2), prompt_ids(1, 9, seed=3)]


@torch.no_grad()
@pytest.mark.parametrize("method", star.methods())
def test_full_budget_equals_unpatched_model_and_remove_restores_it(model, method):
    inputs = batch(PROMPTS[:1])
    before = model(**inputs).logits
    options = {"stage1_ratio": 0.0} if method == "star" else {}
    with star.apply(model, method=method, keep=N_VISUAL, **options):
        pruned = model(**inputs).logits
    after = model(**inputs).logits
    assert (pruned - before).abs().max() < 1e-5
    assert torch.equal(after, before)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(l._forward_pre_hooks for l in model.model.language_model.layers)


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("method", SELECTING)
def test_pruned_prefill_equals_forward_over_kept_tokens(model, method, positions):
    prompt = PROMPTS[0]
    inputs = batch([prompt])
    features = image_features(model, inputs["pixel_values"])[0]
    with star.apply(model, method=method, keep=5, positions=positions) as pruner:
        logits = model(**inputs).logits[0, -1]
        stats = pruner.stats
    kept = [k[0] for k in stats.kept_patches]
    expected = forward_kept(model, prompt, features, kept, stats.layers, positions)
    assert stats.tokens[-1] == 5 and len(kept[-1]) == 5
    assert (logits - expected).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("method", ["star", "fastv", "pdrop", "fastervlm", "vispruner", "divprune", "cdpruner", "dart"])
def test_cached_generation_equals_recomputation(model, method, positions):
    prompt = PROMPTS[1]
    inputs = batch([prompt])
    features = image_features(model, inputs["pixel_values"])[0]
    with star.apply(model, method=method, keep=4, positions=positions) as pruner:
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        stats = pruner.stats
    kept = [k[0] for k in stats.kept_patches]
    expected = greedy_by_recompute(model, prompt, features, kept, stats.layers, positions, steps=8)
    assert out[0, len(prompt):].tolist() == expected


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("method", star.methods())
def test_batch_of_different_lengths_equals_each_prompt_alone(model, method, positions):
    inputs = batch(PROMPTS)
    with star.apply(model, method=method, keep=6, positions=positions) as pruner:
        together = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)[:, -6:]
        prefill = model(**inputs).logits[:, -1]
        batch_patches = pruner.stats.kept_patches
        for row, prompt in enumerate(PROMPTS):
            single = batch([prompt])
            single["pixel_values"] = inputs["pixel_values"][row : row + 1]
            alone = model.generate(**single, max_new_tokens=6, do_sample=False, min_new_tokens=6)[:, -6:]
            assert together[row].tolist() == alone[0].tolist()
            assert (model(**single).logits[0, -1] - prefill[row]).abs().max() < 1e-4
            for stage, patches in enumerate(pruner.stats.kept_patches):
                assert torch.equal(patches[0], batch_patches[stage][row])


@torch.no_grad()
@pytest.mark.parametrize("method", star.methods())
@pytest.mark.parametrize("keep", [1, 3, 8, 15])
def test_every_method_keeps_exactly_keep_tokens_in_order(model, method, keep):
    prompt = PROMPTS[2]
    inputs = batch([prompt])
    with star.apply(model, method=method, keep=keep) as pruner:
        logits = model(**inputs).logits
        stats = pruner.stats
    pooled = {1: 1, 3: 4, 8: 9, 15: 16}  # pool: the 4 x 4 grid reaches the squares, keep becomes the nearest
    final = N_VISUAL if method == "none" else pooled[keep] if method == "pool" else keep
    assert stats.tokens[-1] == final
    assert logits.shape[1] == len(prompt) - N_VISUAL + final
    assert stats.sequence_lengths[-1] == logits.shape[1]
    for patches in stats.kept_patches:
        assert bool((patches[:, 1:] >= patches[:, :-1]).all())
        assert bool((patches >= 0).all() and (patches < N_VISUAL).all())


@torch.no_grad()
def test_fraction_budget_and_two_models_in_one_process():
    pruned, plain = tiny_llava(seed=0), tiny_llava(seed=0)
    inputs = batch(PROMPTS[:1])
    reference = plain(**inputs).logits
    with star.apply(pruned, method="star", keep=0.25) as pruner:
        pruned(**inputs)
        assert pruner.stats.tokens[-1] == 4
        assert torch.equal(plain(**inputs).logits, reference)


@torch.no_grad()
def test_two_images_in_one_prompt(model):
    prompt = prompt_ids(2, 5, seed=4, images=2)
    inputs = batch([prompt], images=2)
    features = image_features(model, inputs["pixel_values"]).flatten(0, 1)
    with star.apply(model, method="star", keep=3) as pruner:
        logits = model(**inputs).logits[0, -1]
        stats = pruner.stats
    assert stats.kept_patches[-1].shape == (1, 6)
    kept = [k[0] for k in stats.kept_patches]
    assert (logits - forward_kept(model, prompt, features, kept, stats.layers, "original")).abs().max() < 1e-4


@torch.no_grad()
def test_sampling_and_text_only_prompts_pass_through(model):
    inputs = batch(PROMPTS[:2])
    with star.apply(model, method="star", keep=4):
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=5)
        text = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
        pruned_text = model(**text).logits
    assert sampled.shape == (2, inputs["input_ids"].shape[1] + 5)
    assert torch.equal(pruned_text, model(**text).logits)


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_eager_attention_batch_and_oracle(positions):
    model = tiny_llava(attn="eager")
    inputs = batch(PROMPTS)
    features = image_features(model, inputs["pixel_values"])
    with star.apply(model, method="star", keep=5, positions=positions) as pruner:
        together = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)[:, -5:]
        stats = pruner.stats
        for row, prompt in enumerate(PROMPTS):
            kept = [k[row] for k in stats.kept_patches]
            expected = greedy_by_recompute(model, prompt, features[row], kept, stats.layers, positions, steps=5)
            assert together[row].tolist() == expected

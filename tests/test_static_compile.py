"""A StaticCache and torch.compile: a pruned generate() answers as with a DynamicCache and as eager, and a compiled
forward serves every prompt of one shape without compiling again."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

import star
from conftest import batch, prompt_ids, tiny_llava
from families import next_inputs, tiny_gemma3, gemma_inputs, tiny_llava_next

OPTIONS = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def assert_static_equals_dynamic(model, inputs: dict, method: str, keep, **options) -> None:
    with star.apply(model, method=method, keep=keep, **options):
        dynamic = model.generate(**inputs, **OPTIONS)
        static = model.generate(**inputs, **OPTIONS, cache_implementation="static")
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    for step_static, step_dynamic in zip(static.logits, dynamic.logits):
        assert (step_static - step_dynamic).abs().max() < 1e-4


@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("method", ["star", "fastervlm", "fastv", "pdrop", "sparsevlm", "visionzip"])
@torch.no_grad()
def test_static_cache_answers_as_dynamic(model, method, positions):
    """Left-padded prompts of different lengths; every method family: a vision stage (the entry frame is shorter
    than the cache's slots), one decoder cut, several, merged states."""
    inputs = batch([prompt_ids(5, 7, 0), prompt_ids(2, 11, 1)])
    assert_static_equals_dynamic(model, inputs, method, 4, positions=positions)


@pytest.mark.parametrize("method", ["star", "pdrop"])
@torch.no_grad()
def test_static_cache_answers_as_dynamic_on_uneven_crops(method):
    """LLaVA-NeXT: prompts whose crops keep different numbers of tokens, so the cuts pad rows unevenly."""
    from test_llava_next import SQUARE, WIDE

    model = tiny_llava_next()
    assert_static_equals_dynamic(model, next_inputs(model, [[WIDE], [SQUARE]], [(3, 6), (1, 2)], seed=6), method, 3)


@torch.no_grad()
def test_static_cache_is_refused_where_a_window_would_span_a_cut():
    model = tiny_gemma3(window=64)
    inputs = gemma_inputs([1], [(2, 3)])
    with star.apply(model, method="star", keep=8), pytest.raises(ValueError, match="StaticCache on a decoder with sliding-window"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


@torch.no_grad()
def test_a_static_cache_keeps_the_dropped_tokens_slots_unseen(model):
    """A model call with a StaticCache of its own: every layer from the cut on caches only the kept tokens, in its
    first slots, and the prefill's logits are the DynamicCache's."""
    inputs = batch([prompt_ids(5, 7, 0)])
    with star.apply(model, method="star", keep=4) as pruner:
        expected = model(**inputs).logits
        cache = StaticCache(config=model.config, max_cache_len=64)
        logits = model(**inputs, past_key_values=cache).logits
        lengths = pruner.stats.sequence_lengths
    assert (logits - expected).abs().max() < 1e-5
    assert [int(layer.get_seq_length()) for layer in cache.layers] == lengths or [
        int(layer.keys[0, 0].any(dim=-1).sum()) for layer in cache.layers
    ] == lengths


@pytest.mark.parametrize("method", ["star", "fastervlm"])
@torch.no_grad()
def test_a_compiled_forward_answers_as_eager_and_compiles_once_per_shape(model, method):
    """torch.compile(model.forward) after apply(): a pruned generate() with a StaticCache gives eager's tokens, and a
    second prompt of the same shape (other text, other image) runs without compiling again."""
    first = batch([prompt_ids(5, 7, 0)])
    second = batch([prompt_ids(5, 7, 3)], seed=5)
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static")
    torch._dynamo.reset()
    with star.apply(model, method=method, keep=4) as pruner:
        eager = [model.generate(**inputs, **options) for inputs in (first, second)]
        kept = pruner.stats.kept_patches
        model.forward = torch.compile(model.forward)
        try:
            assert model.generate(**first, **options).tolist() == eager[0].tolist()
            with torch._dynamo.config.patch(error_on_recompile=True):
                assert model.generate(**second, **options).tolist() == eager[1].tolist()
            assert all(torch.equal(a, b) for a, b in zip(pruner.stats.kept_patches, kept))
        finally:
            del model.forward
            torch._dynamo.reset()


@torch.no_grad()
def test_a_forward_compiled_with_other_hooks_never_runs_unpruned(model):
    """A graph may keep the hooks it was traced with (dynamo does not guard on module hooks by default): a forward
    compiled under a pruner without decoder stages, run under STAR, would skip STAR's cut. The pruner counts its
    layers and refuses; where torch traces again instead, the cut happens as in eager."""
    inputs = batch([prompt_ids(5, 7, 0)])
    with star.apply(model, method="star", keep=4) as pruner:
        expected, tokens = model(**inputs).logits, pruner.stats.tokens
    torch._dynamo.reset()
    try:
        with star.apply(model, method="fastervlm", keep=4):
            model.forward = torch.compile(model.forward)
            model(**inputs)
        with star.apply(model, method="star", keep=4) as pruner:
            try:
                logits = model(**inputs).logits
            except RuntimeError as error:
                assert "compiled with other hooks" in str(error)
            else:
                assert pruner.stats.tokens == tokens and (logits - expected).abs().max() < 1e-4
    finally:
        del model.forward
        torch._dynamo.reset()

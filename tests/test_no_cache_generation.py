"""generate(..., use_cache=False) prunes once per prompt, as with the cache: without a cache every step is a
prefill of the prompt and the tokens so far, and the pruner reuses the prompt's pruning (decided at its first
prefill) for each, so the answer is the cached one. Every family with a decoder stage."""

from __future__ import annotations

import pytest
import torch

import star
from conftest import batch, prompt_ids, tiny_llava
from families import gemma_inputs, next_inputs, qwen_inputs, tiny_gemma3, tiny_llava_next, tiny_qwen, tiny_qwen3, tiny_qwen3_5
from star import compat
from test_gemma4 import gemma4_inputs, tiny_gemma4
from tiled_families import internvl_inputs, onevision_inputs, tiny_internvl, tiny_onevision

SPECIAL = [120, 121, 122, 123, 124]  # image, video, image-delimiter (and Gemma 4's audio) tokens: an answer holding one would be another prompt
FAMILIES = {
    "llava": lambda: (tiny_llava(), lambda m: batch([prompt_ids(3, 6, 0), prompt_ids(1, 4, 1)])),
    "llava-next": lambda: (tiny_llava_next(), lambda m: next_inputs(m, [[(32, 64)], [(64, 64)]], [(3, 6), (1, 4)])),
    "llava-onevision": lambda: (tiny_onevision(), lambda m: onevision_inputs(m, [[(32, 64)], [(64, 64)]], [(3, 6), (1, 4)])),
    "qwen2-vl": lambda: (tiny_qwen("2"), lambda m: qwen_inputs([[(8, 8)], [(4, 6)]], [(3, 6), (1, 4)])),
    "qwen2.5-vl": lambda: (tiny_qwen("2.5"), lambda m: qwen_inputs([[(8, 8)], [(4, 6)]], [(3, 6), (1, 4)])),
    "qwen3-vl": lambda: (tiny_qwen3(), lambda m: qwen_inputs([[(8, 8)], [(4, 6)]], [(3, 6), (1, 4)])),
    "qwen3.5": lambda: (tiny_qwen3_5(), lambda m: qwen_inputs([[(8, 8)], [(4, 6)]], [(3, 6), (1, 4)])),
    "internvl": lambda: (tiny_internvl(), lambda m: internvl_inputs([[1], [2]], [(3, 6), (1, 4)])),
    "gemma3": lambda: (tiny_gemma3(), lambda m: gemma_inputs([1, 1], [(3, 6), (1, 4)])),
    "gemma4": lambda: (tiny_gemma4(), lambda m: gemma4_inputs([[(4, 6)], [(4, 4)]], [(3, 6), (1, 4)])),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    if request.param == "qwen3.5" and compat.QWEN3_5_MISSING:
        pytest.skip(compat.QWEN3_5_MISSING)
    if request.param == "gemma4" and compat.GEMMA4_MISSING:
        pytest.skip(compat.GEMMA4_MISSING)
    model, make = FAMILIES[request.param]()
    return request.param, model, make(model)


@torch.no_grad()
@pytest.mark.parametrize("method", ["star", "fastv", "cdpruner", "pool"])
def test_generation_without_a_cache_gives_the_cached_answer(family, method):
    _, model, inputs = family
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, suppress_tokens=SPECIAL)
    with star.apply(model, method=method, keep=0.25) as pruner:
        cached = model.generate(**inputs, **options)
        kept = [k.clone() for k in pruner.stats.kept_patches]
        uncached = model.generate(**inputs, **options, use_cache=False)
        assert all(torch.equal(a, b) for a, b in zip(kept, pruner.stats.kept_patches))  # the last step's: the prompt's
    assert uncached.tolist() == cached.tolist()


@torch.no_grad()
def test_without_reuse_a_longer_prefill_prunes_otherwise():
    """What the reuse prevents: a new prompt of the same tokens and answer (other pixel_values, equal in value: a
    fresh prefill) ranks its visual tokens with the answer's last token (FastV), and keeps others; the same
    pixel_values and a continuation of the prompt reuse its pruning."""
    model = tiny_llava()
    inputs = batch([prompt_ids(3, 6, 0)])
    with star.apply(model, method="fastv", keep=0.25) as pruner:
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, suppress_tokens=SPECIAL)
        prompt_kept = pruner.stats.kept_patches[-1].clone()
        model(input_ids=out, attention_mask=torch.ones_like(out), pixel_values=inputs["pixel_values"], use_cache=False)
        assert torch.equal(pruner.stats.kept_patches[-1], prompt_kept)  # the same images and a continuation: reused
        model(input_ids=out, attention_mask=torch.ones_like(out), pixel_values=inputs["pixel_values"].clone(), use_cache=False)
        assert not torch.equal(pruner.stats.kept_patches[-1], prompt_kept)

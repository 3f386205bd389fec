"""A prefill with images is pruned, or refused: it never runs unpruned without a word.

transformers 5's generate() encodes images before the model's forward (`mm_encoder_outputs`); before the
pruner turned that off, every generation ran unpruned while single forward calls were pruned. These tests
fail if any way in reaches the decoder with all the image's tokens.
"""

from __future__ import annotations

import pytest
import torch

import star
from conftest import IMAGE_TOKEN, N_VISUAL, batch, prompt_ids
from families import next_inputs, qwen_inputs, tiny_llava_next, tiny_qwen
from reference import image_features
from star import compat

PROMPT = prompt_ids(3, 6, seed=2)


def _llava_inputs():
    return batch([PROMPT])


def _families():
    from conftest import tiny_llava

    yield "llava", tiny_llava(), _llava_inputs()
    model = tiny_llava_next()
    yield "llava-next", model, next_inputs(model, [[(32, 64)]], [(2, 3)], seed=1)
    for version in ("2", "2.5"):
        yield f"qwen{version}", tiny_qwen(version), qwen_inputs([[(4, 6)]], [(2, 3)], seed=1)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2", "qwen2.5"])
def test_generate_prunes_its_prefill(family):
    name, model, inputs = next(f for f in _families() if f[0] == family)
    prompt_length = inputs["input_ids"].shape[1]
    lengths = []
    first = model.model.language_model.layers[0]
    handle = first.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    with star.apply(model, method="star", keep=2) as pruner:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert pruner.stats is not None and pruner.stats.tokens[-1] == 2
        entry = pruner.stats.sequence_lengths[0]
    handle.remove()
    assert lengths[0] == entry < prompt_length, f"{name}: generate()'s prefill fed {lengths[0]} of {prompt_length} tokens"


@torch.no_grad()
def test_precomputed_encoder_outputs_are_refused(model):
    inputs = _llava_inputs()
    pixels = inputs.pop("pixel_values")
    encoded = {"image": image_features(model, pixels)}
    with star.apply(model, method="star", keep=4), pytest.raises(ValueError, match="mm_encoder_outputs"):
        model(**inputs, mm_encoder_outputs=encoded)


@torch.no_grad()
def test_inputs_embeds_at_prefill_are_refused(model):
    inputs = _llava_inputs()
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    inputs.pop("pixel_values")
    with star.apply(model, method="star", keep=4), pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=embeds, **inputs)


@torch.no_grad()
def test_image_tokens_without_pixel_values_are_refused(model):
    inputs = _llava_inputs()
    pixels = inputs.pop("pixel_values")
    with star.apply(model, method="star", keep=4), pytest.raises(ValueError, match=f"{N_VISUAL} image tokens.*image_pixels"):
        model(**inputs, image_pixels=pixels)


@torch.no_grad()
def test_text_only_prompts_still_pass(model):
    ids = torch.tensor([[t for t in PROMPT if t != IMAGE_TOKEN]])
    with star.apply(model, method="star", keep=4) as pruner:
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
        assert pruner.stats is None


def test_remove_gives_generate_its_encoder_back(model):
    before = getattr(model, "input_modalities", None)  # 4.57 has none
    with star.apply(model, method="star", keep=4):
        if compat.V5:
            assert model.input_modalities == ("text",)
    assert getattr(model, "input_modalities", None) == before and "input_modalities" not in model.__dict__

"""Every bad input fails before any compute, with a ValueError that names the argument."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import star
from conftest import IMAGE_TOKEN, N_VISUAL, batch, prompt_ids

PROMPT = prompt_ids(3, 6, seed=1)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"keep": N_VISUAL + 1}, "keep"),
        ({"keep": 0}, "keep"),
        ({"keep": -3}, "keep"),
        ({"keep": 0.0}, "keep"),
        ({"keep": 1.5}, "keep"),
        ({"keep": "half"}, "keep"),
        ({"keep": True}, "keep"),
        ({"keep": 4, "layer": 6}, "layer"),
        ({"keep": 4, "layer": -1}, "layer"),
        ({"keep": 4, "layer": 0}, "layer"),
        ({"keep": 4, "method": "pdrop", "layers": (0, 1, 2)}, "layers"),
        ({"keep": 4, "stage1_ratio": 1.0}, "stage1_ratio"),
        ({"keep": 4, "stage1_ratio": -0.1}, "stage1_ratio"),
        ({"keep": 4, "method": "fastv", "layer": 0}, "layer"),
        ({"keep": 4, "method": "pdrop", "layers": (3, 2)}, "layers"),
        ({"keep": 4, "method": "nope"}, "method"),
        ({"keep": 4, "method": "fastervlm", "layer": 3}, "layer"),
        ({"keep": 4, "positions": "shifted"}, "positions"),
        ({"keep": 4, "method": "vispruner", "important_ratio": 1.5}, "important_ratio"),
        ({"keep": 4, "method": "vispruner", "important_ratio": True}, "important_ratio"),
        ({"keep": 4, "method": "dart", "layer": 0}, "layer"),
        ({"keep": 4, "method": "dart", "layer": 6}, "layer"),
        ({"keep": 4, "method": "dart", "pivot_image_tokens": 0}, "pivot_image_tokens"),
        ({"keep": 4, "method": "dart", "pivot_text_tokens": -1}, "pivot_text_tokens"),
        ({"keep": 4, "method": "dart", "pivot_text_tokens": 2.5}, "pivot_text_tokens"),
        ({"keep": 4, "method": "divprune", "layer": 3}, "layer"),
    ],
)
def test_bad_arguments_are_named(model, kwargs, named):
    kwargs = {"method": "star", **kwargs}
    with pytest.raises(ValueError, match=named):
        star.apply(model, **kwargs)
    assert not model._forward_pre_hooks


def test_unknown_method_lists_the_known_ones(model):
    with pytest.raises(ValueError, match="star, fastv"):
        star.apply(model, method="nope")


def test_unsupported_model_names_the_supported_classes():
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        star.apply(llm, method="star", keep=4)


def test_image_tokens_that_do_not_match_the_image(model):
    ids = [t for t in PROMPT]
    ids.remove(IMAGE_TOKEN)
    inputs = batch([ids])
    with star.apply(model, method="star", keep=4), pytest.raises(ValueError, match="image tokens"):
        with torch.no_grad():
            model(**inputs)


def test_right_padding_is_refused(model):
    inputs = batch([PROMPT, PROMPT[:-2]])
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    with star.apply(model, method="star", keep=4), pytest.raises(ValueError, match="attention_mask"):
        with torch.no_grad():
            model(**inputs)


def test_applying_twice_is_refused_until_removed(model):
    pruner = star.apply(model, method="star", keep=4)
    with pytest.raises(ValueError, match="already pruned"):
        star.apply(model, method="fastv", keep=4)
    pruner.remove()
    star.apply(model, method="fastv", keep=4).remove()

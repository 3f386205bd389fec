"""The plugin on the project's default model (CLIP ViT-B/16 + SmolLM2-135M, 196 tokens per image) against the
Hugging Face path, in one vLLM engine: the same kept patches, greedy answers and log-probabilities, alone and in
a batch, at 98 / 39 / 20 tokens, on scenes and on photographs; and a setting with more than one decoder cut stops the
engine at its start."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import star

from engines import ENGINE, default_model, hf_generate, hf_model, kept_patches, overrides, scene_prompts, vllm_generate

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the engine

N_VISUAL = 196
SETTINGS = [
    {"method": "star-vision", "keep": 98},
    {"method": "star-vision", "keep": 39},
    {"method": "star-vision", "keep": 20},
    {"method": "visionzip", "keep": 39},
]  # fastervlm and random: test_tiny_model.py
STEPS = 8


@pytest.fixture(scope="module")
def path() -> str:
    return default_model()


@pytest.fixture(scope="module")
def hf(path) -> tuple:
    return hf_model(path)


@pytest.fixture(scope="module")
def scenes(path):
    return scene_prompts(path, 4)


@pytest.fixture(scope="module")
def llm(path):
    from vllm import LLM

    engine = LLM(path, hf_overrides=overrides("star-vision", 39), max_model_len=1024, **ENGINE)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _same(ours: dict, reference: dict) -> None:
    assert ours["tokens"] == reference["tokens"]
    assert np.allclose(ours["logprobs"], reference["logprobs"], atol=1e-3), (ours["logprobs"], reference["logprobs"])


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['method']}-{s['keep']}")
def test_same_patches_and_answers_as_the_hf_path(llm, hf, scenes, setting):
    prompts, images, _ = scenes
    reference = hf_generate(hf, prompts, images, setting, STEPS)
    [alone] = vllm_generate(llm, prompts[:1], images[:1], setting, STEPS)
    assert kept_patches(llm) == [reference[0]["kept"]]
    _same(alone, reference[0])
    together = vllm_generate(llm, prompts, images, setting, STEPS)
    for ours, expected in zip(together, reference):
        _same(ours, expected)


def test_a_photograph_gets_the_hf_answer(llm, hf, path):
    """Photographs the processor resizes and crops (the scenes are 224 px already, so their pixels need no
    resampling): the same kept patches and answers as the Hugging Face path, both on this environment's processor
    (transformers' torchvision-backed CLIPImageProcessor in .venv-vllm; docs/serving.md)."""
    from PIL import Image
    from transformers import AutoProcessor

    from star.eval.runner import build_prompt

    assets = Path(star.__file__).parent / "data" / "assets"
    images = [[Image.open(assets / name).convert("RGB")] for name in ("astronaut.jpg", "coffee.jpg")]
    prompts = [build_prompt(AutoProcessor.from_pretrained(path), "What is in the picture?")] * 2
    setting = {"method": "star-vision", "keep": 39}
    reference = hf_generate(hf, prompts, images, setting, STEPS)
    for row in range(2):
        [ours] = vllm_generate(llm, prompts[row : row + 1], images[row : row + 1], setting, STEPS)
        assert kept_patches(llm) == [reference[row]["kept"]]
        _same(ours, reference[row])


def test_the_prompt_shrinks_by_the_dropped_tokens(llm, scenes):
    prompts, images, _ = scenes
    [full] = vllm_generate(llm, prompts[:1], images[:1], {"method": "none", "keep": N_VISUAL}, 1)
    for keep in (98, 39, 20):
        [pruned] = vllm_generate(llm, prompts[:1], images[:1], {"method": "fastervlm", "keep": keep}, 1)
        assert full["prompt_tokens"] - pruned["prompt_tokens"] == N_VISUAL - keep


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"method": "pdrop", "keep": 39}, "method='pdrop' at keep=39 cuts before 3 decoder layers [7, 15, 22]"),
        ({"method": "sparsevlm", "keep": 39}, "the plugin serves one cut"),
    ],
)
def test_a_setting_with_more_than_one_cut_stops_the_engine_at_its_start(llm, path, setting, message):
    """Checked in the front end, before an engine process starts (the module's engine stays up meanwhile); one cut
    is served (test_default_model_cut.py)."""
    from vllm import LLM

    with pytest.raises(ValueError) as error:
        LLM(path, hf_overrides={"architectures": ["StarLlavaForConditionalGeneration"], "star": setting}, max_model_len=1024, **ENGINE)
    assert "hf_overrides['star']" in str(error.value) and message in str(error.value)

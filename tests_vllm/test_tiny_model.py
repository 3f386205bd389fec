"""The plugin on a small random LLaVA-1.5 against the Hugging Face path, in one vLLM engine.

Every setting runs as a request's own `mm_processor_kwargs`, so one engine serves all of them. The reference is
`star.apply(..., positions="contiguous")` on the same checkpoint: the same kept patches, the same greedy tokens
and their log-probabilities to 1e-4, for single prompts and for batches of prompts with one or two images.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from engines import ENGINE, N_VISUAL, hf_generate, hf_model, kept_patches, overrides, tiny_llava_checkpoint, vllm_generate

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the engine

PROMPTS = ["what <image> color is the ? answer :", "how many <image> is the shape ? answer :", "<image> <image> what shape . answer :"]
SETTINGS = [
    {"method": "star-vision", "keep": 5},
    {"method": "fastervlm", "keep": 7},
    {"method": "visionzip", "keep": 6},
    {"method": "random", "keep": 4, "seed": 3},
    {"method": "vispruner", "keep": 6},
    {"method": "divprune", "keep": 5},
    {"method": "pool", "keep": 4},
    {"method": "star-vision", "keep": 0.5},
    {"method": "none", "keep": N_VISUAL},
]
STEPS = 6


def images(seed: int, count: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in range(count)]


PICTURES = [images(1, 1), images(2, 1), images(3, 2)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return tiny_llava_checkpoint(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def hf(checkpoint) -> tuple:
    return hf_model(checkpoint)


@pytest.fixture(scope="module")
def llm(checkpoint):
    from vllm import LLM

    engine = LLM(checkpoint, hf_overrides=overrides("fastervlm", 5), max_model_len=512, limit_mm_per_prompt={"image": 2}, **ENGINE)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _same(ours: dict, reference: dict) -> None:
    assert ours["tokens"] == reference["tokens"]
    assert np.allclose(ours["logprobs"], reference["logprobs"], atol=1e-4), (ours["logprobs"], reference["logprobs"])


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['method']}-{s['keep']}")
def test_each_prompt_alone_keeps_the_hf_patches_and_gives_its_answer(llm, hf, setting):
    reference = hf_generate(hf, PROMPTS, PICTURES, setting, STEPS)
    for row, prompt in enumerate(PROMPTS):
        [ours] = vllm_generate(llm, [prompt], [PICTURES[row]], setting, STEPS)
        kept = kept_patches(llm)
        places = [image * N_VISUAL + j for image, patches in enumerate(kept) for j in patches]
        assert places == reference[row]["kept"]
        keep = len(reference[row]["kept"]) // len(PICTURES[row])
        words = len(prompt.split()) - len(PICTURES[row])
        assert ours["prompt_tokens"] == words + keep * len(PICTURES[row])
        _same(ours, reference[row])


@pytest.mark.parametrize("setting", SETTINGS[:4], ids=lambda s: s["method"])
def test_a_batch_gives_what_each_prompt_gives_alone(llm, hf, setting):
    """vLLM schedules the three prompts together; each must give the Hugging Face path's answer for it."""
    reference = hf_generate(hf, PROMPTS, PICTURES, setting, STEPS)
    for ours, expected in zip(vllm_generate(llm, PROMPTS, PICTURES, setting, STEPS), reference):
        _same(ours, expected)


def test_the_engine_setting_applies_when_a_request_gives_none(llm, hf):
    [ours] = vllm_generate(llm, PROMPTS[:1], PICTURES[:1], None, STEPS)
    assert ours["prompt_tokens"] == len(PROMPTS[0].split()) - 1 + 5
    _same(ours, hf_generate(hf, PROMPTS[:1], PICTURES[:1], {"method": "fastervlm", "keep": 5}, STEPS)[0])


BAD = [
    ({"method": "star", "keep": 4}, "method='star' at keep=4 prunes inside the decoder (a cut before layer 2)"),
    ({"method": "fastv", "keep": 4}, "vision-side methods run instead: fastervlm, visionzip, vispruner, divprune, random, pool, star-vision"),
    ({"method": "pdrop", "keep": 4}, "prunes inside the decoder"),
    ({"method": "sparsevlm", "keep": 4}, "prunes inside the decoder"),
    ({"method": "nope", "keep": 4}, "method='nope' is unknown"),
    ({"method": "fastervlm", "keep": 17}, "keep=17 is outside [1, 16]"),
    ({"method": "random", "keep": 4, "layer": 2}, "option 'layer' is not accepted by method 'random'"),
    ({"keep": 4}, "must be a dict with 'method', 'keep'"),
]


def test_bad_requests_are_refused_and_the_engine_keeps_serving(llm, hf):
    for setting, message in BAD:
        with pytest.raises(ValueError) as error:
            vllm_generate(llm, PROMPTS[:1], PICTURES[:1], setting, STEPS)
        assert "mm_processor_kwargs['star']" in str(error.value) and message in str(error.value)
    [after] = vllm_generate(llm, PROMPTS[:1], PICTURES[:1], SETTINGS[0], STEPS)
    _same(after, hf_generate(hf, PROMPTS[:1], PICTURES[:1], SETTINGS[0], STEPS)[0])

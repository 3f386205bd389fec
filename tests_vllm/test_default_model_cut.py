"""STAR's two stages served by vLLM on the project's default model (CLIP ViT-B/16 + SmolLM2-135M, 196 tokens per
image, 30 decoder layers): stage 1 keeps 167 tokens per image, the cut before layer 15 keeps 39. Against the
Hugging Face path (`star.apply(..., positions="contiguous")`): 24 scene questions and 4 text-only prompts in one
batch, the same greedy answers and log-probabilities (to 1e-3); and a few questions alone."""

from __future__ import annotations

import pytest

from engines import COMPILED, hf_generate, scene_prompts, vllm_generate
from test_decoder_cut import text_generate
from test_default_model import _same, hf, path  # noqa: F401 (the default model's fixtures, and its tolerance)

SETTING = {"method": "star", "keep": 39}
STEPS = 8
TEXT_ONLY = ["What is the capital of France?", "Name a colour.", "Count to three:", "Say hello."]


@pytest.fixture(scope="module")
def scenes(path):
    return scene_prompts(path, 24)


@pytest.fixture(scope="module")
def llm(path):
    from vllm import LLM

    from star.integrations.vllm import engine_args

    engine = LLM(path, max_model_len=1024, **{**COMPILED, **engine_args(SETTING["method"], SETTING["keep"])})
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_a_mixed_batch_of_28_prompts_gives_the_hf_answers(llm, hf, scenes):
    prompts, images, _ = scenes
    reference = hf_generate(hf, prompts, images, SETTING, STEPS) + text_generate(hf, TEXT_ONLY, STEPS)
    ours = vllm_generate(llm, prompts + TEXT_ONLY, images + [[]] * len(TEXT_ONLY), None, STEPS)
    assert len(ours) == 28
    for got, expected in zip(ours, reference):
        _same(got, expected)
    assert all(o["prompt_tokens"] == len(hf[1].tokenizer(p)["input_ids"]) - 1 + 167 for o, p in zip(ours, prompts))


def test_questions_alone_give_their_answers(llm, hf, scenes):
    prompts, images, _ = scenes
    reference = hf_generate(hf, prompts[:3], images[:3], SETTING, STEPS)
    for row in range(3):
        [got] = vllm_generate(llm, prompts[row : row + 1], images[row : row + 1], None, STEPS)
        _same(got, reference[row])

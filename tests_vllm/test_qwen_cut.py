"""One decoder cut in vLLM on small random Qwen2-VL, Qwen2.5-VL and Qwen3-VL, against `star.apply` on the same checkpoint.

A cut is an engine's own setting, so each (family, method) runs in an engine of its own. The kept tokens keep their
original 3-D M-RoPE positions on both paths; each image keeps its own budget (images of 16, 24 and 32 tokens). The
same greedy tokens and log-probabilities (to 1e-4) for prompts of one image and of two images of different sizes, in
one batch with a text-only prompt, and each alone.
"""

from __future__ import annotations

import os

import pytest

from engines import COMPILED, tiny_qwen_checkpoint
from test_decoder_cut import _child
from test_tiny_qwen import ARCHITECTURES, PICTURES, PROMPTS, _same, hf_generate, vllm_generate

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

# Qwen3-VL's 4-layer decoder with DeepStack into layers 0-2: STAR cuts before layer 2, so the features of layer 2
# follow the kept rows.
CASES = [("2.5", {"method": "star", "keep": 4}), ("2.5", {"method": "fastv", "keep": 5}), ("2", {"method": "dart", "keep": 6}), ("3", {"method": "star", "keep": 4})]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return {v: tiny_qwen_checkpoint(tmp_path_factory.mktemp(f"tiny-qwen{v}"), v) for v in dict(CASES)}


@pytest.mark.parametrize("version, setting", CASES, ids=lambda c: c if isinstance(c, str) else c["method"])
def test_the_cut_gives_the_hf_answers_in_a_batch_and_alone(checkpoints, version, setting):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from vllm import LLM

    from star.integrations.vllm import engine_args

    path = checkpoints[version]
    hf = AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path, padding_side="left")
    reference = [hf_generate(hf, prompt, images, setting) for prompt, images in zip(PROMPTS, PICTURES)]
    llm = LLM(path, max_model_len=512, limit_mm_per_prompt={"image": 2}, **{**COMPILED, **engine_args(setting["method"], setting["keep"], ARCHITECTURES[version])})
    try:
        for ours, expected in zip(vllm_generate(llm, PROMPTS, PICTURES, None), reference):
            _same(ours, expected)
        for row in range(2):
            [ours] = vllm_generate(llm, PROMPTS[row : row + 1], PICTURES[row : row + 1], None)
            _same(ours, reference[row])
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_the_cut_changes_the_answer(checkpoints):
    """STAR's two stages against its vision stage alone at the same final budget, on the Hugging Face path: the
    cut has an effect on these prompts, so the equality above is a test of it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf = AutoModelForImageTextToText.from_pretrained(checkpoints["2.5"]).eval(), AutoProcessor.from_pretrained(checkpoints["2.5"], padding_side="left")
    two = [hf_generate(hf, p, i, {"method": "star", "keep": 4})["logprobs"] for p, i in zip(PROMPTS[:2], PICTURES[:2])]
    one = [hf_generate(hf, p, i, {"method": "star-vision", "keep": 4})["logprobs"] for p, i in zip(PROMPTS[:2], PICTURES[:2])]
    assert two != one


# Three images of 32 tokens (32 x 64 px) per request on the tiny Qwen2.5-VL: STAR keeps 27 of each in its vision
# stage and 4 at its cut, so a 92-token prompt holds 3 blocks of 32 before the cut and 1 after it, and 7 in all
# once its 40 answer tokens are in: three such requests and a text-only one need 25 of the 16 blocks.
QWEN = dict(
    architecture=ARCHITECTURES["2.5"], max_len=160,
    prompt="<|vision_start|> <|image_pad|> <|vision_end|> " * 3 + "what shape ? answer :",
    pictures="from test_tiny_qwen import picture\ndef pictures(i):\n    return [picture(10 + 3 * i + j, 32, 64) for j in range(3)]\n",
)


def test_a_preempted_cut_request_gives_its_unpreempted_answer(checkpoints):
    """As on LLaVA (test_decoder_cut.py), on M-RoPE positions: three cut requests and a text-only one in a KV cache
    too small for all of them, so vLLM preempts one; recomputed (its prompt, then its answer so far), every request
    finishes with the tokens it gives when nothing is preempted."""
    unpreempted = _child(checkpoints["2.5"], blocks=256, requests=3, tokens=40, keep=4, family=QWEN)
    result = _child(checkpoints["2.5"], blocks=16, requests=3, tokens=40, keep=4, family=QWEN)
    assert not any(unpreempted["preempted"].values())
    assert any(result["preempted"][rid] for rid in ("0", "1", "2")), result["preempted"]
    assert {rid: ended[0] for rid, ended in result["ended"].items()} == dict.fromkeys(["0", "1", "2", "text"], "length")
    for rid, ended in unpreempted["ended"].items():
        assert result["ended"][rid][3] == ended[3], rid

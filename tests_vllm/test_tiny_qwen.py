"""The plugin on small random Qwen2-VL, Qwen2.5-VL and Qwen3-VL against the Hugging Face path, one vLLM engine
per family.

Every setting runs as a request's own `mm_processor_kwargs`. The reference is `star.apply` on the same checkpoint
(original positions, as on every M-RoPE model; pool's tokens numbered as their pooled grid's own): the same kept
tokens (pool's: its windows' centres), the same greedy tokens and their log-probabilities to 1e-4, for prompts with
one image and with two of different sizes, alone and batched with a text-only prompt; `prompt_tokens` counts the
pruned prompt.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import engines
from engines import ENGINE, kept_patches, tiny_qwen_checkpoint

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the engine

ARCHITECTURES = {"2": "Qwen2VLForConditionalGeneration", "2.5": "Qwen2_5_VLForConditionalGeneration", "3": "Qwen3VLForConditionalGeneration"}
PROMPTS = [
    "<|vision_start|> <|image_pad|> <|vision_end|> what color is the ? answer :",
    "how many <|vision_start|> <|image_pad|> <|vision_end|> <|vision_start|> <|image_pad|> <|vision_end|> shape ? answer :",
    "what shape is the ? answer :",
]
SETTINGS = [
    {"method": "star-vision", "keep": 5},
    {"method": "random", "keep": 4, "seed": 3},
    {"method": "vispruner", "keep": 6},
    {"method": "divprune", "keep": 5},
    {"method": "star-vision", "keep": 0.5},
    {"method": "none", "keep": 1.0},
    # pool's grids: 16 tokens (4 x 4) pool to 2 x 2 / 3 x 3, 24 (6 x 4) to 3 x 2 / 4 x 3, 32 (4 x 8) to 2 x 4 / 3 x 6
    {"method": "pool", "keep": 6},
    {"method": "pool", "keep": 0.6},
]
POOL = SETTINGS[-2]
STEPS = 6


def picture(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


# 32 x 32 px: 16 tokens; 48 x 32 px: 24 tokens; 32 x 64 px: 32 tokens (4 px patches merged 2 x 2).
PICTURES = [[picture(1, 32, 32)], [picture(2, 48, 32), picture(3, 32, 64)], []]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def family(request, tmp_path_factory) -> tuple[str, str]:
    return request.param, tiny_qwen_checkpoint(tmp_path_factory.mktemp(f"tiny-qwen{request.param}"), request.param)


@pytest.fixture(scope="module")
def hf(family) -> tuple:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(family[1], dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(family[1], padding_side="left")


@pytest.fixture(scope="module")
def llm(family):
    from vllm import LLM

    from star.integrations.vllm import engine_args

    engine = LLM(family[1], max_model_len=512, limit_mm_per_prompt={"image": 2}, **engine_args("star-vision", 5, ARCHITECTURES[family[0]]), **ENGINE)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def hf_generate(hf: tuple, prompt: str, images: list, setting: dict) -> dict:
    """`star.apply` on the Hugging Face model, one prompt, greedy: its new tokens, their log-probabilities, the kept
    tokens of each image (indices into its merged tokens)."""
    import star

    model, processor = hf
    inputs = processor(images=images or None, text=[prompt], return_tensors="pt")
    options = {k: v for k, v in setting.items() if k not in ("method", "keep")}
    with torch.no_grad(), star.apply(model, setting["method"], setting["keep"], **options) as pruner:
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True, return_dict_in_generate=True)
        kept = pruner.stats.kept_patches[0][0] if images else torch.zeros(0)
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    if 3 in tokens:
        tokens = tokens[: tokens.index(3) + 1]
    logprobs = torch.stack(out.scores, dim=1).float().log_softmax(dim=-1)[0]
    return {"tokens": tokens, "logprobs": [float(logprobs[s, t]) for s, t in enumerate(tokens)], "kept": kept[kept >= 0].tolist()}


def vllm_generate(llm, prompts: list[str], images: list[list], setting: dict | None) -> list[dict]:
    return engines.vllm_generate(llm, prompts, images, setting, STEPS)


def _same(ours: dict, reference: dict) -> None:
    assert ours["tokens"] == reference["tokens"]
    assert np.allclose(ours["logprobs"], reference["logprobs"], atol=1e-4), (ours["logprobs"], reference["logprobs"])


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['method']}-{s['keep']}")
def test_each_prompt_alone_keeps_the_hf_tokens_and_gives_its_answer(llm, hf, setting):
    for prompt, images in zip(PROMPTS[:2], PICTURES[:2]):
        reference = hf_generate(hf, prompt, images, setting)
        [ours] = vllm_generate(llm, [prompt], [images], setting)
        kept, sizes = kept_patches(llm), [image.width * image.height // 64 for image in images]
        assert [sum(sizes[:i]) + j for i, row in enumerate(kept) for j in row] == reference["kept"]  # places among the prompt's image tokens
        words = len(prompt.split()) - len(images)
        assert ours["prompt_tokens"] == words + len(reference["kept"])
        _same(ours, reference)


@pytest.mark.parametrize("setting", [*SETTINGS[:2], POOL], ids=lambda s: s["method"])
def test_a_batch_with_a_text_prompt_gives_what_each_prompt_gives_alone(llm, hf, setting):
    for ours, prompt, images in zip(vllm_generate(llm, PROMPTS, PICTURES, setting), PROMPTS, PICTURES):
        _same(ours, hf_generate(hf, prompt, images, setting))


def test_the_engine_setting_applies_when_a_request_gives_none(llm, hf):
    [ours] = vllm_generate(llm, PROMPTS[:1], PICTURES[:1], None)
    assert ours["prompt_tokens"] == len(PROMPTS[0].split()) - 1 + 5
    _same(ours, hf_generate(hf, PROMPTS[0], PICTURES[0], {"method": "star-vision", "keep": 5}))


BAD = [
    ({"method": "star", "keep": 4}, "method='star' at keep=4 prunes inside the decoder"),
    ({"method": "fastervlm", "keep": 4}, "has no [CLS] token"),
    ({"method": "visionzip", "keep": 4}, "this model has none its decoder can take"),
    ({"method": "star-vision", "keep": 17}, "keep=17 is above the 16 visual tokens of an image"),
]


def test_bad_requests_are_refused_and_the_engine_keeps_serving(llm, hf):
    for setting, message in BAD:
        with pytest.raises(ValueError) as error:
            vllm_generate(llm, PROMPTS[:1], PICTURES[:1], setting)
        assert message in str(error.value)
    [after] = vllm_generate(llm, PROMPTS[:1], PICTURES[:1], SETTINGS[0])
    _same(after, hf_generate(hf, PROMPTS[0], PICTURES[0], SETTINGS[0]))


def test_a_video_is_refused_by_vllm_and_the_engine_keeps_serving(llm, hf):
    from vllm.exceptions import VLLMValidationError

    frames = np.stack([np.asarray(picture(4, 32, 32))] * 2)
    metadata = {"fps": 2.0, "duration": 1.0, "total_num_frames": 2, "frames_indices": [0, 1], "video_backend": "opencv", "do_sample_frames": False}
    with pytest.raises(VLLMValidationError, match=r"At most 0 video\(s\) may be provided in one prompt"):
        llm.generate({"prompt": "<|vision_start|> <|video_pad|> <|vision_end|> what ? answer :", "multi_modal_data": {"video": (frames, metadata)}})
    [after] = vllm_generate(llm, PROMPTS[:1], PICTURES[:1], SETTINGS[0])
    _same(after, hf_generate(hf, PROMPTS[0], PICTURES[0], SETTINGS[0]))

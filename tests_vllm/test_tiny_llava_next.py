"""The plugin on a small random LLaVA-NeXT against the Hugging Face path, in one vLLM engine.

Two image sizes: 32 x 64 px (a 1 x 2 grid of whole tiles) and 40 x 56 px (a 2 x 2 grid that unpadding cuts to 12
of each tile's 16 patches, so each tile keeps its share: round(keep * 12 / 16)). The reference is `star.apply(...,
positions="contiguous")` on the same checkpoint: the same kept tokens (their places among the prompt's image
tokens, newlines counted there), the same placeholder count, the same greedy tokens and their log-probabilities to
1e-4, for single prompts and for batches of prompts with one or two images of either size; pool per crop, a cut
tile pooled over the rectangle of patches it shows.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from engines import ENGINE, N_VISUAL, hf_generate, hf_model, kept_patches, overrides, tiny_llava_next_checkpoint, vllm_generate

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the engine

NEXT = "LlavaNextForConditionalGeneration"
PROMPTS = ["what <image> color is the ? answer :", "how many <image> is the shape ? answer :", "<image> <image> what shape . answer :"]
WHOLE, CUT = (32, 64), (40, 56)  # (height, width)
# Tokens of an unpruned block: the base crop's 16 and the tiles' picture with a newline ending each of its rows.
FULL = {WHOLE: 16 + 4 * 8 + 4, CUT: 16 + 6 * 8 + 6}
NEWLINES = {WHOLE: 4, CUT: 6}
SETTINGS = [
    {"method": "star-vision", "keep": 5},
    {"method": "fastervlm", "keep": 7},
    {"method": "visionzip", "keep": 6},
    {"method": "random", "keep": 4, "seed": 3},
    {"method": "vispruner", "keep": 6},
    {"method": "divprune", "keep": 5},
    {"method": "star-vision", "keep": 0.5},
    {"method": "none", "keep": N_VISUAL},
    {"method": "pool", "keep": 9},
    {"method": "pool", "keep": 4},
]
POOL = SETTINGS[-2]
STEPS = 6


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


SIZES = [[WHOLE], [CUT], [CUT, WHOLE]]
PICTURES = [[picture(10 * row + i, size) for i, size in enumerate(sizes)] for row, sizes in enumerate(SIZES)]


# pool's blocks, counted by hand: keep=9 pools the 4 x 4 crops to 3 x 3 and a cut tile's 3 x 4 patches (a budget of
# round(9 * 12 / 16) = 7) to 2 x 3; keep=4 pools crops to 2 x 2 and a cut tile (a budget of 3) to 1 x 1.
POOLED = {(WHOLE, 9): 9 + 2 * 9 + 4, (CUT, 9): 9 + 4 * 6 + 6, (WHOLE, 4): 4 + 2 * 4 + 4, (CUT, 4): 4 + 4 * 1 + 6}


def pruned(size: tuple[int, int], keep: int | float, method: str = "star-vision") -> int:
    """The block's tokens at `keep`, counted by hand: the base crop's and each tile's budget, and the newlines."""
    if method == "pool":
        return POOLED[size, keep]
    tile = 16 if size == WHOLE else 12
    share = max(1, round(keep * tile)) if isinstance(keep, float) else min(tile, max(1, round(keep * tile / 16)))
    base = max(1, round(keep * 16)) if isinstance(keep, float) else keep
    tiles = 2 if size == WHOLE else 4
    return base + tiles * share + NEWLINES[size]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return tiny_llava_next_checkpoint(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="module")
def hf(checkpoint) -> tuple:
    return hf_model(checkpoint)


@pytest.fixture(scope="module")
def llm(checkpoint):
    from vllm import LLM

    engine = LLM(
        checkpoint, hf_overrides=overrides("fastervlm", 5, NEXT), max_model_len=512, limit_mm_per_prompt={"image": 2}, **ENGINE
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _same(ours: dict, reference: dict) -> None:
    assert ours["tokens"] == reference["tokens"]
    assert np.allclose(ours["logprobs"], reference["logprobs"], atol=1e-4), (ours["logprobs"], reference["logprobs"])


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['method']}-{s['keep']}")
def test_each_prompt_alone_keeps_the_hf_tokens_and_gives_its_answer(llm, hf, setting):
    reference = hf_generate(hf, PROMPTS, PICTURES, setting, STEPS)
    for row, prompt in enumerate(PROMPTS):
        [ours] = vllm_generate(llm, [prompt], [PICTURES[row]], setting, STEPS)
        kept = kept_patches(llm)
        offsets = np.cumsum([0] + [FULL[size] for size in SIZES[row]])
        assert [offsets[image] + p for image, places in enumerate(kept) for p in places] == reference[row]["kept"]
        words = len(prompt.split()) - len(SIZES[row])
        assert ours["prompt_tokens"] == words + sum(pruned(size, setting["keep"], setting["method"]) for size in SIZES[row])
        _same(ours, reference[row])


@pytest.mark.parametrize("setting", [*SETTINGS[:4], POOL], ids=lambda s: s["method"])
def test_a_batch_gives_what_each_prompt_gives_alone(llm, hf, setting):
    """vLLM schedules the three prompts (four images of two sizes) together; each must give the Hugging Face
    path's answer for it."""
    reference = hf_generate(hf, PROMPTS, PICTURES, setting, STEPS)
    for ours, expected in zip(vllm_generate(llm, PROMPTS, PICTURES, setting, STEPS), reference):
        _same(ours, expected)


def test_unpruned_blocks_are_vllms_own_count(llm):
    """With `none` the placeholder count is vLLM's own LLaVA-NeXT count (`get_num_image_tokens`) for each size.
    Images no earlier test sent, so that the encoder runs (vLLM's encoder cache would serve a seen one)."""
    from operator import attrgetter

    fresh = [picture(90, CUT), picture(91, WHOLE)]
    [ours] = vllm_generate(llm, PROMPTS[2:], [fresh], {"method": "none", "keep": N_VISUAL}, 1)
    assert ours["prompt_tokens"] == len(PROMPTS[2].split()) - 2 + FULL[CUT] + FULL[WHOLE]
    assert [len(k) for k in llm.apply_model(attrgetter("star_kept"))[0]] == [FULL[CUT] - 6, FULL[WHOLE] - 4]


def test_the_engine_setting_applies_when_a_request_gives_none(llm, hf):
    [ours] = vllm_generate(llm, PROMPTS[1:2], PICTURES[1:2], None, STEPS)
    assert ours["prompt_tokens"] == len(PROMPTS[1].split()) - 1 + pruned(CUT, 5)
    _same(ours, hf_generate(hf, PROMPTS[1:2], PICTURES[1:2], {"method": "fastervlm", "keep": 5}, STEPS)[0])


BAD = [
    ({"method": "star", "keep": 4}, "method='star' at keep=4 prunes inside the decoder (a cut before layer 2)"),
    ({"method": "fastv", "keep": 4}, "vision-side methods run instead"),
    ({"method": "fastervlm", "keep": 17}, "keep=17 is outside [1, 16]"),
]


def test_bad_requests_are_refused_and_the_engine_keeps_serving(llm, hf):
    for setting, message in BAD:
        with pytest.raises(ValueError) as error:
            vllm_generate(llm, PROMPTS[1:2], PICTURES[1:2], setting, STEPS)
        assert "mm_processor_kwargs['star']" in str(error.value) and message in str(error.value)
    [after] = vllm_generate(llm, PROMPTS[1:2], PICTURES[1:2], SETTINGS[0], STEPS)
    _same(after, hf_generate(hf, PROMPTS[1:2], PICTURES[1:2], SETTINGS[0], STEPS)[0])


def test_a_decoder_stage_engine_setting_stops_the_model_before_its_weights(hf):
    """What the pruned class checks first when vLLM builds it (`engine_setting`), on this model's config."""
    from star.integrations.vllm import engine_setting

    config = hf[0].config
    config.star = overrides("star", 4, NEXT)["star"]
    try:
        with pytest.raises(ValueError, match=r"hf_overrides\['star'\]: method='star' at keep=4 prunes inside the decoder"):
            engine_setting(config)
    finally:
        del config.star

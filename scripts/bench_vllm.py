"""Serving throughput with the vLLM plugin: unpruned against pruned images, offline (`LLM.generate`) and through
`vllm serve` with the OpenAI client, in one run; STAR's two stages (its decoder cut) beside its vision stage alone.

    .venv-vllm/bin/python scripts/bench_vllm.py                      # the CPU table of docs/results.md
    .venv-vllm/bin/python scripts/bench_vllm.py --gpu --model llava-hf/llava-1.5-7b-hf --keep 288,115,58,29 --requests 256
    .venv-vllm/bin/python scripts/bench_vllm.py --config qwen2.5-vl-7b --image-pixels 50000,100000 --max-tokens 1,16 \
        --requests 4 --repeats 1 --modes offline                     # Qwen2.5-VL-shaped, random weights, on a CPU
    .venv-vllm/bin/python scripts/bench_vllm.py --gpu --config qwen2.5-vl-7b --decoder full --requests 64

Each burst is N scene questions (one image each), every request submitted at once, so that the engine batches them;
every burst has images of its own (so no encoder or prefix cache serves one burst from another), and every setting
serves the same bursts. Every engine of a mode is open at once (each burst runs beside the same idle engines, whose
workers took about 1.5% of a core each on the 2-core machine) and every setting of every engine is timed after a
warm-up burst, `--repeats` times, the settings taking turns burst by burst, so that a machine whose speed drifts
during the run slows them alike, the cut engines' as much as the shared engine's. `--apart` (implied by `--gpu`,
where a 7B engine each would not fit together) opens one engine at a time, its settings taking turns; a drift
between engines then stays in their rows, whose bursts' wall times, load average and free memory the JSON keeps. The
table gives medians, and each row's ratio to the unpruned row of the same mode. A second table pairs each burst with
the unpruned row's same burst (time ratio per burst, their mean with its 95% interval, prefill efficiency at the
mean and the interval's ends): with `--requests 1` every image against itself. `--pool` prints that table over the
bursts of several earlier runs' JSON files. A third table sets each cut row beside `--method` at equal decoder FLOPs
(interpolated between its budgets), by the medians and burst by burst with a 95% interval.

Rows, per mode. `unpruned` and `--method` (star-vision: STAR's vision stage alone) at each `--keep` share one
engine, each setting as the requests' own `mm_processor_kwargs`; the unpruned row is the plugin's `none` setting in
that engine. `--cut-method` (star: `star (two stages)`) at each `--keep` prunes inside the decoder as well, which
vLLM serves only as an engine's own setting: each budget gets an engine of its own (one per mode), with the options
a cut needs (`star.integrations.vllm.engine_args`: its scheduler, no chunked prefill, no prefix caching), which the
shared engine then takes as well, so that every engine batches a burst alike and only the cut differs. Every engine
is compiled as vLLM compiles on the platform (`--eager`: none is); the layers after a cut run on vLLM's own
attention backend. STAR's two stages end with the same visual tokens per image as star-vision at the same `--keep`
(its vision stage keeps more, its cut the rest), so a cut row also gives its ratio to that row of its mode.

Columns: answer tokens (each `--max-tokens` in bursts of its own, in the same engines); prompt tokens as vLLM
counts them (a cut row's vision-stage count, e.g. 27 text + 167 of 196 image tokens for STAR on the default model,
and in brackets what the layers after its cut keep); requests/s and prompt tokens/s over the burst's wall time;
time to first token (median over the burst's requests: the engine's own `first_token_latency` offline, the first
streamed chunk with a token for the server); the KV cache a request holds at its end,
computed from its token counts, not read from the engine: its tokens (prompt + answer, as vLLM counts them) and
the blocks of vLLM's paged allocation, ceil(tokens / block size) with every request's image being different. A
cut engine's KV cache is two groups, the layers before the cut and the layers after it, given as
`before + after = sum`: the group before holds ceil(tokens / block) blocks, the group after ceil((tokens - D) /
block), D the tokens the cut dropped (images x (vision-stage count - keep)), which never hold a block there. A block of a one-group engine holds every layer's KV for its tokens and a block of a cut
engine only its group's layers, so across engines compare the MiB column: blocks x block size x the group's layers
x K and V per token and layer (key-value heads x head size, the engine's dtype). vLLM makes its groups of equal
layer counts: STAR's cut at the middle layer gives exactly the two; a cut at layer 2 (FastV, DART) gives one group
before and 14 alike after it on a 30-layer decoder, each holding the blocks given for "after", which the sum
counts once (the MiB column counts every layer). On a CPU vLLM reserves its KV cache up front:
VLLM_CPU_KVCACHE_SPACE (GiB), 2 here unless set. A step that encodes two 2-megapixel images can outlast vLLM's
300 s limit on a model step on a slower CPU: VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS is 3600 here unless set.

FLOPs: each row's prefill FLOPs over the unpruned row's on the same requests. The decoder's (star.flops, the
paper's formula) for every request from its prompt as vLLM counts it and the setting's plan for its image; for
LLaVA-1.5 and `--config qwen2.5-vl-7b` also with the vision tower's (star.flops, by the same rule: CLIP up to its
feature layer and the projector over the tokens the vision stage keeps; Qwen's windowed and full-attention blocks,
patch embedding and merger), which every setting runs whole (the pruning comes after it). With --config the
tower's figure also holds what the vision-side method computes to choose (`star.flops.vision_selection_flops`, the
method's own code counted from the shapes: STAR's score is one more Q K^T over the score layer's patches, 0.9-1.8%
of the tower at 1-2 megapixels); on LLaVA-1.5 the selection is left out (STAR's score there: 0.2% of the tower),
and so is the cut's score in the decoder everywhere (its text rows against the prompt at one layer). Prefill
efficiency: (1 - time ratio) / (1 - FLOPs ratio), the time a burst's wall time.

`--config NAME` (qwen2.5-vl-7b): a shipped architecture (star/configs) built with random weights and saved as a
checkpoint (once, in a cache folder): its vision tower exactly (but for the merger's output width, the decoder's),
its decoder (`--decoder`) that of the config or a small one of the same layout (Qwen2 layers, M-RoPE: Qwen2.5-0.5B's
width and depth). Its processor is Qwen2.5-VL-
7B-Instruct's image processor settings and chat template, over the default model's BPE tokenizer with Qwen's
vision tokens added (no hub here to fetch Qwen's own). Each request's image is a scene stretched to its own size,
multiples of 28 px from the low to the high `--image-pixels` (1-2 megapixels unless given), so images differ in
size and a budget is best a fraction (`--keep 0.5,0.2,0.1`, the default there). Answers are meaningless, and so
is which tokens a score keeps; how many it keeps, and what that costs, are real.
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from star.eval.stats import mean_interval

# `vllm serve`'s server by its module: vllm-cpu 0.32.0's `vllm` command fails before parsing (it reads the version
# of a distribution named "vllm"; this one is "vllm-cpu"). The module runs the same server with the same arguments.
SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MIB = 2**20
IMAGES = 1  # images per request: every scene question shows one
RANDOM_CONFIGS = ("qwen2.5-vl-7b",)  # --config: shipped architectures this script builds with random weights
# --decoder small: Qwen2.5-0.5B's decoder (Qwen2 layers), with M-RoPE sections in Qwen2.5-VL's proportions for its
# 64-wide heads (16, 24, 24 of 128 halved)
SMALL_DECODER = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
SMALL_MROPE = [8, 12, 12]
# Qwen2.5-VL-7B-Instruct's preprocessor_config.json (its image processor), and its chat template's form for images
QWEN_IMAGES = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=12845056,
                   image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
QWEN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] in ('image', 'image_url') -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
QWEN_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary, _, method = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=method, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory or hub name (default: the project's default model)")
    parser.add_argument("--config", default=None, choices=RANDOM_CONFIGS,
                        help="instead of --model: this shipped architecture with random weights (see below)")
    parser.add_argument("--decoder", default="small", choices=("small", "full"),
                        help="with --config: a small decoder of the config's layout (Qwen2.5-0.5B's 24 layers of 896; default) or the config's own")
    parser.add_argument("--image-pixels", default="1000000,2000000",
                        help="with --config: the images' sizes, LOW,HIGH pixels (each request's its own between them; default 1000000,2000000)")
    parser.add_argument("--method", default="star-vision", help="the vision-side method of the pruned rows, served per request by one engine (default star-vision)")
    parser.add_argument("--cut-method", default="star",
                        help="the method of the rows that also prune inside the decoder (one cut; LLaVA-1.5 and the Qwen families), served as an engine's own "
                             "setting, one engine per budget per mode: star (default; rows 'star (two stages)'), fastv or dart; "
                             "none: no such rows")
    parser.add_argument("--keep", default=None,
                        help="budgets of the pruned rows, visual tokens per image after all pruning (or fractions of each image's), "
                             "comma-separated (default 98,39,20; with --config 0.5,0.2,0.1)")
    parser.add_argument("--requests", type=int, default=16, help="requests per burst (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed bursts per setting after one warm-up (default 3)")
    parser.add_argument("--max-tokens", default="8", help="answer tokens per request, comma-separated: each in bursts of its own (default 8)")
    parser.add_argument("--modes", default="offline,server", help="offline, server or both (default both)")
    parser.add_argument("--gpu", action="store_true", help="bfloat16, CUDA graphs and a larger batch (a GPU machine with vllm installed)")
    parser.add_argument("--apart", action="store_true",
                        help="one engine at a time, each shut down before the next starts: for engines that do not fit in memory together "
                             "(implied by --gpu; on a CPU each engine holds VLLM_CPU_KVCACHE_SPACE and its weights: the default model's four "
                             "held about 22 GB); default: every engine of a mode open together, all their settings taking turns")
    parser.add_argument("--eager", action="store_true", help="every engine without vLLM's compilation (enforce_eager); default: compiled")
    parser.add_argument("--pool", type=Path, nargs="+", default=None, metavar="JSON",
                        help="run nothing: print the paired table over every burst of these earlier runs (their --out files, of one model and "
                             "workload), each burst paired with the unpruned one of its own run")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the measurements go (JSON; default docs/results/vllm-cpu.json, with --config docs/results/vllm-cpu-CONFIG.json)")
    args = parser.parse_args(argv)
    if args.config and args.model:
        parser.error("--config builds a model with random weights: give it or --model, not both")
    args.keep = args.keep or ("0.5,0.2,0.1" if args.config else "98,39,20")
    try:
        args.keeps = [float(k) if "." in k else int(k) for k in args.keep.split(",")]
        args.max_tokens = [int(k) for k in args.max_tokens.split(",")]
        args.image_pixels = [int(k) for k in args.image_pixels.split(",")]
    except ValueError as error:
        parser.error(f"--keep, --max-tokens and --image-pixels take comma-separated numbers ({error})")
    if min(args.max_tokens) < 1:
        parser.error(f"--max-tokens={args.max_tokens} must be at least 1")
    if len(args.image_pixels) != 2 or not 28 * 28 <= args.image_pixels[0] <= args.image_pixels[1]:
        parser.error(f"--image-pixels={args.image_pixels}: give LOW,HIGH with {28 * 28} <= LOW <= HIGH")
    args.apart = args.apart or args.gpu
    args.out = args.out or Path(f"docs/results/vllm-cpu{'-' + args.config if args.config else ''}.json")
    args.modes = args.modes.split(",")
    for mode in args.modes:
        if mode not in ("offline", "server"):
            parser.error(f"--modes: {mode!r} is not offline or server")
    if args.requests < 1 or args.repeats < 1:
        parser.error(f"--requests={args.requests} and --repeats={args.repeats} must be at least 1")
    return args


def engine_args(args: argparse.Namespace) -> dict:
    if args.gpu:
        options = {"dtype": "bfloat16", "max_model_len": 4096, "max_num_seqs": 256, "seed": 0}
    else:
        # 32-token blocks, the CPU backend's smallest (its default is 128): the blocks the cut saves show at these sizes
        options = {"dtype": "float32", "max_model_len": 1024, "max_num_seqs": args.requests, "seed": 0, "block_size": 32}
    options["enforce_eager"] = args.eager
    if args.config:  # vLLM profiles its encoder with the largest image the processor allows: the run's largest, not Qwen's 12.8 MP
        tokens = args.image_pixels[1] // (28 * 28)
        options.update(max_model_len=max(options["max_model_len"], 256 * math.ceil((tokens + 256) / 256)),
                       mm_processor_kwargs={"max_pixels": args.image_pixels[1]})
    return options


@dataclass
class Engine:
    """One engine of a mode and the settings it serves: `star` (the plugin's engine_args: hf_overrides, and a cut's
    engine options) and its rows (each a setting's dict, and the plugin's `Setting` of it, whose plan per image
    gives its token counts); `per_request`: each row's setting goes with its requests (else it is the engine's own);
    `cut`: the engine's decoder cut (its layer; with images of one size, the vision-stage count and the tokens it
    drops per image)."""

    star: dict
    rows: list[tuple[dict, object]]
    per_request: bool
    cut: dict | None = None
    layers: tuple[int, ...] = ()  # the decoder layers of each KV-cache group


def engines(args: argparse.Namespace, config) -> list[Engine]:
    """The shared engine (unpruned and --method, per request), then one engine per --keep for --cut-method. Where
    there are cut rows, the shared engine takes the options a cut needs too (`CUT_ENGINE`: the cut's scheduler, no
    chunked prefill, no prefix caching), so that every engine batches a burst alike and only the cut differs: with
    vLLM's defaults the shared engine would take a burst in one step of up to 4096 tokens where a cut engine takes
    it in steps of up to 2048."""
    from star.integrations.vllm import CUT_ENGINE, config_setting, serves_cut
    from star.integrations.vllm import engine_args as star_engine_args
    from star.integrations.vllm import hf_overrides
    from star.integrations.vllm import n_visual, num_layers

    n, layers = n_visual(config), num_layers(config)
    architecture = (config.architectures or ["?"])[0]
    full = n or 1.0  # the unpruned setting: every token (a fraction where images differ in size)
    raws = [{"method": "none", "keep": full}] + [{"method": args.method, "keep": k} for k in args.keeps]
    rows = [(raw, config_setting(raw, config, f"--method {raw['method']} --keep {raw['keep']}", cuts=False)) for raw in raws]
    shared = Engine({"hf_overrides": hf_overrides("none", full, architecture)}, rows, per_request=True, layers=(layers,))
    if args.cut_method == "none":
        return [shared]
    shared.star.update(CUT_ENGINE)
    if not serves_cut(config):
        raise SystemExit(f"--cut-method {args.cut_method}: the plugin serves no decoder cut on {architecture}; "
                         "--cut-method none runs the other rows")
    cuts = []
    for keep in args.keeps:
        raw = {"method": args.cut_method, "keep": keep}
        setting = config_setting(raw, config, f"--cut-method {args.cut_method} --keep {keep}", cuts=True)
        if setting.cut is None:
            raise SystemExit(f"--cut-method {args.cut_method} at --keep {keep} does not prune inside this model's decoder: "
                             "a vision-side setting belongs in --method")
        layer = setting.cut.layer
        cut = {"layer": layer} if n is None else {"layer": layer, "vision_keep": setting.keep, "dropped_per_image": setting.keep - setting.cut.keep}
        cuts.append(Engine(star_engine_args(args.cut_method, keep, architecture), [(raw, setting)], per_request=False, cut=cut,
                           layers=(layer, layers - layer)))
    return [shared, *cuts]


def label(row: dict) -> str:
    if row["method"] == "none":
        return "unpruned"
    if row.get("cut"):
        return f"{row['method']} ({'two stages' if row['method'] == 'star' else 'decoder cut'}) {row['keep']}"
    return f"{row['method']} {row['keep']}"


@dataclass
class Workload:
    """What every setting serves: the prompts, their questions and images (one each), each image's tokens from the
    encoder, the decoder's shape, and the tower's FLOPs per image (None where not modelled). Burst b of a max_tokens is
    requests [b * requests, (b + 1) * requests) of that max_tokens' own slice: no image is served twice. Where the
    selection is modelled (--config), `selection_view` gives what the vision-side method selects from, by shape."""

    prompts: list[str]
    questions: list[str]
    images: list
    units: list[int]
    texts: list[int]  # the prompt's other tokens
    shape: object
    tower_flops: Callable[[int, int], float] | None  # (image's index, its tokens entering the decoder) -> its tower's FLOPs
    selection_view: Callable[[int], object] | None = None  # image's index -> its feature layer as a VisionView of meta tensors

    def burst(self, args, answer: int, repeat: int) -> slice:
        start = (args.max_tokens.index(answer) * (args.repeats + 1) + repeat) * args.requests
        return slice(start, start + args.requests)


def workload(args, path: str, config) -> Workload:
    """Scene questions, as many as the run serves; with --config, each image stretched to its own size (multiples of
    28 px, its pixels evenly from the low to the high --image-pixels, at most the high, its aspect from 3:4 to 4:3).
    The tower's FLOPs are modelled for LLaVA-1.5 (CLIP) and --config (Qwen2.5-VL), else left out."""
    import torch
    from transformers import AutoProcessor

    from star.adapters.base import MergedView
    from star.data.scenes import TYPES, scene_records
    from star.eval.runner import build_prompt
    from star.flops import DecoderShape, clip_tower_flops, qwen2_5_vision_flops
    from star.integrations.vllm import n_visual

    count = args.requests * (args.repeats + 1) * len(args.max_tokens)
    processor = AutoProcessor.from_pretrained(path)
    records = scene_records("test", per_type=-(-count // len(TYPES)))[:count]
    images = [r.image for r in records]
    units = [n_visual(config)] * count
    tower = selection_view = None
    if (config.architectures or [None])[0] == "LlavaForConditionalGeneration":
        layers = config.vision_feature_layer % (config.vision_config.num_hidden_layers + 1)
        text_width = config.get_text_config().hidden_size

        def tower(image: int, projected: int) -> float:
            return clip_tower_flops(config.vision_config, layers, projected, text_width)
    if args.config:
        low, high = args.image_pixels
        images, units, flops, grids = [], [], [], []
        for i, record in enumerate(records):
            pixels = low + (high - low) * i / max(count - 1, 1)
            aspect = (3 / 4, 1.0, 4 / 3)[i % 3]
            height = max(2, round(math.sqrt(pixels / aspect) / 28))
            width = max(2, min(round(height * aspect), high // (28 * 28 * height)))
            images.append(record.image.resize((28 * width, 28 * height)))
            units.append(height * width)
            grids.append((height, width))
            flops.append(qwen2_5_vision_flops(config.vision_config, 2 * height, 2 * width))

        def tower(image: int, projected: int) -> float:  # the merger runs before the pruning: every setting alike
            return flops[image]

        vision = config.vision_config
        heads, patch_width = vision.num_heads, vision.hidden_size // vision.num_heads

        def selection_view(image: int) -> MergedView:  # the merged tokens, and the score layer's queries and keys of their patches
            rows, columns = grids[image]
            tokens, merge = rows * columns, vision.spatial_merge_size**2
            q, k = (torch.empty(1, heads, tokens * merge, patch_width, device="meta") for _ in range(2))
            features = torch.empty(1, tokens, vision.out_hidden_size, device="meta")
            token_of = torch.arange(tokens, device="meta").repeat_interleave(merge)
            return MergedView(features=features, n_prefix=0, qk=lambda: (q, k), token_of=token_of, grid=(rows, columns))
    prompts = [build_prompt(processor, r.question) for r in records]
    texts = [len(processor.tokenizer(p)["input_ids"]) - IMAGES for p in prompts]  # each image is one placeholder token here
    return Workload(prompts, [r.question for r in records], images, units, texts, DecoderShape.from_config(config.get_text_config()), tower,
                    selection_view)


def random_checkpoint(args) -> str:
    """The --config architecture with random weights (--decoder: its own or the small one), saved with a Qwen2.5-VL
    processor (see the module's docstring) in the engine's dtype, in a cache folder reused while complete."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from star.synthetic import random_model, shipped_config
    from star.zoo import build_default_model

    dtype = engine_args(args)["dtype"]
    home = Path(os.environ.get("STAR_HOME", Path.home() / ".cache" / "star"))
    folder = home / "bench" / f"{args.config}-{args.decoder}-{dtype}-random"
    if (folder / "complete").is_file():
        return str(folder)
    tokenizer = AutoTokenizer.from_pretrained(build_default_model(progress=False))
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    config = shipped_config(args.config)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    text = config.text_config
    fields = {**text.to_dict(), **(SMALL_DECODER if args.decoder == "small" else {}), "vocab_size": 64 * math.ceil(len(tokenizer) / 64),
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    fields.pop("layer_types", None)  # one per layer: the config makes them anew for the new depth
    config.text_config = text = type(text)(**fields)
    if args.decoder == "small":  # the rotary dict (rope_parameters in transformers 5, rope_scaling in 4) in place
        (getattr(text, "rope_parameters", None) or text.rope_scaling)["mrope_section"] = SMALL_MROPE
    config.vision_config.out_hidden_size = text.hidden_size  # the merger's output is the decoder's width (Qwen2.5-VL-3B's 2048 likewise)
    for name, value in {**ids, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}.items():
        setattr(config, name, value)
    device = "cuda" if args.gpu else "cpu"
    model = random_model(config, device, getattr(torch, dtype), "sdpa")
    images = Qwen2VLImageProcessor(**QWEN_IMAGES)
    videos = Qwen2VLVideoProcessor(**{k: v for k, v in QWEN_IMAGES.items() if k not in ("min_pixels", "max_pixels")})
    processor = Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos, chat_template=QWEN_TEMPLATE)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "complete").write_text(json.dumps({"config": args.config, "decoder": args.decoder, "dtype": dtype}) + "\n")
    del model
    gc.collect()
    return str(folder)


def kv_blocks(prompt_tokens: int, answer_tokens: int, block_size: int, dropped: int | None = None) -> tuple[int, ...]:
    """The blocks of each KV-cache group a request holds at its end, from its token counts (prompt as vLLM counts
    it): one group without a cut (`dropped` None); with a cut that dropped `dropped` tokens, the group before the
    cut, and the group after it, which holds the kept tokens alone (`cut_blocks`)."""
    from star.integrations.vllm.cut import cut_blocks

    held = math.ceil((prompt_tokens + answer_tokens) / block_size)
    if dropped is None:
        return (held,)
    return (held, cut_blocks(prompt_tokens + answer_tokens, dropped, block_size))


def kv_bytes_per_token_layer(config, dtype: str) -> int:
    """K and V of one token in one decoder layer: 2 x key-value heads x head size x the dtype's bytes."""
    text = config.get_text_config()
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_key_value_heads * head * DTYPE_BYTES[dtype]


@contextmanager
def offline_engine(args, path: str, engine: Engine, kv_unit: int, work: Workload) -> Iterator[Callable]:
    """An `LLM` of the engine, open while the context lasts, as its `serve(max_tokens, raw, setting, burst)`."""
    from vllm import LLM, SamplingParams

    llm = LLM(path, disable_log_stats=False, **{**engine_args(args), **engine.star})
    try:
        block_size = llm.llm_engine.vllm_config.cache_config.block_size

        def serve(answer: int, raw: dict, setting, burst: slice) -> dict:
            own = {"mm_processor_kwargs": {"star": raw}} if engine.per_request else {}
            requests = [{"prompt": p, "multi_modal_data": {"image": i}, **own} for p, i in zip(work.prompts[burst], work.images[burst])]
            start = time.perf_counter()
            outputs = llm.generate(requests, SamplingParams(max_tokens=answer, temperature=0.0, ignore_eos=True), use_tqdm=False)
            wall = time.perf_counter() - start
            answers = [len(o.outputs[0].token_ids) for o in outputs]
            _check_answers(answers, [o.outputs[0].finish_reason for o in outputs], answer, raw)
            return _burst(wall, [len(o.prompt_token_ids) for o in outputs], [o.metrics.first_token_latency for o in outputs],
                          answers, block_size, engine, setting, kv_unit, work, burst)

        yield serve
    finally:  # the engine core's process ends here, its KV cache with it
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@contextmanager
def server_engine(args, path: str, engine: Engine, kv_unit: int, work: Workload) -> Iterator[Callable]:
    """A `vllm serve` of the engine, running while the context lasts, as its `serve(max_tokens, raw, setting, burst)`."""
    import openai

    from star.eval.records import QUESTION_SUFFIX
    from star.integrations.vllm import server_flags

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [*SERVE, "--model", path, "--host", "127.0.0.1", "--port", str(port), *server_flags({**engine_args(args), **engine.star})]
    command += ["--trust-request-mm-kwargs"] if engine.per_request else []
    log = tempfile.NamedTemporaryFile("w", prefix="vllm-serve-", suffix=".log", delete=False)
    print(f"vllm serve's log: {log.name}", file=sys.stderr)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=3600)
    try:
        _wait(client, process)
        block_size = _block_size(port)
        images = [_image_url(i) for i in work.images]

        def serve(answer: int, raw: dict, setting, burst: slice) -> dict:
            start = time.perf_counter()
            replies = _burst_requests(client, path, work.questions[burst], images[burst], raw if engine.per_request else None, answer,
                                      QUESTION_SUFFIX, start)
            wall = time.perf_counter() - start
            _check_answers([r[2] for r in replies], [r[3] for r in replies], answer, raw)
            return _burst(wall, [r[0] for r in replies], [r[1] for r in replies], [r[2] for r in replies], block_size, engine, setting,
                          kv_unit, work, burst)

        yield serve
    finally:  # the server's process group: its engine and worker processes stop with it
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)


def _alternate(args, mode: str, work: Workload, served: list[tuple[Engine, Callable[[int, dict, object, slice], dict]]]) -> Iterator[list[dict]]:
    """The rows of every engine open together, their settings taking turns burst by burst (a warm-up burst of each,
    then each setting's first timed burst, then its second, ...), so that a machine whose speed drifts over the run
    slows every setting alike, a cut engine's as much as the shared engine's; the order of the turns rotates by one
    setting every burst, so that no setting always runs right after the same one (on the 2-core machine star-vision
    0.5 took 0.98 of the unpruned time in a round's last place and 0.93 in its second, where 0.1 took 0.91 in both: a
    place effect or noise, rotated out either way). `served`: each engine with its `serve(max_tokens, raw, setting,
    burst)`, which serves one burst and returns its figures; a line on stderr per burst shows the run's progress.
    Yields the rows of each answer length once every setting's last burst of it is served."""
    turns = [(engine, raw, setting, serve) for engine, serve in served for raw, setting in engine.rows]
    for answer in args.max_tokens:
        bursts: list[list[dict]] = [[] for _ in turns]
        for repeat in range(args.repeats + 1):
            burst = work.burst(args, answer, repeat)
            for turn in range(len(turns)):
                index = (turn + repeat) % len(turns)
                (_, raw, setting, serve), timed = turns[index], bursts[index]
                figures = serve(answer, raw, setting, burst)
                print(f"{mode}, {answer} answer tokens, {raw['method']} {raw['keep']}: "
                      f"{f'timed burst {repeat} of {args.repeats}' if repeat else 'warm-up'}, {figures['wall_s']:.1f} s", file=sys.stderr, flush=True)
                if repeat:
                    timed.append(figures)
        rows = [_row(mode, answer, raw, engine, timed) for (engine, raw, _, _), timed in zip(turns, bursts)]
        print("\n".join(json.dumps(row) for row in rows), flush=True)
        yield rows


def _burst_requests(client, model, questions, images, setting, max_tokens, suffix, start) -> list[tuple[int, float, int, str]]:
    """Every request at once, one thread each, streamed: (prompt tokens, time to first token, answer tokens, finish
    reason). `setting`: the requests' own (`mm_processor_kwargs`), or None for the engine's. The first token is the
    first chunk that carries token ids (`return_token_ids`), whether or not its text is empty (a token that decodes
    to nothing yet, which random weights give)."""
    replies: list = [None] * len(questions)
    extra = {"ignore_eos": True, "return_token_ids": True, **({"mm_processor_kwargs": {"star": setting}} if setting is not None else {})}

    def ask(index: int) -> None:
        content = [{"type": "image_url", "image_url": {"url": images[index]}},
                   {"type": "text", "text": f"{questions[index]}\n{suffix}"}]
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra,
        )
        first, usage, finish = None, None, None
        for chunk in stream:
            if first is None and chunk.choices and (chunk.choices[0].model_extra or {}).get("token_ids"):
                first = time.perf_counter() - start
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
        replies[index] = (usage.prompt_tokens, first, usage.completion_tokens, finish)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if None in replies:
        raise RuntimeError(f"{replies.count(None)} of {len(replies)} streamed requests failed (their threads' errors are above)")
    if any(r[1] is None for r in replies):
        raise RuntimeError("a streamed answer carried no token ids: its time to first token is unknown")
    return replies


def _check_answers(answers: list[int], reasons: list, max_tokens: int, setting: dict) -> None:
    """Every answer as long as asked (ignore_eos): a shorter one ended early, e.g. a cut request that vLLM preempted
    (its scheduler ends it with an error rather than recomputing it), which would make the burst look faster."""
    short = [(a, r) for a, r in zip(answers, reasons) if a != max_tokens]
    if short:
        raise RuntimeError(f"{setting}: {len(short)} of {len(answers)} answers ended before {max_tokens} tokens "
                           f"(tokens, finish reason: {short[:4]}); a cut request ends so when its KV cache runs short")


def _burst(wall: float, prompt: list[int], ttft: list[float], answer: list[int], block_size: int, engine: Engine, setting, kv_unit: int,
           work: Workload, burst: slice) -> dict:
    """A timed burst's figures. Each request's plan for its image (the setting's `unit_plan`) gives its vision-stage
    count, which with its text must be vLLM's prompt count (else the run stops: what vLLM served is not what is
    counted), the tokens its cut drops and its decoder FLOPs."""
    from star.flops import prefill_flops, tokens_per_layer, vision_selection_flops

    units, texts = work.units[burst], work.texts[burst]
    plans = [setting.unit_plan(n) for n in units]
    expected = [t + plan.vision_keep * IMAGES for t, plan in zip(texts, plans)]
    if expected != prompt:
        raise RuntimeError(f"{setting.text}: vLLM counted prompts of {prompt} tokens where the plans give {expected} (text + vision stage)")
    dropped = [IMAGES * (plan.vision_keep - plan.llm_stages[0].keep) for plan in plans] if engine.cut else [None] * len(prompt)
    groups = [kv_blocks(p, a, block_size, d) for p, a, d in zip(prompt, answer, dropped)]
    decoder = [prefill_flops(work.shape, tokens_per_layer(work.shape.num_layers, t, plan.vision_keep * IMAGES,
                                                          [(s.layer, s.keep * IMAGES) for s in plan.llm_stages]))
               for t, plan in zip(texts, plans)]
    result = {
        "wall_s": wall, "requests_per_s": len(prompt) / wall, "prompt_tokens_per_s": sum(prompt) / wall,
        "ttft_s": statistics.median(ttft), "prompt_tokens": statistics.median(prompt), "text_tokens": statistics.median(texts),
        "image_tokens_unpruned": statistics.median(units),
        "kv_tokens": statistics.median(p + a for p, a in zip(prompt, answer)),
        "kv_blocks": statistics.median(sum(g) for g in groups), "block_size": block_size,
        "kv_mib": statistics.median(sum(b * block_size * n * kv_unit for b, n in zip(g, engine.layers)) / MIB for g in groups),
        "decoder_flops": sum(decoder),
    }
    if work.tower_flops is not None:
        result["tower_flops"] = sum(work.tower_flops(i, plan.vision_keep) for i, plan in zip(range(burst.start, burst.stop), plans))
    if work.selection_view is not None:  # the plugin selects where the vision stage keeps fewer than the image's tokens
        result["selection_flops"] = sum(vision_selection_flops(setting.method, work.selection_view(i), plan.vision_keep)
                                        for i, plan in zip(range(burst.start, burst.stop), plans) if plan.vision_keep < plan.n_visual)
    if engine.cut:
        result["prompt_tokens_after_cut"] = statistics.median(p - d for p, d in zip(prompt, dropped))
        result["kv_blocks_before_cut"] = statistics.median(g[0] for g in groups)
        result["kv_blocks_after_cut"] = statistics.median(g[1] for g in groups)
    return result


def _row(mode: str, answer: int, raw: dict, engine: Engine, bursts: list[dict]) -> dict:
    """Medians over the bursts; FLOPs summed over them (the same requests for every setting of a mode). Each burst's
    wall time, the load average and the memory left when the row is written go with it: what a drift between engines
    that ran one after another would show in."""
    summed = ("decoder_flops", "tower_flops", "selection_flops")
    median = {key: statistics.median(b[key] for b in bursts) for key in bursts[0] if key not in summed}
    median["block_size"] = bursts[0]["block_size"]  # the engine's, not a median (which of two is a float)
    row = {"mode": mode, "max_tokens": answer, "method": raw["method"], "keep": raw["keep"], "repeats": len(bursts), **median,
           **{key: sum(b[key] for b in bursts) for key in summed if key in bursts[0]},
           "burst_wall_s": [b["wall_s"] for b in bursts], "load_average": os.getloadavg(), "mem_available_gib": _mem_available_gib()}
    if engine.cut:
        row.update(cut=engine.cut, kv_group_layers=list(engine.layers),
                   engine_options={k: v for k, v in engine.star.items() if k != "hf_overrides"})
    return row


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    return round(kib / 2**20, 2)


def _wait(client, process, timeout: float = 1800) -> None:
    import openai

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}: see its log (printed at its start)")
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not answer within {timeout} s") from None
            time.sleep(2)


def _block_size(port: int) -> int:
    """The KV block size the server runs with, from its Prometheus cache-config gauge."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    line = next(line for line in text.splitlines() if line.startswith("vllm:cache_config_info"))
    return int(line.split('block_size="')[1].split('"')[0])


def _image_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _unpruned(results: list[dict], row: dict) -> dict:
    """The unpruned row of `row`'s mode and answer length: what every ratio of `row` is to."""
    return next(r for r in results if (r["mode"], r["max_tokens"], r["method"]) == (row["mode"], row["max_tokens"], "none"))


def flops_ratios(row: dict, base: dict) -> tuple[float, float | None]:
    """A row's prefill FLOPs over the unpruned row's: the decoder's, and with the tower's and the selection's where
    modelled (None where the tower is not)."""
    decoder = row["decoder_flops"] / base["decoder_flops"]
    if "tower_flops" not in row:
        return decoder, None
    whole = ("decoder_flops", "tower_flops", "selection_flops")
    return decoder, sum(row.get(key, 0.0) for key in whole) / sum(base.get(key, 0.0) for key in whole)


def efficiency(time_ratio: float, flops_ratio: float | None) -> str:
    """(1 - time ratio) / (1 - FLOPs ratio): the share of the FLOPs saved that the time saved."""
    if flops_ratio is None or flops_ratio >= 1:
        return "-"
    return f"{(1 - time_ratio) / (1 - flops_ratio):.2f}"


def table(results: list[dict], vision_method: str = "star-vision") -> str:
    """The markdown table: per mode and answer length the unpruned row, then per budget the vision-side row and the
    cut row."""
    lines = [
        f"| mode | answer tokens | setting | prompt tokens | requests/s (x unpruned; x {vision_method}) | prompt tokens/s | TTFT (s) (x unpruned; x {vision_method}) "
        "| KV cache / request: tokens; blocks (before + after cut = sum) of block size; MiB "
        "| FLOPs x unpruned: decoder; with tower | prefill efficiency (wall time): decoder; with tower |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = list(dict.fromkeys((r["mode"], r["max_tokens"]) for r in results))
    keeps = list(dict.fromkeys(r["keep"] for r in results if r["method"] != "none"))
    order = sorted(results, key=lambda r: (groups.index((r["mode"], r["max_tokens"])), r["method"] != "none",
                                           keeps.index(r["keep"]) if r["method"] != "none" else 0, bool(r.get("cut"))))
    for row in order:
        same = [r for r in results if (r["mode"], r["max_tokens"]) == (row["mode"], row["max_tokens"])]
        base = _unpruned(results, row)
        vision = next((r for r in same if r["method"] == vision_method and r["keep"] == row["keep"] and not r.get("cut")), None)

        def cell(key: str) -> str:  # three significant digits: a 2-megapixel request on a CPU is 0.00426 requests/s
            ratios = f"{row[key] / base[key]:.2f}x" + (f"; {row[key] / vision[key]:.2f}x" if row.get("cut") and vision else "")
            return f"{row[key]:.3g} ({ratios})"

        if row.get("cut"):
            prompt = f"{row['prompt_tokens']:.0f} ({row['prompt_tokens_after_cut']:.0f} after the cut)"
            held = f"{row['kv_blocks_before_cut']:.0f} + {row['kv_blocks_after_cut']:.0f} = {row['kv_blocks']:.0f}"
        else:
            prompt, held = f"{row['prompt_tokens']:.0f}", f"{row['kv_blocks']:.0f}"
        decoder, whole = flops_ratios(row, base)
        time_ratio = row["wall_s"] / base["wall_s"]
        flops = f"{decoder:.2f}; {'-' if whole is None else f'{whole:.2f}'}"
        lines.append(
            f"| {row['mode']} | {row['max_tokens']} | {label(row)} | {prompt} | {cell('requests_per_s')} | {row['prompt_tokens_per_s']:.3g} "
            f"| {cell('ttft_s')} | {row['kv_tokens']:.0f}; {held} of {row['block_size']}; {row['kv_mib']:.1f} "
            f"| {flops} | {efficiency(time_ratio, decoder)}; {efficiency(time_ratio, whole)} |"
        )
    return "\n".join(lines)


def paired(runs: list[list[dict]]) -> str:
    """Each pruned setting's bursts against the unpruned row's same bursts (the same requests) of its own run: each
    burst's time ratio, their mean with its 95% interval (Student's t over the bursts, `star.eval.stats`), and the
    prefill efficiency at the mean and at the interval's ends, against the FLOPs (with the tower where it is
    modelled, else the decoder's) saved on average over the bursts. With one request per burst, each image of its
    own size, this pairs every image with itself, where the medians above pair a setting's middle image with the
    unpruned row's. Several runs (`--pool`) pool their bursts, each paired within its run."""
    settings: dict[tuple, list[tuple[list[float], float, bool]]] = {}
    for results in runs:
        for row in results:
            base = _unpruned(results, row)
            if row is base:
                continue
            decoder, whole = flops_ratios(row, base)
            ratios = [t / u for t, u in zip(row["burst_wall_s"], base["burst_wall_s"])]
            settings.setdefault((row["mode"], row["max_tokens"], label(row)), []).append((ratios, decoder if whole is None else whole, whole is not None))
    lines = ["| mode | answer tokens | setting | time x unpruned, each burst (runs apart by /) | bursts | mean (95% interval) "
             "| FLOPs x unpruned | prefill efficiency at the mean (95% interval) |",
             "|---|---|---|---|---|---|---|---|"]
    for (mode, answer, name), parts in settings.items():
        ratios = [r for part, _, _ in parts for r in part]
        flops = sum(len(part) * flops for part, flops, _ in parts) / len(ratios)  # per burst on average
        if len(ratios) > 1:
            mean, (low, high) = mean_interval(ratios)
            time_cell = f"{mean:.3f} ({low:.3f}-{high:.3f})"
            spread = f" ({efficiency(high, flops)} to {efficiency(low, flops)})" if flops < 1 else ""
        else:
            mean, time_cell, spread = ratios[0], f"{ratios[0]:.3f}", ""
        each = " / ".join(", ".join(f"{r:.3f}" for r in part) for part, _, _ in parts)
        tower = " with tower" if all(modelled for _, _, modelled in parts) else ""
        lines.append(f"| {mode} | {answer} | {name} | {each} | {len(ratios)} | {time_cell} | {flops:.3f}{tower} | {efficiency(mean, flops)}{spread} |")
    return "\n".join(lines)


def pooled_runs(paths: list[Path]) -> list[list[dict]]:
    """The results of several runs' JSON files, refused unless they measured one model the same way."""
    records = [json.loads(path.read_text()) for path in paths]
    for path, record in zip(paths, records):
        if any("burst_wall_s" not in row for row in record["results"]):
            raise SystemExit(f"--pool: {path} has no time per burst (burst_wall_s): a run from before the bench kept them")
    same = ("model", "config", "decoder", "decoder_shape", "image_pixels", "requests")
    for path, record in zip(paths[1:], records[1:]):
        differ = [key for key in same if record.get(key) != records[0].get(key)]
        if differ:
            raise SystemExit(f"--pool: {path} differs from {paths[0]} in {', '.join(differ)}; pool only runs of one model and workload")
    return [record["results"] for record in records]


def equal_flops(results: list[dict], vision_method: str = "star-vision") -> str:
    """Each cut row beside the vision-side method at the same decoder FLOPs: its requests/s and TTFT interpolated
    linearly in the decoder FLOPs ratio between the two rows of the same mode and answer length (vision-side or
    unpruned) around the cut row's ratio; none where the cut row's ratio is below every vision-side row's. The
    medians, and burst by burst (the same requests in every row): the mean of the bursts' ratios with its 95%
    interval."""
    lines = [f"| mode | answer tokens | setting | decoder FLOPs x unpruned | requests/s x {vision_method} at equal FLOPs: medians; "
             f"each burst, mean (95% interval) | TTFT x {vision_method} at equal FLOPs |",
             "|---|---|---|---|---|---|"]
    for row in (r for r in results if r.get("cut")):
        same = [r for r in results if (r["mode"], r["max_tokens"]) == (row["mode"], row["max_tokens"]) and not r.get("cut")]
        base = _unpruned(results, row)
        points = sorted((flops_ratios(r, base)[0], r) for r in same if r["method"] in ("none", vision_method))
        ratio = flops_ratios(row, base)[0]
        around = [(a, b) for a, b in zip(points, points[1:]) if a[0] <= ratio <= b[0]]
        if not around:
            continue
        (x0, r0), (x1, r1) = around[0]
        weight = (ratio - x0) / (x1 - x0) if x1 > x0 else 0.0
        at = {key: r0[key] + weight * (r1[key] - r0[key]) for key in ("requests_per_s", "ttft_s")}
        speed = f"{row['requests_per_s'] / at['requests_per_s']:.2f}x"
        if len(row.get("burst_wall_s", ())) > 1:  # requests/s of a burst: its requests over its wall time
            bursts = [(1 / w) / (1 / a + weight * (1 / b - 1 / a)) for w, a, b in zip(row["burst_wall_s"], r0["burst_wall_s"], r1["burst_wall_s"])]
            mean, (low, high) = mean_interval(bursts)
            speed += f"; {mean:.2f}x ({low:.2f}-{high:.2f})"
        lines.append(f"| {row['mode']} | {row['max_tokens']} | {label(row)} | {ratio:.2f} | {speed} | {row['ttft_s'] / at['ttft_s']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.pool:
        print(paired(pooled_runs(args.pool)))
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
    from transformers import AutoConfig

    path = args.model
    if args.config:
        path = random_checkpoint(args)
    elif path is None:
        from star.zoo import build_default_model

        path = str(build_default_model())
    config = AutoConfig.from_pretrained(path)
    plan = engines(args, config)
    work = workload(args, path, config)
    kv_unit = kv_bytes_per_token_layer(config, engine_args(args)["dtype"])
    text = config.get_text_config()
    record = {"command": " ".join(["scripts/bench_vllm.py", *(argv if argv is not None else sys.argv[1:])]), "model": path,
              "config": args.config, "decoder": args.decoder if args.config else None,
              "decoder_shape": {k: getattr(text, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")},
              "image_pixels": args.image_pixels if args.config else None,
              "requests": args.requests, "max_tokens": args.max_tokens, "method": args.method, "cut_method": args.cut_method,
              "kv_cache_gib": None if args.gpu else os.environ["VLLM_CPU_KVCACHE_SPACE"],
              "engines": "apart" if args.apart else "together", "load_average_at_start": os.getloadavg(), "results": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    groups = [[engine] for engine in plan] if args.apart else [plan]
    for mode, open_engine in (("offline", offline_engine), ("server", server_engine)):
        if mode in args.modes:
            for group in groups:
                with ExitStack() as stack:
                    served = [(engine, stack.enter_context(open_engine(args, path, engine, kv_unit, work))) for engine in group]
                    for rows in _alternate(args, mode, work, served):
                        record["results"] += rows
                        record["load_average"] = os.getloadavg()
                        args.out.write_text(json.dumps(record, indent=1) + "\n")  # what has run so far, should a later burst fail
    print(table(record["results"], args.method))
    print()
    print(paired([record["results"]]))
    print()
    print(equal_flops(record["results"], args.method))


if __name__ == "__main__":
    main()

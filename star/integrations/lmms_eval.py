"""lmms-eval backend `star`: any lmms-eval task, answered by a Hugging Face VLM pruned with `star.apply`.

    star lmms-eval --model star --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=star,keep=58 \
        --tasks mme,pope --batch_size 8 --log_samples --output_path logs/

`star lmms-eval ARGS` registers the backend in lmms-eval's model registry (no file of lmms-eval is edited)
and hands ARGS to lmms-eval's own command line unchanged; `--model star` is added when no `--model` is
given. Written against lmms-eval 0.7.3 (the `[lmms]` extra pins it).

model_args: pretrained (a checkpoint directory or hub id of a family of star.families: LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL3, Gemma 3; each prompt built by its own chat template), method, keep
(an int or a fraction), positions, dtype (auto, float16, bfloat16, float32), attn_implementation (default
sdpa), template (`model`: the checkpoint's chat template, as `star eval` prompts; `vicuna_v1`: the same with
LLaVA's system line, as the LLaVA-1.5 papers evaluate), and the method's own options as `star --option` spells
them (layer=16, stage1_ratio=0.15 for star, layers=8/16/24 for pdrop; `star methods` lists them). Each sample log gets, under `token_counts`, the prompt and answer lengths
and STAR's record of its prefill: visual tokens per stage, prefill FLOPs, prefill time, the whole generate()
time (latency; a batch's time shared evenly) and peak GPU memory.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image

import star
from star.checks import check_setting, model_skeleton
from star.data.vqa import exact_match
from star.eval.records import QUESTION_SUFFIX, read_jsonl
from star.methods import build, parse_option
from star.pruner import POSITION_POLICIES

BACKEND = "star"
CLASS_PATH = "star.integrations.lmms_eval.Star"
# LLaVA's `vicuna_v1` conversation: the system line the LLaVA-1.5 papers evaluate with (lmms-eval's `llava`).
TEMPLATES = {
    "model": None,
    "vicuna_v1": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
}
DTYPES = ("auto", "float16", "bfloat16", "float32")
IMAGE_MARK = "<image>"


@dataclass
class StarCounts(TokenCounts):
    """lmms-eval's per-sample token counts, plus what pruning did to the sample's prefill.

    Why this channel: it is the one per-sample record a backend hands to lmms-eval's sample logs
    (`token_counts` in samples_*.jsonl). FLOPs are the decoder's prefill FLOPs by the paper's formula; a
    padded batch's FLOPs are shared evenly among its prompts (exact at batch size 1, as `star eval` does).
    """

    visual_tokens: list[int] = field(default_factory=list)
    prefill_flops: float | None = None
    prefill_s: float | None = None
    latency_s: float | None = None
    peak_memory_bytes: int | None = None

    def to_dict(self) -> dict:
        extra = {
            "visual_tokens": self.visual_tokens,
            "prefill_flops": self.prefill_flops,
            "prefill_s": self.prefill_s,
            "latency_s": self.latency_s,
            "peak_memory_bytes": self.peak_memory_bytes,
        }
        return {**super().to_dict(), **{k: v for k, v in extra.items() if v is not None}}


def method_options(method: str, options: dict) -> dict:
    """The method's own model_args, typed as `star --option` types them: lmms-eval has read the numbers, and text
    (layers=8/16/24, or a malformed value) is read here by the method's field."""
    return {name: parse_option(method, name, value) if isinstance(value, str) else value for name, value in options.items()}


def check_model_args(method: str = "star", keep: int | float = 0.1, positions: str | None = None, dtype: str = "auto", template: str = "model", **options: object) -> None:
    """Reject bad model_args before any model is loaded (the scripts' test calls this without a model)."""
    build(method, **method_options(method, options))  # unknown method or option: a ValueError naming it
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or keep <= 0:
        raise ValueError(f"keep={keep!r} must be a positive int (tokens) or a fraction in (0, 1]")
    if positions is not None and positions not in POSITION_POLICIES:
        raise ValueError(f"positions={positions!r} is unknown: allowed are {', '.join(POSITION_POLICIES)} (or none given: the method's own)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown: allowed are {', '.join(DTYPES)}")
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is unknown: allowed are {', '.join(TEMPLATES)}")


def check_checkpoint(pretrained: str, method: str, keep: int | float, positions: str, options: dict) -> None:
    """Reject a budget or option that this checkpoint cannot take, from its config.json alone (no weights)."""
    check_setting(model_skeleton(pretrained, argument="model_args pretrained"), method, keep, options, positions)


class Star(lmms):
    """A pruned Hugging Face VLM as an lmms-eval model (generate_until tasks, batches with left padding)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "star",
        keep: int | float = 0.1,
        positions: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        template: str = "model",
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **options: object,
    ) -> None:
        super().__init__()
        from accelerate import Accelerator

        from star.families import load_model, load_processor

        options = method_options(method, options)
        check_model_args(method, keep, positions, dtype, template, **options)
        check_checkpoint(pretrained, method, keep, positions, options)
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int ('auto' is not supported)")
        accelerator = Accelerator()
        if accelerator.num_processes > 1:  # one GPU per data-parallel process; lmms-eval shards the requests
            device = f"cuda:{accelerator.local_process_index}"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self.accelerator = accelerator
        weights_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.processor = load_processor(pretrained, "model_args pretrained")
        self.model = load_model(pretrained, weights_dtype, attn_implementation, "model_args pretrained")
        self.model.to(self._device).eval()
        self.processor.tokenizer.padding_side = "left"
        self.system = TEMPLATES[template]
        self.batch_size = int(batch_size)
        self.pruner = star.apply(self.model, method=method, keep=keep, positions=positions, **options)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def prompt(self, context: str, n_images: int) -> str:
        """The chat-templated prompt: the images first, then the task's text (as `star eval` builds it)."""
        content = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": context.replace(IMAGE_MARK, "").strip()})
        messages = [{"role": "user", "content": content}]
        if self.system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answers in the order of `requests`, batched among requests of the same task and generation options."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            context, gen_kwargs, _, _, task, split = request.args
            groups.setdefault(json.dumps([gen_kwargs, task, split], sort_keys=True, default=str), []).append(index)
        results: list[GenerationResult | None] = [None] * len(requests)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc=f"star {self.pruner.method.name} keep={self.pruner.keep}", disable=self.rank != 0)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, result in zip(chunk, self._answer([requests[i] for i in chunk])):
                    results[index] = result
                bar.update(len(chunk))
        bar.close()
        return results

    @torch.no_grad()
    def _answer(self, requests: list[Instance]) -> list[GenerationResult]:
        contexts, images = [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) or [] if v is not None]
            if not all(isinstance(v, Image.Image) for v in visuals):
                raise ValueError(f"task {task!r} doc {doc_id}: the star backend answers about images only (got {[type(v).__name__ for v in visuals]})")
            contexts.append(self.prompt(context, len(visuals)))
            images.append([v.convert("RGB") for v in visuals])
        gen_kwargs = dict(requests[0].args[1])
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        # one list of images per prompt, the form every family's processor takes (Gemma 3's needs it)
        inputs = self.processor(images=images if any(images) else None, text=contexts, return_tensors="pt", padding=True).to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        marks: list[float] = []
        handle = self.model.register_forward_hook(lambda *_: marks.append(time.perf_counter()))
        try:
            start = time.perf_counter()
            output = self.model.generate(**inputs, **_generation_options(gen_kwargs, self.processor.tokenizer))
        finally:
            handle.remove()
        latency_s = (time.perf_counter() - start) / len(requests)
        prefill_s = (marks[0] - start) / len(requests)
        peak = torch.cuda.max_memory_allocated(self._device) if self._device.type == "cuda" else None
        stats = self.pruner.stats
        width = inputs["input_ids"].shape[1]
        results = []
        for row, answer_ids in enumerate(output[:, width:]):
            text = self.processor.decode(answer_ids, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            counts = StarCounts(
                input_tokens=int(inputs["attention_mask"][row].sum()),
                output_tokens=int((answer_ids != self.processor.tokenizer.pad_token_id).sum()),
                visual_tokens=list(stats.totals[row]),
                prefill_flops=stats.flops / stats.batch_size,
                prefill_s=prefill_s,
                latency_s=latency_s,
                peak_memory_bytes=peak,
            )
            results.append(GenerationResult(text.strip(), counts))
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the star backend answers generate_until tasks only (no loglikelihood)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the star backend answers generate_until tasks only (no multi-round)")


def _generation_options(gen_kwargs: dict, tokenizer) -> dict:
    """lmms-eval's generation_kwargs as `generate()` takes them: greedy unless a temperature above 0 asks otherwise."""
    sample = bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature") or 0) > 0
    options = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens", 128)),
        "num_beams": int(gen_kwargs.get("num_beams") or 1),
        "do_sample": sample,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if sample:
        options["temperature"] = float(gen_kwargs.get("temperature") or 1.0)
        if gen_kwargs.get("top_p") is not None:
            options["top_p"] = float(gen_kwargs["top_p"])
    return options


# -- a local task over a `star eval` JSONL file ---------------------------------------------------------


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question and the short-answer cue, exactly as `star eval` asks it."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """`star eval`'s score: VQA-normalised exact match."""
    return {"accuracy": float(exact_match(results[0], doc["answer"]))}


def write_task(data: Path | str, folder: Path | str, name: str, max_new_tokens: int = 8) -> Path:
    """An lmms-eval task (YAML + JSON) over a `star eval` JSONL file, for `--include_path folder --tasks name`.

    Why: the same questions, prompt and score in both tools, so their accuracies can be compared.
    """
    records, skipped = read_jsonl(Path(data))
    if skipped:
        raise ValueError(f"data={str(data)!r} has lines a task cannot use: {skipped[0]}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": r.id, "image": str(r.image), "question": r.question, "answer": r.answer, "type": r.type} for r in records]
    (folder / f"{name}.json").write_text(json.dumps(rows))
    here = __name__
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {name}.json\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: !function {here}.doc_to_visual\n"
        f"doc_to_text: !function {here}.doc_to_text\n"
        "doc_to_target: answer\n"
        f"generation_kwargs:\n  max_new_tokens: {max_new_tokens}\n  temperature: 0\n  do_sample: false\n  until: []\n"
        f"process_results: !function {here}.process_results\n"
        "metric_list:\n  - metric: accuracy\n    aggregation: mean\n    higher_is_better: true\n"
        f"lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ''\n    post_prompt: {json.dumps(chr(10) + QUESTION_SUFFIX)}\n"
    )
    return folder / f"{name}.yaml"


# -- registration and the `star lmms-eval` command ------------------------------------------------------


def manifest():
    """The backend's manifest, for lmms-eval's `lmms_eval.models` entry-point group."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=BACKEND, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make `--model star` known to lmms-eval in this process (its registry is a module-level object)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def check_command(argv: list[str]) -> None:
    """The star backend's --model_args, checked before lmms-eval loads any task or weights.

    Names and values as `Star` takes them, and the budget and options against the checkpoint's config. A run
    configured otherwise (lmms-eval's --config file) is checked when lmms-eval builds the model.
    """
    from lmms_eval.utils import simple_parse_args_string

    if "-h" in argv or "--help" in argv or _flag(argv, "--model", BACKEND) != BACKEND or _flag(argv, "--config"):
        return
    model_args = simple_parse_args_string(_flag(argv, "--model_args", ""))
    if "pretrained" not in model_args:
        raise ValueError("--model_args has no pretrained=: name the checkpoint, a model directory or a hub id")
    try:
        given = inspect.signature(Star.__init__).bind(None, **model_args).arguments
    except TypeError as error:
        raise ValueError(f"--model_args: {error}") from None
    options = method_options(given.get("method", "star"), given.get("options", {}))
    method, keep, positions = given.get("method", "star"), given.get("keep", 0.1), given.get("positions", "original")
    check_model_args(method, keep, positions, given.get("dtype", "auto"), given.get("template", "model"), **options)
    check_checkpoint(given["pretrained"], method, keep, positions, options)


def _flag(argv: list[str], name: str, default: str | None = None) -> str | None:
    """The value of `name` in argv, spelled `name VALUE` or `name=VALUE`."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return default


def main(argv: list[str] | None = None) -> int:
    """`star lmms-eval ARGS`: lmms-eval's command line with the star backend registered."""
    from lmms_eval.cli.dispatch import main as lmms_main

    argv = list(sys.argv[1:] if argv is None else argv)
    register()
    if argv and argv[0].startswith("-") and _flag(argv, "--model") is None:
        argv = ["--model", BACKEND, *argv]
    check_command(argv)
    sys.argv = ["lmms-eval", *argv]
    lmms_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

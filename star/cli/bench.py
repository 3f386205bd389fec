"""`star bench`: prefill time, decode speed and memory of each setting against the unpruned model and the oracle."""

from __future__ import annotations

import argparse
import json

from star import synthetic
from star.cli.args import (
    add_model_options, add_option_argument, budget, command, count, label, list_of, load, new_file, positive, setting_names,
    settings,
)


def add(commands: argparse._SubParsersAction) -> None:
    sub = command(
        commands, "bench",
        help="prefill time, decode speed and memory against the unpruned model and the oracle",
        description="Medians over repeated runs after warm-up, per batch size, method and budget: prefill time "
        "and throughput, decode tokens/s, KV-cache bytes, peak memory, and the ratios of prefill time to the "
        "unpruned model and to the oracle (the same model given only the kept tokens, with no scoring). "
        "With --config NAME --random-init it times a real architecture (LLaVA-1.5-7B/13B, LLaVA-NeXT-7B, "
        "Qwen2.5-VL-7B, ...) with random weights built on --device, no checkpoint needed: a random image of the "
        "family's native size in a prompt of --text-tokens; its answers are meaningless, its times are real.",
        examples=["star bench --methods star,fastv --keep 39,10 --option layer=4",
                  "star bench --config llava-1.5-7b --random-init --device cuda --dtype float16 --batch 1,8,32 --methods star --keep 58"],
    )
    add_model_options(sub)
    sub.add_argument(
        "--config", choices=synthetic.shipped_configs(),
        help="a shipped architecture to build with random weights (needs --random-init; instead of --model)",
    )
    sub.add_argument(
        "--random-init", action="store_true",
        help="random weights on the device, from --config's or --model's config.json: no weights are read",
    )
    sub.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"], help="attention implementation (default sdpa)")
    sub.add_argument("--batch", type=list_of(positive, "batch size", "1,8,32"), default="1", help="comma-separated batch sizes, e.g. 1,8,32 (default 1)")
    sub.add_argument(
        "--text-tokens", type=positive, default=synthetic.TEXT_TOKENS,
        help=f"text tokens of each random-init prompt besides the image (default {synthetic.TEXT_TOKENS}, the paper's for LLaVA-1.5)",
    )
    sub.add_argument(
        "--methods", type=setting_names, default="star,fastv,fastervlm,pdrop",
        help="comma-separated methods, and resize (the unpruned model on an image made smaller to about keep tokens: Qwen families)",
    )
    sub.add_argument("--keep", type=list_of(budget, "budget", "98,39,20,10"), default="98,39,20,10", help="comma-separated budgets")
    add_option_argument(sub)
    sub.add_argument("--repeats", type=positive, default=5)
    sub.add_argument("--warmup", type=count, default=2)
    sub.add_argument("--new-tokens", type=positive, default=16, help="tokens generated to time decoding")
    sub.add_argument("--out", type=new_file, help="also write the rows as JSON here")
    sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from star.bench import calls, measure
    from tqdm.auto import tqdm

    timed = settings(["none", *args.methods], args.keep, args.option)  # the unpruned model first: every ratio's reference
    config, skeleton = check_bench(args, timed)
    if args.random_init:
        import torch

        print(f"star bench: {synthetic.NOTICE}", flush=True)
        parameters = sum(p.numel() for p in skeleton.parameters())
        size = parameters * getattr(torch, args.dtype).itemsize / 2**30
        print(f"star bench: building {args.config or args.model} ({parameters / 1e9:.2f} B parameters, {size:.1f} GiB "
              f"{args.dtype}) on {args.device} with random weights", flush=True)
        model = synthetic.random_model(config, args.device, getattr(torch, args.dtype), args.attn)
        prompts = lambda batch, resize=None: synthetic.synthetic_inputs(model, batch, args.text_tokens, resize=resize)  # noqa: E731
    else:
        model, prompts = checkpoint_model(args)
    described = {"model": args.config or args.model, "weights": "random" if args.random_init else "checkpoint",
                 "device": args.device, "dtype": args.dtype, "attn": args.attn}
    bar = tqdm(total=len(args.batch) * len(timed) * calls(args.repeats, args.warmup), desc="star bench", unit="call")
    rows = []
    for batch in args.batch:
        inputs = prompts(batch)
        for setting in timed:
            bar.set_postfix_str(f"batch {batch}, {label(setting)}")
            if setting.method == "resize":  # the unpruned model on the smaller image
                measured = measure(model, prompts(batch, setting.keep), "none", 1.0, args.repeats, args.warmup, args.new_tokens,
                                   tick=lambda: bar.update())
                measured.update(method="resize", keep=setting.keep)
            else:
                measured = measure(
                    model, inputs, setting.method, setting.keep, args.repeats, args.warmup, args.new_tokens, args.positions,
                    tick=lambda: bar.update(), **setting.options,
                )
            rows.append({**measured, **described})
    bar.close()
    print(table(rows))
    if args.random_init:
        print(f"({synthetic.NOTICE})")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


def checkpoint_model(args: argparse.Namespace):
    """The checkpoint of --model and a function of the batch size: that many copies of one test-split scene prompt."""
    from star.eval.runner import build_prompt
    from star.eval.sources import load_records
    from star.resize import resize_image

    model, processor = load(args)
    record = load_records("scenes", "test", 1)[0][0]

    def prompts(batch: int, resize: int | float | None = None) -> dict:
        text = build_prompt(processor, record.question)
        image = record.open_image() if resize is None else resize_image(record.open_image(), processor, resize)
        return processor(images=[[image]] * batch, text=[text] * batch, return_tensors="pt").to(args.device)

    return model, prompts


def table(rows: list[dict]) -> str:
    """The rows as one Markdown table, each compared with the unpruned row of its batch size (ratios added to the rows)."""
    lines = [
        "| batch | method | keep | tokens | prefill ms | vision tower ms (share) | prompts/s | vs unpruned | vs oracle "
        "| decoder FLOPs vs unpruned | counted FLOPs vs unpruned | decode tok/s | KV cache MB | peak memory GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {row["batch"]: row for row in rows if row["method"] == "none"}
    for row in rows:
        reference = base[row["batch"]]
        row["flops_vs_unpruned"] = row["flops"] / reference["flops"]
        row["counted_flops_vs_unpruned"] = row["counted_flops"] / reference["counted_flops"]
        peak = None if row["peak_memory_bytes"] is None else row["peak_memory_bytes"] / 2**30
        lines.append(
            f"| {row['batch']} | {row['method']} | {row['keep']} | {' / '.join(map(str, row['tokens']))} | "
            f"{row['prefill_s'] * 1e3:.1f} | {row['tower_s'] * 1e3:.1f} ({row['tower_share']:.0%}) | {row['prefill_prompts_per_s']:.2f} | {row['prefill_vs_unpruned']:.3f} | "
            f"{row['prefill_vs_oracle']:.3f} | {row['flops_vs_unpruned']:.3f} | {row['counted_flops_vs_unpruned']:.3f} | "
            f"{or_na(row['decode_tokens_per_s'], '.1f')} | {row['kv_cache_bytes'] / 2**20:.2f} | {or_na(peak, '.2f')} |"
        )
    return "\n".join(lines)


def or_na(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def check_bench(args: argparse.Namespace, timed: list):
    """bench's arguments checked before any load: the model source, the attention, every setting on the skeleton,
    and for random weights the memory they need. Returns the config and its skeleton."""
    from star import checks

    checks.check_device(args.device)
    config = checks.bench_config(args.model, args.config, args.random_init)
    checks.check_attention(args.attn, args.device)
    skeleton = checks.skeleton_of(config, f"--model {args.model!r}")
    for setting in timed:
        if setting.method == "resize":
            checks.check_resize(skeleton, setting.keep)
        else:
            checks.check_setting(skeleton, setting.method, setting.keep, setting.options, args.positions)
    if args.random_init:
        checks.check_memory(skeleton, args.dtype, args.device)
    return config, skeleton

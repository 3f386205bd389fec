"""`star flops`: the paper's prefill-FLOPs formula for a shipped model shape or a checkpoint's config, per method and budget; no weights."""

from __future__ import annotations

import argparse

from star import flops as flops_model
from star.cli.args import add_option_argument, budget, command, count, list_of, method_names, settings
from star.families import listed
from star.methods import build
from star.pruner import resolve_keep
from star.pruner.budget import on_attention_layers


def add(commands: argparse._SubParsersAction) -> None:
    sub = command(
        commands, "flops",
        help="theoretical prefill FLOPs of a pruning schedule (the paper's Table 3 columns)",
        description="Decoder prefill FLOPs by the paper's formula (section 4.3) for a shipped model shape or a "
        "checkpoint's config.json, one image of the family's native size, for each method and budget, with the ratio "
        "to the unpruned model. Shapes ship with the package: no hub.",
        examples=["star flops --model llava-1.5-7b --text-tokens 79 --method star,fastervlm --keep 288,115,58,29",
                  "star flops --model gemma-3-4b --method star,fastv --keep 64,32 --option layer=8",
                  "star flops --model path/to/Qwen2.5-VL-7B-Instruct --method star --keep 64"],
    )
    sub.add_argument(
        "--model", default="llava-1.5-7b",
        help=f"a shipped shape ({', '.join(flops_model.named_models())}; default llava-1.5-7b), or a checkpoint directory "
        f"or hub id of a supported family, its config.json alone: {listed()}",
    )
    sub.add_argument("--text-tokens", type=count, default=79, help="prompt tokens besides the image (default 79, as in FasterVLM)")
    sub.add_argument("--method", type=method_names, default="star", help="comma-separated methods (default star)")
    sub.add_argument("--keep", type=list_of(budget, "budget", "98,39,20,10"), default="288,115,58,29", help="comma-separated visual tokens kept per image")
    add_option_argument(sub)
    sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    chosen = settings(args.method, args.keep, args.option)
    shape, per_crop, crops, fixed_image = model_shape(args.model, chosen)
    fixed = args.text_tokens + fixed_image
    baseline = flops_model.prefill_flops(shape, [fixed + crops * per_crop] * shape.num_layers)
    rows = []
    for setting in chosen:
        keep = resolve_keep(setting.keep, per_crop)
        options = {k: v for k, v in setting.options.items() if k != "positions"}  # positions change no FLOPs
        method = build(setting.method, **options)
        plan = method.plan(per_crop, keep, shape.num_layers)
        if shape.attention_layers is not None:  # a hybrid decoder: stages score at its full-attention layers
            plan = on_attention_layers(method, plan, shape.attention_layers, shape.num_layers)
        stages = [(s.layer, crops * s.keep) for s in plan.llm_stages]
        lengths = flops_model.tokens_per_layer(shape.num_layers, fixed, crops * plan.vision_keep, stages)
        total = flops_model.prefill_flops(shape, lengths)
        tokens = " / ".join(str(t) for t in plan.tokens)
        average = plan.layer_average(shape.num_layers)
        rows.append(f"| {setting.method} | {keep} | {tokens} | {average:.1f} | {total / 1e12:.3f} | {total / baseline:.3f} |")
    unit = f"{crops} crops of {per_crop}" if crops > 1 else f"{per_crop}"
    print(f"{args.model}: {shape.num_layers} layers, {unit} visual + {fixed} other tokens; unpruned {baseline / 1e12:.3f} TFLOPs per image")
    print("| method | keep | visual tokens per stage" + (" (per crop)" if crops > 1 else "") + " | layer average | TFLOPs | ratio to unpruned |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


def model_shape(model: str, chosen: list) -> tuple:
    """(decoder shape, visual tokens per unit, units per image, fixed image tokens) of a shipped shape or of a
    checkpoint (its config.json, on a weightless skeleton, with one image laid out at the family's native size);
    a method the family refuses is refused here, as star.apply refuses it."""
    from pathlib import Path

    from star import checks, synthetic

    if model in flops_model.named_models():
        refused = flops_model.refused_methods(model)
        for setting in chosen:
            if setting.method in refused:
                raise ValueError(f"--method {setting.method!r} cannot prune {model}: {refused[setting.method]}")
        if model in synthetic.buildable_configs():  # the family's own refusals too (e.g. Gemma 4's shared layers)
            skeleton = checks.skeleton_of(synthetic.shipped_config(model), f"--model {model!r}")
            for setting in chosen:
                checks.check_setting(skeleton, setting.method, setting.keep, setting.options, None)
        return (flops_model.DecoderShape.named(model), flops_model.visual_tokens(model), flops_model.crops_per_image(model),
                flops_model.fixed_image_tokens(model))
    if "/" not in model and not Path(model).expanduser().exists():
        raise ValueError(f"--model {model!r} is neither a shipped shape ({', '.join(flops_model.named_models())}) nor a checkpoint "
                         "directory or hub id")
    skeleton = checks.model_skeleton(model)
    for setting in chosen:
        checks.check_setting(skeleton, setting.method, setting.keep, setting.options, None)
    shape = flops_model.DecoderShape.from_config(skeleton.config.get_text_config())
    return (shape, *synthetic.native_layout(skeleton))

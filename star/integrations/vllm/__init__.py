"""Serve pruned models with vLLM: a plugin (`vllm.general_plugins` entry point) that registers pruned variants
of vLLM's own model classes.

    vllm serve MODEL --hf-overrides '{"architectures": ["StarLlavaForConditionalGeneration"],
                                      "star": {"method": "fastervlm", "keep": 98}}'

The `star` entry is the engine's default setting; a request may give its own as `mm_processor_kwargs`
(`{"star": {...}}`, `extra_body` in the OpenAI client). A setting is the method's name, `keep` (visual tokens
per image entering the decoder, per 576-token crop for LLaVA-NeXT, or a fraction of the encoder's) and the
method's options, as in `star.apply`.
Only vision-side methods run: vLLM keeps one token count per request in every decoder layer, so a method that
cuts inside the decoder (STAR's stage 2, FastV, PDrop, SparseVLM) is refused with what runs instead
(docs/serving.md says what upstream would need). The kept tokens are numbered without gaps, as
`star.apply(..., positions="contiguous")` does.

This module does not import vLLM; the model classes live in `star.integrations.vllm.llava` (LLaVA-1.5, and what
every CLIP-tower class shares) and `star.integrations.vllm.llava_next` (LLaVA-NeXT).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from star.methods import REGISTRY, Method, build
from star.pruner import resolve_keep
from star.pruner.budget import unit_keep

# The pruned class of each vLLM architecture served, and where it lives (imported by vLLM when it loads it).
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "StarLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "StarLlavaNextForConditionalGeneration",
}
MODULES = {
    "StarLlavaForConditionalGeneration": "star.integrations.vllm.llava:StarLlavaForConditionalGeneration",
    "StarLlavaNextForConditionalGeneration": "star.integrations.vllm.llava_next:StarLlavaNextForConditionalGeneration",
}
# Families of the Hugging Face path that the plugin does not serve yet, and why.
_MROPE = (
    "vLLM computes a request's M-RoPE positions from its image grid when the request "
    "is added, before the encoder runs; the kept tokens are known only after it, so their original 3-D positions "
    "cannot be given to them, and star has no gap-free M-RoPE numbering to compare against"
)
NOT_SERVED = {
    "Qwen2VLForConditionalGeneration": _MROPE,
    "Qwen2_5_VLForConditionalGeneration": _MROPE,
}


def register() -> None:
    """The entry point vLLM calls in each of its processes: register the pruned classes (imported lazily)."""
    from vllm import ModelRegistry

    for name, target in MODULES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)


def hf_overrides(method: str, keep: int | float, architecture: str = "LlavaForConditionalGeneration", **options: Any) -> dict:
    """vLLM's `hf_overrides` for a pruned engine, checked as far as a setting can be without the model.

        LLM(model, hf_overrides=star.integrations.vllm.hf_overrides("fastervlm", 98))
    """
    if architecture not in ARCHITECTURES:
        reason = NOT_SERVED.get(architecture, "not a model family star prunes")
        raise ValueError(f"architecture={architecture!r} is not served: {reason}; served: {', '.join(ARCHITECTURES)}")
    raw = {"method": method, "keep": keep, **options}
    check_method(raw)
    return {"architectures": [ARCHITECTURES[architecture]], "star": raw}


@dataclass(frozen=True)
class Setting:
    """One pruning setting as the plugin runs it: the method, and the visual tokens per image (per crop for
    LLaVA-NeXT) it keeps."""

    method: Method
    keep: int
    n_visual: int
    text: str  # the setting as canonical JSON: it travels with each image from the front end to the model
    given: int | float  # `keep` as the setting gives it (a count per n_visual tokens, or a fraction)
    num_layers: int

    @property
    def prunes(self) -> bool:
        return self.keep < self.n_visual

    def unit_keep(self, n: int) -> int:
        """The tokens kept of a unit that shows n of its n_visual patches (a LLaVA-NeXT tile that unpadding cuts),
        as `star.apply` counts them (`star.pruner.budget.unit_keep`): the method's plan for that unit."""
        if n == self.n_visual:
            return self.keep
        plan = self.method.plan(n, unit_keep(self.given, n, self.n_visual), self.num_layers)
        if plan.llm_stages:
            raise ValueError(_refusal(self.method, self.given, plan.llm_stages[0].layer))
        return plan.vision_keep


def parse_setting(raw: object, n_visual: int, num_layers: int, where: str) -> Setting:
    """A setting from its dict (`{"method": ..., "keep": ..., options}`), or a ValueError that names `where` it came
    from, the value and what is allowed. Decoder-stage methods are refused here, with what runs instead."""
    try:
        method = check_method(raw)
        keep = resolve_keep(raw["keep"], n_visual)
        plan = method.plan(n_visual, keep, num_layers)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if plan.llm_stages:
        raise ValueError(f"{where}: {_refusal(method, raw['keep'], plan.llm_stages[0].layer)}")
    return Setting(method, plan.vision_keep, n_visual, json.dumps(raw, sort_keys=True), raw["keep"], num_layers)


def check_method(raw: object) -> Method:
    """The method a setting names, built with its options (keep is checked against the model later)."""
    if not isinstance(raw, dict) or "method" not in raw or "keep" not in raw:
        raise ValueError(f"star={raw!r} must be a dict with 'method', 'keep' and the method's options")
    options = {k: v for k, v in raw.items() if k not in ("method", "keep")}
    name = raw["method"]
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"method={name!r} is unknown: vision-side methods are {', '.join(vision_methods())}")
    if REGISTRY[name].reads_instruction:
        raise ValueError(
            f"method={name!r} weighs the visual tokens by the prompt's instruction, and vLLM's encoder step never sees the "
            f"prompt (it runs on the image alone, its output cached for any question), so it would run as another method; "
            f"vision-side methods that run here are {', '.join(vision_methods())}"
        )
    return build(name, **options)


def vision_methods() -> list[str]:
    """The registered methods that prune only before the decoder at a budget below the encoder's tokens, read from
    their plans for LLaVA-1.5's sizes (576 tokens, 58 kept, 32 layers; a plan's stages depend on the options)."""
    return [
        name for name, cls in REGISTRY.items()
        if name != "none" and not cls().plan(576, 58, 32).llm_stages and not cls.reads_instruction
    ]


def _refusal(method: Method, keep: object, layer: int) -> str:
    instead = (
        "method 'star-vision' runs STAR's vision stage at the same final budget (under its own name, so that no "
        "table mistakes it for STAR)"
        if method.name == "star"
        else f"vision-side methods run instead: {', '.join(vision_methods())}"
    )
    return (
        f"method={method.name!r} at keep={keep!r} prunes inside the decoder (a cut before layer {layer}), which vLLM "
        "cannot serve: its engine gives a request one token count in every layer and one KV-cache length, so a "
        f"cut would need a second KV-cache group (docs/serving.md); {instead}"
    )

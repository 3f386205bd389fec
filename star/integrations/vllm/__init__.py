"""Serve pruned models with vLLM: a plugin (`vllm.general_plugins` entry point) that registers pruned variants
of vLLM's own model classes.

    vllm serve MODEL --hf-overrides '{"architectures": ["StarLlavaForConditionalGeneration"],
                                      "star": {"method": "fastervlm", "keep": 98}}'

The `star` entry is the engine's default setting; a request may give its own as `mm_processor_kwargs`
(`{"star": {...}}`, `extra_body` in the OpenAI client). A setting is the method's name, `keep` (visual tokens
per image, per 576-token crop for LLaVA-NeXT, or a fraction of the encoder's) and the method's options, as in
`star.apply`.
A vision-side setting runs per request. A setting with one cut inside the decoder (STAR's stage 2, FastV, DART)
is an engine's own, on LLaVA-1.5, Qwen2-VL, Qwen2.5-VL and Qwen3-VL: its layers from the cut on are a KV-cache group of their
own (`star.integrations.vllm.cut`), and `engine_args` gives the engine options it needs. On LLaVA the kept tokens
are numbered without gaps, as `star.apply(..., positions="contiguous")` does.

On Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 the kept tokens keep their original 3-D M-RoPE positions, as
`star.apply` gives them on M-RoPE models, but for `pool`'s, which take their pooled grid's own
(`star.integrations.vllm.qwen2_vl`). Qwen3.5's hybrid decoder is never cut (`Family.no_cut`).

The package mirrors `star/adapters/`: this module (settings, no vLLM import), `served` (what every served family
shares), one module per family (`llava`, `llava_next`, `qwen2_vl`, `qwen3_vl`, `qwen3_5`), and `cut` (the decoder
cut, which knows no family).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from star.methods import REGISTRY, LLMStage, Method, Plan, build
from star.methods.pool import pooled_grid
from star.pruner import resolve_keep
from star.pruner.budget import NOMINAL_TOKENS, unit_keep

@dataclass(frozen=True)
class Family:
    """A served family: the architecture (vLLM names its classes as transformers does), the pruned class (module in
    this package, class), the Hugging Face model type, the `star.adapters` class whose tower refusals apply, whether
    its images differ in size with 3-D M-RoPE positions (an int `keep` counts per image), whether an engine's
    setting may cut inside its decoder, and where that is never to be, why (the refusal says it)."""

    architecture: str
    pruned: str
    model_type: str
    adapter: str
    mrope: bool = False
    cuts: bool = False
    no_cut: str = ""

    @property
    def pruned_class(self) -> str:
        return self.pruned.partition(":")[2]


FAMILIES = (
    Family("LlavaForConditionalGeneration", "llava:StarLlavaForConditionalGeneration", "llava", "LlavaAdapter", cuts=True),
    Family("LlavaNextForConditionalGeneration", "llava_next:StarLlavaNextForConditionalGeneration", "llava_next", "LlavaNextAdapter"),
    Family("Qwen2VLForConditionalGeneration", "qwen2_vl:StarQwen2VLForConditionalGeneration", "qwen2_vl", "Qwen2VLAdapter", mrope=True, cuts=True),
    Family("Qwen2_5_VLForConditionalGeneration", "qwen2_vl:StarQwen2_5_VLForConditionalGeneration", "qwen2_5_vl", "Qwen2VLAdapter", mrope=True, cuts=True),
    Family("Qwen3VLForConditionalGeneration", "qwen3_vl:StarQwen3VLForConditionalGeneration", "qwen3_vl", "Qwen3VLAdapter", mrope=True, cuts=True),
    Family(
        "Qwen3_5ForConditionalGeneration", "qwen3_5:StarQwen3_5ForConditionalGeneration", "qwen3_5", "Qwen3_5Adapter", mrope=True,
        no_cut="Qwen3.5's decoder is never cut here: its linear-attention layers after a cut would need their recurrent state built from the kept tokens alone, which the cut's KV-cache group does not give",
    ),
)
ARCHITECTURES = {family.architecture: family.pruned_class for family in FAMILIES}
# Families of the Hugging Face path that the plugin does not serve yet, and why.
NOT_SERVED = {
    "Qwen3VLMoeForConditionalGeneration": "the pruned Qwen3-VL class is not yet built on vLLM's mixture-of-experts variant",
    "InternVLForConditionalGeneration": "no pruned vLLM class for it yet",
    "LlavaOnevisionForConditionalGeneration": "no pruned vLLM class for it yet",
    "Gemma3ForConditionalGeneration": "no pruned vLLM class for it yet",
}


def register() -> None:
    """The entry point vLLM calls in each of its processes: register the pruned classes (imported lazily) and the
    KV-cache layout of the layers after a decoder cut."""
    from vllm import ModelRegistry

    from star.integrations.vllm.cut import register_kv_cache_spec

    for family in FAMILIES:
        if family.pruned_class not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(family.pruned_class, f"{__name__}.{family.pruned}")
    register_kv_cache_spec()


# The engine options a decoder cut needs (docs/serving.md, "The decoder cut"): the scheduler that tells the cut
# layers' KV-cache manager what each request drops, each prompt prefilled whole, and no prefix caching (the layers
# after the cut cache what the question chose).
CUT_ENGINE = {
    "scheduler_cls": "star.integrations.vllm.cut.CutScheduler",
    "enable_chunked_prefill": False,
    "enable_prefix_caching": False,
}


def server_flags(options: dict) -> list[str]:
    """Engine options (as `engine_args` gives them) as the flags of vLLM's server: a bool as the flag or its --no-
    form, a dict as JSON."""
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


def engine_args(method: str, keep: int | float, architecture: str = "LlavaForConditionalGeneration", **options: Any) -> dict:
    """The keyword arguments of `vllm.LLM` for a pruned engine: `hf_overrides`, and for a setting that cuts
    inside the decoder the options that cut needs (`CUT_ENGINE`).

        LLM(model, **star.integrations.vllm.engine_args("star", 39))
    """
    overrides = hf_overrides(method, keep, architecture, **options)
    may_cut = bool(build(method, **options).plan(576, 1, 32).llm_stages)  # whether the method cuts at small budgets
    cut = CUT_ENGINE if may_cut and _family(architecture=architecture).cuts else {}
    return {"hf_overrides": overrides, **cut}


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
    n_visual: int | None  # None: images differ in size (Qwen), and an int `keep` counts per image
    text: str  # the setting as canonical JSON: it travels with each image from the front end to the model
    given: int | float  # `keep` as the setting gives it (a count per n_visual tokens, or a fraction)
    num_layers: int
    cut: LLMStage | None = None  # the decoder cut, where the setting has one: `cut.keep` per image after it

    def unit_plan(self, n: int, grid: tuple[int, int] | None = None) -> Plan:
        """The method's plan for a unit of n tokens laid out as `grid` (rows, columns; a LLaVA-NeXT tile that unpadding
        cuts, a Qwen image), its budget as `star.apply` counts it (`star.pruner.budget.unit_keep`); a ValueError where
        an int `keep` is above a Qwen image's tokens, or where the unit would be cut inside the decoder other than at
        the setting's cut."""
        plan = self.method.unit_plan(n, unit_keep(self.given, n, self.n_visual), self.num_layers, grid)
        stages = plan.llm_stages
        if stages and (self.cut is None or len(stages) > 1 or stages[0].layer != self.cut.layer):
            raise ValueError(_refusal(self.method, self.given, stages[0].layer))
        return plan

    def unit_keep(self, n: int, grid: tuple[int, int] | None = None) -> int:
        """The tokens a unit of n tokens (laid out as `grid`) keeps in the vision stage (its placeholder count)."""
        return self.keep if n == self.n_visual else self.unit_plan(n, grid).vision_keep

    def kept_grid(self, n: int, grid: tuple[int, int]) -> tuple[int, int]:
        """The grid whose own positions a unit's kept tokens take: pool's pooled grid (`Method.grid_positions`), known
        from the setting and the unit's grid before the encoder runs; the unit's own grid for every other method."""
        if not self.method.grid_positions:
            return grid
        return pooled_grid(grid, unit_keep(self.given, n, self.n_visual))

    def unit_cut(self, n: int) -> int:
        """The tokens a unit of n tokens keeps after the decoder cut (its vision stage's, where it has no cut)."""
        plan = self.unit_plan(n)
        return plan.llm_stages[0].keep if plan.llm_stages else plan.vision_keep


def parse_setting(raw: object, n_visual: int | None, num_layers: int, where: str, cuts: bool = False, no_cut: str = "") -> Setting:
    """A setting from its dict (`{"method": ..., "keep": ..., options}`), or a ValueError that names `where` it came
    from, the value and what is allowed. A decoder cut is refused unless `cuts` (an engine's setting, `serves_cut`),
    with what runs instead (and `no_cut`, the family's reason, where it has one); more than one cut is always refused."""
    try:
        method = check_method(raw)
        keep = resolve_keep(raw["keep"], n_visual)
        plan = method.plan(n_visual or max(NOMINAL_TOKENS, keep), keep, num_layers)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if plan.llm_stages and not cuts:
        raise ValueError(f"{where}: {_refusal(method, raw['keep'], plan.llm_stages[0].layer, no_cut)}")
    if len(plan.llm_stages) > 1:
        layers = [s.layer for s in plan.llm_stages]
        raise ValueError(
            f"{where}: method={method.name!r} at keep={raw['keep']!r} cuts before {len(layers)} decoder layers {layers}; "
            "the plugin serves one cut (its layers after the cut are one KV-cache group with one drop count per "
            f"request); a one-cut setting runs, such as method={method.name!r} with one layer (its option 'layers')"
        )
    cut = plan.llm_stages[0] if plan.llm_stages else None
    return Setting(method, plan.vision_keep, n_visual, json.dumps(raw, sort_keys=True), raw["keep"], num_layers, cut)


def serves_cut(config) -> bool:
    """Whether an engine's setting may cut inside the decoder (a Llama, Qwen2 or Qwen3 decoder, whose layers after
    the cut hold nothing but their own KV cache), from the model's Hugging Face config."""
    return _family(model_type=config.model_type).cuts


def unit_tokens(config, data) -> int:
    """An image's tokens from the encoder (before any pruning), from its multimodal data as vLLM's scheduler holds
    it: its grid for the Qwen families, the tower's size for the others."""
    if not _family(model_type=config.model_type).mrope:
        return n_visual(config)
    if data is None or "image_grid_thw" not in data:
        raise RuntimeError("an image reached the cut's scheduler without its image_grid_thw: its dropped tokens cannot be counted")
    return merged_grid(data["image_grid_thw"].data, config.vision_config.spatial_merge_size)[0]


def merged_grid(thw, merge: int) -> tuple[int, tuple[int, int] | None]:
    """A Qwen image's merged tokens and their (rows, columns) grid, from its patch grid (t, h, w); an image of
    several frames has no grid of its own (None), as `star/adapters/qwen2_vl.py` gives none."""
    t, h, w = (int(v) for v in thw)
    return t * h * w // merge**2, ((h // merge, w // merge) if t == 1 else None)


def engine_setting(config) -> Setting:
    """The engine's default setting, from `hf_overrides["star"]` on the model's Hugging Face config."""
    raw = getattr(config, "star", None)
    if raw is None:
        name = (getattr(config, "architectures", None) or ["StarLlavaForConditionalGeneration"])[0]
        raise ValueError(
            f"hf_overrides has no 'star' setting: {name} needs one, e.g. "
            f'--hf-overrides \'{{"architectures": ["{name}"], "star": {{"method": "fastervlm", "keep": 98}}}}\''
        )
    return config_setting(raw, config, "hf_overrides['star']")


def config_setting(raw: object, config, where: str, cuts: bool | None = None) -> Setting:
    """A setting on the model of this Hugging Face config (`parse_setting` with its sizes), a method its family
    refuses (FasterVLM's [CLS] on a tower without one) refused as `star.apply` refuses it. `cuts`: whether a
    decoder cut is allowed, by default where the engine serves one (`serves_cut`)."""
    import star.adapters
    from star.adapters.base import vision_refusal

    family = _family(model_type=config.model_type)
    setting = parse_setting(raw, n_visual(config), num_layers(config), where, serves_cut(config) if cuts is None else cuts, family.no_cut)
    refusal = vision_refusal(getattr(star.adapters, family.adapter), setting.method)
    if refusal:
        raise ValueError(f"{where}: method={setting.method.name!r}: {refusal}")
    return setting


def n_visual(config) -> int | None:
    """Visual tokens per image (per crop for LLaVA-NeXT), or None where images differ in size (Qwen)."""
    if _family(model_type=config.model_type).mrope:
        return None
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def num_layers(config) -> int:
    return config.get_text_config().num_hidden_layers


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


def _refusal(method: Method, keep: object, layer: int, no_cut: str = "") -> str:
    instead = (
        "method 'star-vision' runs STAR's vision stage at the same final budget (under its own name, so that no "
        "table mistakes it for STAR)"
        if method.name == "star"
        else f"vision-side methods run instead: {', '.join(vision_methods())}"
    )
    return (
        f"method={method.name!r} at keep={keep!r} prunes inside the decoder (a cut before layer {layer}), which the "
        "plugin serves as an engine's own setting on LLaVA-1.5, Qwen2-VL, Qwen2.5-VL and Qwen3-VL only (`star serve --method ...`, "
        f"or `LLM(model, **star.integrations.vllm.engine_args(...))`), not per request or on other families"
        f"{'; ' + no_cut if no_cut else ''}; {instead}"
    )


def _family(**field: str) -> Family:
    """The served family with this architecture or model type."""
    [(name, value)] = field.items()
    for family in FAMILIES:
        if getattr(family, name) == value:
            return family
    raise ValueError(f"{name}={value!r} is not served: served are {', '.join(ARCHITECTURES)}")

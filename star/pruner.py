"""The Pruner: hooks on one model instance that prune its visual tokens once per prompt, at prefill.

Two kinds of forward pre-hook, and nothing else of the model is touched:
- on the model itself: at prefill it runs the vision encoder, applies the method's vision stage, projects
  only the kept patches and hands the decoder `inputs_embeds` in a shorter "entry frame"; at each decode
  step it maps generate()'s full-length attention mask, positions and cache positions into that frame.
- on the decoder layers from the first decoder stage on: at a stage's layer, at prefill, it scores and cuts
  the sequence (hidden states, mask, rotary positions); every later layer gets the shorter frame's mask and
  positions. Layers cache what they see, so the KV cache of layers >= K holds only the kept tokens, and at
  decode the same hooks slice the mask's key columns to match.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from star import flops as flops_model
from star.adapters import adapter_for
from star.decoder import Frame, contiguous_positions, gather_seq, slice_mask
from star.methods import DecoderView, LLMStage, Method, Selection
from star.scoring import attention_probs

POSITION_POLICIES = ("original", "contiguous")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


@dataclass
class PruneStats:
    """What the last prefill did.

    tokens: visual tokens per image after each stage: [from the encoder, entering the decoder, after each
    decoder stage]. kept_patches: for each of those stages after the encoder, [B, V] the patches still
    present in each prompt (image m's patch j is m * n_visual + j; a merged token counts as its
    representative's patch). layers: the decoder layer where each decoder stage cut. sequence_lengths: the tokens
    each decoder layer processed (per prompt, padding included). flops: the decoder's prefill FLOPs for the
    whole batch, by the paper's formula over those lengths.
    """

    tokens: list[int]
    kept_patches: list[torch.Tensor]
    layers: list[int]
    sequence_lengths: list[int]
    batch_size: int
    flops: float


@dataclass
class _Prompt:
    """What a prefill decided, kept for the decode steps of the same prompt."""

    full_length: int
    entry_keep: torch.Tensor  # [B, S1] indices of the full prompt present in the entry frame
    frames: list[Frame]
    n_text: torch.Tensor
    images_per_row: int


@dataclass
class _Step:
    """State of one forward call as it passes through the decoder layers."""

    prefill: bool
    position_ids: torch.Tensor | None = None
    cache_position: torch.Tensor | None = None
    override: dict[str, Any] = field(default_factory=dict)
    saved: dict[int, tuple[torch.Tensor, dict[str, Any]]] = field(default_factory=dict)


class Pruner:
    """Prunes the visual tokens of one loaded model; `remove()` leaves the model exactly as it was."""

    def __init__(self, model: nn.Module, method: Method, keep: int | float, positions: str = "original"):
        self.adapter = adapter_for(model)
        if positions not in POSITION_POLICIES:
            raise ValueError(f"positions={positions!r} is unknown: allowed are {', '.join(POSITION_POLICIES)}")
        implementation = model.config.text_config._attn_implementation
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={implementation!r} is not supported: allowed are "
                f"{', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        if getattr(model, "_star_pruner", None) is not None:
            raise ValueError("this model is already pruned: call remove() on its pruner before applying another")
        self.model = model
        self.method = method
        self.positions = positions
        n_visual = self.adapter.n_visual
        self.keep = resolve_keep(keep, n_visual)
        num_layers = len(self.adapter.layers)
        self.plan = method.plan(n_visual, self.keep, num_layers)
        _check_stages(self.plan.llm_stages)
        self._stage_at = {stage.layer: i for i, stage in enumerate(self.plan.llm_stages)}
        self._early_scores = {s.score_layer for s in self.plan.llm_stages if s.score_layer != s.layer}
        self._shape = flops_model.DecoderShape.from_config(model.config.text_config)
        self._signature = inspect.signature(model.forward)
        self._prompt: _Prompt | None = None
        self._step: _Step | None = None
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
        ]
        if self.plan.llm_stages:
            first = min(s.score_layer for s in self.plan.llm_stages)
            for index in range(first, num_layers):
                hook = partial(self._before_layer, index)
                self._handles.append(self.adapter.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        model._star_pruner = self

    def remove(self) -> None:
        """Detach every hook; the model computes exactly what it did before `apply()`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._prompt = self._step = None
        if getattr(self.model, "_star_pruner", None) is self:
            del self.model._star_pruner

    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Pruner(method={self.method!r}, keep={self.keep}, positions={self.positions!r}, plan={self.plan})"

    @property
    def stats(self) -> PruneStats | None:
        """Token counts and FLOPs of the last prefill (None before the first one)."""
        prompt = self._prompt
        if prompt is None:
            return None
        frames = prompt.frames
        lengths = [next(f.length for f in reversed(frames) if f.start_layer <= i) for i in range(len(self.adapter.layers))]
        batch = frames[0].keep_cols.shape[0]
        return PruneStats(
            tokens=[self.plan.n_visual, self.plan.vision_keep, *(s.keep for s in self.plan.llm_stages[: len(frames) - 1])],
            kept_patches=[f.patches for f in frames],
            layers=[f.start_layer for f in frames[1:]],
            sequence_lengths=lengths,
            batch_size=batch,
            flops=batch * flops_model.prefill_flops(self._shape, lengths),
        )

    # -- the model's forward: prefill and decode steps -------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
            kwargs = {**bound.pop("kwargs", {}), **bound}
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        self._step = None
        if kwargs.get("pixel_values") is not None:
            if past:
                raise ValueError(
                    "pixel_values came with a non-empty past_key_values: pruning happens once per prompt, at "
                    "prefill; start a new cache for a new image"
                )
            if cache is not None and not isinstance(cache, DynamicCache):
                raise ValueError(f"past_key_values of type {type(cache).__name__} is not supported: use DynamicCache")
            return (), self._start_prompt(kwargs)
        if past == 0 or self._prompt is None:
            self._prompt = None
            return (), kwargs
        return (), self._continue_prompt(kwargs, past)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """A call's frame state ends with the call, so layers run on their own afterwards are left alone."""
        self._step = None

    def _start_prompt(self, kwargs: dict) -> dict:
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("input_ids is None: pruning needs the prompt's token ids to find its image tokens")
        pixel_values = kwargs["pixel_values"]
        batch, length = input_ids.shape
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("attention_mask pads on the right: prompts must be left-padded (padding_side='left')")
        is_image = input_ids == self.adapter.image_token_id
        n_visual, images = self.adapter.n_visual, pixel_values.shape[0]
        counts = is_image.sum(dim=1)
        if bool((counts != counts[0]).any()) or int(counts.sum()) != images * n_visual:
            raise ValueError(
                f"input_ids holds {counts.tolist()} image tokens per prompt but pixel_values holds {images} "
                f"image(s) of {n_visual} tokens each: every prompt needs {n_visual} image tokens per image, "
                "and every prompt in a batch the same number of images"
            )
        per_row = images // batch

        view = self.adapter.encode(pixel_values)
        k1 = self.plan.vision_keep
        if k1 < n_visual:
            selection = self.method.select_vision(view, k1)
        else:
            selection = Selection(torch.arange(n_visual, device=input_ids.device).expand(images, n_visual))
        features = selection.states if selection.states is not None else gather_seq(view.features, selection.index)
        image_embeds = self.adapter.project(features)

        # Entry frame: each image keeps its first k1 placeholders; the kept features fill them in order.
        image_slots = is_image.nonzero()[:, 1].view(batch, per_row, n_visual)
        text_slots = (~is_image).nonzero()[:, 1].view(batch, length - per_row * n_visual)
        entry_keep = torch.cat([text_slots, image_slots[:, :, :k1].flatten(1)], dim=1).sort(dim=1).values
        entry_is_image = is_image.gather(1, entry_keep)
        embeds = self.adapter.embed(input_ids.gather(1, entry_keep))
        embeds = embeds.masked_scatter(entry_is_image[..., None], image_embeds.to(embeds.dtype))

        full_positions = kwargs.get("position_ids")
        if full_positions is None:
            cache_position = kwargs.get("cache_position")
            start = torch.arange(length, device=input_ids.device) if cache_position is None else cache_position
            full_positions = start[None].expand(batch, length)
        if self.positions == "original":
            positions = full_positions.gather(1, entry_keep)
            kept_slots = image_slots.gather(2, selection.index.view(batch, per_row, k1)).flatten(1)
            positions = positions.masked_scatter(entry_is_image, full_positions.gather(1, kept_slots))
        else:
            positions = contiguous_positions(full_positions, entry_keep)

        entry_length = entry_keep.shape[1]
        visual = entry_is_image.nonzero()[:, 1].view(batch, per_row * k1)
        entry_mask = mask.gather(1, entry_keep)
        image_offsets = torch.arange(per_row, device=input_ids.device)[None, :, None] * n_visual
        patches = (selection.index.view(batch, per_row, k1) + image_offsets).flatten(1)
        entry_cols = torch.arange(entry_length, device=input_ids.device).expand(batch, entry_length)
        frame = Frame(0, entry_cols, entry_mask, visual, patches, positions)
        self._prompt = _Prompt(length, entry_keep, [frame], entry_length - 1 - visual[:, -1], per_row)
        self._step = _Step(prefill=True)
        return {
            **kwargs,
            "input_ids": None,
            "pixel_values": None,
            "inputs_embeds": embeds,
            "attention_mask": entry_mask,
            "position_ids": positions,
            "cache_position": torch.arange(entry_length, device=input_ids.device),
        }

    def _continue_prompt(self, kwargs: dict, past: int) -> dict:
        prompt = self._prompt
        dropped = prompt.full_length - prompt.frames[0].length
        new = kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"].shape[1]
        cache_position = kwargs.get("cache_position")
        if cache_position is None:
            cache_position = torch.arange(past, past + new, device=prompt.entry_keep.device)
        else:
            cache_position = cache_position - dropped
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (cache_position + dropped)[None].expand(prompt.entry_keep.shape[0], new)
        if self.positions == "contiguous":
            positions = positions - dropped
        mask = kwargs.get("attention_mask")
        if mask is not None:
            full = prompt.full_length
            mask = torch.cat([mask[:, :full].gather(1, prompt.entry_keep), mask[:, full:]], dim=1)
        self._step = _Step(prefill=False, position_ids=positions, cache_position=cache_position)
        return {**kwargs, "attention_mask": mask, "position_ids": positions, "cache_position": cache_position}

    # -- the decoder layers -----------------------------------------------------------------------------

    def _before_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        step = self._step
        if step is None:
            return None
        hidden = args[0]
        current = {**kwargs, **step.override}
        if index in self._early_scores:
            step.saved[index] = (hidden, current)
        stage_number = self._stage_at.get(index)
        if stage_number is not None:
            if step.prefill:
                hidden, step.override = self._cut(self.plan.llm_stages[stage_number], hidden, current, step)
            else:
                step.override = self._decode_frame(stage_number, hidden, kwargs, step)
            current = {**kwargs, **step.override}
        if not step.override:
            return None
        return (hidden, *args[1:]), current

    def _cut(self, stage: LLMStage, hidden: torch.Tensor, kwargs: dict, step: _Step) -> tuple[torch.Tensor, dict]:
        """Score the visual tokens with the stage's layer and keep the top ones: the start of a new frame."""
        prompt = self._prompt
        frame = prompt.frames[-1]
        score_hidden, score_kwargs = step.saved.get(stage.score_layer, (hidden, kwargs))
        score_layer = self.adapter.layers[stage.score_layer]
        key_mask = frame.mask.bool()

        def attention(rows: torch.Tensor) -> torch.Tensor:
            q, k = self.adapter.decoder_qk(score_layer, score_hidden, score_kwargs["position_embeddings"], rows)
            return attention_probs(q, k, key_mask, rows)

        view = DecoderView(score_hidden, frame.visual, prompt.n_text, key_mask, attention)
        k = stage.keep * prompt.images_per_row
        selection = self.method.select_llm(stage, view, k)
        batch, length = hidden.shape[:2]
        kept_visual = frame.visual.gather(1, selection.index)
        is_visual = torch.zeros(batch, length, dtype=torch.bool, device=hidden.device).scatter(1, frame.visual, True)
        others = (~is_visual).nonzero()[:, 1].view(batch, -1)
        keep = torch.cat([others, kept_visual], dim=1).sort(dim=1).values
        is_kept_visual = torch.zeros_like(is_visual).scatter(1, kept_visual, True).gather(1, keep)
        visual = is_kept_visual.nonzero()[:, 1].view(batch, k)
        hidden = gather_seq(hidden, keep)
        if selection.states is not None:
            hidden = hidden.scatter(1, visual[..., None].expand(-1, -1, hidden.shape[-1]), selection.states.to(hidden.dtype))

        if self.positions == "original":
            positions = frame.position_ids.gather(1, keep)
            cos, sin = kwargs["position_embeddings"]
            position_embeddings = (gather_seq(cos, keep), gather_seq(sin, keep))
        else:
            positions = contiguous_positions(frame.position_ids, keep)
            position_embeddings = self.adapter.rotary(hidden, positions)
        prompt.frames.append(
            Frame(
                stage.layer,
                frame.keep_cols.gather(1, keep),
                frame.mask.gather(1, keep),
                visual,
                frame.patches.gather(1, selection.index),
                positions,
            )
        )
        return hidden, {
            "attention_mask": slice_mask(kwargs["attention_mask"], keep, keep),
            "position_embeddings": position_embeddings,
            "position_ids": positions,
            "cache_position": torch.arange(keep.shape[1], device=hidden.device),
        }

    def _decode_frame(self, stage_number: int, hidden: torch.Tensor, kwargs: dict, step: _Step) -> dict:
        """Decode-step inputs of the layers from a stage on: their cache holds only the kept prompt tokens."""
        prompt = self._prompt
        frame = prompt.frames[stage_number + 1]
        shift = prompt.frames[0].length - frame.length
        mask = kwargs["attention_mask"]
        if mask is not None:
            batch, total = frame.keep_cols.shape[0], mask.shape[-1]
            new = torch.arange(prompt.frames[0].length, total, device=mask.device).expand(batch, -1)
            mask = slice_mask(mask, None, torch.cat([frame.keep_cols, new], dim=1))
        override = {"attention_mask": mask, "cache_position": step.cache_position - shift}
        if self.positions == "contiguous":
            positions = step.position_ids - shift
            override.update(position_ids=positions, position_embeddings=self.adapter.rotary(hidden, positions))
        return override


def resolve_keep(keep: int | float, n_visual: int) -> int:
    """`keep` as a token count: an int in [1, n_visual], or a float in (0, 1] as a fraction of n_visual."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep={keep!r} must be an int in [1, {n_visual}] or a float in (0, 1]")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep!r} as a fraction must be in (0, 1]")
        return max(1, round(keep * n_visual))
    if not 1 <= keep <= n_visual:
        raise ValueError(f"keep={keep!r} is outside [1, {n_visual}]: the model has {n_visual} visual tokens per image")
    return keep


def _check_stages(stages: tuple[LLMStage, ...]) -> None:
    """Each stage scores within the frame it cuts: no earlier cut may fall between its score layer and its layer."""
    previous = -1
    for stage in stages:
        if not previous < stage.score_layer <= stage.layer:
            raise ValueError(f"decoder stages {stages} overlap: each must score after the previous cut")
        previous = stage.layer

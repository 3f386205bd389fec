"""Decode steps: generate() sends full-length masks and positions; map them into the pruned frames.

generate() knows nothing of the pruning: its attention mask covers the whole prompt, and the positions and
cache positions it derives count every prompt token. The model's inputs are mapped into the entry frame, and
the inputs of the layers from each decoder stage on into that stage's frame, whose cache holds fewer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from star import compat
from star.adapters import Adapter
from star.decoder import Frame, causal_frame_mask, mask_like, unseen_slots
from star.pruner.entry import Prompt


@dataclass
class Step:
    """Where one decode step's new tokens sit in the entry frame."""

    position_ids: torch.Tensor
    cache_position: torch.Tensor
    padding: torch.Tensor | None  # the 2-D mask in the entry frame: the prompt's tokens there, then the new ones
    end: int  # one past the last new token's place in the entry frame, on the host


def step_inputs(adapter: Adapter, prompt: Prompt, positions: str, kwargs: dict, past: int) -> tuple[dict, Step]:
    """The model's inputs of one decode step, in the entry frame, and where its new tokens sit there."""
    dropped = prompt.full_length - prompt.frames[0].length
    new = kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"].shape[1]
    cache_position = kwargs.get("cache_position")
    if cache_position is None:
        cache_position = torch.arange(past, past + new, device=prompt.entry_keep.device)
    else:
        cache_position = cache_position - dropped
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = adapter.decode_positions(prompt.positions, cache_position + dropped)
    if prompt.position_shift is not None:  # M-RoPE images numbered as grids of their own (pool)
        position_ids = position_ids - prompt.position_shift[:, None]
    elif positions == "contiguous":
        position_ids = position_ids - dropped - prompt.entry_pads[:, None]
    mask = kwargs.get("attention_mask")
    if prompt.cache_slots is not None:
        # A StaticCache: generate() makes the 4-D mask from the cache's own count, the entry frame's, so its columns
        # mix two frames. Every slot of the entry frame's cache instead: the prompt's own tokens as the prefill saw
        # them, then every new token (generate() never masks one), up to the step's own.
        padding = prompt.frames[0].mask
        padding = torch.cat([padding, padding.new_ones(padding.shape[0], prompt.cache_slots - padding.shape[1])], dim=1)
        slots = torch.arange(prompt.cache_slots, device=padding.device).expand(padding.shape[0], -1)
        like = mask if mask is not None and mask.dim() == 4 else padding.new_ones(1, 1, 1, 1, dtype=torch.bool)
        mask = causal_frame_mask(like, padding, slots, cache_position)
    elif mask is not None:
        full = prompt.full_length
        entry = mask[:, :full].gather(1, prompt.entry_keep) * prompt.entry_real
        mask = padding = torch.cat([entry, mask[:, full:]], dim=1)
    elif prompt.frames[0].padded:  # no padding of the caller's, but the entry frame has the pruner's
        entry = prompt.frames[0].mask
        mask = padding = torch.cat([entry, entry.new_ones(entry.shape[0], past + new - entry.shape[1])], dim=1)
    else:
        padding = None
    step = Step(position_ids, cache_position, padding, past + new)
    inputs = {**kwargs, "attention_mask": mask, "position_ids": position_ids}
    return compat.with_cache_position(inputs, cache_position), step


def layer_inputs(
    adapter: Adapter, prompt: Prompt, frame: Frame, positions: str, hidden: torch.Tensor, kwargs: dict, step: Step,
    layer_type: str | None, flash: bool,
) -> dict:
    """What changes in the inputs of a layer that runs in `frame`, whose cache holds only the frame's prompt
    tokens: the mask's key columns (of those tokens and the new ones), the cache positions, and for contiguous
    positions the positions and rotary tables. Where the model made no mask (no padding in the entry frame) but
    the pruner padded this frame, one is made (flash: FlashAttention's 2-D form). A layer that takes the padding
    mask of its own tokens (`padding_mask_types`) keeps the model's: it covers the step's new tokens, alike in
    every frame, and the layer's states hold what came before."""
    if layer_type in adapter.padding_mask_types:
        return {}
    shift = prompt.frames[0].length - frame.length
    mask = kwargs["attention_mask"]
    if mask is None and frame.padded:
        mask = mask_like(flash, frame.mask)
    if mask is not None:
        batch, entry = frame.keep_cols.shape[0], prompt.frames[0].length
        new = torch.arange(entry, step.end, device=mask.device).expand(batch, -1)
        padding = step.padding if step.padding is not None else frame.mask.new_ones(batch, step.end)
        seen = torch.cat([frame.mask, padding[:, entry : step.end]], dim=1)
        mask = causal_frame_mask(mask, seen, torch.cat([frame.keep_cols, new], dim=1), step.cache_position)
        mask = unseen_slots(mask, prompt.cache_slots)
    override = compat.with_cache_position({"attention_mask": mask}, step.cache_position - shift)
    if positions == "contiguous":  # each row moves back by the tokens this frame dropped from its own
        dropped = prompt.frames[0].mask.sum(dim=1) - frame.mask.sum(dim=1)
        position_ids = step.position_ids - dropped[:, None]
        override["position_ids"] = position_ids
        for name, kind in compat.rotary_tables(kwargs).items():
            override[name] = adapter.rotary(hidden, position_ids, kind or layer_type)
    return override

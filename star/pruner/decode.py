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
from star.decoder import slice_mask
from star.pruner.entry import Prompt


@dataclass
class Step:
    """Where one decode step's new tokens sit in the entry frame."""

    position_ids: torch.Tensor
    cache_position: torch.Tensor


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
    if positions == "contiguous":
        position_ids = position_ids - dropped - prompt.entry_pads[:, None]
    mask = kwargs.get("attention_mask")
    if mask is not None:
        full = prompt.full_length
        entry = mask[:, :full].gather(1, prompt.entry_keep) * prompt.entry_real
        mask = torch.cat([entry, mask[:, full:]], dim=1)
    step = Step(position_ids, cache_position)
    inputs = {**kwargs, "attention_mask": mask, "position_ids": position_ids}
    return compat.with_cache_position(inputs, cache_position), step


def layer_inputs(
    adapter: Adapter, prompt: Prompt, stage_number: int, positions: str, hidden: torch.Tensor, kwargs: dict,
    step: Step,
) -> dict:
    """What changes in the inputs of the layers from a decoder stage on: their cache holds only its kept tokens."""
    frame = prompt.frames[stage_number + 1]
    shift = prompt.frames[0].length - frame.length
    mask = kwargs["attention_mask"]
    if mask is not None:
        batch, total = frame.keep_cols.shape[0], mask.shape[-1]
        new = torch.arange(prompt.frames[0].length, total, device=mask.device).expand(batch, -1)
        mask = slice_mask(mask, None, torch.cat([frame.keep_cols, new], dim=1))
    override = compat.with_cache_position({"attention_mask": mask}, step.cache_position - shift)
    if positions == "contiguous":
        position_ids = step.position_ids - shift
        override.update(position_ids=position_ids, position_embeddings=adapter.rotary(hidden, position_ids))
    return override

"""Prefill: stage 1 on every image, and the decoder's shorter entry frame built from what it keeps.

The decoder gets `inputs_embeds` of each prompt's text and fixed image tokens plus its kept visual tokens, at
their places in the prompt, with the mask and rotary positions gathered to match. What the prefill decided is
kept in a `Prompt` for the decoder's cuts and the decode steps of the same prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from star import compat
from star.adapters import Adapter
from star.adapters.base import FIXED, TEXT
from star.decoder import Frame, contiguous_positions, gather_positions, gather_seq
from star.methods import Selection
from star.pruner.budget import Budget


@dataclass
class Prompt:
    """What a prefill decided, kept for the decoder's cuts and the decode steps of the same prompt."""

    full_length: int
    entry_keep: torch.Tensor  # [B, S1] indices of the full prompt present in the entry frame
    entry_real: torch.Tensor  # [B, S1] False at the padding slots the pruner added to even out rows
    entry_pads: torch.Tensor  # [B] how many of those each row has
    positions: torch.Tensor  # rotary positions of the full prompt, [B, S] or [3, B, S]
    frames: list[Frame]
    n_text: torch.Tensor
    budgets: list[list[int]]  # per decoder stage, the visual tokens each prompt keeps
    tokens: list[int]
    totals: list[list[int]]
    residuals: torch.Tensor | None = None  # [B, V, E, D] DeepStack features of the last frame's visual tokens


def enter(adapter: Adapter, budget: Budget, positions: str, kwargs: dict) -> tuple[Prompt, dict]:
    """Run stage 1 on the prompts' images and return the prompt's state and the decoder's entry inputs."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        raise ValueError("input_ids is None: pruning needs the prompt's token ids to find its image tokens")
    batch, length = input_ids.shape
    device = input_ids.device
    stages = budget.plan.llm_stages
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        form = f"a tensor of {mask.dim()} dims" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"attention_mask came as {form} at prefill: the pruner needs the 2-D padding mask [batch, tokens] to "
            "build its shorter frames"
        )
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask pads on the right: prompts must be left-padded (padding_side='left')")
    encoded = adapter.encode_prompts(kwargs, input_ids)
    full_positions = adapter.prompt_positions(kwargs, input_ids, mask)

    # Stage 1, unit by unit: the kept tokens' places among each prompt's image tokens, and their embeddings.
    slots = encoded.slots
    kept_places: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    kept_embeds: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    kept_residuals: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    totals = torch.zeros(batch, 2 + len(stages), dtype=torch.long)
    tokens = None
    for group in encoded.groups:
        units, n = group.view.features.shape[:2]
        plan = budget.unit_plan(n)
        schedule = budget.schedule(plan)
        tokens = tokens or (budget.schedule(budget.plan) if adapter.n_visual else schedule)
        totals.index_add_(0, group.rows.cpu(), torch.tensor(schedule).expand(units, -1).contiguous())
        if plan.vision_keep < n:
            selection = budget.method.select_vision(group.view, plan.vision_keep)
        else:
            selection = Selection(torch.arange(n, device=device).expand(units, n))
        features = selection.states if selection.states is not None else gather_seq(group.view.features, selection.index)
        projected = adapter.project(features)
        kept = group.ordinals.gather(1, selection.index)
        # A merged token keeps the residuals of the place it takes.
        residuals = None if group.residuals is None else gather_seq(group.residuals, selection.index)
        for unit, row in enumerate(group.rows.tolist()):
            kept_places[row].append(kept[unit])
            kept_embeds[row].append(projected[unit])
            if residuals is not None:
                kept_residuals[row].append(residuals[unit])

    totals_list = totals.tolist()
    budgets = [[row[2 + s] for row in totals_list] for s in range(len(stages))]
    uneven = any(len({row[j] for row in totals_list}) > 1 for j in range(1, totals.shape[1]))

    # Entry frame: each prompt's text and fixed image tokens, and its kept visual tokens at their places (a
    # merged token may share its place with another; the stable sort keeps the method's order). Shorter
    # rows are left-padded; one spare padding slot per row when a later cut is uneven, so every row has a
    # masked column for that cut's own padding to point at.
    image_cols = ragged_rows(slots != TEXT)
    columns, visual_embeds, visual_residuals = [], [], []
    for row in range(batch):
        places = torch.cat(kept_places[row]) if kept_places[row] else slots.new_zeros(0)
        others = (slots[row] < 0).nonzero()[:, 0]  # TEXT and FIXED
        cols = torch.cat([others, image_cols[row, places]])
        order = torch.sort(cols, stable=True).indices
        columns.append(cols[order])
        visual_order = order[order >= len(others)] - len(others)
        visual_embeds.append(torch.cat(kept_embeds[row])[visual_order] if kept_embeds[row] else None)
        if kept_residuals[row]:
            visual_residuals.append(torch.cat(kept_residuals[row])[visual_order])
    spare = 1 if uneven and stages else 0
    width = max(len(c) for c in columns) + spare
    entry_keep = torch.stack([torch.cat([c.new_zeros(width - len(c)), c]) for c in columns])
    lengths = torch.tensor([len(c) for c in columns], device=device)
    entry_real = torch.arange(width, device=device) >= width - lengths[:, None]
    entry_slots = slots.gather(1, entry_keep)
    entry_visual = (entry_slots >= 0) & entry_real
    embeds = adapter.embed(input_ids.gather(1, entry_keep))
    for row, row_embeds in enumerate(visual_embeds):
        if row_embeds is not None:
            embeds[row, entry_visual[row]] = row_embeds.to(embeds.dtype)
    if encoded.fixed is not None:
        embeds = torch.where((entry_slots == FIXED)[..., None], encoded.fixed.to(embeds.dtype), embeds)

    pads = width - lengths
    if positions == "original":
        entry_positions = gather_positions(full_positions, entry_keep)
    else:  # the padding slots added here do not count as tokens before the real ones
        entry_positions = contiguous_positions(full_positions, entry_keep) - pads[:, None]
    entry_length = entry_keep.shape[1]
    entry_mask = mask.gather(1, entry_keep) * entry_real
    visual = ragged_rows(entry_visual)
    patches = entry_slots.gather(1, visual.clamp_min(0)).masked_fill(visual < 0, -1)
    image_like = (entry_visual | (entry_slots == FIXED)).long()
    last_image = (image_like * torch.arange(entry_length, device=device)).amax(dim=1)
    entry_cols = torch.arange(entry_length, device=device).expand(batch, entry_length)
    frame = Frame(0, entry_cols, entry_mask, visual, patches, entry_positions)
    residuals = None
    if visual_residuals:  # aligned with the frame's visual tokens, shorter rows padded with zeros
        residuals = embeds.new_zeros(batch, visual.shape[1], *visual_residuals[0].shape[1:])
        for row, row_residuals in enumerate(visual_residuals):
            residuals[row, : len(row_residuals)] = row_residuals.to(embeds.dtype)
    prompt = Prompt(
        length, entry_keep, entry_real, pads, full_positions, [frame], entry_length - 1 - last_image, budgets,
        tokens or [0] * totals.shape[1], totals_list, residuals,
    )
    # Per-token inputs the model reads besides the ids (Gemma 3's token types), at the kept tokens; 0 at the
    # padding slots added here.
    token_inputs = {name: kwargs[name].gather(1, entry_keep) * entry_real for name in adapter.token_inputs if kwargs.get(name) is not None}
    entry = {
        **kwargs,
        **{name: None for name in adapter.vision_inputs},
        **token_inputs,
        "input_ids": None,
        "inputs_embeds": embeds,
        "attention_mask": entry_mask,
        "position_ids": entry_positions,
    }
    return prompt, compat.with_cache_position(entry, torch.arange(entry_length, device=device))


def ragged_rows(flags: torch.Tensor) -> torch.Tensor:
    """Indices of each row's True columns, in order, [B, V_max]; shorter rows end with -1."""
    counts = flags.sum(dim=1, keepdim=True)
    width = int(counts.max()) if flags.shape[0] else 0
    order = torch.sort((~flags).long(), dim=1, stable=True).indices[:, :width]
    return order.masked_fill(torch.arange(width, device=flags.device) >= counts, -1)

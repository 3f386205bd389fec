"""Prefill: stage 1 on every image, and the decoder's shorter entry frame built from what it keeps.

The decoder gets `inputs_embeds` of each prompt's text and fixed image tokens plus its kept visual tokens, at
their places in the prompt, with the mask and rotary positions gathered to match. What the prefill decided is
kept in a `Prompt` for the decoder's cuts and the decode steps of the same prompt.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import StaticCache

from star import compat
from star.adapters import Adapter
from star.adapters.base import FIXED, TEXT, Encoded, Layout, read_layout, rows_of, split_rows
from star.decoder import (
    Frame, contiguous_positions, gather_positions, gather_seq, keep_in_order, on_device, padding_of, ragged_rows,
)
from star.methods import LLMStage, Method, Selection
from star.pruner.budget import Budget, batch_stages
from star.schedule import Point


@dataclass
class Prompt:
    """What a prefill decided, kept for the decoder's cuts and the decode steps of the same prompt."""

    full_length: int
    entry_keep: torch.Tensor  # [B, S1] indices of the full prompt present in the entry frame
    entry_real: torch.Tensor  # [B, S1] False at the padding slots the pruner added to even out rows
    entry_pads: torch.Tensor  # [B] how many of those each row has
    positions: torch.Tensor  # rotary positions of the full prompt, [B, S] or [3, B, S]
    frames: list[Frame]
    layout: Layout
    stages: tuple[LLMStage, ...]  # the batch's decoder stages: every layer one of its prompts cuts at
    methods: list[Method]  # each prompt's method (its options are its own where a budget picks them per prompt)
    budgets: list[list[int | None]]  # per decoder stage, the visual tokens each prompt keeps; None: it does not cut there
    tokens: list[int]
    totals: list[list[int]]
    residuals: torch.Tensor | None = None  # [B, V, E, D] DeepStack features of the last frame's visual tokens
    cache_slots: int | None = None  # a StaticCache's slots per layer (every frame's cache has as many), or None
    picks: list[Point] | None = None  # each prompt's setting, where a budget picked it per prompt
    # What the prefill decided, for a prefill that continues this prompt without a cache to reuse (see `enter`):
    # each prompt's budget, stage 1's selections in the order made, and each decoder stage's (filled by `cut`).
    row_budgets: list[Budget] = field(default_factory=list)
    vision_selections: list[Selection] = field(default_factory=list)
    llm_selections: list[list[Selection]] = field(default_factory=list)
    replay: Prompt | None = None  # the prompt whose decisions this prefill reuses, or None
    source: tuple[torch.Tensor, torch.Tensor] | None = None  # the prompt's input_ids and pixel_values
    # M-RoPE with each image a grid of its own (pool, positions="contiguous"): [B] what each row's text after the
    # images moved back by, so that decode steps continue from the entry frame's positions; else None
    position_shift: torch.Tensor | None = None
    stage_at: dict[int, int] = field(init=False)  # the stage that cuts at each of its layers
    early_scores: set[int] = field(init=False)  # the layers a stage scores at before its own layer

    def __post_init__(self):
        self.stage_at = {stage.layer: i for i, stage in enumerate(self.stages)}
        self.early_scores = {s.score_layer for s in self.stages if s.score_layer != s.layer}

    def frame_at(self, layer: int) -> Frame:
        """The frame decoder layer `layer` runs in."""
        return next(f for f in reversed(self.frames) if f.start_layer <= layer)


def enter(
    adapter: Adapter, budgets_of: Callable[[Layout, Callable[[], Encoded]], tuple[list[Budget], list[Point] | None]],
    positions: str, kwargs: dict, replay: Prompt | None = None,
) -> tuple[Prompt, dict]:
    """Run stage 1 on the prompts' images and return the prompt's state and the decoder's entry inputs.

    budgets_of: each prompt's budget from the batch's layout, or from its units where they differ in size (the
    second argument encodes the images, once; the settings picked per prompt, if any, come with them).
    replay: a prompt this one continues (its tokens followed by more, the same images; `continues`): its budgets
    and every selection it made are reused, so the tokens that follow the prompt never change its pruning.
    After the one read of the batch's `Layout`, every size is known on the host and every index is computed on
    the device: a GPU runs the prefill without waiting for the host.
    """
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        raise ValueError("input_ids is None: pruning needs the prompt's token ids to find its image tokens")
    batch, length = input_ids.shape
    device = input_ids.device
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    cache = compat.cache_of(kwargs)
    cache_slots = cache.layers[adapter.counted_layer].max_cache_len if isinstance(cache, StaticCache) else None
    if cache_slots is not None and isinstance(mask, torch.Tensor) and mask.dim() == 4:
        mask = padding_of(mask)[:, :length]  # 4.57's generate() makes a StaticCache's 4-D mask before the forward
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        form = f"a tensor of {mask.dim()} dims" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"attention_mask came as {form} at prefill: the pruner needs the 2-D padding mask [batch, tokens] to "
            "build its shorter frames"
        )
    layout = read_layout(input_ids, mask, adapter.image_token_id, adapter.image_sizes(kwargs))
    encode = functools.cache(lambda: adapter.encode_prompts(kwargs, input_ids, layout))
    budgets, picks = (replay.row_budgets, replay.picks) if replay is not None else budgets_of(layout, encode)
    if layout.image_sizes is not None:  # images of their own sizes: each budget checked before the tower runs
        rows = rows_of(split_rows(layout.image_tokens, layout.image_sizes, adapter.sizes_note))
        for row, n, grid in zip(rows, layout.image_sizes, layout.image_grids):
            budgets[row].unit_plan(n, grid)
    stages = batch_stages(budgets) if len(set(map(id, budgets))) > 1 else budgets[0].plan.llm_stages
    encoded = encode()
    full_positions = adapter.prompt_positions(kwargs, input_ids, mask)

    # Stage 1, unit by unit: each unit's kept tokens, their places among its prompt's image tokens, and the
    # slots they take in their prompt's row of kept visual tokens (units in order, each in the method's order).
    totals = [[0] * (2 + len(stages)) for _ in range(batch)]
    filled = [0] * batch  # kept visual tokens of each prompt
    candidates = [0] * batch  # and the image tokens stage 1 chose them from
    kept_units, selections = [], []
    grids = []  # each unit's kept grid, in prompt order (M-RoPE positions of images that small)
    tokens = None
    for group in encoded.groups:
        units, n = group.view.features.shape[:2]
        # Units of prompts with different budgets are scored together and kept apart.
        for budget in {id(budgets[row]): budgets[row] for row in group.rows}.values():
            plan = budget.unit_plan(n, group.view.grid)
            schedule = budget.schedule(plan, stages)
            tokens = tokens or (budgets[0].schedule(budgets[0].plan, stages) if adapter.n_visual else schedule)
            if replay is not None:
                selection = replay.vision_selections[len(selections)]
            elif plan.vision_keep < n:
                selection = budget.method.select_vision(group.view, plan.vision_keep)
            else:
                selection = Selection(torch.arange(n, device=device).expand(units, n))
            selections.append(selection)
            features = selection.states if selection.states is not None else gather_seq(group.view.features, selection.index)
            index, ordinals, group_residuals, rows = selection.index, group.ordinals, group.residuals, group.rows
            mine = [unit for unit, row in enumerate(group.rows) if budgets[row] is budget]
            if len(mine) < units:
                pick = on_device(mine, device)
                index, ordinals, features = index[pick], ordinals[pick], features[pick]
                group_residuals = None if group_residuals is None else group_residuals[pick]
                rows = [group.rows[unit] for unit in mine]
            kept = index.shape[1]
            grids += [selection.grid or group.view.grid] * len(rows)
            starts = []
            for row in rows:
                totals[row] = [total + count for total, count in zip(totals[row], schedule)]
                starts.append(filled[row])
                filled[row] += kept
                candidates[row] += n
            # A merged token keeps the residuals of the place it takes; a mixed one (Pool) their mix.
            if group_residuals is None:
                residuals = None
            elif selection.mix is not None:
                residuals = torch.einsum("kn,ined->iked", selection.mix.to(group_residuals.dtype), group_residuals)
            else:
                residuals = gather_seq(group_residuals, index)
            places = ordinals.gather(1, index)
            kept_units.append((rows, starts, places, adapter.project(features), residuals))

    # Every prompt's kept visual tokens as rows of `width_v` slots (-1 / zeros where a row has fewer): their
    # columns in the full prompt, their embeddings, and their residuals.
    width_v = max(filled)
    image_cols = ragged_rows(encoded.slots != TEXT, max(layout.image_tokens))
    visual_cols = torch.full((batch * width_v,), -1, dtype=torch.long, device=device)
    visual_embeds = visual_residuals = None
    for rows, starts, places, projected, residuals in kept_units:
        kept = places.shape[1]
        slot = (on_device([row * width_v + start for row, start in zip(rows, starts)], device)[:, None] + torch.arange(kept, device=device)).flatten()
        row_index = on_device(rows, device)[:, None].expand(-1, kept)
        visual_cols.index_copy_(0, slot, image_cols[row_index, places].flatten())
        if visual_embeds is None:
            visual_embeds = projected.new_zeros(batch * width_v, projected.shape[-1])
        visual_embeds.index_copy_(0, slot, projected.flatten(0, 1))
        if residuals is not None:
            if visual_residuals is None:
                visual_residuals = residuals.new_zeros(batch * width_v, *residuals.shape[2:])
            visual_residuals.index_copy_(0, slot, residuals.flatten(0, 1))
    visual_cols = visual_cols.view(batch, width_v)

    # Entry frame: each prompt's text and fixed image tokens and its kept visual tokens, in prompt order (a
    # merged token may share its place with another; the stable sort keeps the method's order). Shorter rows
    # are left-padded, masked.
    dropped = [c - f for c, f in zip(candidates, filled)]
    width = length - min(dropped)
    columns = torch.arange(length, device=device).expand(batch, length).masked_fill(encoded.slots >= 0, -1)
    entry_keep, entry_real, from_visual, visual_slot = keep_in_order(columns, visual_cols, width)
    embeds = adapter.embed(input_ids.gather(1, entry_keep))
    if width_v:
        embeds = torch.where(from_visual[..., None], gather_seq(visual_embeds.view(batch, width_v, -1), visual_slot).to(embeds.dtype), embeds)
    entry_slots = encoded.slots.gather(1, entry_keep)
    if encoded.fixed is not None:
        embeds = torch.where((entry_slots == FIXED)[..., None], encoded.fixed.to(embeds.dtype), embeds)

    pads = (~entry_real).sum(dim=1)
    entry_mask = mask.gather(1, entry_keep) * entry_real
    shift = None
    if positions == "original":
        entry_positions = gather_positions(full_positions, entry_keep)
    elif adapter.mrope:  # each image a grid of its own (pool): numbered as the model numbers an image that small
        entry_positions = adapter.grid_positions(input_ids.gather(1, entry_keep), entry_mask, grids)
        shift = full_positions[-3][:, -1] - entry_positions[0][:, -1]
    else:  # the padding slots added here do not count as tokens before the real ones
        entry_positions = contiguous_positions(full_positions, entry_keep) - pads[:, None]
    visual = ragged_rows(from_visual, width_v)
    patches = entry_slots.gather(1, visual.clamp_min(0)).masked_fill(visual < 0, -1)
    entry_cols = torch.arange(width, device=device).expand(batch, width)
    frame = Frame(0, entry_cols, entry_mask, visual, patches, entry_positions, filled, max(dropped) > min(dropped))
    residuals = None
    if visual_residuals is not None:  # aligned with the frame's visual tokens, shorter rows padded with zeros
        residuals = gather_seq(visual_residuals.view(batch, width_v, *visual_residuals.shape[1:]), visual_slot.gather(1, visual.clamp_min(0)))
        residuals = residuals * (visual >= 0).view(batch, width_v, *[1] * (residuals.dim() - 2)).to(residuals.dtype)
    cuts = [{s.layer for s in budget.plan.llm_stages} for budget in budgets]
    stage_budgets = [[row[2 + s] if stage.layer in cuts[r] else None for r, row in enumerate(totals)] for s, stage in enumerate(stages)]
    prompt = Prompt(
        length, entry_keep, entry_real, pads, full_positions, [frame], layout, stages, [b.method for b in budgets],
        stage_budgets, tokens or [0] * (2 + len(stages)), totals, residuals, cache_slots, picks, budgets, selections,
        replay=replay, source=(input_ids, kwargs["pixel_values"]), position_shift=shift,
    )
    # Per-token inputs the model reads besides the ids (Gemma 3's token types), at the kept tokens.
    token_inputs = adapter.entry_inputs(kwargs, input_ids, entry_keep, entry_real)
    entry = {
        **kwargs,
        **{name: None for name in adapter.vision_inputs},
        **token_inputs,
        "input_ids": None,
        "inputs_embeds": embeds,
        "attention_mask": entry_mask,
        "position_ids": entry_positions,
    }
    return prompt, compat.with_cache_position(entry, torch.arange(width, device=device))



def continues(prompt: Prompt | None, kwargs: dict) -> bool:
    """Whether a prefill without a cache continues `prompt`: its images (the same pixel_values) and its tokens
    followed by more. generate(use_cache=False) calls the model so at every step, and `enter` then reuses the
    prompt's pruning. One read back from the device (the tokens compared)."""
    if prompt is None or prompt.source is None or kwargs.get("use_cache") is not False:
        return False
    ids, pixels = prompt.source
    new = kwargs.get("input_ids")
    if new is None or kwargs["pixel_values"] is not pixels or new.shape[0] != ids.shape[0] or new.shape[1] <= ids.shape[1]:
        return False
    return bool(torch.equal(new[:, : ids.shape[1]], ids))

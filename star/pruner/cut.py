"""A decoder stage's cut, at prefill: score the visual tokens with the stage's layer and keep the top ones.

The layer and every later one get the shorter frame: hidden states gathered at the kept tokens (a merging
method's states written over its kept ones), and `frame_inputs` moves each layer's mask, rotary tables and
positions, which the model makes for the entry frame, to the same tokens. Layers cache what they see, so from
here on the KV cache holds only the kept tokens.
"""

from __future__ import annotations

from functools import partial

import torch

from star import compat
from star.adapters import Adapter
from star.decoder import (
    Frame, causal_frame_mask, contiguous_positions, gather_positions, gather_rotary, gather_seq, hide_keys, keep_in_order,
    mask_like, ragged_rows, slice_mask, unseen_slots,
)
from star.methods import DecoderView, LLMStage, Selection
from star.pruner.entry import Prompt
from star.scoring import attention_probs


def cut(
    adapter: Adapter, stage: LLMStage, prompt: Prompt, budgets: list[int | None], positions: str,
    hidden: torch.Tensor, scored: tuple[torch.Tensor, dict],
) -> torch.Tensor:
    """The stage layer's hidden states in the new frame, which is appended to `prompt.frames` (with the kept
    tokens' residuals, where the family has them).

    hidden: the stage layer's input; scored: the input and inputs of the stage's score layer (the same layer,
    or an earlier one), in the last frame. budgets: the visual tokens each prompt keeps (None: all it has, a
    prompt whose own setting does not cut here).
    """
    frame = prompt.frames[-1]
    stage_number = len(prompt.frames) - 1
    if prompt.replay is not None:  # a prefill that continues a prompt without a cache: that prompt's selection
        selections = prompt.replay.llm_selections[stage_number]
    else:
        selections = select(adapter, stage, prompt, *scored, budgets, hidden)
    prompt.llm_selections.append(selections)
    batch, length = hidden.shape[:2]
    kept_counts = [s.index.shape[1] for s in selections for _ in range(s.index.shape[0])]
    if len(selections) == 1:
        index, states = selections[0].index, selections[0].states
    else:
        index = pad_rows([s.index[0] for s in selections])
        states = None
        if any(s.states is not None for s in selections):  # a merging method's rows, and rows kept whole as they are
            own = [hidden[row : row + 1].gather(1, frame.visual[row : row + 1, : frame.counts[row], None].expand(-1, -1, hidden.shape[-1])) for row in range(batch)]
            states = pad_rows([(s.states if s.states is not None else own[row])[0] for row, s in enumerate(selections)], 0)

    # Each row keeps its other tokens (text, fixed image tokens, padding) and its kept visual tokens, in order;
    # rows that end up shorter are left-padded, masked.
    kept = frame.visual.gather(1, index.clamp_min(0)).masked_fill(index < 0, -1)
    is_visual = torch.zeros(batch, length + 1, dtype=torch.bool, device=hidden.device)
    is_visual = is_visual.scatter(1, frame.visual.masked_fill(frame.visual < 0, length), True)[:, :length]
    columns = torch.arange(length, device=hidden.device).expand(batch, length).masked_fill(is_visual, -1)
    added_per_row = [k - n for k, n in zip(kept_counts, frame.counts)]
    width = length + max(added_per_row)
    keep, real, from_visual, slot = keep_in_order(columns, kept, width)
    added = (~real).sum(dim=1)
    visual = ragged_rows(from_visual, index.shape[1])
    patches = gather_seq(frame.patches, index.clamp_min(0)).masked_fill(index < 0, -1)
    hidden = gather_seq(hidden, keep)
    if states is not None:
        merged = gather_seq(states, slot).to(hidden.dtype)
        hidden = torch.where(from_visual[..., None], merged, hidden)

    if positions == "original":
        frame_positions = gather_positions(frame.position_ids, keep)
    else:  # the padding slots this cut added to a shorter row do not count as tokens before its real ones
        frame_positions = contiguous_positions(frame.position_ids, keep) - added[:, None]
    padded = frame.padded or max(added_per_row) > min(added_per_row)
    mask = frame.mask.gather(1, keep) * real
    prompt.frames.append(Frame(stage.layer, frame.keep_cols.gather(1, keep), mask, visual, patches, frame_positions, kept_counts, padded))
    if prompt.residuals is not None:
        prompt.residuals = gather_seq(prompt.residuals, index.clamp_min(0))
    return hidden


def frame_inputs(
    adapter: Adapter, frame: Frame, positions: str, hidden: torch.Tensor, kwargs: dict, layer_type: str | None,
    cache_slots: int | None, flash: bool,
) -> dict:
    """What changes in a layer's prefill inputs, made for the entry frame, in `frame`: the mask, every rotary
    table and the positions, gathered at the tokens the frame keeps (contiguous positions: tables made anew).
    The padding a cut added is hidden from every query. cache_slots: a StaticCache's slots, which the mask's key
    columns span; flash: the attention takes a 2-D padding mask (FlashAttention).

    Where the model runs a layer on its last tokens only (Gemma 4's key/value-sharing layers at prefill), `hidden`
    holds those: they are text, present in every frame, so the model's mask rows and rotary tables are already
    theirs, and only the mask's key columns move."""
    keep = frame.keep_cols
    queries = hidden.shape[1]
    whole = queries == frame.length
    mask = kwargs["attention_mask"]
    places = torch.arange(frame.length, device=keep.device)
    if layer_type in adapter.padding_mask_types:  # the 2-D padding mask of the frame's own tokens, where any pads
        mask = frame.mask if mask is not None or frame.padded else None
    elif mask is not None and mask.dim() == 4:
        mask = hide_keys(slice_mask(mask, keep if whole else None, keep), frame.mask)
    elif mask is not None or frame.padded:  # FlashAttention's 2-D mask, or none where the entry frame has no padding
        like = mask if mask is not None else mask_like(flash, frame.mask)
        mask = causal_frame_mask(like, frame.mask, places.expand_as(keep), places[frame.length - queries :])
    override = {"attention_mask": unseen_slots(mask, cache_slots)}
    own = frame.position_ids[..., frame.length - queries :]
    for name, kind in compat.rotary_tables(kwargs).items():
        if positions == "contiguous":
            override[name] = adapter.rotary(hidden, own, kind or layer_type)
        elif whole:
            cos, sin = kwargs[name]
            override[name] = (gather_rotary(cos, keep), gather_rotary(sin, keep))
    if positions == "contiguous":
        override["position_ids"] = own
    elif kwargs.get("position_ids") is not None:
        override["position_ids"] = gather_positions(kwargs["position_ids"], keep)[..., frame.length - queries :]
    return compat.with_cache_position(override, places[frame.length - queries :])


def select(
    adapter: Adapter, stage: LLMStage, prompt: Prompt, hidden: torch.Tensor, kwargs: dict,
    budgets: list[int | None], cut_hidden: torch.Tensor,
) -> list[Selection]:
    """Each prompt's method's decoder-stage selection over the last frame's visual tokens: one per group of rows.

    hidden, kwargs: the score layer's inputs; cut_hidden: the stage layer's (the same frame). Rows that hold
    and keep the same numbers of visual tokens, under the same method, are scored together; otherwise row by
    row. A row whose budget is None keeps its tokens as they are.
    """
    frame = prompt.frames[-1]
    score_layer = adapter.layers[stage.score_layer]
    score_rotary = compat.layer_rotary(kwargs, adapter.layer_type(stage.score_layer))
    batch = hidden.shape[0]
    counts, n_text, methods = frame.counts, prompt.layout.n_text, prompt.methods
    uniform = len(set(budgets)) == 1 and len(set(counts)) == 1 and all(m == methods[0] for m in methods)
    groups = [None] if uniform and budgets[0] is not None else list(range(batch))
    selections = []
    for row in groups:
        if row is not None and budgets[row] is None:
            selections.append(Selection(torch.arange(counts[row], device=hidden.device)[None]))
            continue
        h, pe, key_mask, cut_h = hidden, score_rotary, frame.mask.bool(), cut_hidden
        visual, text, text_counts, positions = frame.visual, prompt.layout.n_text_device, n_text, frame.position_ids
        if row is not None:
            h, key_mask, text, cut_h = h[row : row + 1], key_mask[row : row + 1], text[row : row + 1], cut_h[row : row + 1]
            pe = tuple(_batch_row(x, row, x.dim() - 3) for x in pe)
            visual, text_counts = visual[row : row + 1, : counts[row]], n_text[row : row + 1]
            positions = _batch_row(positions, row, positions.dim() - 2)

        def attention(rows: torch.Tensor, h=h, pe=pe, key_mask=key_mask) -> torch.Tensor:
            q, k = adapter.decoder_qk(score_layer, h, pe, rows)
            return attention_probs(q, k, key_mask, rows)

        def keys(h=h, key_mask=key_mask, positions=positions) -> torch.Tensor:
            """Keys rotated at the positions each prompt has alone: a rotated key's norm depends on its
            position, which left padding shifts."""
            alone = adapter.rotary_alone(h, positions, key_mask, adapter.layer_type(stage.score_layer))
            return adapter.decoder_qk(score_layer, h, alone, torch.zeros_like(h[:, :1, 0], dtype=torch.long))[1]

        view = DecoderView(h, visual, text, text_counts, key_mask, attention, keys, cut_h, partial(adapter.norm, cut_h))
        selections.append(methods[0 if row is None else row].select_llm(stage, view, budgets[0 if row is None else row]))
    return selections


def pad_rows(rows: list[torch.Tensor], fill: float = -1) -> torch.Tensor:
    """Per-row tensors stacked into [B, max, ...], shorter rows ending with `fill`."""
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r.new_full((width - len(r), *r.shape[1:]), fill)]) for r in rows])


def _batch_row(x: torch.Tensor, row: int, dim: int) -> torch.Tensor:
    """Row `row` of x along its batch axis `dim`, or x itself where that axis broadcasts (size 1)."""
    return x if x.shape[dim] == 1 else x.narrow(dim, row, 1)

"""A decoder stage's cut, at prefill: score the visual tokens with the stage's layer and keep the top ones.

The layer and every later one get the shorter frame: hidden states, mask and rotary positions gathered at the
kept tokens (a merging method's states written over its kept ones). Layers cache what they see, so from here
on the KV cache holds only the kept tokens.
"""

from __future__ import annotations

import torch

from star import compat
from star.adapters import Adapter
from star.decoder import Frame, contiguous_positions, gather_positions, gather_rotary, gather_seq, slice_mask
from star.methods import DecoderView, LLMStage, Method, Selection
from star.pruner.entry import Prompt
from star.scoring import attention_probs


def cut(
    adapter: Adapter, method: Method, stage: LLMStage, prompt: Prompt, budgets: list[int], positions: str,
    hidden: torch.Tensor, kwargs: dict, scored: tuple[torch.Tensor, dict],
) -> tuple[torch.Tensor, dict]:
    """The stage's layer inputs in the new frame, which is appended to `prompt.frames`.

    hidden, kwargs: the stage layer's inputs; scored: those of the stage's score layer (the same, or an
    earlier layer's). budgets: the visual tokens each prompt keeps.
    """
    frame = prompt.frames[-1]
    selections = select(adapter, method, stage, prompt, *scored, budgets)
    batch, length = hidden.shape[:2]
    if len(selections) == 1:
        index = selections[0].index
        states = None if selections[0].states is None else list(selections[0].states)
    else:
        index = pad_rows([s.index[0] for s in selections])
        states = None if selections[0].states is None else [s.states[0] for s in selections]

    # Each row keeps its other tokens (text, fixed image tokens, padding) and its kept visual tokens;
    # rows that end up shorter are left-padded with a masked column of their own.
    rows = []
    for row in range(batch):
        chosen = index[row][index[row] >= 0]
        visual = frame.visual[row][frame.visual[row] >= 0]
        others = torch.ones(length, dtype=torch.bool, device=hidden.device)
        others[visual] = False
        rows.append((others.nonzero()[:, 0], visual[chosen]))
    width = max(len(o) + len(v) for o, v in rows)
    keep, kept_visual = [], []
    for row, (others, visual) in enumerate(rows):
        cols = torch.cat([others, visual]).sort().values
        if len(cols) < width:
            pad = (frame.mask[row] == 0).nonzero()[0, 0]
            cols = torch.cat([pad.expand(width - len(cols)), cols])
        keep.append(cols)
        kept_visual.append(torch.isin(cols, visual).nonzero()[:, 0])
    keep = torch.stack(keep)
    visual = pad_rows(kept_visual)
    patches = gather_seq(frame.patches, index.clamp_min(0)).masked_fill(index < 0, -1)
    hidden = gather_seq(hidden, keep)
    if states is not None:
        for row, merged in enumerate(states):
            hidden[row, kept_visual[row]] = merged.to(hidden.dtype)

    layer_positions = kwargs.get("position_ids")
    if positions == "original":
        frame_positions = gather_positions(frame.position_ids, keep)
        cos, sin = kwargs["position_embeddings"]
        position_embeddings = (gather_rotary(cos, keep), gather_rotary(sin, keep))
        layer_positions = None if layer_positions is None else gather_positions(layer_positions, keep)
    else:
        frame_positions = layer_positions = contiguous_positions(frame.position_ids, keep)
        position_embeddings = adapter.rotary(hidden, frame_positions)
    prompt.frames.append(
        Frame(stage.layer, frame.keep_cols.gather(1, keep), frame.mask.gather(1, keep), visual, patches, frame_positions)
    )
    return hidden, compat.with_cache_position(
        {
            "attention_mask": slice_mask(kwargs["attention_mask"], keep, keep),
            "position_embeddings": position_embeddings,
            "position_ids": layer_positions,
        },
        torch.arange(keep.shape[1], device=hidden.device),
    )


def select(
    adapter: Adapter, method: Method, stage: LLMStage, prompt: Prompt, hidden: torch.Tensor, kwargs: dict,
    budgets: list[int],
) -> list[Selection]:
    """The method's decoder-stage selection over the last frame's visual tokens: one per group of rows.

    Rows that hold and keep the same numbers of visual tokens are scored together; otherwise row by row.
    """
    frame = prompt.frames[-1]
    score_layer = adapter.layers[stage.score_layer]
    batch = hidden.shape[0]
    counts = (frame.visual >= 0).sum(dim=1)
    if len(set(budgets)) == 1 and bool((counts == counts[0]).all()):
        groups = [None]
    else:
        groups = list(range(batch))
    selections = []
    for row in groups:
        h, pe, key_mask = hidden, kwargs["position_embeddings"], frame.mask.bool()
        visual, n_text = frame.visual, prompt.n_text
        if row is not None:
            h, key_mask, n_text = h[row : row + 1], key_mask[row : row + 1], n_text[row : row + 1]
            pe = tuple(_batch_row(x, row, x.dim() - 3) for x in pe)
            visual = visual[row : row + 1, : int(counts[row])]

        def attention(rows: torch.Tensor, h=h, pe=pe, key_mask=key_mask) -> torch.Tensor:
            q, k = adapter.decoder_qk(score_layer, h, pe, rows)
            return attention_probs(q, k, key_mask, rows)

        view = DecoderView(h, visual, n_text, key_mask, attention)
        selections.append(method.select_llm(stage, view, budgets[0 if row is None else row]))
    return selections


def pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """1-D index tensors stacked into [B, max], shorter rows ending with -1."""
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r.new_full((width - len(r),), -1)]) for r in rows])


def _batch_row(x: torch.Tensor, row: int, dim: int) -> torch.Tensor:
    """Row `row` of x along its batch axis `dim`, or x itself where that axis broadcasts (size 1)."""
    return x if x.shape[dim] == 1 else x.narrow(dim, row, 1)

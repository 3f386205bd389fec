"""Decoder plumbing: the tensor operations that move a decoder's inputs into a shorter frame.

A "frame" is the token sequence a range of decoder layers sees. Pruning at layer K starts a new frame:
hidden states, attention mask, positions and cache positions are gathered at the kept indices, and the
layers from K on cache only those tokens. Pure functions here; the hooks that call them live in `pruner`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from star.scoring import flagged_in_order


@dataclass
class Frame:
    """The tokens one range of decoder layers sees, from `start_layer` on.

    keep_cols: [B, S_f] the prompt's indices in the decoder's entry frame that are still present.
    mask: [B, S_f] 2-D attention mask of the prompt in this frame (False at padding).
    visual: [B, V_f] indices of the visual tokens in this frame. When the rows keep different numbers of
    visual tokens (images of different sizes), shorter rows end with -1.
    patches: [B, V_f] which visual token each one is: its place among the image tokens of its prompt
    (image m's patch j is m * n_visual + j for LLaVA-1.5), -1 where `visual` is.
    position_ids: [B, S_f] or [3, B, S_f] (M-RoPE) rotary positions of the prompt tokens in this frame.
    counts: [B] the visual tokens of each row, on the host, so that the next cut's sizes need no read back.
    padded: whether the pruner left-padded a row of this frame or an earlier one (known on the host: a model that
    sees no padding in its own mask makes none, and the pruner must).
    """

    start_layer: int
    keep_cols: torch.Tensor
    mask: torch.Tensor
    visual: torch.Tensor
    patches: torch.Tensor
    position_ids: torch.Tensor
    counts: list[int]
    padded: bool

    @property
    def length(self) -> int:
        return self.keep_cols.shape[1]


def on_device(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host integers (a list, or a tensor on the CPU) as a long tensor on `device` without waiting for the device:
    an ordinary copy to a GPU synchronises its stream, a copy from pinned memory is queued behind the work already
    there."""
    host = torch.as_tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def keep_in_order(others: torch.Tensor, visual: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """A new frame's columns: each row's other tokens [B, L] (their columns, -1 where dropped) and its kept visual
    tokens [B, V] (their columns, -1 where a row has fewer), merged in ascending order and left-padded to `width`.

    Returns, each [B, width]: the columns (0 at padding), whether each is real (not padding), whether it is a
    visual token, and the visual token's place in `visual` (0 elsewhere). A stable sort of a fixed size: equal
    columns keep their order (others, then `visual` in its own order), and nothing is read back from the device
    (boolean indexing and `nonzero` would have to learn each row's count first). `width` is at least each row's
    count of kept entries.
    """
    keys = torch.cat([others, visual], dim=1)
    order = torch.sort(keys, dim=1, stable=True).indices[:, keys.shape[1] - width :]
    columns = keys.gather(1, order)
    real = columns >= 0
    length = others.shape[1]
    return columns.clamp_min(0), real, (order >= length) & real, (order - length).clamp_min(0)


def ragged_rows(flags: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of each row's True columns, in order, [B, width]; rows with fewer end with -1. `width` is at
    least every row's count, known on the host."""
    counts = flags.sum(dim=1, keepdim=True)
    return flagged_in_order(flags, width).masked_fill(torch.arange(width, device=flags.device) >= counts, -1)


def gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x gathered along `dim` at per-row indices [B, K]; x may broadcast over the batch (size 1)."""
    batch, k = index.shape
    if x.shape[0] != batch:
        x = x.expand(batch, *x.shape[1:])
    view, target = [batch] + [1] * (x.dim() - 1), list(x.shape)
    view[dim] = target[dim] = k
    return x.gather(dim, index.view(view).expand(target))


def gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Position ids [B, S] or [n, B, S] (M-RoPE: one row per axis) gathered at per-row token indices [B, K]."""
    if positions.dim() == 2:
        return gather_seq(positions, index)
    return torch.stack([gather_seq(axis, index) for axis in positions])


def gather_rotary(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A rotary cos or sin, [B, S, d] or [3, B, S, d] (M-RoPE), gathered at per-row token indices [B, K]."""
    if x.dim() == 3:
        return gather_seq(x, index)
    return torch.stack([gather_seq(axis, index) for axis in x])


def slice_mask(mask: torch.Tensor | None, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor | None:
    """Restrict an attention mask (None, 2-D [B, K] or 4-D [B, 1, Q, K]) to kept query rows and key columns."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return gather_seq(mask, cols, dim=1)
    if rows is not None:
        mask = gather_seq(mask, rows, dim=2)
    return gather_seq(mask, cols, dim=3)


def padding_of(mask: torch.Tensor) -> torch.Tensor:
    """The 2-D mask [B, K] (1 where a key may be seen) of a 4-D mask [B, 1, Q, K] (bool, or additive float) that
    generate() makes for a StaticCache: its last query row sees every key that is no padding up to itself."""
    last = mask[:, 0, -1]
    return (last if last.dtype == torch.bool else last == 0).long()


def mask_like(flash: bool, mask: torch.Tensor) -> torch.Tensor:
    """A stand-in for the model's own mask where it made none (no padding in the entry frame), giving
    `causal_frame_mask` the form the attention takes: FlashAttention's 2-D padding mask (`mask` itself), else a
    4-D bool mask (SDPA, eager)."""
    return mask if flash else mask.new_ones(1, 1, 1, 1, dtype=torch.bool)


def hide_keys(mask: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """A 4-D mask [B, 1, Q, K] (bool, or additive float) with the keys where seen [B, K] is 0 hidden from every query."""
    hidden = ~seen.bool()[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~hidden
    return mask.masked_fill(hidden, torch.finfo(mask.dtype).min)


def unseen_slots(mask: torch.Tensor | None, slots: int | None) -> torch.Tensor | None:
    """A 4-D mask [B, 1, Q, K] widened to a StaticCache's `slots` key slots, the added ones seen by no query: the
    cache of a shorter frame has as many slots as the entry frame's, and uses only its first K."""
    if mask is None or slots is None or mask.dim() != 4:
        return mask
    extra = slots - mask.shape[-1]
    if mask.dtype == torch.bool:
        return torch.nn.functional.pad(mask, (0, extra), value=False)
    return torch.nn.functional.pad(mask, (0, extra), value=torch.finfo(mask.dtype).min)


def causal_frame_mask(like: torch.Tensor, seen: torch.Tensor, cols: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """A mask over a frame's keys, in the form of the model's own mask `like` (2-D, or 4-D bool or additive float):
    query i, at entry-frame position query[i], sees the key at entry-frame column cols[b, j] if seen[b, j] (no
    padding) and that column is not after it. Built from the frame's own mask, not cut from `like`: where layers
    of a type size their masks by a cache that a cut shortened (Gemma 3's first global layer), `like` lacks the
    columns."""
    batch = cols.shape[0]
    seen = seen.bool()
    if like.dim() == 2:
        return seen.to(like.dtype)
    allowed = seen[:, None, None, :] & (cols[:, None, None, :] <= query.view(1, 1, -1, 1))
    allowed = allowed.expand(batch, 1, len(query), cols.shape[1])
    if like.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(~allowed, torch.finfo(like.dtype).min)


def contiguous_positions(positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """1-D positions [B, S] of the kept tokens renumbered without gaps: each moves back by the tokens dropped
    before it. (Not defined for M-RoPE's 3-D positions, where an image's tokens share temporal positions.)"""
    dropped_before = keep - torch.arange(keep.shape[1], device=keep.device)
    return positions.gather(1, keep) - dropped_before


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, H, S, d] with cos, sin [B, S, d] (the half-rotation convention of Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def llama_style_qk(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries for `rows` [B, R] and keys for every token of a Llama/Mistral/Qwen2-style decoder layer.

    The layer's own input norm, projections and rotary embedding, as its attention computes them, so the
    scores equal that layer's attention probabilities. Returns q [B, H, R, d], k [B, Hk, S, d].
    """
    q, k = project_qk(layer, hidden, rows)
    cos, sin = position_embeddings
    batch = hidden.shape[0]
    cos = cos.expand(batch, *cos.shape[1:])
    sin = sin.expand(batch, *sin.shape[1:])
    return rotate(q, gather_seq(cos, rows), gather_seq(sin, rows)), rotate(k, cos, sin)


def project_qk(layer: nn.Module, hidden: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's input norm and q/k projections, before any rotary embedding: queries for `rows`
    [B, R] as [B, H, R, d], keys for every token as [B, Hk, S, d]. Where the attention normalises each head's
    queries and keys (`q_norm`, `k_norm`: Qwen3, Gemma 3), so do these."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    batch, seq = hidden.shape[:2]
    q = attn.q_proj(gather_seq(normed, rows)).view(batch, rows.shape[1], -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k


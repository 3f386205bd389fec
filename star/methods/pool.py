"""Pool: the baseline of a smaller image, each unit's token grid downsampled by 2-D average pooling.

No scores: a grid of h x w tokens becomes g_h x g_w tokens, each the mean of its window of the encoder's grid,
the windows of torch's adaptive average pooling (rows floor(i h / g_h) to ceil((i + 1) h / g_h), columns alike),
on the features the projector receives. The grid keeps its aspect, so only some counts are reachable: `keep`
becomes the nearest of them (`pooled_grid`; the smaller on a tie), and the plan, `stats.tokens` and `star flops`
report that count. A pooled token takes the place of its window's centre patch (so `stats.kept_patches` lists
the centres, in row-major order); by default the decoder numbers the pooled tokens without gaps
(positions="contiguous"), as it numbers the tokens of an image that small, and positions="original" puts each at
its centre patch's position. On Qwen's 3-D M-RoPE, where a subset of tokens has no gap-free renumbering, a pooled
grid has one: the model's own positions of an image that small (`grid_positions`; the adapter's `grid_positions`
asks the model's `get_rope_index`). Where the decoder adds features onto visual tokens (Qwen3-VL's DeepStack) a
pooled token gets the mean of its window's (`Selection.mix`).

VTC-Bench (ACL 2026) and UniPruneBench (arXiv 2511.02650) found that downsampling and random selection beat many
token-pruning methods at equal cost: this is the downsampling side of that comparison, run on the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from star.methods.base import Method, Plan, Selection, VisionView


def pooled_grid(grid: tuple[int, int], keep: int) -> tuple[int, int]:
    """The g_h x g_w grid, of `grid`'s aspect, whose count is nearest `keep` (the smaller on a tie): g_h from 1 to
    h rows (a wide grid), each with round(g_h * w / h) columns (at least 1, at most w); a square grid reaches the
    squares."""
    rows, cols = grid
    if rows > cols:  # a tall grid: counted along its columns, as a wide one along its rows
        g_w, g_h = pooled_grid((cols, rows), keep)
        return g_h, g_w
    candidates = [(g, min(cols, max(1, round(g * cols / rows)))) for g in range(1, rows + 1)]
    return min(candidates, key=lambda hw: (abs(hw[0] * hw[1] - keep), hw[0] * hw[1]))


def windows(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive average pooling's windows [start, end) of `out` cells over `size` (torch's rule)."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def pooling_matrix(grid: tuple[int, int], pooled: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [g_h * g_w, h * w], each row the mean over one window; centres [g_h * g_w], the patch at the centre
    of each window), both in row-major order."""
    (rows, cols), (g_h, g_w) = grid, pooled
    by_row, by_col = torch.zeros(g_h, rows), torch.zeros(g_w, cols)
    row_windows, col_windows = windows(rows, g_h), windows(cols, g_w)
    for i, (start, end) in enumerate(row_windows):
        by_row[i, start:end] = 1.0 / (end - start)
    for j, (start, end) in enumerate(col_windows):
        by_col[j, start:end] = 1.0 / (end - start)
    weights = torch.einsum("ar,bc->abrc", by_row, by_col).reshape(g_h * g_w, rows * cols)
    centre_rows = torch.tensor([(start + end - 1) // 2 for start, end in row_windows])
    centre_cols = torch.tensor([(start + end - 1) // 2 for start, end in col_windows])
    return weights, (centre_rows[:, None] * cols + centre_cols[None, :]).flatten()


@dataclass(frozen=True)
class Pool(Method):
    name = "pool"
    summary = "each unit's token grid average-pooled to about keep tokens (a smaller image), before the decoder"
    positions = "contiguous"
    grid_positions = True

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        side = round(n_visual**0.5)
        if side * side != n_visual:
            raise ValueError(f"pool needs the grid of a unit of {n_visual} tokens, which is not a square: the family gives none")
        return self.unit_plan(n_visual, keep, num_layers, (side, side))

    def unit_plan(self, n_visual: int, keep: int, num_layers: int, grid: tuple[int, int] | None) -> Plan:
        if grid is None:
            return self.plan(n_visual, keep, num_layers)
        g_h, g_w = pooled_grid(grid, keep)
        return Plan(n_visual=n_visual, vision_keep=g_h * g_w)

    def select_vision(self, view: VisionView, k: int) -> Selection:
        images, n = view.features.shape[:2]
        grid = view.grid
        if grid is None:
            raise ValueError("pool pools each unit's token grid, and this family's vision view gives no grid")
        pooled = pooled_grid(grid, k)
        if pooled[0] * pooled[1] != k or grid[0] * grid[1] != n:
            raise ValueError(f"pool cannot keep {k} of a {grid[0]} x {grid[1]} grid of {n} tokens: reachable is {pooled[0] * pooled[1]}")
        weights, centres = pooling_matrix(grid, pooled)
        weights, centres = weights.to(view.features.device), centres.to(view.features.device)
        states = torch.einsum("kn,ind->ikd", weights, view.features.float()).to(view.features.dtype)
        return Selection(centres.expand(images, k), states, weights, pooled)

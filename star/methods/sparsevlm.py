"""SparseVLM (Zhang et al., 2024): text raters rank the visual tokens at several decoder layers, and part of
what is deleted is recycled into a few merged tokens.

Defaults follow the official code, Gumpest/SparseVLMs @ 26a5f48, its default version "1_0" (SparseVLM v1.5:
`LlamaDynamicvitModel.forward` in `llava/model/language_model/modelling_sparse_llama.py`, `score.py`, `utils.py`):
- Layers: the outputs of layers 2, 6 and 15 of 32 are pruned (`pruning_loc`); here floor(L * {2, 6, 15} / 32),
  at least 2 apart on a shallow decoder. Such a layer runs over all tokens and its attention ranks; the cut comes after it.
- Raters: the prompt tokens after the image whose similarity to the visual tokens stands out. With
  S = softmax over the text tokens of (visual states @ text states^T), a text token's score is its mean over
  the visual tokens, and the raters are the tokens scoring above the mean.
- Ranking: the layer's attention from the raters to each visual token, mean over heads and raters.
- Budgets (`counts="official"`): the code keeps fixed counts per stage, listed for 576 tokens by the setting's
  name, which is a layer average: 64 -> 66, 30, 17 (`score.py`; also 96, 128, 192). Other budgets interpolate
  those lists linearly as fractions of the encoder's tokens, between the four settings and 0 or all tokens: by the
  final count (`budget="final"`, `keep` counts the tokens after the last stage, merged ones included) or by the
  setting's name (`budget="average"`, which gives the code's own lists at 576 tokens and 64 / 96 / 128 / 192).
- Recycling: of the deleted tokens, the int(0.3 n) + 1 best scored are clustered by DPC-kNN (density peaks
  over the Euclidean distances of their states, k = the number of clusters) into int(r / 10) + 1 merged tokens,
  each the mean of its cluster; the kept visual tokens keep their sequence order, and positions are renumbered
  without gaps (positions "contiguous").

Deliberate differences:
- Raters: the code chooses them once, from the decoder's input embeddings; here each stage chooses them from the
  input of the layer that ranks (a stage sees only that layer's input and output).
- Ties: the code breaks density ties with 1e-6 random noise; here the lower index wins, so runs repeat exactly.
- Place of a merged token: the code appends the merged tokens after the kept visual tokens; here each takes the
  place of its best scored member, among the kept ones. A decoder cut keeps each token's column and slices the
  layer's causal mask by those columns, so it cannot move a token behind later ones (that needs the cut to build
  a new causal mask: a change to star/pruner.py).
- Any batch size (the code handles one prompt): every row chooses its raters, ranks and recycles on its own; the
  code's "keep at least one deleted token" (`min(count, n - 1)`) is kept.
- Scores in float32, recomputed for the rater rows (the code builds every layer's eager map in fp16).
This project's earlier variant is `counts="geometric"` with positions="original" (budgets shrinking by one
ratio to `keep`); its cut before each layer (instead of after it) is not kept as an option.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from star import scoring
from star.decoder import gather_seq
from star.methods.base import (
    DecoderView, LLMStage, Method, Plan, Selection, check_choice, geometric_counts, staged_plan,
)

# The code's pruning layers for a 32-layer decoder, and its kept counts (before merged tokens are added) for 576
# visual tokens, by the name of the setting (score.py, version "1_0").
CODE_LAYERS = (2, 6, 15)
CODE_TOKENS = 576
CODE_COUNTS = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}


@dataclass(frozen=True)
class SparseVLM(Method):
    name = "sparsevlm"
    summary = "text raters' attention after layers L*{2,6,15}/32, the code's budgets, deleted tokens recycled by clustering"
    source = "Gumpest/SparseVLMs @ 26a5f48 (version 1_0)"
    positions = "contiguous"

    layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "the decoder layers whose output is pruned, increasing (None: L*{2,6,15}/32)"}
    )
    recycle_ratio: float = field(default=0.3, metadata={"help": "share of the deleted tokens recycled into merged ones, in [0, 1]"})
    cluster_size: int = field(default=10, metadata={"help": "recycled tokens per merged token"})
    budget: str = field(default="final", metadata={"help": "what keep counts: 'final' (after the last stage) or 'average' (the code's setting names, layer averages)"})
    counts: str = field(default="official", metadata={"help": "tokens kept per stage: 'official' (the code's lists) or 'geometric' (one ratio down to keep)"})

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        layers = self.layers or default_layers(num_layers)
        if isinstance(layers, (str, bytes)) or any(b < a + 2 for a, b in zip(layers, layers[1:])):
            raise ValueError(
                f"layers={layers!r} must increase by at least 2: each layer's output is pruned, and the next pruned "
                "layer ranks with its own attention, over what the previous cut left"
            )
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= num_layers - 2:
                raise ValueError(f"layers={layers!r}: {layer!r} is not a layer whose output can be pruned (integers 0 to {num_layers - 2})")
        ratio = self.recycle_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"recycle_ratio={ratio!r} is not a fraction in [0, 1] (0 turns recycling off)")
        size = self.cluster_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"cluster_size={size!r} must be a positive integer (recycled tokens per merged token)")
        check_choice("budget", self.budget, ("final", "average"))
        check_choice("counts", self.counts, ("official", "geometric"))
        if self.counts == "geometric" and self.budget == "average":
            raise ValueError("budget='average' reads keep as the code's setting names, which only counts='official' has")
        if keep == n_visual:
            return Plan(n_visual=n_visual, vision_keep=n_visual)
        if self.counts == "geometric":
            return staged_plan(n_visual, geometric_counts(n_visual, keep, len(layers)), layers, after=True)
        return staged_plan(n_visual, self.official_counts(n_visual, keep, len(layers)), layers, after=True)

    def official_counts(self, n: int, keep: int, stages: int) -> list[int]:
        """Visual tokens after each stage (kept + merged) on the code's lists, interpolated for n and `keep`.

        The lists give the kept counts t_s; a stage then holds t_s + clusters(deleted), and the next ranks those.
        With budget="final" the last stage holds exactly `keep`.
        """
        fractions = code_fractions(keep / n, self.budget, stages)
        counts, present = [], n
        for s, fraction in enumerate(fractions):
            last = s == stages - 1
            if last and self.budget == "final":
                total = keep
            else:
                kept = min(max(1, round(fraction * n)), present - 1)
                total = kept + self.clusters(present - kept)
                if self.budget == "final":
                    total = max(total, keep)
            total = min(total, present)
            counts.append(total)
            present = total
        return counts

    def recycled(self, deleted: int) -> int:
        """How many of `deleted` deleted tokens are recycled: the top `recycle_ratio` (the code's 30%), plus one."""
        if deleted == 0 or self.recycle_ratio == 0:
            return 0
        return min(deleted, int(deleted * self.recycle_ratio) + 1)

    def clusters(self, deleted: int) -> int:
        """How many merged tokens the code makes from `deleted` deleted tokens: one per 10 recycled, plus one."""
        recycled = self.recycled(deleted)
        return recycled // self.cluster_size + 1 if recycled else 0

    def split(self, n: int, k: int) -> int:
        """Of a budget of k over n tokens, how many are kept as they are; the other k - t are merged tokens.

        t + clusters(n - t) grows by 0 or 1 with t, so the largest t within the budget fills it exactly; for the
        code's lists at 576 tokens it is the list's own count (tests/test_fidelity.py checks all twelve).
        """
        return next((t for t in range(k, -1, -1) if t + self.clusters(n - t) <= k), 0)

    def select_llm(self, stage: LLMStage, view: DecoderView, k: int) -> Selection:
        n = view.visual.shape[1]
        n_kept = self.split(n, k)
        rows, own = view.text_rows()
        raters = choose_raters(gather_seq(view.hidden, view.visual), gather_seq(view.hidden, rows), own)
        scores = view.attention_to_visual(rows, raters)
        visual = gather_seq(view.states, view.visual)
        indices, states = [], []
        for row in range(view.visual.shape[0]):
            kept = scoring.top_k_in_order(scores[row], n_kept)
            deleted = scoring.complement_in_order(kept, n)
            slots, merged = recycle(visual[row, deleted], scores[row, deleted], self.recycled(len(deleted)), k - n_kept)
            index = torch.cat([kept, deleted[slots]])
            state = torch.cat([visual[row, kept], merged.to(visual.dtype)])
            order = index.argsort()
            indices.append(index[order])
            states.append(state[order])
        return Selection(torch.stack(indices), torch.stack(states))


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The code's layers 2, 6, 15 of 32 scaled to the decoder's depth (floor(L * l / 32)), each at least 2 after
    the one before (a shallow decoder) and before its last layer."""
    layers: list[int] = []
    for layer in CODE_LAYERS:
        layer = max(num_layers * layer // 32, layers[-1] + 2 if layers else 0)
        if layer <= num_layers - 2:
            layers.append(layer)
    return tuple(layers)


def code_fractions(share: float, budget: str, stages: int) -> list[float]:
    """The code's kept counts as fractions of its 576 tokens, interpolated at `share` = keep / n.

    Its four settings are placed by their final kept count (budget "final") or by their name (budget "average"),
    between 0 (nothing kept) and 1 (everything kept); a decoder with other than three stages uses the first ones.
    """
    anchors = sorted(
        ((counts[-1] if budget == "final" else name) / CODE_TOKENS, [c / CODE_TOKENS for c in counts])
        for name, counts in CODE_COUNTS.items()
    )
    anchors = [(0.0, [0.0] * 3), *anchors, (1.0, [1.0] * 3)]
    for (x0, y0), (x1, y1) in zip(anchors, anchors[1:]):
        if x0 <= share <= x1:
            w = (share - x0) / (x1 - x0)
            fractions = [a + w * (b - a) for a, b in zip(y0, y1)]
            return (fractions + [fractions[-1]] * stages)[:stages]
    raise ValueError(f"keep / n = {share} is outside (0, 1]")


def choose_raters(visual: torch.Tensor, text: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The text tokens most relevant to the image: [B, R] True for a rater.

    visual: [B, V, D] and text: [B, R, D] states; own: [B, R] True for the row's own text tokens (the rest is
    other rows' text length, under left padding). Each visual token's similarity is a softmax over the row's
    text tokens; a text token rates if its mean over the visual tokens is above the row's mean.
    """
    similarity = visual.float() @ text.float().transpose(1, 2)
    relevance = similarity.masked_fill(~own[:, None, :], float("-inf")).softmax(dim=2).mean(dim=1)
    threshold = (relevance * own).sum(dim=1, keepdim=True) / own.sum(dim=1, keepdim=True)
    raters = own & (relevance > threshold)
    return torch.where(raters.any(dim=1, keepdim=True), raters, own)


def recycle(
    states: torch.Tensor, scores: torch.Tensor, recycled: int, clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the `recycled` highest-scored deleted tokens into `clusters` tokens, so their content is not lost.

    states: [N, D], scores: [N] of the deleted tokens. Returns (slots [clusters], merged [clusters, D] float32):
    each merged token is the mean of its cluster and takes the place (index into N) of its highest-scored member.
    """
    members = torch.sort(scores.float(), descending=True, stable=True).indices[:recycled]
    if clusters == 0:
        return members[:0], states[:0].float()
    assignment = density_peak_clusters(states[members], clusters)
    device = states.device
    sums = torch.zeros(clusters, states.shape[1], device=device).index_add_(0, assignment, states[members].float())
    sizes = torch.zeros(clusters, device=device).index_add_(0, assignment, torch.ones(recycled, device=device))
    order = torch.arange(recycled, device=device)
    first = torch.full((clusters,), recycled, device=device).scatter_reduce(0, assignment, order, "amin")
    return members[first], sums / sizes[:, None]


def density_peak_clusters(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """DPC-kNN: cluster [N, D] points into `clusters` groups, [N] cluster ids, each cluster non-empty.

    A point's density comes from its `clusters` nearest neighbours; the centres are the points that are both
    dense and far from any denser point; every other point joins its nearest centre.
    """
    n = x.shape[0]
    distance = torch.cdist(x.float(), x.float()) / x.shape[1] ** 0.5
    nearest = distance.topk(clusters, dim=1, largest=False).values
    density = (-(nearest**2).mean(dim=1)).exp()
    rank = torch.empty(n, dtype=torch.long, device=x.device)
    rank[torch.sort(density, descending=True, stable=True).indices] = torch.arange(n, device=x.device)
    denser = rank[None, :] < rank[:, None]
    parent = torch.where(denser, distance, distance.max()).min(dim=1).values
    centres = torch.sort(parent * density, descending=True, stable=True).indices[:clusters]
    assignment = distance[centres].argmin(dim=0)
    assignment[centres] = torch.arange(clusters, device=x.device)
    return assignment

"""SparseVLM (Zhang et al., 2024): text raters rank the visual tokens at several decoder layers, and part of
what is deleted is recycled into a few merged tokens.

Each stage, following the public code (Gumpest/SparseVLMs, its default version "1_0"):
- Raters: the prompt tokens after the last image token whose similarity to the visual tokens stands out. With
  S = softmax over the text tokens of (visual states @ text states^T), a text token's score is its mean over
  the visual tokens, and the raters are the tokens scoring above the mean. The paper divides the logits by
  sqrt(D) and keeps scores >= the mean; the code does neither, and this file follows the code. A row where no
  token stands out (one text token, or all equal) rates with all of its text tokens.
- Ranking: the stage layer's attention from the raters to each visual token, mean over raters and heads.
- Budget: the paper deletes an adaptive number of tokens, from the rank of the attention matrix; the code keeps
  a fixed number per stage, and so does this file.
- Recycling: of the deleted tokens, the top `recycle_ratio` by score (int(0.3 n) + 1 of n) are clustered by
  DPC-kNN (density peaks over the Euclidean distances of their states, k = the number of clusters) into
  int(r / `cluster_size`) + 1 merged tokens, each the mean of its cluster, and these are kept.

Where this file departs from the code:
- Layers: the code prunes at layers 2, 6, 15 of 32; here at floor(L * {2, 6, 15} / 32), but not before layer
  1 (the code's first ranking layer has seen two layers' work, and none has at layer 0), repeats collapsed.
  The code lets layer l run over all tokens and prunes its output; here layer l's attention over its input
  ranks and the cut comes before layer l, so the merged states are the very states the ranking saw.
- Raters: the code chooses them once, from the decoder's input embeddings; a stage here sees only its own
  layer's input, so the raters are chosen again at each stage, from those states.
- Budgets: the code's per-stage lists (e.g. 300, 200, 110 for its "192" setting, which is an average over
  layers) count the kept tokens before the merged ones are added. Here `keep` is the final count, merged tokens
  included: stage budgets shrink geometrically from n to `keep`, and a stage's budget k over V tokens splits
  into t kept + (k - t) merged, t the largest count with t + clusters(V - t) <= k (when even t = 0 gives too
  many clusters, the k merged tokens are all that is kept).
- Places: the code appends the merged tokens after the kept ones and renumbers positions contiguously; here a
  merged token takes the place of its highest-scored member (positions="contiguous" renumbers, as the code).
- Ties: the code breaks density ties with random noise; here the lower index wins, so runs repeat exactly.
- Batches: the code handles one prompt; here every row chooses its raters, ranks and recycles on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from star import scoring
from star.decoder import gather_seq
from star.methods.base import DecoderView, LLMStage, Method, Plan, Selection, geometric_plan

# The code's pruning layers, for a 32-layer decoder.
CODE_LAYERS = (2, 6, 15)


@dataclass(frozen=True)
class SparseVLM(Method):
    name = "sparsevlm"
    summary = "text raters' attention at L*{2,6,15}/32, geometric budgets, deleted tokens recycled by clustering"

    layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "the decoder layers that prune, increasing (None: L*{2,6,15}/32)"}
    )
    recycle_ratio: float = field(default=0.3, metadata={"help": "share of the deleted tokens recycled into merged ones, in [0, 1]"})
    cluster_size: int = field(default=10, metadata={"help": "recycled tokens per merged token"})

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        layers = self.layers or tuple(sorted({max(1, num_layers * layer // 32) for layer in CODE_LAYERS}))
        ratio = self.recycle_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"recycle_ratio={ratio!r} is not a fraction in [0, 1] (0 turns recycling off)")
        size = self.cluster_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"cluster_size={size!r} must be a positive integer (recycled tokens per merged token)")
        return geometric_plan(n_visual, keep, layers, num_layers)

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

        t + clusters(n - t) grows by 0 or 1 with t, so the largest t within the budget fills it exactly.
        """
        return next((t for t in range(k, -1, -1) if t + self.clusters(n - t) <= k), 0)

    def select_llm(self, stage: LLMStage, view: DecoderView, k: int) -> Selection:
        n = view.visual.shape[1]
        n_kept = self.split(n, k)
        rows, own = view.text_rows()
        visual = gather_seq(view.hidden, view.visual)
        raters = choose_raters(visual, gather_seq(view.hidden, rows), own)
        scores = view.attention_to_visual(rows, raters)
        indices, states = [], []
        for row in range(view.visual.shape[0]):
            kept = scoring.top_k_in_order(scores[row], n_kept)
            dropped = torch.ones(n, dtype=torch.bool, device=kept.device)
            dropped[kept] = False
            deleted = dropped.nonzero()[:, 0]
            slots, merged = recycle(visual[row, deleted], scores[row, deleted], self.recycled(len(deleted)), k - n_kept)
            index = torch.cat([kept, deleted[slots]])
            state = torch.cat([visual[row, kept], merged.to(visual.dtype)])
            order = index.argsort()
            indices.append(index[order])
            states.append(state[order])
        return Selection(torch.stack(indices), torch.stack(states))


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

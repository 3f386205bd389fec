"""What a pruning method is: a budget plan plus a selection rule for each stage.

A method never sees a model. The adapter hands it a `VisionView` (the feature layer of the vision
encoder) and the decoder plumbing hands it a `DecoderView` (one decoder layer's input); the method
returns a `Selection`. So one method file serves every model family.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, ClassVar

import torch

from star import scoring


@dataclass(frozen=True)
class LLMStage:
    """Prune inside the decoder: before layer `layer` runs, keep `keep` visual tokens per image.

    `score_layer` is the layer whose attention ranks the tokens (FastV scores with the layer before the cut).
    """

    layer: int
    keep: int
    score_layer: int


@dataclass(frozen=True)
class Plan:
    """Visual tokens per image at each stage: `n_visual` from the encoder, `vision_keep` enter the decoder."""

    n_visual: int
    vision_keep: int
    llm_stages: tuple[LLMStage, ...] = ()

    @property
    def tokens(self) -> list[int]:
        return [self.n_visual, self.vision_keep, *(s.keep for s in self.llm_stages)]

    @property
    def final_keep(self) -> int:
        return self.llm_stages[-1].keep if self.llm_stages else self.vision_keep

    def layer_average(self, num_layers: int) -> float:
        """Visual tokens per image averaged over the decoder's layers (what each layer's input holds): the budget
        SparseVLM's and PyramidDrop's papers quote ("64 tokens"), where `keep` is the count after the last stage."""
        return layer_average(self.vision_keep, [(s.layer, s.keep) for s in self.llm_stages], num_layers)


@dataclass
class Selection:
    """Which tokens survive a stage: indices in ascending order, and optionally new states for them.

    `states` is set by merging methods (VisionZip, SparseVLM), whose kept tokens carry merged content. `mix`, [k, N]
    (the same for every unit), is set where each kept token is a fixed weighted mean of the candidates (Pool's
    windows): what the family adds onto a token in the decoder (Qwen3-VL's DeepStack features) is mixed alike.
    """

    index: torch.Tensor
    states: torch.Tensor | None = None
    mix: torch.Tensor | None = None
    grid: tuple[int, int] | None = None  # (rows, columns) of the kept tokens, where they form a grid (Pool)


@dataclass
class VisionView:
    """The vision encoder's feature layer for I images.

    features: [I, N, D] the patch features the projector would receive.
    qk: computes the feature layer's queries and keys, [I, H, T, d] each, over all T = n_prefix + N tokens
    (n_prefix is 1 for CLIP's [CLS], 0 for encoders without one). Called only by methods that score.
    project: the projector, features -> decoder input embeddings; None where the features already are
    those embeddings (Qwen2-VL, whose patch merger is its projector).
    instruction: computes the decoder input embeddings of each unit's instruction, the prompt tokens after
    its last image token, as ([I, T, D_decoder], mask [I, T] False where a row has fewer); None where the
    view belongs to no prompt. Called only by methods that condition on the instruction.
    grid: (rows, columns) of the units' tokens, whose features lie in row-major order of that grid; None where the
    adapter gives none. Read only by methods that reshape the grid (Pool).
    """

    features: torch.Tensor
    n_prefix: int
    qk: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    prefix_features: torch.Tensor | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    instruction: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    grid: tuple[int, int] | None = None

    @cached_property
    def attention(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities [I, H, T, T], queries, keys) of the feature layer, computed once per view."""
        q, k = self.qk()
        return scoring.attention_probs(q, k), q, k

    def received(self) -> torch.Tensor:
        """Attention each patch receives, averaged over all query rows ([CLS] included) and heads: [I, N]."""
        probs = self.attention[0]
        return scoring.received_attention(probs)[:, self.n_prefix :]

    def cls_attention(self) -> torch.Tensor:
        """The [CLS] row of the attention, averaged over heads: [I, N]."""
        if self.n_prefix == 0:
            raise ValueError("this vision encoder has no [CLS] token, so a [CLS]-attention method cannot score it")
        return self.attention[0][:, :, 0, self.n_prefix :].mean(dim=1)

    @cached_property
    def embeddings(self) -> torch.Tensor:
        """The features as the decoder receives them, [I, N, D_decoder], projected once per view."""
        return self.features if self.project is None else self.project(self.features)


@dataclass
class DecoderView:
    """One decoder layer's input, for a batch of B left-padded prompts.

    visual: [B, V] sequence indices of the visual tokens still present (V equal in every row).
    n_text: [B] prompt tokens after the last visual token; left padding puts them at the end of each row.
    text_counts: the same counts on the host, so that the text rows' shape needs no read back.
    key_mask: [B, S] False for padding.
    attention: that layer's attention probabilities for query rows [B, R] against all S keys, causal,
    [B, H, R, S] in float32.
    keys: that layer's keys at every position, after the rotary embedding, [B, H_kv, S, d].
    states: the states the cut keeps, those entering the layer that cuts, [B, S, D]: `hidden` unless the
    stage scores with an earlier layer (FastV, SparseVLM: that layer's output).
    normed_states: `states` through the decoder's final norm, as the LM head reads them, [B, S, D].
    """

    hidden: torch.Tensor
    visual: torch.Tensor
    n_text: torch.Tensor
    text_counts: list[int]
    key_mask: torch.Tensor
    attention: Callable[[torch.Tensor], torch.Tensor]
    keys: Callable[[], torch.Tensor]
    states: torch.Tensor
    normed_states: Callable[[], torch.Tensor]

    def text_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The text rows as an index [B, R] over the last R positions, with the mask of each row's own."""
        s, r = self.hidden.shape[1], max(self.text_counts)
        offsets = torch.arange(r, device=self.visual.device)
        rows = (s - r + offsets).expand(self.visual.shape[0], r)
        return rows, offsets[None, :] >= (r - self.n_text)[:, None]

    def last_token_rows(self) -> torch.Tensor:
        """The last prompt token of every row: [B, 1]."""
        return torch.full((self.visual.shape[0], 1), self.hidden.shape[1] - 1, device=self.visual.device)

    def attention_to_visual(self, rows: torch.Tensor, row_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention from the given query rows to each visual token, mean over rows and heads: [B, V]."""
        probs = self.attention(rows)
        return scoring.received_attention(probs, row_mask).gather(1, self.visual)


@dataclass(frozen=True)
class Method:
    """Base of every method. Subclasses are frozen dataclasses whose fields are the method's options."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # The official code whose defaults the method follows (repository @ commit), and the position policy it uses:
    # "contiguous" where the authors renumber the kept tokens without gaps, "original" where they keep them.
    source: ClassVar[str] = "this project"
    positions: ClassVar[str] = "original"
    # Whether the vision stage reads the prompt's instruction (VisionView.instruction): a serving engine whose
    # encoder step never sees the prompt cannot run such a method as it is (star.integrations.vllm refuses it).
    reads_instruction: ClassVar[bool] = False
    # Whether each unit's kept tokens form a grid of their own (Pool): an M-RoPE family can then number them as an
    # image that size (positions="contiguous" there, the model's own 3-D positions of the smaller grid).
    grid_positions: ClassVar[bool] = False

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        raise NotImplementedError

    def unit_plan(self, n_visual: int, keep: int, num_layers: int, grid: tuple[int, int] | None) -> Plan:
        """The plan of one unit whose tokens form `grid` (None where the adapter gives none): the plan of its
        count, for every method but those whose reachable counts depend on the grid's shape (Pool)."""
        return self.plan(n_visual, keep, num_layers)

    def select_vision(self, view: VisionView, k: int) -> Selection:
        raise NotImplementedError(f"{self.name} has no vision stage")

    def select_llm(self, stage: LLMStage, view: DecoderView, k: int) -> Selection:
        raise NotImplementedError(f"{self.name} has no decoder stage")


def check_layers(layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Decoder layers of a multi-stage method (PDrop): distinct, increasing, each one a layer to cut at."""
    if isinstance(layers, (str, bytes)) or list(layers) != sorted(set(layers)):
        raise ValueError(f"layers={layers!r} must be distinct and increasing")
    for layer in layers:
        check_layer("layers", layer, num_layers)
    return tuple(layers)


def staged_plan(n_visual: int, counts: list[int], layers: tuple[int, ...], after: bool = False) -> Plan:
    """Decoder stages keeping counts[s] tokens at layers[s]: before that layer, ranked by its own attention, or,
    with `after`, on its output (the cut comes before layer + 1, ranked by the layer's attention)."""
    shift = 1 if after else 0
    stages = tuple(LLMStage(layer=layer + shift, keep=count, score_layer=layer) for layer, count in zip(layers, counts))
    return Plan(n_visual=n_visual, vision_keep=n_visual, llm_stages=stages)


def geometric_counts(n_visual: int, keep: int, stages: int) -> list[int]:
    """Budgets that shrink by one ratio per stage from n_visual to `keep`: n * r^s with r = (keep / n)^(1/stages)."""
    ratio = (keep / n_visual) ** (1.0 / stages)
    return [max(keep, round(n_visual * ratio ** (s + 1))) for s in range(stages - 1)] + [keep]


def layer_average(vision_keep: int, stages: list[tuple[int, int]], num_layers: int) -> float:
    """Visual tokens averaged over `num_layers` decoder layers: `vision_keep` enter, and from each (layer, keep)
    of `stages` on, layers see `keep`."""
    counts = [vision_keep] * num_layers
    for layer, keep in stages:
        counts[layer:] = [keep] * (num_layers - layer)
    return sum(counts) / num_layers


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is unknown: allowed are {', '.join(map(repr, allowed))}")
    return value


def check_layer(name: str, layer: int, num_layers: int) -> int:
    """Validate the layer a decoder stage cuts at, so a bad option fails before any compute.

    Layer 0 is excluded: a cut there would prune the decoder's input, which is a vision stage's job, and the
    cache that transformers sizes its decode masks from (layer 0's) must keep the decoder's entry frame.
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
        raise ValueError(f"{name}={layer!r} is not a decoder layer to cut at: allowed are integers 1 to {num_layers - 1}")
    return layer


def check_ratio(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} is not a ratio in [0, 1)")
    return float(value)


"""What every adapter hands the pruner: the vision side of one prefill, laid out on the prompt.

The pruner is family-agnostic. An adapter says how a family's image tokens lie in the prompt, which tokens
stage 1 selects among (a "unit": an image, or a LLaVA-NeXT crop), and how the kept ones become decoder
embeddings; the pruner applies the method's plan to each unit and builds the shorter entry frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from star import scoring
from star.decoder import on_device
from star.methods.base import Method, VisionView

# Logits of a vision score computed at once (scoring.key_attention): on a CPU a block that stays in cache (4 MiB),
# elsewhere few large kernels (512 MiB); a large image's whole attention matrix never exists
SCORE_BLOCK = {"cpu": 2**20}
SCORE_BLOCK_ELSEWHERE = 2**27
TEXT = -1  # a prompt token that is no image token
FIXED = -2  # an image token that is always kept and never counted as visual (LLaVA-NeXT's image newline)


@dataclass
class MergedView(VisionView):
    """Units of a tower without [CLS] whose decoder tokens each merge several patches (Qwen's 2 x 2 merger,
    Gemma 3's 4 x 4 average pool): features are the merged tokens, qk the patches' queries and keys in the
    layer's own order, and `token_of[p]` the token that the layer's patch p goes into.

    A token's score is the attention its patches receive (mean over query rows and heads), summed over them.
    """

    token_of: torch.Tensor | None = None

    def received(self) -> torch.Tensor:
        """Attention each token's patches receive, mean over query rows and heads, summed per token: [I, N]."""
        q, k = self.qk()
        received = scoring.key_attention(q, k, SCORE_BLOCK.get(q.device.type, SCORE_BLOCK_ELSEWHERE))
        return received.new_zeros(q.shape[0], self.features.shape[1]).index_add_(1, self.token_of, received)


@dataclass
class VisionGroup:
    """Units of one size, scored together in one view.

    view: the units' feature layer, features [I, N, D] (I units of N candidate tokens each).
    rows: the prompt each unit belongs to, on the host (one per unit).
    ordinals: [I, N] each candidate's place among the image tokens of its prompt (in prompt order).
    residuals: [I, N, E, D] what the decoder adds onto each candidate's hidden state after each of its first E
    layers (Qwen3-VL's DeepStack features), or None where the family adds nothing.
    """

    view: VisionView
    rows: list[int]
    ordinals: torch.Tensor
    residuals: torch.Tensor | None = None


@dataclass
class Encoded:
    """The vision encoder's output for one batch of prompts.

    groups: the selection units, grouped by size.
    slots: [B, S] for each prompt token: TEXT, FIXED, or its place among the prompt's image tokens (ordinal).
    fixed: the decoder embedding of FIXED tokens, or None where the family has none.
    """

    groups: list[VisionGroup]
    slots: torch.Tensor
    fixed: torch.Tensor | None


class Decoder:
    """The decoder accessors every family shares: its layers, token embeddings and rotary embedding.

    has_cls: the tower has a [CLS] token whose attention ranks patches (FasterVLM). projects_cls: its feature
    can enter the decoder as a token (VisionZip keeps it).
    """

    decoder: nn.Module
    has_cls = False
    projects_cls = False
    # What the decoder adds onto visual tokens after its first layers (Qwen3-VL's DeepStack): how many layers.
    residual_layers = 0
    # Per-token inputs besides input_ids that the model reads at prefill (Gemma 3's token_type_ids).
    token_inputs: tuple[str, ...] = ()
    # Inputs that carry visual tokens the pruner does not prune, refused at any prefill: name -> what they carry.
    unpruned_inputs: dict[str, str] = {}
    # A sliding window some decoder layers attend within, or None (see `Gemma3Adapter`).
    window: int | None = None
    # A smaller image gives fewer visual tokens (the encoder sees each image at its own resolution): star.resize
    # runs. Elsewhere the tower or the processor brings every image to a fixed size or token budget.
    resizable = False
    # Every image token is a visual token of a whole unit of n_visual: a prompt's units and text tokens follow from
    # its counts in the `Layout`, so a FLOPs budget per prompt (star.schedule.PromptBudget) is picked before the
    # tower runs; elsewhere (crops shown in part, newline tokens) from the sizes of its encoded units.
    whole_units = False
    # The layers whose softmax attention a decoder stage may score with (None: every layer); a hybrid decoder's
    # others (Qwen3.5's linear attention) have no attention matrix.
    attention_layers: tuple[int, ...] | None = None
    # Layer types that take the 2-D padding mask of their own tokens, not an attention mask over a cache
    # (Qwen3.5's linear attention, which zeroes padded tokens before its convolution and recurrence).
    padding_mask_types: tuple[str, ...] = ()
    # The layer whose cache length the cache reports (`get_seq_length`): a hybrid cache counts its first
    # attention layer's keys, which may sit after a cut.
    counted_layer = 0

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def layer_type(self, index: int) -> str | None:
        """The type of decoder layer `index` where layers differ in mask and rotary table (Gemma 3), else None."""
        return None

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.rotary_emb(hidden, position_ids)

    def rotary_alone(
        self, hidden: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, layer_type: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding (of a layer of `layer_type`) of a frame's positions ([B, S], or M-RoPE's
        [3, B, S] that generate() may give as [4, B, S], text positions first) counted from each prompt's first
        token (key_mask [B, S] False at padding): the positions each prompt has alone, whatever padding
        shifted them by."""
        if self.mrope:
            positions = positions[-3:]
        first = key_mask.long().argmax(dim=1)[:, None].expand(*positions.shape[:-1], 1)
        return self.rotary(hidden, positions - positions.gather(-1, first), layer_type)

    def image_sizes(self, inputs: dict) -> torch.Tensor | None:
        """Each image's tokens and the (rows, columns) of their grid, [I, 3] on the device (0, 0 where an image's
        tokens form no grid), where images differ in size, else None: read back with the `Layout`, so a `keep` above
        an image's tokens is refused before the tower runs, and a method that needs the grid (Pool) plans by it."""
        return None

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final norm, the one the LM head reads through."""
        return self.decoder.norm(hidden)

    def check_stages(self, stages: tuple, method: str) -> None:
        """Refuse, when applied, decoder stages at layers this family cannot cut at (none here)."""

    def entry_inputs(self, kwargs: dict, input_ids: torch.Tensor, keep: torch.Tensor, real: torch.Tensor) -> dict:
        """Per-token inputs the model reads besides the ids, at the entry frame's tokens `keep` [B, S1] (0 at the
        padding slots the pruner adds, where `real` is False)."""
        return {name: kwargs[name].gather(1, keep) * real for name in self.token_inputs if kwargs.get(name) is not None}

    def frame_args(self, args: tuple, keep: torch.Tensor) -> tuple:
        """A decoder layer's positional inputs after its hidden states, moved to a frame's tokens `keep` [B, S_f]
        (indices into the entry frame): none of them is per token here."""
        return args[1:]

    def instruction(self, input_ids: torch.Tensor, rows: list[int], layout: Layout) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """For the units of prompts `rows`, computes the decoder input embeddings of their prompts' tokens
        after the last image token, [I, T, D], right-aligned as left padding leaves them, and their mask [I, T]."""

        def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
            own = [layout.n_text[row] for row in rows]
            width = max(own)
            device = input_ids.device
            ids = input_ids[on_device(rows, device), input_ids.shape[1] - width :]
            return self.embed(ids), torch.arange(width, device=device) >= width - on_device(own, device)[:, None]

        return embeddings


def vision_refusal(adapter: type[Decoder], method: Method) -> str | None:
    """Why `method`'s vision stage cannot run on the family of `adapter`, or None where it can (or has none).

    The vision stage runs once on a four-patch stand-in view (a 2 x 2 grid) shaped like the family's ([CLS] or
    not, a [CLS] feature for the decoder or not), so what it raises is what it would raise at the first prompt.
    """
    prefix = 1 if adapter.has_cls else 0
    stand_in = torch.zeros(1, 1, prefix + 4, 1)
    probe = VisionView(
        features=torch.zeros(1, 4, 1),
        n_prefix=prefix,
        qk=lambda: (stand_in, stand_in),
        prefix_features=torch.zeros(1, 1) if adapter.projects_cls else None,
        grid=(2, 2),
    )
    try:
        method.select_vision(probe, 1)
    except NotImplementedError:
        return None
    except ValueError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class Layout:
    """Where a batch's image tokens lie, on the host: the one read back from the device of a pruned prefill.

    Every size after it (how many images each prompt holds, the entry frame's width, each stage's) follows from
    these counts and the budget, so nothing later in the prefill waits for the device.
    image_tokens: [B] image tokens (placeholders) in each prompt. n_text: [B] prompt tokens after each prompt's
    last image token (a prompt without images: all its tokens but the first); `n_text_device` is the same on
    the device. real_tokens: [B] each prompt's tokens but its padding.
    """

    image_tokens: list[int]
    n_text: list[int]
    n_text_device: torch.Tensor
    real_tokens: list[int]
    image_sizes: list[int] | None = None  # tokens of each image, where images differ in size (`Decoder.image_sizes`)
    image_grids: list[tuple[int, int] | None] | None = None  # and the (rows, columns) of each one's tokens, or None


def read_layout(input_ids: torch.Tensor, mask: torch.Tensor, image_token_id: int, image_sizes: torch.Tensor | None = None) -> Layout:
    """The batch's `Layout`, and a refusal of right padding, in one read back from the device (with the tokens of
    each image and their grid, `image_sizes` [I, 3], where the family's images differ in size)."""
    is_image = input_ids == image_token_id
    length = input_ids.shape[1]
    last = torch.where(is_image, torch.arange(length, device=input_ids.device), -1).amax(dim=1)
    n_text = torch.where(last >= 0, length - 1 - last, mask.sum(dim=1) - 1)
    right_padded = (mask[:, 1:] < mask[:, :-1]).any(dim=1)
    counts = torch.stack([is_image.sum(dim=1), n_text, right_padded.long(), mask.sum(dim=1).long()])
    if image_sizes is not None:
        counts = torch.cat([counts.flatten(), image_sizes.to(counts.device, torch.long).flatten()])
    values = counts.tolist()
    sizes = grids = None
    if image_sizes is not None:
        batch = input_ids.shape[0]
        values, shapes = [values[i * batch : (i + 1) * batch] for i in range(4)], values[4 * batch :]
        sizes = shapes[0::3]
        grids = [(rows, cols) if rows else None for rows, cols in zip(shapes[1::3], shapes[2::3])]
    image_tokens, texts, right, real = values
    if any(right):
        raise ValueError("attention_mask pads on the right: prompts must be left-padded (padding_side='left')")
    return Layout(image_tokens, texts, n_text, real, sizes, grids)


def split_rows(image_tokens: list[int], per_image: list[int], what: str) -> list[int]:
    """Assign images to prompts in order: prompt r takes images until their tokens match its image tokens.

    image_tokens: image tokens in each prompt (`Layout.image_tokens`); per_image: tokens each image fills.
    Returns the number of images of each prompt, or a ValueError that says what does not match.
    """
    counts, image = [], 0
    for row, need in enumerate(image_tokens):
        have, start = 0, image
        while have < need and image < len(per_image):
            have += per_image[image]
            image += 1
        if have != need:
            raise ValueError(
                f"input_ids holds {image_tokens} image tokens per prompt but the {len(per_image)} image(s) "
                f"({what}) fill {per_image} tokens each: prompt {row} does not match its images"
            )
        counts.append(image - start)
    if image != len(per_image):
        raise ValueError(
            f"input_ids holds {image_tokens} image tokens per prompt, fewer than the {len(per_image)} "
            f"image(s) of {per_image} tokens each ({what}) need"
        )
    return counts


def rows_of(per_row: list[int]) -> list[int]:
    """The prompt of each image, in order, from the images of each prompt."""
    return [row for row, count in enumerate(per_row) for _ in range(count)]


def ordinals(is_image: torch.Tensor) -> torch.Tensor:
    """Each token's place among its prompt's image tokens ([B, S]; TEXT where it is not one)."""
    place = is_image.long().cumsum(dim=1) - 1
    return place.masked_fill(~is_image, TEXT)


def around_image(before: torch.Tensor, after: torch.Tensor, block: list[int]) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of prompts [B, b] + one image block + [B, a], unpadded (all rows alike long)."""
    image = torch.tensor(block, dtype=before.dtype).expand(before.shape[0], -1)
    ids = torch.cat([before, image, after], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

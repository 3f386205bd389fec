"""Gemma 4 (`Gemma4ForConditionalGeneration`): a tower without [CLS] that sees each image at its own size, a
position-wise average pool, and a Gemma decoder with per-layer embeddings and key/value sharing.

The processor cuts each image, at its own aspect ratio, into at most `max_soft_tokens` x k^2 patches of 16 px
(k = `pooling_kernel_size`, 3), padded to one length per batch and placed by `image_position_ids` ((x, y), -1 at
padding); the tower attends over the real patches with a 2-D rotary embedding, averages each k x k block into
one soft token, and `embed_vision` projects those into the decoder. So each image is one block of its own
number of tokens between start- and end-of-image tokens, and `keep` counts tokens per image, as for Qwen2-VL.

Stage 1 (the unit is an image): a token's score is the attention its k^2 patches receive in the tower's last
layer, mean over the image's real patches as queries and over heads, summed over the k^2; only the kept tokens
are projected. The decoder is Gemma 3's in what a cut needs (see `GemmaDecoder`): sliding and global layers with
their own masks and rotary tables, image tokens attending to each other both ways in sliding layers (from
`mm_token_type_ids`, where the checkpoint's `use_bidirectional_attention` is "vision"), decoder stages only while
the sequence fits the sliding window. What is Gemma 4's own:
- per-layer embeddings (PLE): each layer adds a per-token input made from the token's id (image tokens count as
  padding) and its input embedding. The entry frame gets those of its tokens; a cut gathers each later layer's.
- key/value sharing: the last `num_kv_shared_layers` layers reuse the keys and values of the last earlier layer
  of their type and, at prefill, run only the token(s) whose logits are asked for. A decoder stage must score and
  cut at or before the first of those storing layers, so that they store the kept tokens the sharing layers see
  (a cut among the sharing layers would save nothing there anyway); a later one is refused when applied.
Video frames (`pixel_values_videos`) are refused while a pruner is applied: they are visual tokens this adapter
does not prune. Audio passes unpruned in a prompt without images and is refused with images (the pruned prompt
reaches the decoder as embeddings, into which the model cannot place audio).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from star import compat
from star.adapters.base import Encoded, Layout, MergedView, VisionGroup, around_image, ordinals, split_rows
from star.adapters.gemma3 import GemmaDecoder
from star.decoder import gather_seq, on_device
from star.methods import LLMStage


class Gemma4Adapter(GemmaDecoder):
    model_classes = compat.model_classes("Gemma4ForConditionalGeneration")
    budget_note = (
        "tokens per image (each image its own size; an int above an image's tokens is refused); decoder stages within "
        "the sliding window and before the layers that share keys and values"
    )
    vision_inputs = ("pixel_values", "image_position_ids")
    token_inputs = ("mm_token_type_ids",)
    unpruned_inputs = {"pixel_values_videos": "video frames, which are visual tokens this adapter does not prune"}
    n_visual = None  # images differ in size: plans are made per image
    budget_unit = None  # an int `keep` counts tokens per image
    sizes_note = "real patches / pooling_kernel_size**2 tokens each"  # how an image's tokens are counted, for split_rows' errors
    synthetic_patches = 48  # per side of the timing image: 768 px at 16 px patches, 256 tokens (the default budget is 280)

    def __init__(self, model):
        config = model.config
        text = config.get_text_config()
        if config.vision_config is None:
            raise ValueError(f"{type(model).__name__} has no vision tower (vision_config is None): there is nothing to prune")
        if text.use_bidirectional_attention == "all":
            raise ValueError(
                "use_bidirectional_attention='all' is not supported: its text attends both ways, so decoder scores "
                "recomputed as causal attention would not be the model's"
            )
        self.model = model
        self.vision_tower: nn.Module = model.model.vision_tower
        self.embedder: nn.Module = model.model.embed_vision
        self.decoder: nn.Module = model.model.language_model
        self.image_token_id: int = config.image_token_id
        self.embed_fill = text.pad_token_id
        self.multimodal_ids = [i for i in (config.image_token_id, config.video_token_id, config.audio_token_id) if i is not None]
        self.kernel: int = config.vision_config.pooling_kernel_size
        self.merge_unit = self.kernel**2  # patches pooled into one token
        self.use_decoder(text)
        self.score_layer = self.vision_tower.encoder.layers[-1]
        self._rope = compat.gemma4_vision_rope(self.score_layer.self_attn)
        modes = text.kv_sharing_modes
        self.shared = [i for i, mode in enumerate(modes) if mode == "reuse"]
        # With sharing, the layers that store keys and values for the sharing ones must see the last frame.
        self.last_cut = min(i for i, mode in enumerate(modes) if mode == "store") if self.shared else len(modes) - 1

    def check_stages(self, stages: tuple[LLMStage, ...], method: str) -> None:
        """Refuse a decoder stage after the first layer that stores keys and values for the sharing layers."""
        late = [s.layer for s in stages if s.layer > self.last_cut]
        if late:
            raise ValueError(
                f"method {method!r} cuts at decoder layer {late[0]}, but this Gemma 4's layers {self.shared[0]}-"
                f"{self.shared[-1]} reuse the keys and values that layers from {self.last_cut} on store (and at "
                f"prefill run only the last token): a decoder stage must cut at layer {self.last_cut} or earlier "
                "(the method's layer or layers option)"
            )

    def entry_inputs(self, kwargs: dict, input_ids: torch.Tensor, keep: torch.Tensor, real: torch.Tensor) -> dict:
        """The token types at the entry frame's tokens and, where the decoder has per-layer embeddings, their
        token-identity part: the model makes it from the ids, which the entry frame (given as embeddings) lacks."""
        inputs = super().entry_inputs(kwargs, input_ids, keep, real)
        if self.decoder.hidden_size_per_layer_input:
            ids = input_ids.gather(1, keep)
            multimodal = torch.isin(ids, on_device(self.multimodal_ids, ids.device))
            inputs["per_layer_inputs"] = self.decoder.get_per_layer_inputs(ids.masked_fill(multimodal, self.embed_fill), None)
        return inputs

    def frame_args(self, args: tuple, keep: torch.Tensor) -> tuple:
        """A decoder layer's positional inputs after its hidden states, moved to a frame's tokens `keep`: its
        per-layer input (made for the entry frame), where the decoder has them."""
        if len(args) > 1 and isinstance(args[1], torch.Tensor):
            return (gather_seq(args[1], keep), *args[2:])
        return args[1:]

    def encode_prompts(self, inputs: dict, input_ids: torch.Tensor, layout: Layout) -> Encoded:
        """The images of a batch of prompts, each one unit of its own size."""
        if inputs.get("input_features") is not None:
            raise ValueError(
                "input_features (audio) came with images: the pruned prompt reaches the decoder as embeddings, into "
                "which Gemma 4 cannot place its audio tokens; pass the images and the audio in separate requests"
            )
        positions = inputs["image_position_ids"]  # checked by `image_sizes`, which the layout read first
        # Images of different sizes: their token counts and grids came with the layout (`image_sizes`)
        sizes, grids = layout.image_sizes, layout.image_grids
        per_row = split_rows(layout.image_tokens, sizes, self.sizes_note)

        layer: dict[str, object] = {}

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            layer.update(hidden=args[0], rotary=kwargs["position_embeddings"])

        handle = self.score_layer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            dtype = next(self.vision_tower.parameters()).dtype
            tokens = self.vision_tower(pixel_values=inputs["pixel_values"].to(dtype), pixel_position_ids=positions).last_hidden_state
        finally:
            handle.remove()

        device = input_ids.device
        groups, start, image = [], 0, 0
        for row, count in enumerate(per_row):
            place = 0
            for _ in range(count):
                n = sizes[image]
                grid = positions[image, : n * self.merge_unit]
                view = MergedView(
                    features=tokens[None, start : start + n],
                    n_prefix=0,
                    qk=partial(self._patch_qk, layer, image, grid),
                    token_of=self.pooled(grid),
                    project=self.project,
                    instruction=self.instruction(input_ids, [row], layout),
                    grid=grids[image],
                )
                groups.append(VisionGroup(view, [row], torch.arange(place, place + n, device=device)[None]))
                start, place, image = start + n, place + n, image + 1
        return Encoded(groups, ordinals(input_ids == self.image_token_id), None)

    def image_sizes(self, inputs: dict) -> torch.Tensor:
        """Each image's tokens, rows and columns, [I, 3]: its real patches (position ids not -1) pooled k x k, in
        row-major order of a grid of width / k columns."""
        positions = inputs.get("image_position_ids")
        if positions is None:
            raise ValueError("image_position_ids is None: Gemma 4's tower places each patch by them (its processor returns them with pixel_values)")
        tokens = (positions != -1).all(dim=-1).sum(dim=1) // self.merge_unit
        columns = (positions[..., 0].amax(dim=1) + 1) // self.kernel
        return torch.stack([tokens, tokens // columns, columns], dim=-1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """`embed_vision`: normalise the pooled tokens, project them into the decoder's space."""
        return self.embedder(features)

    def pooled(self, grid: torch.Tensor) -> torch.Tensor:
        """The soft token each real patch goes into, [P], for one image's patch positions grid [P, 2] ((x, y)): the
        tower's pool averages each k x k block of the grid (whose sides the processor makes multiples of k), and its
        tokens come in the blocks' row-major order. Computed on the device, without reading the grid's width back."""
        block = torch.div(grid, self.kernel, rounding_mode="floor")
        width = torch.div(grid[:, 0].max() + 1, self.kernel, rounding_mode="floor")
        return block[:, 0] + width * block[:, 1]

    def _patch_qk(self, layer: dict, image: int, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys of the tower's last layer for one image's real patches, [1, H, P, d] each, the queries
        rescaled so that softmax(q k^T / sqrt(d)) is the layer's softmax(q k^T * scaling)."""
        block, attn = self.score_layer, self.score_layer.self_attn
        real = grid.shape[0]
        normed = block.input_layernorm(layer["hidden"][image : image + 1, :real])
        cos, sin = (x[image : image + 1, :real] for x in layer["rotary"])
        grid = grid[None]

        def heads(proj: nn.Module, norm: nn.Module) -> torch.Tensor:
            x = norm(proj(normed).view(1, real, -1, attn.head_dim))
            return self._rope(x, cos, sin, grid).transpose(1, 2)

        q, k = heads(attn.q_proj, attn.q_norm), heads(attn.k_proj, attn.k_norm)
        return q * (attn.scaling * attn.head_dim**0.5), k

    def synthetic_inputs(self, before: torch.Tensor, after: torch.Tensor, generator: torch.Generator) -> dict:
        """Prompts of text around one random square image of `synthetic_patches` patches a side, padded as the
        processor pads it (to the default budget's 280 x k^2 patches), between start- and end-of-image tokens."""
        config, vision = self.model.config, self.model.config.vision_config
        batch, side = before.shape[0], self.synthetic_patches
        real, length = side * side, max(side * side, 280 * self.merge_unit)
        pixels = torch.zeros(batch, length, 3 * vision.patch_size**2)
        pixels[:, :real] = torch.rand(batch, real, 3 * vision.patch_size**2, generator=generator)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        grid = torch.full((length, 2), -1, dtype=torch.long)
        grid[:real] = torch.stack([xs.flatten(), ys.flatten()], dim=1)
        block = [config.boi_token_id] + [self.image_token_id] * (real // self.merge_unit) + [config.eoi_token_id]
        prompt = around_image(before, after, block)
        types = (prompt["input_ids"] == self.image_token_id).long()
        return {**prompt, "pixel_values": pixels, "image_position_ids": grid.expand(batch, -1, -1), "mm_token_type_ids": types}

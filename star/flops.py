"""Prefill FLOPs of a decoder: the paper's formula (section 4.3), and a count of a real run.

Convention: FLOPs = 2 x multiply-accumulates, as PyTorch's FlopCounterMode counts them (the paper states the
one-FLOP-per-MAC rule; ratios, which is what it compares, are the same either way). Per layer with n tokens:
- projections: q and o over the query width, k and v over the key/value width (grouped-query attention);
- attention: the two matrix products Q K^T and A V, n^2 each per head dimension;
- FFN: two matrices, or three for Llama's gated FFN.
A hybrid decoder's linear-attention layers (Qwen3.5's gated delta net) have no n^2 term; such a layer counts
- projections: q, k (key width each), v and the output gate z (value width each), the per-head decay and write
  strength (one column per value head each), and the output projection (value width);
- the short causal convolution: kernel MACs per token and q/k/v channel;
- the recurrence, by the gated delta rule's own formula: per token and value head, three products with the
  key_dim x value_dim state (read it with the key, write the key's outer product, read it with the query);
- the FFN as above.
Qwen3.5's full-attention layers gate their output from a second q-width half of q_proj: their q projection
counts twice.

Vision towers, which every setting runs whole (the pruning comes after them), by the same rule: LLaVA's CLIP
(`clip_tower_flops`) and Qwen2.5-VL's windowed ViT (`qwen2_5_vision_flops`). Norms, biases, activations and
rotary or position embeddings are counted nowhere. What a method computes to choose the kept tokens (a score
over the tower's attention, a similarity) is its own cost beside them: `vision_selection_flops` counts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib.resources import files
from typing import Callable, Sequence

from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class LinearAttention:
    """The linear-attention layers of a hybrid decoder (Qwen3.5's gated delta net), and which layers they are."""

    layer_types: tuple[str, ...]
    key_heads: int
    value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int

    @classmethod
    def from_config(cls, config) -> LinearAttention | None:
        types = tuple(getattr(config, "layer_types", None) or ())
        if "linear_attention" not in types:
            return None
        return cls(
            types, config.linear_num_key_heads, config.linear_num_value_heads, config.linear_key_head_dim,
            config.linear_value_head_dim, config.linear_conv_kernel_dim,
        )


@dataclass(frozen=True)
class DecoderShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    gated_ffn: bool = True
    linear: LinearAttention | None = None  # a hybrid decoder's linear-attention layers (its full ones gate their output)
    # Where layers' attention differs (Gemma 4's global layers: other key/value heads and head size), each layer's
    # (num_kv_heads, head_dim); empty where every layer has the fields above.
    layer_heads: tuple[tuple[int, int], ...] = ()

    @property
    def attention_layers(self) -> tuple[int, ...] | None:
        """The layers with softmax attention where others have none (a hybrid decoder), else None."""
        if self.linear is None:
            return None
        return tuple(i for i, kind in enumerate(self.linear.layer_types) if kind != "linear_attention")

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        """The shape of a transformers Llama/Mistral/Qwen2-style decoder config.

        A mixture-of-experts decoder (Qwen3-VL-MoE) counts, per token, the FFNs of the experts it is routed to
        (num_experts_per_tok of moe_intermediate_size each); the router's small product is not counted. A config
        whose attention varies by layer (`per_layer_config`, Gemma 4) gives each layer its own heads.
        """
        heads = config.num_attention_heads
        per_layer = getattr(config, "per_layer_config", None)
        layers = [per_layer[i] for i in range(config.num_hidden_layers)] if per_layer else [config]
        layer_heads = tuple(
            (getattr(layer, "num_key_value_heads", None) or heads, getattr(layer, "head_dim", None) or config.hidden_size // heads)
            for layer in layers
        )
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=_ffn_width(config),
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=layer_heads[0][0],
            head_dim=layer_heads[0][1],
            gated_ffn=getattr(config, "hidden_act", "silu") in ("silu", "swiglu"),
            linear=LinearAttention.from_config(config),
            layer_heads=layer_heads if len(set(layer_heads)) > 1 else (),
        )

    def layer(self, index: int) -> DecoderShape:
        """The shape of layer `index`'s attention (itself where every layer is alike)."""
        if not self.layer_heads:
            return self
        kv_heads, head_dim = self.layer_heads[index]
        return replace(self, num_kv_heads=kv_heads, head_dim=head_dim, layer_heads=())

    @classmethod
    def named(cls, name: str) -> DecoderShape:
        """A decoder shape shipped with the package (no hub needed): see `named_models()`."""
        data = _named(name)
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        linear = fields.pop("linear", None)
        heads = tuple(map(tuple, fields.pop("layer_heads", ())))
        linear = None if linear is None else LinearAttention(**{**linear, "layer_types": tuple(linear["layer_types"])})
        return cls(**fields, linear=linear, layer_heads=heads)


def _ffn_width(config) -> int:
    """The FFN width a token passes through: the dense one, or that of its routed experts together."""
    experts = getattr(config, "num_experts_per_tok", None)
    if not experts or not getattr(config, "num_experts", None):
        return config.intermediate_size
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise ValueError(
            f"mlp_only_layers={config.mlp_only_layers}, decoder_sparse_step={config.decoder_sparse_step}: FLOPs of a "
            "decoder that mixes dense and expert layers are not modelled (every Qwen3-VL-MoE checkpoint is all experts)"
        )
    return experts * config.moe_intermediate_size


def named_models() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in files("star").joinpath("configs").iterdir() if p.name.endswith(".json"))


def visual_tokens(name: str) -> int:
    """Visual tokens per image (per crop for LLaVA-NeXT) of a shipped model."""
    return int(_named(name)["visual_tokens"])


def crops_per_image(name: str) -> int:
    """Crops each image is encoded as, at most (LLaVA-NeXT: the base image and 4 tiles; 1 elsewhere)."""
    return int(_named(name).get("max_crops", 1))


def fixed_image_tokens(name: str) -> int:
    """Image tokens that are never pruned nor counted as visual (LLaVA-NeXT's newlines), per full image."""
    return int(_named(name).get("newline_tokens", 0))


def refused_methods(name: str) -> dict[str, str]:
    """The methods the family of a shipped model refuses, with the reason (e.g. a [CLS] method on SigLIP)."""
    return dict(_named(name).get("refused_methods", {}))


def _named(name: str) -> dict:
    if name not in named_models():
        raise ValueError(f"model={name!r} has no shipped shape: known are {', '.join(named_models())}")
    return json.loads(files("star").joinpath("configs", f"{name}.json").read_text())


def layer_flops(shape: DecoderShape, n_tokens: int, layer: int = 0) -> float:
    """FLOPs of decoder layer `layer`'s prefill over n_tokens (the paper's formula, GQA and gated FFN aware, with
    that layer's own heads; a hybrid decoder's linear-attention layer by its own, see the module's docstring)."""
    shape = shape.layer(layer)
    n, d = n_tokens, shape.hidden_size
    ffn = (3 if shape.gated_ffn else 2) * n * d * shape.intermediate_size
    linear = shape.linear
    if linear is not None and linear.layer_types[layer] == "linear_attention":
        key, value = linear.key_heads * linear.key_head_dim, linear.value_heads * linear.value_head_dim
        projections = n * d * (2 * key + 2 * value + 2 * linear.value_heads) + n * value * d
        convolution = n * (2 * key + value) * linear.conv_kernel
        recurrence = 3 * n * linear.value_heads * linear.key_head_dim * linear.value_head_dim
        return 2.0 * (projections + convolution + recurrence + ffn)
    q_width, kv_width = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    gate = q_width if linear is not None else 0  # Qwen3.5's output gate, the second half of q_proj
    projections = 2 * n * d * q_width + n * d * gate + 2 * n * d * kv_width
    attention = 2 * n * n * q_width
    return 2.0 * (projections + attention + ffn)


def prefill_flops(shape: DecoderShape, tokens_per_layer: Sequence[int]) -> float:
    """FLOPs of a prefill where layer i processes tokens_per_layer[i] tokens."""
    if len(tokens_per_layer) != shape.num_layers:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries for a {shape.num_layers}-layer decoder")
    return sum(layer_flops(shape, n, i) for i, n in enumerate(tokens_per_layer))


def tokens_per_layer(num_layers: int, n_text: int, n_visual: int, stages: Sequence[tuple[int, int]] = ()) -> list[int]:
    """Tokens each layer sees: n_visual enter layer 0, and each (layer, kept) stage cuts the visual ones."""
    counts, visual = [], n_visual
    cuts = dict(stages)
    for layer in range(num_layers):
        visual = cuts.get(layer, visual)
        counts.append(n_text + visual)
    return counts


def count_flops(fn: Callable[[], object], module: nn.Module) -> dict[str, float]:
    """Run fn under FlopCounterMode; FLOPs in total and inside each of `module`'s submodules.

    PyTorch counts matrix products (linear, bmm, conv, and the GPU attention kernels). On the CPU its SDPA
    kernel is not counted, so count an eager-attention model there to see the attention products.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    per_module = counter.get_flop_counts()
    root = type(module).__name__
    result = {"total": float(counter.get_total_flops())}
    for name, ops in per_module.items():
        if name.startswith(root + "."):
            result[name.removeprefix(root + ".")] = float(sum(ops.values()))
    return result


def vision_selection_flops(method, view, keep: int) -> float:
    """FLOPs of `method`'s vision-stage selection of `keep` tokens from `view` (a `VisionView`), its own code counted
    by FlopCounterMode: what the setting computes beyond the tower (STAR's score is one more Q K^T over the feature
    layer's tokens). A view of meta tensors counts it from the shapes alone, without computing anything."""
    with FlopCounterMode(display=False) as counter:
        method.select_vision(view, keep)
    return float(counter.get_total_flops())


def clip_tower_flops(vision, layers: int, projected: int, text_width: int) -> float:
    """FLOPs of LLaVA's image encoding, one image: the CLIP tower's patch embedding and its first `layers` encoder
    layers (up to the feature layer, what vLLM builds) over the [CLS] token and every patch, then the two-layer
    projector (vision width to text_width, text_width to text_width) over the `projected` tokens that enter the
    decoder (the vision stage's kept ones: the projector runs after the pruning)."""
    d, patches = vision.hidden_size, (vision.image_size // vision.patch_size) ** 2
    tokens = patches + 1
    embed = patches * vision.num_channels * vision.patch_size**2 * d
    layer = tokens * (4 * d * d + 2 * d * vision.intermediate_size) + 2 * tokens * tokens * d
    projector = projected * (d * text_width + text_width * text_width)
    return 2.0 * (embed + layers * layer + projector)


def qwen2_5_vision_flops(vision, rows: int, columns: int) -> float:
    """FLOPs of Qwen2.5-VL's vision tower on one image of rows x columns patches (a frame pair): the patch
    embedding; per block the q/k/v and output projections, the gated FFN, and attention's two products, within
    windows of `window_size` px (whole merged units, the grid's last windows cut short) in most blocks and over the
    whole image in `fullatt_block_indexes`; the merger's two-layer MLP over merged units (before any pruning)."""
    d, patches, merge = vision.hidden_size, rows * columns, vision.spatial_merge_size
    embed = patches * vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * d
    units_per_window = vision.window_size // merge // vision.patch_size
    merged_rows, merged_columns = rows // merge, columns // merge
    windows = [min(units_per_window, merged_rows - r) * min(units_per_window, merged_columns - c) * merge**2
               for r in range(0, merged_rows, units_per_window) for c in range(0, merged_columns, units_per_window)]
    linear = patches * (4 * d * d + 3 * d * vision.intermediate_size)
    full = set(vision.fullatt_block_indexes)
    attention = sum(2 * d * (patches**2 if block in full else sum(w * w for w in windows)) for block in range(vision.depth))
    wide = d * merge**2
    merger = patches // merge**2 * (wide * wide + wide * vision.out_hidden_size)
    return 2.0 * (embed + vision.depth * linear + attention + merger)

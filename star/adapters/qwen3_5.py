"""Qwen3.5 (`Qwen3_5ForConditionalGeneration`): Qwen3-VL's vision side without DeepStack, and a hybrid decoder.

The vision side is Qwen2-VL's layout (one block of t * h * w / 4 tokens per image, the 2 x 2 merger as the
projector, no [CLS], 3-D interleaved M-RoPE positions from `get_rope_index`), so stage 1 is Qwen2-VL's: a
token's score is the attention its four patches receive in the tower's last layer.

The decoder mixes two kinds of layer (`layer_types`): full-attention layers (softmax attention with a gate on
its output, per-head q/k norms, rotary on part of each head) and linear-attention layers (a gated delta net:
a short causal convolution over the sequence and a recurrent state in place of a KV cache, no attention matrix).
A decoder stage can only score where softmax attention exists, so its score layer must be a full-attention
layer (`attention_layers`; see star.pruner.budget). Every layer after a cut, linear ones included, sees only
the kept tokens: its convolution and recurrent state run over them alone, as over a prompt that never held the
dropped ones, and decode steps continue from those states. A linear-attention layer takes the 2-D padding mask
of its own tokens (it zeroes padded ones, so left padding leaves its state as without it).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from star import compat
from star.adapters.qwen2_vl import Qwen2VLAdapter
from star.decoder import gather_seq


class Qwen3_5Adapter(Qwen2VLAdapter):
    model_classes = compat.model_classes("Qwen3_5ForConditionalGeneration")
    budget_note = "tokens per image (each image its own size); decoder stages at full-attention layers only"
    synthetic_patches = 64  # 1024 px at 16 px patches: 1024 merged tokens, as Qwen3-VL's timing image
    padding_mask_types = ("linear_attention",)

    def __init__(self, model):
        super().__init__(model)
        self.layer_types: list[str] = list(model.config.get_text_config().layer_types)
        self.attention_layers = tuple(i for i, kind in enumerate(self.layer_types) if kind == "full_attention")
        # The cache's length is that of its first full-attention layer (linear layers count no tokens).
        self.counted_layer = self.attention_layers[0]

    def layer_type(self, index: int) -> str:
        return self.layer_types[index]

    def decoder_qk(self, layer: nn.Module, hidden: torch.Tensor, position_embeddings, rows: torch.Tensor):
        """Queries for `rows` [B, R] and keys for every token of a full-attention layer, as its attention makes
        them: the query half of q_proj's output (the other half gates the output), per-head norms, and the
        family's own partial rotary. Returns q [B, H, R, d], k [B, Hk, S, d]."""
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        batch, seq = hidden.shape[:2]
        q = attn.q_proj(gather_seq(normed, rows)).view(batch, rows.shape[1], -1, 2 * attn.head_dim)[..., : attn.head_dim]
        q = attn.q_norm(q).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(normed).view(batch, seq, -1, attn.head_dim)).transpose(1, 2)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        cos, sin = (x.expand(batch, *x.shape[1:]) for x in position_embeddings)
        q = rotate(q, q, gather_seq(cos, rows), gather_seq(sin, rows))[0]
        return q, rotate(k, k, cos, sin)[0]

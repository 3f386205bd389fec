"""CDPruner (Zhang et al., NeurIPS 2025): the visual tokens whose set is most diverse given the instruction,
a determinantal point process (DPP) solved greedily, before the decoder.

Following Theia-4869/CDPruner at 9541616 (`llava/model/llava_arch.py`, `encode_images`):
- Similarity: the cosine similarity S of the visual tokens' decoder input embeddings (the projected features).
- Relevance: each token's mean similarity to the instruction, min-max normalised to (0, 1]:
  r = (r - min + 1e-6) / (max - min).
- Kernel: L = diag(r) S diag(r); the kept set is the greedy MAP of the DPP over L (the fast Cholesky-style
  update of Chen et al., 2018: each step keeps the token of largest remaining gain d_j^2, then lowers every
  gain by the square of its new Cholesky entry). The kept tokens enter the decoder in spatial order.

The instruction: the code embeds the question text with CLIP's text tower (loaded beside LLaVA's vision
tower) and compares it with CLIP's projected patch embeddings, and it negates that cosine, a quirk its
authors report seeing in CLIP alone (CDPruner issues #9, #14). A loaded LLaVA or Qwen2-VL has no text tower
aligned with its vision tower; the space where its image and text tokens meet is the decoder's input. So
here the relevance is the mean cosine similarity between a token's decoder input embedding and the input
embeddings of the instruction: the prompt tokens after the last image token (the question and the
assistant prefix), not negated. A prompt with no text after its image (or a view of no prompt) has no
instruction: every token is then equally relevant, and the selection is the plain DPP over S.

Where else this file departs from the code:
- The code normalises relevance over the whole batch of crops at once; here over each unit (an image, a
  LLaVA-NeXT crop), so a prompt's selection does not depend on the others in its batch.
- Once the kernel's rank is spent (every gain left is 0 up to rounding), the code divides by the square root
  of zero or less, and its NaNs can pick a token twice; here such a step keeps the not yet kept token of
  largest gain and changes no gain, so exactly `keep` distinct tokens are kept.
- LLaVA-NeXT: the code drops unpadding and the newline tokens and keeps `keep` of every crop; here every crop
  keeps `keep` (a cut tile, its share of the patches it shows) and the newline tokens stay.
- Positions: the code hands the decoder the shorter sequence, numbered without gaps, so
  positions="contiguous" is the default here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from star.methods.base import Method, Plan, Selection, VisionView
from star.scoring import flagged_in_order


@dataclass(frozen=True)
class CDPruner(Method):
    name = "cdpruner"
    summary = "the most diverse tokens given the instruction (greedy DPP MAP, relevance-weighted cosine kernel), before the decoder"
    source = "Theia-4869/CDPruner @ 9541616"
    positions = "contiguous"
    reads_instruction = True

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        return Plan(n_visual=n_visual, vision_keep=keep)

    def select_vision(self, view: VisionView, k: int) -> Selection:
        tokens = torch.nn.functional.normalize(view.embeddings.float(), dim=-1)
        if view.instruction is None:
            text, own = tokens[:, :0], tokens.new_zeros(tokens.shape[0], 0, dtype=torch.bool)
        else:
            text, own = view.instruction()
        similarity = tokens @ tokens.transpose(1, 2)
        relevance = instruction_relevance(tokens, torch.nn.functional.normalize(text.float(), dim=-1), own)
        return Selection(dpp_map(relevance[:, :, None] * similarity * relevance[:, None, :], k))


def instruction_relevance(tokens: torch.Tensor, text: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Mean cosine of each unit-normed token [I, N, D] to its instruction's unit-normed tokens [I, T, D] (own:
    [I, T]), min-max normalised per unit into (0, 1] as the code does: [I, N]; all ones without instruction."""
    weights = own.float()
    mean = (tokens @ text.transpose(1, 2) * weights[:, None, :]).sum(dim=-1) / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
    low, high = mean.min(dim=-1, keepdim=True).values, mean.max(dim=-1, keepdim=True).values
    scaled = (mean - low + 1e-6) / (high - low)
    return torch.where(own.any(dim=-1, keepdim=True) & (high > low), scaled, torch.ones_like(mean))


def dpp_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP of a DPP with kernel [I, N, N] (symmetric, positive semi-definite): [I, k] ascending indices."""
    units, n = kernel.shape[:2]
    rows = torch.arange(units, device=kernel.device)
    factors = kernel.new_zeros(k, units, n)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    taken = torch.zeros(units, n, dtype=torch.bool, device=kernel.device)
    for step in range(k):
        pick = gains.masked_fill(taken, float("-inf")).argmax(dim=-1)
        taken[rows, pick] = True
        root = gains[rows, pick].clamp_min(0.0).sqrt()[:, None]
        residual = kernel[rows, pick] - torch.einsum("tu,tun->un", factors[:step, rows, pick], factors[:step])
        factors[step] = torch.where(root > 0, residual / root, torch.zeros_like(residual))
        gains = gains - factors[step] ** 2
    return flagged_in_order(taken, k)

"""FLOPs: the paper's Table 3 ratios from the formula, and the formula against a count of real runs."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

import star
from conftest import batch, prompt_ids, tiny_llava
from families import PATCH_DIM, gemma_inputs, qwen_inputs, tiny_gemma3, tiny_qwen, tiny_qwen3
from star.adapters.base import MergedView
from star.cli import main
from star.flops import (
    DecoderShape, LinearAttention, clip_tower_flops, count_flops, layer_flops, named_models, prefill_flops, qwen2_5_vision_flops,
    tokens_per_layer, vision_selection_flops,
)
from star.methods import REGISTRY


@pytest.mark.parametrize("keep, paper", [(288, 0.713), (58, 0.536), (29, 0.514)])
def test_star_schedule_reproduces_table_3_ratios(keep, paper):
    shape = DecoderShape.named("llava-1.5-7b")
    unpruned = prefill_flops(shape, [576 + 79] * 32)
    pruned = prefill_flops(shape, tokens_per_layer(32, 79, 490, [(16, keep)]))
    assert abs(pruned / unpruned - paper) / paper < 0.01


def test_star_flops_command_prints_the_table(capsys):
    assert main(["flops", "--model", "llava-1.5-7b", "--text-tokens", "79", "--method", "star,fastervlm", "--keep", "288,58,29"]) == 0
    out = capsys.readouterr().out
    assert "| star | 288 | 576 / 490 / 288 |" in out and "| 0.710 |" in out
    assert "| star | 58 | 576 / 490 / 58 |" in out and "| 0.535 |" in out
    assert "| fastervlm | 29 | 576 / 29 |" in out


def test_flops_command_knows_the_2025_baselines(capsys):
    assert main(["flops", "--model", "llava-1.5-7b", "--method", "vispruner,divprune,cdpruner,dart", "--keep", "64"]) == 0
    out = capsys.readouterr().out
    for method in ("vispruner", "divprune", "cdpruner"):
        assert f"| {method} | 64 | 576 / 64 |" in out
    assert "| dart | 64 | 576 / 576 / 64 |" in out


def test_shipped_shapes_and_bad_names():
    assert {"gemma-3-4b", "internvl3-8b", "llava-1.5-13b", "llava-1.5-7b", "llava-next-7b", "llava-onevision-7b",
            "llava-1.5-tinyllama-1.1b", "qwen2.5-vl-7b", "qwen3-vl-8b"} <= set(named_models())
    assert DecoderShape.named("llava-1.5-13b").num_layers == 40
    with pytest.raises(ValueError, match="model='llava-9b'"):
        DecoderShape.named("llava-9b")
    with pytest.raises(ValueError, match="tokens_per_layer"):
        prefill_flops(DecoderShape.named("llava-1.5-7b"), [10] * 3)


def test_flops_of_the_tiled_families_count_per_crop_and_refuse_what_their_family_refuses(capsys):
    assert main(["flops", "--model", "internvl3-8b", "--method", "star,fastervlm", "--keep", "64"]) == 0
    out = capsys.readouterr().out
    assert "13 crops of 256 visual + 79 other tokens" in out and "| fastervlm | 64 | 256 / 64 |" in out
    assert main(["flops", "--model", "llava-onevision-7b", "--method", "star", "--keep", "72"]) == 0
    assert "10 crops of 729 visual + 160 other tokens" in capsys.readouterr().out  # 79 text and 81 newlines
    for model, method in [("llava-onevision-7b", "fastervlm"), ("llava-onevision-7b", "visionzip"), ("internvl3-8b", "visionzip")]:
        assert main(["flops", "--model", model, "--method", f"star,{method}", "--keep", "64"]) == 2
        assert f"--method '{method}' cannot prune {model}: " in capsys.readouterr().err


def test_a_layer_is_costed_by_its_own_kind_and_its_own_heads():
    """Linear-attention layers (Qwen3.5) and per-layer heads (Gemma 4) in one decoder: a full-attention layer costs
    what a decoder of its heads would, a linear one what it costs whatever the softmax layers' heads."""
    linear = LinearAttention(("linear_attention", "full_attention") * 2, 2, 4, 8, 8, 4)
    alike = DecoderShape(64, 128, 4, 4, 2, 16, linear=linear)
    varied = replace(alike, layer_heads=((2, 16), (1, 32), (2, 16), (1, 32)))
    wide = replace(alike, num_kv_heads=1, head_dim=32)
    assert layer_flops(varied, 10, 1) == layer_flops(wide, 10, 1) != layer_flops(alike, 10, 1)
    assert layer_flops(varied, 10, 0) == layer_flops(alike, 10, 0) == layer_flops(wide, 10, 0)
    assert prefill_flops(varied, [10, 7, 10, 7]) == 2 * layer_flops(alike, 10, 0) + 2 * layer_flops(wide, 7, 1)


@torch.no_grad()
def test_formula_equals_counted_matrix_products_of_a_llama():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    config._attn_implementation = "eager"
    model = LlamaModel(config).eval()
    counted = count_flops(lambda: model(torch.randint(0, 100, (1, 50))), model)
    for layer in range(4):
        assert counted[f"layers.{layer}"] == layer_flops(DecoderShape.from_config(config), 50)


@torch.no_grad()
@pytest.mark.parametrize("method", ["none", "star", "pdrop", "fastervlm", "cdpruner", "dart"])
def test_stats_flops_match_the_counted_decoder_of_a_real_prefill(method):
    model = tiny_llava(attn="eager")
    inputs = batch([prompt_ids(3, 6, seed=1), prompt_ids(7, 4, seed=2)])
    with star.apply(model, method=method, keep=5) as pruner:
        counted = count_flops(lambda: model(**inputs), model)
        stats = pruner.stats
    decoder = sum(v for k, v in counted.items() if k.startswith("model.language_model.layers.") and k.count(".") == 3)
    assert abs(stats.flops - decoder) / decoder < 0.05


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_stats_flops_match_the_counted_decoder_of_qwen3_vl_and_gemma3(family):
    """Qwen3-VL and Gemma 3 decoders have per-head q/k norms and (Gemma) a gated GELU FFN: the formula's
    matrix products are theirs."""
    if family == "qwen3":
        model, inputs = tiny_qwen3(attn="eager"), qwen_inputs([[(4, 6)], [(8, 8)]], [(3, 6), (7, 4)])
    else:
        model, inputs = tiny_gemma3(attn="eager"), gemma_inputs([1, 2], [(3, 6), (7, 4)])
    with star.apply(model, method="star", keep=3) as pruner:
        counted = count_flops(lambda: model(**inputs), model)
        stats = pruner.stats
    decoder = sum(v for k, v in counted.items() if k.startswith("model.language_model.layers.") and k.count(".") == 3)
    assert abs(stats.flops - decoder) / decoder < 0.05


def test_flops_of_a_mixture_of_experts_decoder_count_the_routed_experts():
    moe = tiny_qwen3(moe=True).config.text_config
    assert DecoderShape.from_config(moe).intermediate_size == 2 * 32
    with pytest.raises(ValueError, match="mlp_only_layers"):
        DecoderShape.from_config(type(moe)(**{**moe.to_dict(), "mlp_only_layers": [0]}))


@pytest.mark.parametrize("feature_layer, projected", [(-2, 16), (-1, 5), (1, 9)])
def test_clip_tower_formula_equals_the_counted_tower_and_projector(feature_layer, projected):
    """LLaVA's image encoding as vLLM runs it: the tower up to its feature layer, the projector over the kept."""
    from transformers import CLIPVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    llava = tiny_llava(attn="eager")
    vision = copy.deepcopy(llava.config.vision_config)
    layers = feature_layer % (vision.num_hidden_layers + 1)  # hidden state -2 of 3 layers: after layer 2
    vision.num_hidden_layers = layers  # what vLLM builds of the tower
    tower = CLIPVisionModel._from_config(vision, attn_implementation="eager").eval()
    projector = LlavaMultiModalProjector(llava.config).eval()
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size)
    states = torch.randn(1, projected, vision.hidden_size)
    with torch.no_grad():
        counted = count_flops(lambda: (tower(pixels), projector(states)), tower)["total"]
    assert clip_tower_flops(vision, layers, projected, llava.config.text_config.hidden_size) == counted


def _merged_view(device: str, heads: int = 2, width: int = 8, grid: tuple[int, int] = (4, 6)) -> MergedView:
    """A Qwen-like view (2 x 2 patches per token, no [CLS]) of random tensors moved to `device`."""
    generator = torch.Generator().manual_seed(0)
    tokens = grid[0] * grid[1]
    q, k = (torch.randn(1, heads, 4 * tokens, width, generator=generator).to(device) for _ in range(2))
    features = torch.randn(1, tokens, 16, generator=generator).to(device)
    return MergedView(features=features, n_prefix=0, qk=lambda: (q, k), token_of=torch.arange(tokens).repeat_interleave(4).to(device), grid=grid)


@pytest.mark.parametrize("name", ["star-vision", "vispruner", "divprune", "random", "pool"])
def test_vision_selection_flops_from_meta_tensors_equal_a_real_selections(name):
    """The served methods on a merged tower: counting from the shapes alone (meta) gives what the real run counts."""
    method = REGISTRY[name]()
    assert vision_selection_flops(method, _merged_view("meta"), 6) == vision_selection_flops(method, _merged_view("cpu"), 6)


def test_vision_selection_flops_of_star_are_its_score_and_of_random_nothing():
    """STAR's stage 1 scores with Q K^T over every patch (2 T^2 H d) and one product of each head's probabilities with
    their rows' 1 / sum (2 T^2 H); random chooses without computing."""
    heads, width, patches = 2, 8, 96
    assert vision_selection_flops(REGISTRY["star-vision"](), _merged_view("meta"), 6) == 2 * patches**2 * heads * (width + 1)
    assert vision_selection_flops(REGISTRY["random"](), _merged_view("meta"), 6) == 0


@pytest.mark.parametrize("rows, columns", [(4, 4), (6, 10), (10, 6), (2, 14)])
def test_qwen2_5_vision_formula_equals_the_counted_tower_with_its_windows_cut_short(rows, columns):
    """Windows of 2 x 2 merged units in blocks 0 and 2, block 1 over the whole image: grids whose last windows are
    cut short in either direction, and a grid of one window's height."""
    model = tiny_qwen("2.5", attn="eager")
    visual = model.model.visual
    pixels = torch.randn(rows * columns, PATCH_DIM)
    with torch.no_grad():
        counted = count_flops(lambda: visual(pixels, grid_thw=torch.tensor([[1, rows, columns]])), visual)["total"]
    assert qwen2_5_vision_flops(model.config.vision_config, rows, columns) == counted

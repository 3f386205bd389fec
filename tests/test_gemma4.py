"""Gemma 4: images of their own sizes pooled by position, per-layer embeddings, key/value sharing, sliding and
global layers (image tokens both ways in sliding ones); the same contract as the other families."""

from __future__ import annotations

import pytest
import torch

import star
from conftest import left_pad
from families import assert_batch_equals_each_alone, kept_of, layout_of
from star import compat
from star.scoring import top_k_in_order

pytestmark = pytest.mark.skipif(compat.GEMMA4_MISSING is not None, reason=str(compat.GEMMA4_MISSING))

IMAGE, VIDEO, BOI, EOI, AUDIO = 120, 121, 122, 123, 124
PATCH = 2  # px; pooled 2 x 2
NO_CLS = [m for m in star.methods() if m not in ("fastervlm", "visionzip")]
# PyramidDrop's stages (it cuts before each), SparseVLM's (after each): their defaults reach the sharing layers.
LAYERS = {"pdrop": (1, 4), "sparsevlm": (0, 3)}


def tiny_gemma4(attn: str = "sdpa", seed: int = 0, shared: int = 3, window: int = 128):
    """9 layers (sliding, sliding, global) x 3 whose global ones have other heads and head size, keys as values
    there, per-layer embeddings, and the last `shared` layers reusing the keys and values of layers 4 (sliding)
    and 5 (global); a 2-layer tower pooling 2 x 2 patches."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=9, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True, vocab_size=128, vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=16, sliding_window=window, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 3,
        num_kv_shared_layers=shared, use_bidirectional_attention="vision", pad_token_id=0, max_position_embeddings=512,
        final_logit_softcapping=30.0,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
        patch_size=PATCH, pooling_kernel_size=2, position_embedding_size=64,
    )
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, image_token_id=IMAGE, video_token_id=VIDEO,
        boi_token_id=BOI, eoi_token_id=EOI, audio_token_id=AUDIO,
    )
    model = Gemma4ForConditionalGeneration._from_config(config, attn_implementation=attn).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_gemma4()


def gemma4_inputs(grids: list[list[tuple[int, int]]], text: list[tuple[int, int]], seed: int = 0) -> dict:
    """Prompts of images of the given (h, w) patch grids (even sides), each between start- and end-of-image tokens
    and marked in mm_token_type_ids, between `text[r]` words; patches padded to the batch's largest image with
    position (-1, -1), as the processor pads them."""
    g = torch.Generator().manual_seed(seed)
    flat = [s for row in grids for s in row]
    length = max(h * w for h, w in flat)
    pixels = torch.zeros(len(flat), length, 3 * PATCH * PATCH)
    positions = torch.full((len(flat), length, 2), -1)
    for i, (h, w) in enumerate(flat):
        pixels[i, : h * w] = torch.rand(h * w, 3 * PATCH * PATCH, generator=g)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        positions[i, : h * w] = torch.stack([xs.flatten(), ys.flatten()], dim=1)
    prompts = []
    for row, (before, after) in zip(grids, text):
        ids = _words(before, g)
        for h, w in row:
            ids += [BOI] + [IMAGE] * (h * w // 4) + [EOI] + _words(1, g)
        prompts.append(ids + _words(after, g))
    inputs = left_pad(prompts)
    return {**inputs, "pixel_values": pixels, "image_position_ids": positions, "mm_token_type_ids": (inputs["input_ids"] == IMAGE).long()}


def _words(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(1, IMAGE - 1, (n,), generator=g).tolist()


def select_rows(inputs: dict, rows: list[int], images_per_row: list[int]) -> dict:
    """The inputs of some prompts alone, their padding removed (their images follow them)."""
    starts = [sum(images_per_row[:r]) for r in range(len(images_per_row))]
    images = [i for r in rows for i in range(starts[r], starts[r] + images_per_row[r])]
    out = left_pad([inputs["input_ids"][r][inputs["attention_mask"][r].bool()].tolist() for r in rows])
    pixels, positions = inputs["pixel_values"][images], inputs["image_position_ids"][images]
    length = int((positions != -1).all(dim=-1).sum(dim=1).max())
    return {**out, "pixel_values": pixels[:, :length], "image_position_ids": positions[:, :length], "mm_token_type_ids": (out["input_ids"] == IMAGE).long()}


# -- an independent reference: the model's own modules, one prompt, only the kept tokens ------------------


def prompt_parts(model, inputs: dict, row: int, images: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prompt without its padding: ids [S], input embeddings [S, D] as the unpatched model builds them, and
    the image block each token is in [S] (-1 for text)."""
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    lm = model.model.language_model
    is_image = ids == IMAGE
    embeds = lm.embed_tokens(ids.masked_fill(is_image, 0)).clone()
    features = model.model.get_image_features(inputs["pixel_values"][images], inputs["image_position_ids"][images]).pooler_output
    embeds[is_image] = torch.cat(features).to(embeds.dtype)
    starts = is_image & ~torch.cat([torch.tensor([False]), is_image[:-1]])
    return ids, embeds, torch.where(is_image, starts.long().cumsum(0) - 1, -1)


def forward_kept(model, ids, embeds, block, kept, cut_layers, extra_ids=(), contiguous=False) -> torch.Tensor:
    """Logits of the last token when only the kept image tokens are present (kept[0] enter the decoder, kept[s]
    are left from cut_layers[s - 1] on). Each layer gets its per-layer input (from the token's id, image tokens as
    padding, and its input embedding), its type's rotary table, and a mask: causal, and in sliding layers within
    the window and both ways between present tokens of one image block; sharing layers read what the storing ones
    stored."""
    lm = model.model.language_model
    text = model.config.get_text_config()
    extra = torch.tensor(list(extra_ids), dtype=torch.long)
    all_ids = torch.cat([ids, extra])
    embeds = torch.cat([embeds, lm.embed_tokens(extra)])
    block = torch.cat([block, torch.full((len(extra),), -1)])
    token_part = lm.get_per_layer_inputs(all_ids.masked_fill(all_ids == IMAGE, 0)[None], None)
    positions = torch.arange(len(embeds))
    columns = (all_ids == IMAGE).nonzero()[:, 0]

    def present(places: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(len(embeds), dtype=torch.bool)
        keep[columns] = False
        keep[columns[places]] = True
        return keep

    alive = present(kept[0])
    hidden = embeds[alive][None]
    per_layer = lm.project_per_layer_inputs(hidden, token_part[:, alive])
    shared = {}
    for index, layer in enumerate(lm.layers):
        if index in cut_layers:
            stage = present(kept[cut_layers.index(index) + 1])
            inner = stage[alive]
            hidden, per_layer, alive = hidden[:, inner], per_layer[:, inner], stage
        n = hidden.shape[1]
        pos = (torch.arange(n) if contiguous else positions[alive])[None]
        q, k, b = torch.arange(n)[:, None], torch.arange(n)[None], block[alive]
        allowed = k <= q
        kind = text.layer_types[index]
        if kind == "sliding_attention":
            allowed = (allowed | ((b[:, None] == b[None]) & (b[:, None] >= 0))) & (q - k < text.sliding_window)
        mask = torch.zeros(n, n).masked_fill(~allowed, float("-inf"))[None, None]
        rotary = lm.rotary_emb(hidden, pos, kind)
        hidden = layer(hidden, per_layer[:, :, index], shared_kv_states=shared, position_embeddings=rotary, attention_mask=mask, position_ids=pos)
    logits = model.lm_head(lm.norm(hidden))[0, -1]
    cap = text.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


def greedy_by_recompute(model, parts, kept, cut_layers, steps: int, contiguous=False) -> list[int]:
    generated: list[int] = []
    for _ in range(steps):
        generated.append(int(forward_kept(model, *parts, kept, cut_layers, generated, contiguous).argmax()))
    return generated


# -- the contract -----------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("method", star.methods())
def test_full_budget_equals_unpatched_model_and_remove_restores_it(model, method):
    inputs = gemma4_inputs([[(4, 6), (4, 4)], [(2, 4)]], [(3, 6), (1, 2)])
    before = model(**inputs).logits
    options = {"stage1_ratio": 0.0} if method == "star" else {}
    with star.apply(model, method=method, keep=1.0, **options):
        pruned = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    after = model(**inputs).logits
    assert (pruned - before).abs().max() < 1e-5
    assert torch.equal(after, before)
    assert torch.equal(generated, model.generate(**inputs, max_new_tokens=4, do_sample=False))
    assert not model._forward_pre_hooks and not any(l._forward_pre_hooks for l in model.model.language_model.layers)


def test_the_reference_is_the_model_and_sees_the_image_blocks(model):
    inputs = gemma4_inputs([[(4, 6), (2, 2)]], [(3, 6)], seed=1)
    ids, embeds, block = prompt_parts(model, inputs, 0, [0, 1])
    every = torch.arange(7)
    with torch.no_grad():
        full = model(**inputs).logits[0, -1]
        assert (forward_kept(model, ids, embeds, block, [every], []) - full).abs().max() < 1e-5
        causal_only = torch.full_like(block, -1)
        assert (forward_kept(model, ids, embeds, causal_only, [every], []) - full).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize(
    "method, options, positions",
    [
        ("star", {}, "original"), ("star", {"layer": 2}, "contiguous"), ("fastv", {}, "original"), ("dart", {}, "original"),
        ("pdrop", {"layers": LAYERS["pdrop"]}, "original"), ("pdrop", {"layers": LAYERS["pdrop"]}, "contiguous"), ("random", {}, "contiguous"),
        ("sparsevlm", {"recycle_ratio": 0.0, "layers": LAYERS["sparsevlm"]}, "original"), ("cdpruner", {}, "original"),
    ],
)
def test_pruned_prefill_equals_forward_over_kept_tokens(model, method, options, positions):
    """Cuts at sliding layers (1, 4) and a global one (2), up to the first storing layer (4; 5 stores too); the sharing layers
    (6-8) read the kept tokens' keys and values. Also with only the last token's logits, as generate() asks."""
    inputs = gemma4_inputs([[(4, 6), (4, 4)]], [(3, 6)], seed=1)
    with star.apply(model, method=method, keep=3, positions=positions, **options) as pruner:
        logits = model(**inputs).logits[0, -1]
        last = model(**inputs, logits_to_keep=1).logits[0, -1]
        stats = pruner.stats
    parts = prompt_parts(model, inputs, 0, [0, 1])
    expected = forward_kept(model, *parts, kept_of(stats, 0), stats.layers, contiguous=positions == "contiguous")
    assert (logits - expected).abs().max() < 1e-4
    assert (last - expected).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("method, positions", [("star", "original"), ("fastv", "original"), ("pdrop", "contiguous")])
def test_cached_generation_equals_recomputation(model, method, positions):
    inputs = gemma4_inputs([[(4, 4)]], [(5, 4)], seed=2)
    options = {"layers": LAYERS[method]} if method in LAYERS else {}
    with star.apply(model, method=method, keep=2, positions=positions, **options) as pruner:
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        stats = pruner.stats
    parts = prompt_parts(model, inputs, 0, [0])
    expected = greedy_by_recompute(model, parts, kept_of(stats, 0), stats.layers, 8, positions == "contiguous")
    assert out[0, -8:].tolist() == expected


@torch.no_grad()
@pytest.mark.parametrize("method, keep", [("star", 2), ("pdrop", 2), ("sparsevlm", 0.5), ("random", 0.5)])
def test_batch_of_different_sizes_and_image_counts_equals_each_alone(model, method, keep):
    grids = [[(4, 4)], [(2, 4), (4, 6)], [(4, 2)]]
    inputs = gemma4_inputs(grids, [(3, 6), (7, 4), (1, 9)], seed=4)
    images = [len(row) for row in grids]
    options = {"layers": LAYERS[method]} if method in LAYERS else {}
    assert_batch_equals_each_alone(model, inputs, method, keep, lambda row: select_rows(inputs, [row], images), **options)


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 0.25])
@pytest.mark.parametrize("method", [m for m in NO_CLS if m != "pool"])  # pool: its own grids, tests/test_pool.py
def test_every_image_keeps_exactly_its_budget_in_order(model, method, keep):
    grids = [[(4, 6), (4, 4), (2, 4)]]
    inputs = gemma4_inputs(grids, [(2, 5)], seed=5)
    options = {"layers": LAYERS[method]} if method in LAYERS else {}
    with star.apply(model, method=method, keep=keep, **options) as pruner:
        logits = model(**inputs).logits
        stats = pruner.stats
    sizes = [6, 4, 2]
    budgets = sizes if method == "none" else [max(1, round(keep * n)) if isinstance(keep, float) else keep for n in sizes]
    assert stats.totals[0][0] == sum(sizes) and stats.totals[0][-1] == sum(budgets)
    assert logits.shape[1] == inputs["input_ids"].shape[1] - sum(sizes) + sum(budgets)
    for patches in kept_of(stats, 0):
        assert bool((patches[1:] > patches[:-1]).all()) and bool((patches < sum(sizes)).all())


@torch.no_grad()
def test_vision_scores_equal_eager_attention_summed_over_each_pooled_block():
    """The eager tower's own weights over each image's real patches (padding neither asks nor receives)."""
    eager, sdpa = tiny_gemma4(attn="eager"), tiny_gemma4(attn="sdpa")
    inputs = gemma4_inputs([[(4, 6), (2, 4)]], [(2, 2)], seed=6)
    weights = eager.model.vision_tower(
        pixel_values=inputs["pixel_values"], pixel_position_ids=inputs["image_position_ids"], output_attentions=True
    ).attentions[-1]
    with star.apply(sdpa, method="star", keep=2) as pruner:
        encoded = pruner.adapter.encode_prompts(inputs, inputs["input_ids"], layout_of(pruner, inputs))
    for image, (h, w) in enumerate([(4, 6), (2, 4)]):
        real = weights[image, :, : h * w, : h * w].mean(dim=(0, 1)).view(h // 2, 2, w // 2, 2)
        expected = real.sum(dim=(1, 3)).flatten()
        assert torch.allclose(encoded.groups[image].view.received()[0], expected, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("layer", [2, 4])
def test_decoder_selection_equals_top_k_of_eager_attention(layer):
    """The eager model's own weights: scaling 1 after q/k norms, the layer type's head size and rotary table."""
    eager, sdpa = tiny_gemma4(attn="eager"), tiny_gemma4(attn="sdpa")
    inputs = gemma4_inputs([[(4, 4)], [(4, 6), (2, 2)]], [(3, 6), (1, 2)], seed=7)
    probs = eager(**inputs, output_attentions=True).attentions[layer]
    with star.apply(sdpa, method="star", keep=1, layer=layer, stage1_ratio=0.0) as pruner:
        sdpa(**inputs)
        stage = kept_of(pruner.stats, 0)[1], kept_of(pruner.stats, 1)[1]
    for row, ids in enumerate(inputs["input_ids"]):
        image = (ids == IMAGE).nonzero()[:, 0]
        text = torch.arange(int(image[-1]) + 1, len(ids))  # from the end-of-image token on
        scores = probs[row][:, text][:, :, image].mean(dim=(0, 1))
        assert torch.equal(stage[row], top_k_in_order(scores, 1 + row))  # 1 per image


def test_generate_prunes_its_prefill(model):
    inputs = gemma4_inputs([[(4, 6)]], [(2, 3)], seed=8)
    lengths = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    with star.apply(model, method="star", keep=2) as pruner, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        entry = pruner.stats.sequence_lengths[0]
    handle.remove()
    assert lengths[0] == entry < inputs["input_ids"].shape[1]


def test_bad_inputs_are_named(model):
    for method in ["fastervlm", "visionzip"]:
        with pytest.raises(ValueError, match=rf"method='{method}' cannot prune Gemma4.*\[CLS\]"):
            star.apply(model, method=method, keep=3)
        assert not model._forward_pre_hooks
    for method, options in [("star", {"layer": 5}), ("pdrop", {}), ("fastv", {"layer": 7})]:
        with pytest.raises(ValueError, match=rf"method '{method}' cuts at decoder layer \d.*layers 6-8 reuse.*layer 4 or earlier"):
            star.apply(model, method=method, keep=3, **options)
        assert not model._forward_pre_hooks
    inputs = gemma4_inputs([[(4, 4)]], [(2, 2)])
    calls = []  # a budget the image cannot meet is refused before the tower's compute
    handle = model.model.vision_tower.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with star.apply(model, method="star", keep=5), torch.no_grad(), pytest.raises(ValueError, match="keep=5 is above the 4 visual tokens"):
            model(**inputs)
        assert calls == []
    finally:
        handle.remove()
    with star.apply(model, method="star", keep=2), torch.no_grad():
        with pytest.raises(ValueError, match="image_position_ids is None"):
            model(**{**inputs, "image_position_ids": None})
        with pytest.raises(ValueError, match=r"input_features \(audio\) came with images"):
            model(**inputs, input_features=torch.zeros(1, 8, 4), input_features_mask=torch.ones(1, 8, dtype=torch.bool))
        video = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_position_ids")}
        with pytest.raises(ValueError, match="pixel_values_videos came at prefill: it carries video frames"):
            model(**video, pixel_values_videos=inputs["pixel_values"], video_position_ids=inputs["image_position_ids"])
        with pytest.raises(ValueError, match="pixel_values_videos came at prefill"):
            model(**inputs, pixel_values_videos=inputs["pixel_values"], video_position_ids=inputs["image_position_ids"])


@torch.no_grad()
def test_a_decoder_stage_refuses_a_sequence_beyond_the_sliding_window():
    narrow = tiny_gemma4(window=16)
    long = gemma4_inputs([[(4, 6)]], [(6, 6)], seed=9)  # 6 + 8 + 1 + 6 = 21 tokens
    with star.apply(narrow, method="random", keep=2):
        narrow.generate(**long, max_new_tokens=3, do_sample=False)
    with star.apply(narrow, method="star", keep=2), pytest.raises(ValueError, match="sliding_window=16"):
        narrow(**long)


@torch.no_grad()
def test_audio_passes_unpruned_alone_and_is_refused_with_images():
    """A checkpoint with an audio tower (E2B, E4B) builds with eager attention there (it has no SDPA) and SDPA
    elsewhere; a prompt of audio alone runs as the model runs it (nothing visual to prune), one with images too is
    refused, naming the audio."""
    from transformers import Gemma4AudioConfig

    from star import synthetic

    config = tiny_gemma4().config
    config.audio_config = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, output_proj_dims=32)
    model = synthetic.random_model(config, "cpu", torch.float32, "sdpa")
    assert (model.config.text_config._attn_implementation, model.config.audio_config._attn_implementation) == ("sdpa", "eager")
    features, mask = torch.randn(1, 40, 128, generator=torch.Generator().manual_seed(0)), torch.ones(1, 40, dtype=torch.bool)
    tokens = int(model.model.get_audio_features(features, mask).attention_mask.sum())
    ids = torch.tensor([[5, 6] + [AUDIO] * tokens + [7, 8]])
    audio = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "input_features": features, "input_features_mask": mask}
    unpruned = model(**audio).logits
    with star.apply(model, method="star", keep=2) as pruner:
        assert torch.equal(model(**audio).logits, unpruned) and pruner.stats is None
        with pytest.raises(ValueError, match=r"input_features \(audio\) came with images"):
            model(**gemma4_inputs([[(4, 4)]], [(2, 2)]), input_features=features, input_features_mask=mask)


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_sdpa_equals_eager_in_a_padded_batch(positions):
    """A left-padded batch, its sharing layers run on the last token only (logits_to_keep=1, as generate() asks):
    eager attention's explicit masks and SDPA's give the same answers."""
    inputs = gemma4_inputs([[(4, 6)], [(4, 4), (2, 4)]], [(3, 6), (1, 2)], seed=3)
    outputs = []
    for attn in ("eager", "sdpa"):
        model = tiny_gemma4(attn=attn)
        with star.apply(model, method="star", keep=2, positions=positions):
            generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
            outputs.append((generated, model(**inputs, logits_to_keep=1).logits))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert (outputs[0][1] - outputs[1][1]).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["star", "fastv", "pool", "dart"])
@torch.no_grad()
def test_a_pruned_prefill_reads_back_the_layout_once(model, method):
    """Images of three sizes in two prompts: the pruner reads back one thing, the layout with each image's tokens
    and grid (`tolist` once); the rest are the tower's own reads, which the unpruned model makes too."""
    from star.bench import host_reads

    inputs = gemma4_inputs([[(4, 6), (4, 4)], [(2, 4)]], [(3, 6), (1, 2)])
    model(**inputs)
    unpruned = host_reads(lambda: model(**inputs))
    with star.apply(model, method=method, keep=0.5):
        model(**inputs)
        pruned = host_reads(lambda: model(**inputs))
    assert pruned["tolist"] == 1 and sum(pruned.values()) <= sum(unpruned.values()), (pruned, unpruned)

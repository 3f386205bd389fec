"""Pool against its references: torch's adaptive average pooling, a forward over a smaller image's tokens built by
hand, and the reachable grids written out. (Every family's contract tests run it too: star.methods().)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import star
from star import compat
from conftest import IMAGE_TOKEN as LLAVA_IMAGE_TOKEN, N_VISUAL, batch, prompt_ids
from families import IMAGE_TOKEN, kept_of, layout_of, next_inputs, qwen_inputs, tiny_llava_next, tiny_qwen, tiny_qwen3, tiny_qwen3_5
from reference import forward_kept, greedy_by_recompute
from star.methods import VisionView
from star.methods.pool import Pool, pooled_grid


@pytest.mark.parametrize(
    "grid, keep, expected",
    [
        ((4, 4), 1, (1, 1)), ((4, 4), 2, (1, 1)), ((4, 4), 3, (2, 2)), ((4, 4), 7, (3, 3)), ((4, 4), 12, (3, 3)),
        ((4, 4), 13, (4, 4)), ((2, 3), 1, (1, 2)), ((2, 3), 4, (1, 2)), ((2, 3), 5, (2, 3)), ((6, 3), 1, (2, 1)),
        ((6, 3), 8, (4, 2)), ((24, 24), 109, (10, 10)), ((24, 24), 111, (11, 11)), ((24, 24), 576, (24, 24)),
    ],
)
def test_keep_becomes_the_nearest_grid_of_the_same_aspect(grid, keep, expected):
    assert pooled_grid(grid, keep) == expected  # a tie (2 or 6 for 4 of 2 x 3) goes to the smaller


@pytest.mark.parametrize("grid, keep", [((5, 7), 12), ((4, 4), 4), ((4, 4), 9), ((6, 3), 8), ((3, 3), 9)])
def test_pooled_states_are_torch_adaptive_average_pooling_and_places_the_window_centres(grid, keep):
    features = torch.randn(2, grid[0] * grid[1], 3)
    view = VisionView(features=features, n_prefix=0, qk=None, grid=grid)
    k = Pool().unit_plan(features.shape[1], keep, 4, grid).vision_keep
    selection = Pool().select_vision(view, k)
    g_h, g_w = pooled_grid(grid, keep)
    image = features.view(2, *grid, 3).permute(0, 3, 1, 2)
    expected = F.adaptive_avg_pool2d(image, (g_h, g_w)).flatten(2).transpose(1, 2)
    assert torch.allclose(selection.states, expected, atol=1e-6)
    assert bool((selection.index[:, 1:] > selection.index[:, :-1]).all())
    if grid == (4, 4):
        assert selection.index[0].tolist() == {4: [0, 2, 8, 10], 9: [0, 1, 2, 4, 5, 6, 8, 9, 10]}[keep]


def _pooled_projected(model, pixel_values: torch.Tensor, side: int) -> torch.Tensor:
    """The feature layer of the tower, average-pooled as a side x side image by torch, then projected: [g * g, D]."""
    patches = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][0, 1:]
    grid = patches.T.reshape(1, -1, 4, 4)
    pooled = F.adaptive_avg_pool2d(grid, (side, side)).flatten(2)[0].T
    return model.model.multi_modal_projector(pooled)


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("keep, side, centres", [(4, 2, [0, 2, 8, 10]), (9, 3, [0, 1, 2, 4, 5, 6, 8, 9, 10])])
def test_llava_prefill_and_generation_equal_a_forward_over_the_pooled_image(model, positions, keep, side, centres):
    """The reference: the prompt with only the window centres' image tokens, each carrying the pooled feature torch
    computes (contiguous: numbered as a smaller image's tokens; original: at the centres' own positions)."""
    prompt = prompt_ids(3, 6, seed=1)
    inputs = batch([prompt])
    features = torch.zeros(N_VISUAL, model.config.text_config.hidden_size)
    features[centres] = _pooled_projected(model, inputs["pixel_values"], side)
    kept = [torch.tensor(centres)]
    with star.apply(model, method="pool", keep=keep, positions=positions) as pruner:
        logits = model(**inputs).logits[0, -1]
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)[0, len(prompt):]
        stats = pruner.stats
    assert stats.tokens == [N_VISUAL, keep] and stats.kept_patches[0][0].tolist() == centres
    assert (logits - forward_kept(model, prompt, features, kept, [], positions)).abs().max() < 1e-4
    assert generated.tolist() == greedy_by_recompute(model, prompt, features, kept, [], positions, steps=5)
    assert prompt.count(LLAVA_IMAGE_TOKEN) == N_VISUAL


@torch.no_grad()
@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("keep, per_image", [(1, [2, 1, 1]), (4, [2, 4, 4]), (0.5, [2, 9, 1])])
def test_qwen_images_keep_the_grid_of_their_own_aspect(version, keep, per_image):
    # merged grids 2 x 3, 4 x 4, 2 x 2: a 2 x 3 grid reaches 2 (1 x 2) and 6, a square one the squares; 0.5 asks
    # for 3, 8 and 2 tokens
    inputs = qwen_inputs([[(4, 6), (8, 8), (4, 4)]], [(2, 5)], seed=5)
    model = tiny_qwen(version)
    with torch.no_grad(), star.apply(model, method="pool", keep=keep) as pruner:
        logits = model(**inputs).logits
        stats = pruner.stats
    assert stats.totals[0] == [26, sum(per_image)]
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 26 + sum(per_image)
    assert len(kept_of(stats, 0)[0]) == sum(per_image)


@torch.no_grad()
@pytest.mark.parametrize("keep, expected", [(4, 4 + 2 + 2 + 5 * 4), (9, 9 + 2 + 2 + 5 * 9), (16, 16 + 8 + 8 + 5 * 16)])
def test_llava_next_crops_shown_in_part_pool_their_shown_rectangle(keep, expected):
    # the wide image's base crop (4 x 4) and two tiles showing 2 x 4 patches each (keep * 8 / 16 asks for 2, 4, 8:
    # a 2 x 4 grid reaches 2 and 8), then a square image's five whole crops
    model = tiny_llava_next()
    inputs = next_inputs(model, [[(20, 70), (64, 64)]], [(2, 5)], seed=4)
    n_image = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    with star.apply(model, method="pool", keep=keep) as pruner:
        logits = model(**inputs).logits
        stats = pruner.stats
    newlines = n_image - 112
    assert stats.totals[0] == [16 + 8 + 8 + 5 * 16, expected]
    assert logits.shape[1] == inputs["input_ids"].shape[1] - n_image + newlines + expected


@torch.no_grad()
@pytest.mark.parametrize("version", ["2", "2.5", "3", "3.5"])
def test_qwen_prefill_and_generation_equal_the_model_on_an_image_that_small(version):
    """The reference is the model itself, given a prompt with a 2 x 2 grid of image tokens (a 4 x 4-patch image) and
    its tower's output replaced by torch's pooling of the full image's merged tokens (and of Qwen3-VL's DeepStack
    features): its own 3-D positions, its own decode steps."""
    if version == "3.5" and compat.QWEN3_5_MISSING:
        pytest.skip(compat.QWEN3_5_MISSING)
    model = {"3": tiny_qwen3, "3.5": tiny_qwen3_5}.get(version, lambda: tiny_qwen(version))()
    inputs = qwen_inputs([[(8, 8)]], [(3, 4)], seed=7)
    ids = inputs["input_ids"][0].tolist()
    first = ids.index(IMAGE_TOKEN)
    small_ids = torch.tensor([ids[:first] + ids[first + 12 :]])  # the same words around a 2 x 2 grid of merged tokens
    small = {
        "input_ids": small_ids, "attention_mask": torch.ones_like(small_ids), "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "pixel_values": inputs["pixel_values"][:16], **compat.qwen_token_types(small_ids, IMAGE_TOKEN),
    }
    def pool(tokens: torch.Tensor) -> torch.Tensor:  # [16, D] merged tokens of a 4 x 4 grid -> [4, D]
        return F.adaptive_avg_pool2d(tokens.T.reshape(1, -1, 4, 4), (2, 2)).flatten(2)[0].T

    full = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])

    def smaller_image(module, args, output):  # 4.57: a tensor (Qwen3-VL: with its DeepStack list); 5.x: an output
        if isinstance(output, torch.Tensor):
            return pool(full)
        if isinstance(output, tuple):
            return pool(full[0]), [pool(d) for d in full[1]]
        output.pooler_output = pool(full.pooler_output)
        if getattr(output, "deepstack_features", None) is not None:
            output.deepstack_features = [pool(d) for d in full.deepstack_features]
        return output

    handle = model.model.visual.register_forward_hook(smaller_image)
    try:
        expected = model(**small).logits[0, -1]
        expected_tokens = model.generate(**small, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0, -4:]
    finally:
        handle.remove()
    with star.apply(model, method="pool", keep=4) as pruner:
        assert pruner.positions == "contiguous"
        logits = model(**inputs).logits[0, -1]
        tokens = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0, -4:]
    assert (logits - expected).abs().max() < 1e-4
    assert tokens.tolist() == expected_tokens.tolist()


@torch.no_grad()
def test_gemma4_images_give_their_token_grids_row_major_and_keep_the_grid_of_their_own_aspect():
    """Gemma 4's images at their own aspect (h x w patches, pooled k x k = 2 x 2 by the tower): each view's grid is
    (h / 2, w / 2), the order of its tokens the row-major one the tower pools patches into (`token_of`), and pool
    keeps each image's nearest grid: 2 x 3 and 3 x 2 reach 2 (1 x 2, 2 x 1) for keep=1, 1 x 2 keeps 2."""
    if compat.GEMMA4_MISSING:
        pytest.skip(compat.GEMMA4_MISSING)
    from test_gemma4 import gemma4_inputs, tiny_gemma4

    model = tiny_gemma4()
    grids = [(4, 6), (6, 4), (2, 4)]
    inputs = gemma4_inputs([grids], [(2, 5)], seed=5)
    with star.apply(model, method="pool", keep=1) as pruner:
        encoded = pruner.adapter.encode_prompts(inputs, inputs["input_ids"], layout_of(pruner, inputs))
        logits = model(**inputs).logits
        stats = pruner.stats
    for group, (h, w) in zip(encoded.groups, grids):
        assert group.view.grid == (h // 2, w // 2)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        assert group.view.token_of.tolist() == ((ys // 2) * (w // 2) + xs // 2).flatten().tolist()
    assert stats.totals[0] == [6 + 6 + 2, 2 + 2 + 2]
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 14 + 6

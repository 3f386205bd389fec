"""SparseVLM: exact budgets with merged tokens, batch rows independent of each other, and its two pieces
(rater choice, recycling) on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

import star
from conftest import N_VISUAL, batch, prompt_ids, tiny_llava
from star.methods.sparsevlm import SparseVLM, choose_raters, recycle

PROMPTS = [prompt_ids(3, 6, seed=1), prompt_ids(7, 4, seed=2), prompt_ids(1, 9, seed=3)]


@torch.no_grad()
@pytest.mark.parametrize(
    "options", [
        {}, {"layers": (1, 3)}, {"recycle_ratio": 0.0}, {"recycle_ratio": 1.0, "cluster_size": 2},
        {"counts": "geometric"}, {"budget": "average"},
    ]
)
@pytest.mark.parametrize("keep", [1, 2, 5, 9, 15])
def test_every_stage_keeps_exactly_its_budget(model, keep, options):
    prompt = PROMPTS[2]
    with star.apply(model, method="sparsevlm", keep=keep, **options) as pruner:
        logits = model(**batch([prompt])).logits
        stats = pruner.stats
    # each layer's output is pruned: the cut comes before the next layer, ranked by the pruned layer's attention
    assert [(s.score_layer, s.layer) for s in pruner.plan.llm_stages] == [(l, l + 1) for l in options.get("layers", (0, 2, 4))]
    assert stats.tokens == [N_VISUAL, N_VISUAL, *(s.keep for s in pruner.plan.llm_stages)]
    if options.get("budget") != "average":
        assert stats.tokens[-1] == keep
    assert logits.shape[1] == len(prompt) - N_VISUAL + stats.tokens[-1]
    for patches, count in zip(stats.kept_patches[1:], stats.tokens[2:]):
        assert patches.shape == (1, count)
        assert bool((patches[:, 1:] > patches[:, :-1]).all())


def test_budget_split_fills_every_stage():
    method = SparseVLM()
    assert method.split(576, 309) == 300  # the code's first stage at its "192" setting: 300 kept + 9 merged
    for n in range(1, 200):
        for k in range(1, n + 1):
            kept = method.split(n, k)
            assert 0 <= kept <= k
            assert kept + method.clusters(n - kept) == k or (kept == 0 and method.clusters(n) > k)


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_batch_of_different_lengths_equals_each_prompt_alone(model, positions):
    inputs = batch(PROMPTS)
    with star.apply(model, method="sparsevlm", keep=5, positions=positions) as pruner:
        together = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)[:, -4:]
        prefill = model(**inputs).logits[:, -1]
        batch_patches = pruner.stats.kept_patches
        for row, prompt in enumerate(PROMPTS):
            single = batch([prompt])
            single["pixel_values"] = inputs["pixel_values"][row : row + 1]
            alone = model.generate(**single, max_new_tokens=4, do_sample=False, min_new_tokens=4)[:, -4:]
            assert together[row].tolist() == alone[0].tolist()
            assert (model(**single).logits[0, -1] - prefill[row]).abs().max() < 1e-4
            for stage, patches in enumerate(pruner.stats.kept_patches):
                assert torch.equal(patches[0], batch_patches[stage][row])


def test_raters_stand_out_in_similarity_to_the_image():
    visual = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(3, 2, 2)
    text = torch.tensor([
        [[5.0, 0.0], [0.0, 0.0], [5.0, 0.0]],  # two tokens like the image, one unlike it
        [[9.0, 0.0], [5.0, 0.0], [0.0, 0.0]],  # the first is another row's length (left padding): never a rater
        [[9.0, 0.0], [9.0, 0.0], [1.0, 0.0]],  # one own token: nothing stands out, so it rates
    ])
    own = torch.tensor([[True, True, True], [False, True, True], [False, False, True]])
    raters = choose_raters(visual, text, own)
    assert raters.tolist() == [[True, False, True], [False, True, False], [False, False, True]]


def test_recycling_merges_the_top_deleted_tokens_by_cluster():
    states = torch.tensor([[0.0, 0.0], [10.0, 10.0], [0.2, 0.0], [10.2, 10.0], [0.0, 0.2], [10.0, 10.2]])
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.05])
    slots, merged = recycle(states, scores, recycled=5, clusters=2)  # token 5 scores lowest: not recycled
    order = slots.argsort()
    assert slots[order].tolist() == [1, 2]  # each cluster's highest-scored member
    assert torch.allclose(merged[order[0]], states[[1, 3]].mean(dim=0))
    assert torch.allclose(merged[order[1]], states[[0, 2, 4]].mean(dim=0))


def test_default_layers_scale_with_depth_and_bad_options_fail():
    assert [s.score_layer for s in SparseVLM().plan(576, 64, 32).llm_stages] == [2, 6, 15]
    assert [s.score_layer for s in SparseVLM().plan(576, 64, 40).llm_stages] == [2, 7, 18]
    assert [s.score_layer for s in SparseVLM().plan(576, 64, 12).llm_stages] == [0, 2, 5]
    model = tiny_llava()
    for options, message in [
        ({"layers": (2, 1)}, "increase by at least 2"),
        ({"layers": (1, 2)}, "increase by at least 2"),
        ({"layers": (1, 5)}, "5 is not a layer whose output can be pruned"),
        ({"budget": "mean"}, "budget='mean' is unknown"),
        ({"counts": "geometric", "budget": "average"}, "only counts='official'"),
        ({"recycle_ratio": 1.5}, "recycle_ratio"),
        ({"cluster_size": 0}, "cluster_size"),
    ]:
        with pytest.raises(ValueError, match=message):
            star.apply(model, method="sparsevlm", keep=4, **options)

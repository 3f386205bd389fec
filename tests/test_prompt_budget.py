"""FLOPs budgets picked per prompt, at prefill (star.schedule.PromptBudget): each prefill costs at most the
asked fraction of its own unpruned prefill and uses it where a setting reaches it, alone or in a batch; STAR
raises its stage-1 ratio before it refuses, and the refusal names the prompt."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN, N_VISUAL, batch, left_pad, prompt_ids, tiny_llava
from families import assert_batch_equals_each_alone
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import star
from star.bench import host_reads
from star.flops import DecoderShape, layer_flops
from star.methods import build
from star.schedule import STAR_STAGE1_RATIO, BudgetUnreachable, Point, PromptBudget, Schedule, by_formula, flops_ratio, shape_key

VISUAL = 576  # 96 px images of 4 px patches, as many tokens as LLaVA-1.5's
LAYERS = 6
SHORT, LONG = 6, 150  # text tokens: far below and far above the 79 a fixed pick assumes


@pytest.fixture(scope="module")
def model() -> LlavaForConditionalGeneration:
    return llava_576()


def llava_576() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=96, patch_size=4, projection_dim=16)
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=1024, pad_token_id=0,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2)
    config._attn_implementation = "sdpa"
    built = LlavaForConditionalGeneration(config).eval()
    built.generation_config.pad_token_id = 0
    return built


def prompt(n_text: int, seed: int) -> list[int]:
    """A prompt of n_text text tokens around one image: two before it, the question after."""
    ids = torch.randint(1, IMAGE_TOKEN - 1, (n_text,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ids[:2] + [IMAGE_TOKEN] * VISUAL + ids[2:]


def inputs_of(prompts: list[list[int]], seed: int = 0) -> dict:
    pixels = torch.randn(len(prompts), 3, 96, 96, generator=torch.Generator().manual_seed(seed))
    return {**left_pad(prompts), "pixel_values": pixels}


def unpruned_flops(shape: DecoderShape, tokens: int) -> float:
    """The unpruned prefill's FLOPs by the paper's formula, every layer over every token."""
    return shape.num_layers * layer_flops(shape, tokens)


def used(model, n_text: int, **budget) -> tuple[float, Point]:
    """The prefill's FLOPs over its unpruned FLOPs, and the setting it was given."""
    shape = DecoderShape.from_config(model.config.text_config)
    with star.apply(model, **budget) as pruner:
        with torch.no_grad():
            model(**inputs_of([prompt(n_text, seed=n_text)]))
        stats = pruner.stats
    return stats.flops / unpruned_flops(shape, n_text + VISUAL), stats.picks[0] if stats.picks else None


@pytest.mark.parametrize("n_text", [SHORT, LONG])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_each_prefill_costs_at_most_its_budget_and_uses_it(model, n_text, fraction):
    ratio, pick = used(model, n_text, flops=fraction)
    assert fraction - 0.02 <= ratio <= fraction
    assert pick.flops == pytest.approx(ratio, rel=1e-9)


def test_a_fixed_pick_for_79_text_tokens_overshoots_a_long_prompt_and_underuses_a_short_one(model):
    """What text_tokens= (the pick once, at apply) does, which the per-prompt pick above does not."""
    long, pick = used(model, LONG, flops=0.3, text_tokens=79)
    short, _ = used(model, SHORT, flops=0.3, text_tokens=79)
    assert pick is None and long > 0.3 + 0.02 and short < 0.3 - 0.02


def test_a_batch_of_a_short_and_a_long_prompt_gives_each_the_setting_it_gets_alone(model):
    """At 0.3 the two prompts cut at different layers (the batch cuts at both, each prompt at its own); at 0.15
    the long one raises its stage-1 ratio, the short one does not."""
    prompts = [prompt(SHORT, seed=1), prompt(LONG, seed=2)]
    inputs = inputs_of(prompts)
    for fraction, differs in [(0.3, "layer"), (0.15, "stage1_ratio")]:
        with star.apply(model, flops=fraction) as pruner, torch.no_grad():
            model(**inputs)
            short, long = pruner.stats.picks
        assert short.options[differs] != long.options[differs] and max(short.flops, long.flops) <= fraction

        def alone(row):
            return {**left_pad([prompts[row]]), "pixel_values": inputs["pixel_values"][row : row + 1]}

        with torch.no_grad():
            assert_batch_equals_each_alone(model, inputs, "star", None, alone, flops=fraction)


def test_star_raises_its_stage1_ratio_where_its_least_setting_costs_more(model):
    shape = DecoderShape.from_config(model.config.text_config)
    least = build("star", layer=1, stage1_ratio=STAR_STAGE1_RATIO).plan(VISUAL, 1, LAYERS)
    assert flops_ratio(shape, least, LONG) > 0.15  # the paper's stage 1 cannot reach it
    ratio, pick = used(model, LONG, flops=0.15)
    assert pick.options["stage1_ratio"] > STAR_STAGE1_RATIO and 0.15 - 0.02 <= ratio <= 0.15


def test_a_budget_no_setting_reaches_for_a_prompt_is_refused_naming_it(model):
    """0.1 is reached by the short prompt (and at apply, by a prompt without text), not by the long one."""
    shape = DecoderShape.from_config(model.config.text_config)
    least = flops_ratio(shape, build("star", layer=1, stage1_ratio=0.5).plan(VISUAL, 1, LAYERS), LONG)
    assert least > 0.1
    with star.apply(model, flops=0.1), torch.no_grad():
        with pytest.raises(BudgetUnreachable, match=(
            r"prompt 1 of the batch \(150 text tokens, 1 image\(s\) of 576 visual tokens\): flops=0.1 is below what "
            rf"star reaches on this model: its least is {least:.3f}, at keep=1, layer=1, stage1_ratio=0.5"
        )):
            model(**inputs_of([prompt(SHORT, seed=1), prompt(LONG, seed=2)]))
    with pytest.raises(BudgetUnreachable, match=r"flops=0.05 is below what star reaches on this model"):
        star.apply(model, flops=0.05)  # no prompt reaches it: refused before any compute
    assert getattr(model, "_star_pruner", None) is None


def test_a_budget_only_short_prompts_reach_is_taken_at_apply():
    """16 visual tokens beside 79 text ones cannot reach 0.5 (the pick at apply refused it); 6 text tokens can."""
    small = tiny_llava()
    shape = DecoderShape.from_config(small.config.text_config)
    with pytest.raises(BudgetUnreachable):
        by_formula("star", {}, shape, N_VISUAL, 79, 0.5)
    with star.apply(small, flops=0.5) as pruner, torch.no_grad():
        small(**batch([prompt_ids(2, 4, seed=0)]))
        assert pruner.stats.flops / unpruned_flops(shape, 6 + N_VISUAL) <= 0.5


def test_a_schedule_is_re_costed_for_each_prompt():
    """A schedule's FLOPs were measured at its prompts' length; per prompt, each point costs what it costs there."""
    shape = DecoderShape.from_config(tiny_llava().config.text_config)
    points = (
        Point(keep=16, options={"stage1_ratio": 0}, flops=1.0, accuracy=0.9),
        Point(keep=8, options={"layer": 1, "stage1_ratio": 0}, flops=0.6, accuracy=0.8),
        Point(keep=2, options={"layer": 1, "stage1_ratio": 0.5}, flops=0.4, accuracy=0.5),
    )
    schedule = Schedule("star", shape_key(shape, N_VISUAL), 20, points, "a test schedule")
    budget = PromptBudget("star", {}, 0.7, shape, N_VISUAL, schedule)
    for n_text in (2, 20, 200):
        affordable = [p for p in points if flops_ratio(shape, build("star", **p.options).plan(N_VISUAL, p.keep, shape.num_layers), n_text) <= 0.7]
        if affordable:
            assert budget.pick(n_text).keep == affordable[0].keep
        else:
            with pytest.raises(BudgetUnreachable):
                budget.pick(n_text)
    assert budget.pick(2).keep == 8 and budget.pick(20).keep != budget.pick(2).keep


def test_a_per_prompt_prefill_reads_back_once(model):
    """The picks come from the layout's one read (tests/test_host_syncs.py), here with rows cutting at two layers."""
    inputs = inputs_of([prompt(SHORT, seed=1), prompt(LONG, seed=2)])
    with torch.no_grad():
        unpruned = host_reads(lambda: model(**inputs))
        with star.apply(model, flops=0.3) as pruner:
            model(**inputs)
            pruned = host_reads(lambda: model(**inputs))
            assert len(pruner.stats.layers) == 2
    assert sum(pruned.values()) <= sum(unpruned.values()) + 1, (pruned, unpruned)
    assert pruned["tolist"] == 1 and pruned["aten::nonzero"] == 0, pruned


def gemma3_case():
    from families import IMAGE_TOKEN as GEMMA_IMAGE
    from families import gemma_inputs, tiny_gemma3

    inputs = gemma_inputs([2, 1], [(2, 3), (4, 1)])

    def alone(row):
        single = left_pad([inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()])
        pixels = inputs["pixel_values"][[0, 1] if row == 0 else [2]]
        return {**single, "pixel_values": pixels, "token_type_ids": (single["input_ids"] == GEMMA_IMAGE).long()}

    return tiny_gemma3(), inputs, alone


def internvl_case():
    from tiled_families import internvl_inputs, rows_alone, tiny_internvl

    inputs = internvl_inputs([[2], [1]], [(2, 3), (4, 1)])
    return tiny_internvl(), inputs, lambda row: rows_alone(inputs, [row], [2, 1])


@pytest.mark.parametrize("case", [gemma3_case, internvl_case], ids=["gemma3", "internvl"])
def test_prompts_of_several_units_are_costed_with_all_of_them(case):
    """Gemma 3's images and InternVL's tiles: a prompt of two units spends the budget of its own prefill, as one of one does."""
    model, inputs, alone = case()
    shape = DecoderShape.from_config(model.config.get_text_config())
    with torch.no_grad():
        for row in range(2):
            single = alone(row)
            with star.apply(model, flops=0.7) as pruner:
                model(**single)
                stats = pruner.stats
            ratio = stats.flops / unpruned_flops(shape, single["input_ids"].shape[1])
            assert 0.7 - 0.05 <= ratio <= 0.7 and stats.picks[0].flops == pytest.approx(ratio, rel=1e-9)
        assert_batch_equals_each_alone(model, inputs, "star", None, alone, flops=0.7)


def next_case():
    from families import next_inputs, select_rows, tiny_llava_next

    model = tiny_llava_next()
    sizes = [[(20, 70)], [(64, 64)], [(40, 70), (20, 70)]]  # a 1 x 2 grid shown in half, a full 2 x 2 one, both
    inputs = next_inputs(model, sizes, [(2, 3), (3, 12), (1, 2)], seed=2)
    return model, inputs, lambda row: select_rows(inputs, [row], [len(s) for s in sizes])


def onevision_case():
    from tiled_families import onevision_inputs, rows_alone, tiny_onevision

    model = tiny_onevision()
    sizes = [[(20, 70)], [(64, 64)], [(40, 70), (20, 70)]]  # a grid shown in half, one resized, two base crops
    inputs = onevision_inputs(model, sizes, [(2, 3), (3, 12), (1, 2)], seed=2)
    return model, inputs, lambda row: rows_alone(inputs, [row], [len(s) for s in sizes])


@pytest.mark.parametrize("case", [next_case, onevision_case], ids=["llava-next", "llava-onevision"])
def test_units_of_their_own_sizes_are_costed_per_prompt(case):
    """LLaVA-NeXT's and LLaVA-OneVision's units differ in size (a tile grid keeps its share of keep, newline tokens
    stay and count as text): each prompt spends at most its own budget, the FLOPs its pick predicts are those its
    prefill counts, prompts of other layouts and lengths get other settings, and a batch gives each what it gets alone."""
    model, inputs, alone = case()
    shape = DecoderShape.from_config(model.config.get_text_config())
    picks = []
    with torch.no_grad():
        for row in range(3):
            single = alone(row)
            with star.apply(model, flops=0.7) as pruner:
                model(**single)
                stats = pruner.stats
            ratio = stats.flops / unpruned_flops(shape, single["input_ids"].shape[1])
            assert 0.7 - 0.06 <= ratio <= 0.7 and stats.picks[0].flops == pytest.approx(ratio, rel=1e-9)
            picks.append((stats.picks[0].keep, stats.picks[0].options))
        assert len({str(pick) for pick in picks}) > 1, picks
        assert_batch_equals_each_alone(model, inputs, "star", None, alone, flops=0.7)
        assert_batch_equals_each_alone(model, inputs, "fastv", None, alone, flops=0.7)

"""resize: the image made smaller before the processor, so that a dynamic-resolution encoder emits about keep tokens."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, Qwen2VLImageProcessor

from conftest import tiny_llava
from families import qwen_processor, tiny_qwen, tiny_qwen3_5
from star import compat, synthetic
from star.cli.args import settings
from star.resize import check_model, resize_image, resized_size


@pytest.mark.parametrize(
    "size, keep, expected",
    [
        ((448, 448), 64, (224, 224)),  # 16 x 16 tokens of 28 px to 8 x 8
        ((280, 560), 50, (140, 280)),  # 10 x 20 to 5 x 10: the aspect kept
        ((448, 448), 0.25, (224, 224)),  # a fraction of the image's own 256
        ((448, 448), 1000, (448, 448)),  # never larger than the image
        ((100, 3000), 1, (28, 140)),  # one row at least: 1 x 5 tokens, the columns scaled as they would be
    ],
)
def test_resized_size_is_about_keep_tokens_of_the_same_aspect(size, keep, expected):
    assert resized_size(*size, keep, 28) == expected


@pytest.mark.parametrize("patch, keep, image, tokens", [(14, 64, (448, 448), 64), (14, 50, (560, 280), 50), (16, 36, (640, 640), 36)])
def test_the_processor_encodes_the_resized_image_into_keep_tokens(patch, keep, image, tokens):
    """Qwen2-VL's image processor itself (14 px patches; Qwen3-VL's 16 px), run on the resized image."""
    processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=2)
    resized = resize_image(Image.new("RGB", image, (10, 200, 30)), processor, keep)
    grid = processor(images=[resized], return_tensors="pt")["image_grid_thw"][0]
    assert int(grid.prod()) // 4 == tokens


def test_fixed_resolution_processors_and_models_are_refused():
    with pytest.raises(ValueError, match="CLIPImageProcessor.*fixed size"):
        resize_image(Image.new("RGB", (64, 64)), CLIPImageProcessor(), 16)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration.*16 tokens each"):
        check_model(tiny_llava())
    check_model(tiny_qwen())
    if not compat.GEMMA4_MISSING:
        from test_gemma4 import tiny_gemma4

        with pytest.raises(ValueError, match="Gemma4ForConditionalGeneration's processor scales every image.*max_soft_tokens"):
            check_model(tiny_gemma4())
    with pytest.raises(ValueError, match="--flops is given with resize"):
        settings(["none", "resize"], [], [], flops=[0.3])


@torch.no_grad()
def test_synthetic_prompt_of_a_smaller_image_runs_the_unpruned_model():
    model = tiny_qwen()
    full = synthetic.synthetic_inputs(model, 1, text_tokens=6)
    small = synthetic.synthetic_inputs(model, 1, text_tokens=6, resize=64)
    assert int(full["image_grid_thw"].prod()) // 4 == 576 and int(small["image_grid_thw"].prod()) // 4 == 64
    assert model(**small).logits.shape[1] == full["input_ids"].shape[1] - 576 + 64


@torch.no_grad()
def test_a_smaller_image_runs_qwen3_5_unpruned():
    """Qwen3.5 sees each image at its own resolution too (Qwen3-VL's tower): resize runs there."""
    if compat.QWEN3_5_MISSING:
        pytest.skip(compat.QWEN3_5_MISSING)
    model = tiny_qwen3_5()
    full = synthetic.synthetic_inputs(model, 1, text_tokens=6)
    small = synthetic.synthetic_inputs(model, 1, text_tokens=6, resize=64)
    assert int(small["image_grid_thw"].prod()) // 4 == 64
    assert model(**small).logits.shape[1] == full["input_ids"].shape[1] - int(full["image_grid_thw"].prod()) // 4 + 64


def test_eval_answers_resize_beside_the_unpruned_model_on_smaller_images(tmp_path):
    """star eval's loop with a Qwen2-VL and its processor (4 px patches, 2 x 2 merge: 8 px a token): 32 px images
    give 16 tokens, resized to 16 px for keep=4 they give 4, and the decoder's FLOPs fall with them."""
    from star.eval.records import read_jsonl
    from star.eval.runner import Setting, evaluate
    import json

    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    rows = [{"image": "red.png", "question": "what color is the w20 ?", "answer": "red", "type": "color"},
            {"image": "blue.png", "question": "what color is the w21 ?", "answer": "blue", "type": "color"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    records, _ = read_jsonl(tmp_path / "data.jsonl")
    model = tiny_qwen()
    model.generation_config.eos_token_id = 3
    summary, skipped = evaluate(model, qwen_processor(), records, [Setting("none", 1.0), Setting("resize", 4)], tmp_path / "out",
                                batch_size=2, max_new_tokens=2, progress=False)
    none, resized = summary["settings"]
    assert not skipped and none["n"] == resized["n"] == 2
    assert none["tokens"] == [16, 16] and resized["tokens"] == [4, 4]
    assert resized["flops"] < none["flops"]

"""lmms-eval end to end, offline: the `star` backend on a local task scores as `star eval` does, answer by answer.

The model is the project's default model when it is already built (cached), else the tiny saved checkpoint,
so the test stays fast on a fresh machine. Skipped only when lmms-eval is not installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import star
from star.integrations import LMMS_MISSING

pytest.importorskip("lmms_eval", reason=LMMS_MISSING)

from conftest import llava_style_processor, save_checkpoint, tiny_checkpoint, tiny_tokenizer  # noqa: E402
from families import CROP, qwen_processor  # noqa: E402
from star.cli import main as star_main  # noqa: E402
from star.eval import answers  # noqa: E402
from star.data.scenes import scene_records  # noqa: E402
from star.integrations import lmms_eval as backend  # noqa: E402

TASK = "star_scenes_local"
PER_TYPE = 4
BATCH = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, int]:
    """(path, keep): the default model if it is cached, else the tiny checkpoint."""
    from star.zoo import CacheError
    from star.zoo.default_model import _base_inputs, cache_dir, check_cache, sha256_file, TRAINED_WEIGHTS

    directory = cache_dir(None, "default")
    try:
        check_cache(directory, {**_base_inputs(), "trained_weights": sha256_file(TRAINED_WEIGHTS)})
        return str(directory), 39
    except (CacheError, OSError):
        return tiny_checkpoint(tmp_path_factory.mktemp("tiny")), 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Fixed test-split scene questions as a `star eval` JSONL file, images beside it."""
    folder = tmp_path_factory.mktemp("scenes")
    lines = []
    for record in scene_records("test", PER_TYPE):
        record.image.save(folder / f"{record.id}.png")
        row = {"id": record.id, "image": f"{record.id}.png", "question": record.question, "answer": record.answer, "type": record.type}
        lines.append(json.dumps(row) + "\n")
    path = folder / "scenes.jsonl"
    path.write_text("".join(lines))
    return path


def test_lmms_eval_scores_like_star_eval(checkpoint, data, tmp_path, monkeypatch):
    path, keep = checkpoint
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the wrapper hands lmms-eval its arguments there

    assert star_main(["eval", "--model", path, "--data", str(data), "--methods", "star", "--keep", str(keep),
                      "--batch-size", str(BATCH), "--max-new-tokens", "8", "--out", str(tmp_path / "star")]) == 0
    ours = answers.read(tmp_path / "star").rows[f"star-{keep}"]
    summary = json.loads((tmp_path / "star" / "results.json").read_text())["settings"][0]

    backend.write_task(data, tmp_path / "task", TASK, max_new_tokens=8)
    assert backend.main([
        "--model_args", f"pretrained={path},method=star,keep={keep},dtype=float32", "--device", "cpu",
        "--tasks", TASK, "--include_path", str(tmp_path / "task"), "--batch_size", str(BATCH),
        "--log_samples", "--output_path", str(tmp_path / "lmms"),
    ]) == 0

    [results_file] = (tmp_path / "lmms").rglob("*_results.json")
    [samples_file] = (tmp_path / "lmms").rglob(f"*_samples_{TASK}.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    ids = [json.loads(line)["id"] for line in data.read_text().splitlines()]
    assert len(samples) == len(ids) == summary["n"]
    for sample in samples:
        row = ours[ids[sample["doc_id"]]]
        [counts] = sample["token_counts"]
        assert sample["filtered_resps"] == row["prediction"], ids[sample["doc_id"]]
        assert sample["accuracy"] == float(row["correct"])
        assert counts["visual_tokens"] == row["tokens"] and counts["visual_tokens"][-1] == keep
        assert counts["prefill_flops"] == pytest.approx(row["flops"], rel=1e-9)
    accuracy = json.loads(results_file.read_text())["results"][TASK]["accuracy,none"]
    assert accuracy == pytest.approx(summary["accuracy"], abs=1e-12)


def test_bad_model_args_are_refused_before_loading():
    backend.check_model_args(method="star", keep=58, layer=16, stage1_ratio=0.15)
    with pytest.raises(ValueError, match="method"):
        backend.check_model_args(method="nope", keep=58)
    with pytest.raises(ValueError, match="keep"):
        backend.check_model_args(method="star", keep=0)
    with pytest.raises(ValueError, match="template"):
        backend.check_model_args(method="star", keep=58, template="chatml")
    backend.check_model_args(method="pdrop", keep=58, layers="8/16/24")  # spelled as `star --option` spells it
    with pytest.raises(ValueError, match="8/16/24"):
        backend.check_model_args(method="pdrop", keep=58, layers="8;16")


def test_the_backend_is_registered_for_lmms_eval():
    from lmms_eval.models import get_model

    backend.register()
    assert get_model("star") is backend.Star


def test_star_lmms_eval_hands_every_argument_to_lmms_eval(monkeypatch):
    import argparse

    from star.integrations import add_lmms_eval_command

    seen = []
    monkeypatch.setattr(backend, "main", lambda argv: seen.append(argv) or 0)
    parser = argparse.ArgumentParser(prog="star")
    add_lmms_eval_command(parser.add_subparsers(dest="command"))
    argv = ["--model_args", "pretrained=x,method=star,keep=58", "--tasks", "mme", "-h"]
    args = parser.parse_args(["lmms-eval", *argv])
    assert args.run(args) == 0 and seen == [argv]


# -- LLaVA-NeXT and Qwen2-VL checkpoints through the backend, in batches of mixed image sizes ------------

SIZES = [(64, 32), (32, 64), (64, 64), (32, 64)]  # width x height: each batch of 2 mixes sizes (and LLaVA-NeXT grids)


def next_checkpoint(directory) -> str:
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from families import IMAGE_TOKEN, PINPOINTS, tiny_llava_next

    images = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    return save_checkpoint(directory, tiny_llava_next(), llava_style_processor(LlavaNextProcessor, images, IMAGE_TOKEN))


def qwen_checkpoint(directory) -> str:
    from families import tiny_qwen

    return save_checkpoint(directory, tiny_qwen("2"))


FAMILIES = {"llava-next": (next_checkpoint, 6), "qwen2-vl": (qwen_checkpoint, 5)}


@pytest.mark.parametrize("family", FAMILIES)
def test_backend_batches_answer_as_single_prompts(family, tmp_path, monkeypatch):
    """Batch size 2 with mixed image sizes: every answer and token count equals that prompt alone under
    star.apply, and pruning changes at least one answer (a backend that ignored it would fail)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    make, keep = FAMILIES[family]
    path = make(tmp_path / "model")
    if family == "qwen2-vl":  # the checkpoint has no processor of its own: hand the backend the image-only one
        loader = AutoProcessor.from_pretrained
        monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda name, *a, **k: qwen_processor() if name == path else loader(name, *a, **k))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    rows = []
    for number, (width, height) in enumerate(SIZES):
        pixels = (torch.arange(width * height * 3).reshape(height, width, 3) * (number + 7) % 251).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{number}.png")
        rows.append(json.dumps({"id": f"q{number}", "image": f"{number}.png", "question": f"what color is the w{20 + number} ?", "answer": "red"}))
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    backend.write_task(tmp_path / "data.jsonl", tmp_path / "task", TASK, max_new_tokens=4)
    assert backend.main([
        "--model_args", f"pretrained={path},method=star,keep={keep},dtype=float32", "--device", "cpu",
        "--tasks", TASK, "--include_path", str(tmp_path / "task"), "--batch_size", "2",
        "--log_samples", "--output_path", str(tmp_path / "lmms"),
    ]) == 0
    [samples_file] = (tmp_path / "lmms").rglob(f"*_samples_{TASK}.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(samples) == len(SIZES)

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    changed = 0
    for sample in samples:
        number = sample["doc_id"]
        question = f"what color is the w{20 + number} ?\n{backend.QUESTION_SUFFIX}"
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True)
        inputs = processor(images=[Image.open(tmp_path / f"{number}.png").convert("RGB")], text=[prompt], return_tensors="pt")
        answers = {}
        for method, budget in (("none", 1.0), ("star", keep)):
            with star.apply(model, method=method, keep=budget) as pruner, torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
                answers[method] = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                totals = list(pruner.stats.totals[0])
        [counts] = sample["token_counts"]
        assert sample["filtered_resps"] == answers["star"], (family, number)
        assert counts["visual_tokens"] == totals, (family, number)
        assert totals[-1] == expected_total(family, keep, totals[0]) < totals[0]
        changed += answers["star"] != answers["none"]
    assert changed, "pruning changed no answer: the test could not tell a backend that ignores it"


def expected_total(family: str, keep: int, encoder_tokens: int) -> int:
    """The last stage's visual tokens, by hand: Qwen2-VL keeps `keep` per image; LLaVA-NeXT keeps `keep` per
    16-token crop (base crop and tiles; these sizes show whole crops, so the encoder's tokens count them)."""
    if family == "qwen2-vl":
        return keep
    assert encoder_tokens % CROP == 0, f"{encoder_tokens} tokens: the test's sizes are meant to show whole crops"
    return keep * encoder_tokens // CROP

"""Score a LLaVA model on scene and easy-VQA questions: greedy answers, normalised exact match, per type.

Each type is reported with its sample size and its majority-answer level (the score of always giving the
most common answer), so that a figure can be told apart from guessing.

    .venv/bin/python -m star.data.evaluate --scenes 200 --easyvqa 200 --out docs/training/test.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from star.data.vqa import exact_match

QUESTION_SUFFIX = "Answer the question using a single word or phrase."


def prompt(processor, question: str) -> str:
    """The default model's prompt: chat template, the image, the question, the short-answer cue."""
    content = [{"type": "image"}, {"type": "text", "text": f"{question}\n{QUESTION_SUFFIX}"}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@torch.no_grad()
def answer(model, processor, records: list, batch_size: int = 8, max_new_tokens: int = 5, progress: bool = True) -> list[str]:
    """Greedy answers through the standard route: processor, then `model.generate` (left padding)."""
    processor.tokenizer.padding_side = "left"
    answers: list[str] = []
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc="answer", disable=not progress):
        chunk = records[start : start + batch_size]
        inputs = processor(
            images=[r.image for r in chunk], text=[prompt(processor, r.question) for r in chunk], return_tensors="pt", padding=True
        ).to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += [a.strip() for a in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]
    return answers


def score(records: list, predictions: list[str]) -> dict[str, dict[str, float]]:
    """Per type (and "overall"): accuracy, sample size n, and the majority-answer level."""
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    groups: dict[str, list[tuple[str, bool]]] = {}
    for record, prediction in zip(records, predictions):
        mark = (record.answer, exact_match(prediction, record.answer))
        groups.setdefault(record.type, []).append(mark)
        groups.setdefault("overall", []).append(mark)
    result = {}
    for kind, marks in groups.items():
        majority = Counter(a for a, _ in marks).most_common(1)[0][1]
        result[kind] = {"accuracy": sum(m for _, m in marks) / len(marks), "n": len(marks), "majority": majority / len(marks)}
    return result


def easyvqa_subset(per_type: int, split: str = "test") -> list:
    """`per_type` color and `per_type` shape questions of easy-VQA, spread evenly over the split."""
    from star.data.easyvqa import load_easyvqa

    records = load_easyvqa(split)
    picked = []
    for kind in ("color", "shape"):
        of_kind = [r for r in records if r.type == kind]
        picked += of_kind[:: max(1, len(of_kind) // per_type)][:per_type]
    return picked


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from star.data.scenes import scene_records
    from star.zoo import build_default_model

    parser = argparse.ArgumentParser(description="Score the default model (or --model) on the test splits.")
    parser.add_argument("--model", type=Path, help="a saved LLaVA directory; default: the default model")
    parser.add_argument("--scenes", type=int, default=200, help="scene questions per type (test split)")
    parser.add_argument("--easyvqa", type=int, default=200, help="easy-VQA color and shape questions each (test split)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    path = args.model or build_default_model()
    model = LlavaForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    result = {}
    for name, records in (("scenes", scene_records("test", args.scenes)), ("easy-vqa", easyvqa_subset(args.easyvqa))):
        result[name] = score(records, answer(model, processor, records, args.batch_size))
        for kind, row in result[name].items():
            print(f"{name:8s} {kind:10s} {row['accuracy']:6.1%}  n={row['n']:4d}  majority {row['majority']:.1%}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

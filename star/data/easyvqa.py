"""easy-VQA (64x64 shapes, 13 answers) read straight from its pinned wheel, which is never installed.

Each question gets a type: `color` and `shape` questions show whether the model sees; `yes/no` questions are
answered 83% correctly from their wording alone, so they are never evidence that it does.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from star.zoo.default_model import WHEELS, fetch_wheel

SPLITS = ("train", "test")
COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
SHAPES = {"circle", "rectangle", "triangle"}


@dataclass(frozen=True)
class EasyVQARecord:
    """One question; the fields follow star.eval.records.Record, `image_id` names the picture in its split."""

    id: str
    image: Image.Image
    question: str
    answer: str
    type: str
    image_id: int


def question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    raise ValueError(f"answer={answer!r} is not one of easy-VQA's 13 answers")


def load_easyvqa(split: str = "test", home: Path | str | None = None, wheel: Path | str | None = None) -> list[EasyVQARecord]:
    """Every question of `split`, in the file's order, with its image (decoded once per picture)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not an easy-VQA split: choose one of {SPLITS}")
    root = WHEELS["easy-vqa"].member + split
    with zipfile.ZipFile(wheel or fetch_wheel("easy-vqa", home)) as archive:
        rows = json.loads(archive.read(f"{root}/questions.json"))
        images: dict[int, Image.Image] = {}
        records = []
        for number, (question, answer, image_id) in enumerate(rows):
            if image_id not in images:
                with Image.open(io.BytesIO(archive.read(f"{root}/images/{image_id}.png"))) as picture:
                    images[image_id] = picture.convert("RGB")
            records.append(EasyVQARecord(
                f"easy-vqa-{split}-{number}", images[image_id], question, answer, question_type(answer), image_id,
            ))
    return records

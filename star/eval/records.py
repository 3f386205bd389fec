"""Evaluation records: an image, a question, its answer, and a question type to report by.

A user's own data is a JSONL file with one {"image", "question", "answer"} object per line (an optional
"type"), image paths relative to the file. A bad line never stops a run: it is skipped and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

QUESTION_SUFFIX = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class Record:
    id: str
    image: Path | Image.Image = field(repr=False)
    question: str
    answer: str
    type: str = "all"

    def open_image(self) -> Image.Image:
        """The record's image as RGB; a RecordError names the record when it cannot be read."""
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        try:
            with Image.open(self.image) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as error:
            raise RecordError(f"record {self.id}: image {self.image} cannot be read ({error})") from error


class RecordError(ValueError):
    """A record that cannot be evaluated; the run skips it and reports it at the end."""


def read_jsonl(path: Path) -> tuple[list[Record], list[str]]:
    """The records of a JSONL file, and a message for each line that was skipped (naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data={str(path)!r} is not a file: give scenes, easy-vqa or a JSONL file")
    records, skipped = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            skipped.append(f"{where}: not JSON ({error.msg})")
            continue
        missing = [key for key in ("image", "question", "answer") if not isinstance(row, dict) or key not in row]
        if missing:
            skipped.append(f"{where}: missing field {', '.join(missing)}")
            continue
        image = (path.parent / str(row["image"])).resolve()
        if not image.is_file():
            skipped.append(f"{where}: image {row['image']} not found")
            continue
        record_id = str(row.get("id", f"line{number}"))
        records.append(Record(record_id, image, str(row["question"]), str(row["answer"]), str(row.get("type", "all"))))
    if not records:
        raise ValueError(f"data={str(path)!r} holds no usable record" + (f": {skipped[0]}" if skipped else " (empty)"))
    return records, skipped

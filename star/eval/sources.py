"""Where evaluation records come from: the scene generator, easy-VQA, or a user's JSONL file."""

from __future__ import annotations

from pathlib import Path

from star.eval.records import Record, read_jsonl

BUILT_IN = ("scenes", "easy-vqa")
SCENES_PER_TYPE = 200


def load_records(data: str, split: str = "test", limit: int | None = None) -> tuple[list[Record], list[str]]:
    """The records of `data` and the messages of any skipped lines; `limit` caps them (scenes: per type)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be at least 1")
    if data not in BUILT_IN:
        records, skipped = read_jsonl(Path(data))
        return records[:limit], skipped
    if data == "scenes":
        from star.data.scenes import scene_records

        built_in = scene_records(split, per_type=limit or SCENES_PER_TYPE)
    else:
        from star.data.easyvqa import load_easyvqa

        built_in = load_easyvqa(split)[:limit]
    return [Record(r.id, r.image, r.question, r.answer, r.type) for r in built_in], []

"""Where evaluation records come from: the scene generator, easy-VQA, or a user's JSONL file."""

from __future__ import annotations

from pathlib import Path

from star.eval.records import Record, read_jsonl

BUILT_IN = ("scenes", "easy-vqa")
SCENES_PER_TYPE = 200


def load_records(data: str, split: str = "test", limit: int | None = None, types: list[str] | None = None) -> tuple[list[Record], list[str]]:
    """The records of `data` and the messages of any skipped lines. `types` keeps only those question types
    (each must occur); `limit` caps the records, per type where types are given and for the scenes."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be at least 1")
    records, skipped = _load(data, split, limit if data == "scenes" or not types else None)
    if types:
        present = sorted({r.type for r in records})
        unknown = [t for t in types if t not in present]
        if unknown:
            raise ValueError(f"types={unknown[0]!r} does not occur in {data}: its types are {', '.join(present)}")
        records = [r for t in types for r in [r for r in records if r.type == t][:limit]]
    return records, skipped


def _load(data: str, split: str, limit: int | None) -> tuple[list[Record], list[str]]:
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

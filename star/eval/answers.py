"""A results folder's answers in one file, OUT/answers.jsonl.gz, beside its table.

`star eval` appends each answer to OUT/runs/<setting>/rank<r>.jsonl as soon as its batch is done, so that an
interrupted run loses nothing. Those files, hundreds per folder, would bury the code in the repository, so a
finished run packs them and each setting's setting.json into one gzip of JSON lines and removes them. Readers take
the pack and any loose files together, so a packed folder resumes with more questions and packs again.

A line is a setting's definition, {"setting": name, "definition": its setting.json}, or one answer,
{"setting": name, "rank": r, "row": the line of rank<r>.jsonl}; `zcat answers.jsonl.gz | jq` reads it.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PACK = "answers.jsonl.gz"


@dataclass(frozen=True)
class Answers:
    """What a folder answered: each setting's definition (where one was written), and its rows by record id."""

    definitions: dict[str, dict]
    rows: dict[str, dict[str, dict]]


def read(out_dir: Path) -> Answers:
    """The pack and the loose files of `out_dir` together, a later answer to a record over an earlier one."""
    return collect(_packed(Path(out_dir)) + _loose(Path(out_dir) / "runs")[0])


def pack(out_dir: Path) -> None:
    """Move the loose files' answers into the pack: the pack is replaced whole before any loose file is deleted, so
    an interruption leaves each answer in the pack, in a loose file, or in both (which `latest` merges)."""
    out_dir = Path(out_dir)
    loose, files = _loose(out_dir / "runs")
    if not files:
        return
    partial = out_dir / (PACK + ".partial")
    partial.write_bytes(encode(latest(_packed(out_dir) + loose)))
    partial.replace(out_dir / PACK)
    for path in files:
        path.unlink()
    for folder in sorted({path.parent for path in files}) + [out_dir / "runs"]:
        if not any(folder.iterdir()):
            folder.rmdir()


def collect(lines: list[dict]) -> Answers:
    """The lines as readers take them, a later line over an earlier one for the same definition or record."""
    definitions, rows = {}, defaultdict(dict)
    for line in lines:
        if "definition" in line:
            definitions[line["setting"]] = line["definition"]
        else:
            rows[line["setting"]][line["row"]["id"]] = line["row"]
    return Answers(definitions, dict(rows))


def latest(lines: list[dict]) -> list[dict]:
    """What readers see, as lines: the last definition of each setting and the last answer to each of its records,
    grouped by setting, its definition first."""
    kept = {}
    for line in lines:
        key = (line["setting"], line["row"]["id"] if "row" in line else None)
        kept[key] = line
    return sorted(kept.values(), key=lambda line: (line["setting"], "row" in line))


def encode(lines: list[dict]) -> bytes:
    """The lines as gzip with no timestamp, so that packing the same answers again changes no byte."""
    return gzip.compress("".join(json.dumps(line) + "\n" for line in lines).encode(), mtime=0)


def decode(data: bytes, path: Path) -> list[dict]:
    """The lines of a pack; an error naming `path` when it is not one (truncated, corrupt, a Git LFS pointer):
    skipping it would answer its questions again, or leave them out of a table."""
    try:
        return [json.loads(line) for line in gzip.decompress(data).decode().splitlines()]
    except (OSError, EOFError, zlib.error, ValueError) as error:
        raise ValueError(
            f"{path} is not a readable answers file ({type(error).__name__}: {error}): restore it, or delete it to "
            "answer its questions again"
        ) from error


def _packed(out_dir: Path) -> list[dict]:
    path = out_dir / PACK
    return decode(path.read_bytes(), path) if path.is_file() else []


def _loose(runs: Path) -> tuple[list[dict], list[Path]]:
    """The lines of the loose files under `runs`, and the files read. A line torn by an interrupted write is left
    out: its record is answered again."""
    lines, files = [], []
    for folder in sorted(p for p in runs.glob("*") if p.is_dir()):
        definition = folder / "setting.json"
        if definition.is_file():
            lines.append({"setting": folder.name, "definition": json.loads(definition.read_text())})
            files.append(definition)
        for path in sorted(folder.glob("rank*.jsonl")):
            for text in path.read_text().splitlines():
                try:
                    row = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "id" in row:
                    lines.append({"setting": folder.name, "rank": int(path.stem.removeprefix("rank")), "row": row})
            files.append(path)
    return lines, files

"""`star eval`: every method at every budget over the same records, resumable and data-parallel.

Each setting (method, keep) appends one line per answered record to `runs/<setting>/rank<r>.jsonl` as soon
as its batch is done, so an interrupted run loses at most one batch and resumes where it stopped, with any
number of processes: the records already answered are read from every rank's file and from the folder's
answers.jsonl.gz, into which a finished run packs them (star.eval.answers). Under `torchrun` or
`accelerate launch` (which set RANK and WORLD_SIZE), process r answers records r, r + N, ...; rank 0
waits for the others, packs their answers and writes the summary.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

import star
from star.data.vqa import exact_match, normalize_answer
from star.eval import answers
from star.eval.records import QUESTION_SUFFIX, Record, RecordError
from star.eval.stats import wilson_interval
from star.methods.base import layer_average
from star.resize import NAME as RESIZE, check_model, resize_image
from star.schedule import BudgetUnreachable
from star.zoo.default_model import MANIFEST


@dataclass(frozen=True)
class Setting:
    """One column of the results: a method at a budget, with its options. `flops_budget`, where set, is a compute
    budget (a fraction of the unpruned prefill FLOPs) that picks keep and options (star.schedule) in place of keep."""

    method: str
    keep: int | float | None
    options: dict = field(default_factory=dict)
    flops_budget: float | None = None
    # a time budget (a fraction of the unpruned prefill time) picked from `schedule`, a file `star calibrate` wrote
    time_budget: float | None = None
    schedule: str | None = None

    @property
    def name(self) -> str:
        extra = "".join(f"-{k}{v}" for k, v in sorted(self.options.items()))
        budget = f"flops{self.flops_budget}" if self.flops_budget is not None else f"time{self.time_budget}" if self.time_budget is not None else self.keep
        return f"{self.method}-{budget}{extra}"

    def budget(self, text_tokens: float | None = None) -> dict:
        """The budget as star.apply takes it; a FLOPs budget for prompts of `text_tokens` text tokens."""
        if self.time_budget is not None:
            return {"time": self.time_budget, "schedule": self.schedule}
        return {"keep": self.keep} if self.flops_budget is None else {"flops": self.flops_budget, "text_tokens": text_tokens}


def build_prompt(processor, question: str) -> str:
    """The model's prompt: its own chat template with the image, the question and the short-answer cue."""
    content = [{"type": "image"}, {"type": "text", "text": f"{question}\n{QUESTION_SUFFIX}"}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@torch.no_grad()
def answer_batch(model, processor, records: list[Record], max_new_tokens: int = 8, resize: int | float | None = None) -> tuple[list[str], float]:
    """Greedy answers for a batch of records, and the prefill time (until the first forward call returns); with
    `resize`, each image made smaller first, to about that many tokens (star.resize). The images go to the processor
    one list per prompt, the form every family's processor takes (Gemma 3's needs it)."""
    images = [record.open_image() for record in records]
    if resize is not None:
        images = [resize_image(image, processor, resize) for image in images]
    images = [[image] for image in images]
    prompts = [build_prompt(processor, record.question) for record in records]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True).to(model.device)
    marks: list[float] = []
    handle = model.register_forward_hook(lambda *_: marks.append(time.perf_counter()))
    try:
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        handle.remove()
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers], marks[0] - start


def evaluate(
    model,
    processor,
    records: list[Record],
    settings: Iterable[Setting],
    out_dir: Path,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    positions: str | None = None,
    progress: bool = True,
) -> tuple[dict, list[str]]:
    """Answer every record under every setting; returns the summary and the messages of skipped records."""
    settings = list(settings)
    # the prompt length a FLOPs budget is computed for
    length = text_tokens(processor, records) if any(s.flops_budget is not None for s in settings) else None
    unreachable: set[str] = set()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    runs = Path(out_dir) / "runs"
    processor.tokenizer.padding_side = "left"
    skipped: list[str] = []
    mine = records[rank::world]
    done = answers.read(out_dir)
    _check_picks(model, settings, done, out_dir, length, positions)
    todo = {s.name: [r for r in mine if r.id not in done.rows.get(s.name, {})] for s in settings}
    bar = tqdm(total=sum(len(v) for v in todo.values()), desc="star eval", unit="q", disable=not progress or rank)
    for setting in settings:
        bar.set_postfix_str(setting.name)
        pending = todo[setting.name]
        resized = setting.keep if setting.method == RESIZE else None  # the unpruned model on smaller images
        try:
            if resized is not None:
                check_model(model)
                pruner = star.apply(model, method="none", keep=1.0)
            else:
                pruner = star.apply(model, method=setting.method, **setting.budget(length), **{"positions": positions, **setting.options})
        except BudgetUnreachable as error:  # at equal FLOPs, a method that cannot get this cheap has no point here
            skipped.append(f"{setting.name}: {error}")
            unreachable.add(setting.name)
            bar.update(len(pending))
            continue
        path = runs / setting.name / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with pruner:
            # what the folder answers, for a later report; a compute budget's pick with it
            picked = {"picked": _pick(pruner, length)} if setting.flops_budget is not None or setting.time_budget is not None else {}
            (path.parent / "setting.json").write_text(json.dumps({**asdict(setting), **picked}))
            for start in range(0, len(pending), batch_size):
                chunk = _readable(pending[start : start + batch_size], skipped)
                if chunk:
                    predictions, prefill_s = answer_batch(model, processor, chunk, max_new_tokens, resized)
                    stats = pruner.stats
                    _append(path, [_row(record, answer, stats, prefill_s / len(chunk)) for record, answer in zip(chunk, predictions)])
                bar.update(len(pending[start : start + batch_size]))
    bar.close()
    if world > 1:
        skipped = _gather_messages(skipped, world)
        if rank:
            return None, skipped
    answers.pack(out_dir)
    summary = summarize([s for s in settings if s.name not in unreachable], answers.read(out_dir), {r.id for r in records})
    (Path(out_dir) / "results.json").write_text(json.dumps(summary, indent=2))
    return summary, skipped


def _pick(pruner, text_tokens: float) -> dict:
    """What a FLOPs budget picked, as setting.json records it (JSON's lists for tuples, so that a reread compares)."""
    length = {} if text_tokens is None else {"text_tokens": round(text_tokens, 2)}  # a time budget's pick is the schedule's
    return json.loads(json.dumps({"keep": pruner.keep, "options": method_options(pruner.method), **length}))


def _check_picks(model, settings: list[Setting], done: answers.Answers, out_dir: Path, length: float | None, positions: str | None) -> None:
    """Refuse, before any compute, to add answers to a FLOPs-budget setting that answered under another pick: the
    pick depends on the prompts' mean length (other records) and on the schedule, and one setting's answers must
    come from one keep and one set of options."""
    for setting in settings:
        if setting.flops_budget is None or setting.name not in done.definitions or not done.rows.get(setting.name):
            continue
        before = done.definitions[setting.name].get("picked") or {}
        try:
            with star.apply(model, method=setting.method, **setting.budget(length), **{"positions": positions, **setting.options}) as pruner:
                now = _pick(pruner, length)
        except BudgetUnreachable:
            continue
        if (before.get("keep"), before.get("options")) != (now["keep"], now["options"]):
            was = f"{before.get('text_tokens', 'an unrecorded number of')} text tokens"
            raise ValueError(
                f"{setting.name} in {out_dir} answered flops={setting.flops_budget} with keep={before.get('keep')} and "
                f"options {before.get('options')} (prompts of {was}); these records pick keep={now['keep']} and options "
                f"{now['options']} (prompts of {now['text_tokens']} text tokens): choose a new --out, or delete {out_dir}"
            )


def _gather_messages(messages: list[str], world: int) -> list[str]:
    """Wait for every process (a barrier) and collect their skipped-record messages on each."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    gathered: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, messages)
    return [m for part in gathered for m in part]


def text_tokens(processor, records: list[Record]) -> float:
    """The records' prompts' mean text tokens (their tokens with the image placeholder not yet expanded, less
    that placeholder): the prompt length a FLOPs budget is computed for."""
    return sum(len(processor.tokenizer(build_prompt(processor, r.question)).input_ids) - 1 for r in records) / len(records)


def method_options(method) -> dict:
    """A built method's options, as star.apply takes them."""
    return {f.name: getattr(method, f.name) for f in fields(method)}


def _row(record: Record, answer: str, stats, prefill_s: float) -> dict:
    return {
        "id": record.id,
        "type": record.type,
        "question": record.question,
        "answer": record.answer,
        "prediction": answer,
        "correct": exact_match(answer, record.answer),
        "tokens": stats.tokens,
        "average_tokens": layer_average(stats.tokens[1], list(zip(stats.layers, stats.tokens[2:])), len(stats.sequence_lengths)),
        "flops": stats.flops / stats.batch_size,
        "prefill_s": prefill_s,
    }


def _append(path: Path, rows: list[dict]) -> None:
    """Append rows as JSON lines, first closing a line torn by an earlier interrupted write."""
    torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:
        f.write("\n" * bool(torn) + "".join(json.dumps(row) + "\n" for row in rows))


def _readable(records: list[Record], skipped: list[str]) -> list[Record]:
    """The records whose image opens; the others are reported, not fatal."""
    readable = []
    for record in records:
        try:
            record.open_image()
            readable.append(record)
        except RecordError as error:
            skipped.append(str(error))
    return readable


def check_identity(out_dir: Path, identity: dict, write: bool = True) -> None:
    """Refuse to add answers to OUT when its run.json records another model, dtype or answer length: a resumed
    run must not mix the answers of two models in one table. The first run writes run.json."""
    path = out_dir / "run.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        changed = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
        if changed:
            details = "; ".join(f"{k}: {recorded.get(k)!r} there, {identity.get(k)!r} now" for k in changed)
            raise ValueError(
                f"--out {str(out_dir)!r} holds answers of another run ({details}): choose a new --out, or delete it"
            )
    elif write:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(identity, indent=1))


def model_identity(path: str | Path) -> dict:
    """What names a model's weights: for a directory, the sha256 of its files as the default model's manifest
    records them, or else each file's size and modification time (hashing a 14 GB checkpoint on every run
    would cost more than the check is worth); for a hub id, the id."""
    folder = Path(path)
    if not folder.is_dir():
        return {"model": str(path)}
    manifest = folder / MANIFEST
    if manifest.is_file():  # content alone: the same default model under another $STAR_HOME is the same model
        return {"files": json.loads(manifest.read_text())["files"]}
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()}
    return {"model": str(folder.resolve()), "files": files}


def summarize(settings: list[Setting], done: answers.Answers, ids: set[str]) -> dict:
    """Accuracy per type and overall, retention against `none`, mean tokens, FLOPs and prefill time, over the
    records `ids` (an OUT folder may hold answers to more, from an earlier run with a larger --limit)."""
    rows = []
    for setting in settings:
        answered = {k: v for k, v in done.rows.get(setting.name, {}).items() if k in ids}
        by_type: dict[str, list[bool]] = defaultdict(list)
        truths: dict[str, Counter] = defaultdict(Counter)
        for row in answered.values():
            by_type[row["type"]].append(row["correct"])
            truths[row["type"]][normalize_answer(row["answer"])] += 1
        n = len(answered)
        values = [answered[key] for key in sorted(answered)]
        correct = sum(r["correct"] for r in values)
        picked = done.definitions.get(setting.name, {}).get("picked")
        rows.append(
            {
                **asdict(setting),
                "name": setting.name,
                "picked": picked,
                "n": n,
                "accuracy": correct / n if n else None,
                "interval": wilson_interval(correct, n),
                # majority: the accuracy of always giving the type's most common answer, the level of guessing
                "per_type": {
                    t: {
                        "n": len(v), "accuracy": sum(v) / len(v), "interval": wilson_interval(sum(v), len(v)),
                        "majority": max(truths[t].values()) / len(v),
                    }
                    for t, v in sorted(by_type.items())
                },
                "tokens": [sum(r["tokens"][i] for r in values) / n for i in range(len(values[0]["tokens"]))] if n else [],
                # the layer average of rows written before it was recorded is left out, not guessed
                "average_tokens": _mean([r["average_tokens"] for r in values if "average_tokens" in r]),
                "flops": sum(r["flops"] for r in values) / n if n else None,
                # the median, so that a cold first batch (compilation, caches) does not set a setting's time
                "prefill_s": statistics.median(r["prefill_s"] for r in values) if n else None,
            }
        )
    baseline = next((r for r in rows if r["method"] == "none" and r["accuracy"]), None)
    for row in rows:
        row["retention"] = row["accuracy"] / baseline["accuracy"] if baseline and row["accuracy"] is not None else None
    return {"settings": rows}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None

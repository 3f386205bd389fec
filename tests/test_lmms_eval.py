"""lmms-eval end to end, offline: the `star` backend on a local task scores as `star eval` does, answer by answer.

The model is the project's default model when it is already built (cached), else the tiny saved checkpoint,
so the test stays fast on a fresh machine. Skipped only when lmms-eval is not installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from star.integrations import LMMS_MISSING

pytest.importorskip("lmms_eval", reason=LMMS_MISSING)

from conftest import tiny_checkpoint  # noqa: E402
from star.cli import main as star_main  # noqa: E402
from star.data.scenes import scene_records  # noqa: E402
from star.integrations import lmms_eval as backend  # noqa: E402

TASK = "star_scenes_local"
PER_TYPE = 4
BATCH = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, int]:
    """(path, keep): the default model if it is cached, else the tiny checkpoint."""
    from star.zoo import CacheError, star_home
    from star.zoo.default_model import _base_inputs, check_cache, sha256_file, TRAINED_WEIGHTS

    directory = star_home() / "default"
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
    ours = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "star" / "runs" / f"star-{keep}" / "rank0.jsonl").read_text().splitlines()}
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

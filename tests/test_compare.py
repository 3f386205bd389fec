"""scripts/compare.py on a folder written by hand: settings that answered different numbers of questions are
compared on the questions all of them answered, variants pair with their defaults, and STAR's paired difference
from each other setting is the one stats.paired_difference gives on exactly those questions; a packed folder gives
the table its loose files give."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from star.eval import answers
from star.eval.stats import paired_difference

SPEC = importlib.util.spec_from_file_location("compare", Path(__file__).resolve().parents[1] / "scripts" / "compare.py")
compare = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(compare)


def write(folder: Path, name: str, setting: dict, correct: list[bool], flops: float) -> None:
    run = folder / "runs" / name
    run.mkdir(parents=True)
    (run / "setting.json").write_text(json.dumps(setting))
    rows = [
        {"id": f"q{i}", "type": "count", "answer": "2", "prediction": "2" if ok else "3", "correct": ok,
         "tokens": [196, 20], "average_tokens": 20.0, "flops": flops, "prefill_s": 0.1}
        for i, ok in enumerate(correct)
    ]
    (run / "rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def folder(tmp_path):
    write(tmp_path, "none-1.0", {"method": "none", "keep": 1.0, "options": {}}, [True] * 40, 5e10)
    write(tmp_path, "star-20", {"method": "star", "keep": 20, "options": {}}, [True] * 34 + [False] * 6 + [True] * 5, 3e10)
    write(tmp_path, "pdrop-20", {"method": "pdrop", "keep": 20, "options": {}}, [True] * 20 + [False] * 20, 2.5e10)
    write(tmp_path, "pdrop-20-positionsoriginal", {"method": "pdrop", "keep": 20, "options": {"positions": "original"}},
          [True] * 22 + [False] * 18, 2.5e10)
    write(tmp_path, "fastv-20", {"method": "fastv", "keep": 20, "options": {}}, [True] * 3, 1e10)  # stopped part-way
    return tmp_path


def test_compare_pairs_settings_on_the_questions_all_answered(folder, capsys):
    compare.main(str(folder), "test")
    text = (folder / "results.md").read_text()
    assert "Left out, answered only in part when the run stopped: fastv-20" in text
    summary = json.loads((folder / "results.json").read_text())
    assert {r["name"] for r in summary["settings"]} == {"none-1.0", "star-20", "pdrop-20", "pdrop-20-positionsoriginal"}
    assert all(r["n"] == 40 for r in summary["settings"])  # star's 5 extra answers are not counted
    value, (low, high) = paired_difference([True] * 34 + [False] * 6, [True] * 20 + [False] * 20)
    assert f"**{100 * value:+.1f} ({100 * low:+.1f} to {100 * high:+.1f})**" in text  # STAR minus pdrop, bold: excludes 0
    variant, (v_low, v_high) = paired_difference([True] * 22 + [False] * 18, [True] * 20 + [False] * 20)
    assert f"| {100 * variant:+.1f} ({100 * v_low:+.1f} to {100 * v_high:+.1f}) |" in text  # not bold: includes 0
    assert "| star |  | 85.0 (70.9-92.9) [0.0300] |" in text  # the grid: accuracy, Wilson interval, TFLOPs
    assert (folder / "accuracy.png").stat().st_size > 0


def test_compare_reads_a_flops_budget_folder(tmp_path):
    write(tmp_path, "none-1.0", {"method": "none", "keep": 1.0, "options": {}}, [True] * 10, 5e10)
    picked = {"keep": 20, "options": {"layer": 7, "stage1_ratio": 0.5}}
    write(tmp_path, "star-flops0.3", {"method": "star", "keep": None, "options": {}, "flops_budget": 0.3, "picked": picked}, [True] * 9 + [False], 1.5e10)
    write(tmp_path, "fastv-flops0.3", {"method": "fastv", "keep": None, "options": {}, "flops_budget": 0.3,
                                       "picked": {"keep": 30, "options": {"layer": 2}}}, [True] * 5 + [False] * 5, 1.5e10)
    compare.main(str(tmp_path), "budgets")
    text = (tmp_path / "results.md").read_text()
    assert "| method | options | flops 0.3 |" in text
    assert "[0.0150; keep 20]" in text and "[0.0150; keep 30]" in text
    assert "| fastv |  | **+40.0" in text  # STAR minus FastV at the same budget, outside the interval
    assert "authors' defaults | variant" not in text  # no variants, no table of them


def test_compare_gives_the_same_table_from_a_packed_folder(folder, tmp_path_factory):
    packed = shutil.copytree(folder, tmp_path_factory.mktemp("packed") / "folder")
    answers.pack(packed)
    assert not (packed / "runs").exists()
    compare.main(str(folder), "test")
    compare.main(str(packed), "test")
    for name in ("results.md", "results.json", "accuracy.png"):
        assert (packed / name).read_bytes() == (folder / name).read_bytes(), name

"""`star eval` on a user's JSONL file: results, resume, and bad records, on a tiny saved checkpoint."""

from __future__ import annotations

import gzip
import json

import pytest
from PIL import Image

from conftest import tiny_checkpoint
from star.cli import main
from star.eval import answers, runner
from star.eval.records import read_jsonl


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def write_data(folder, rows: list[dict | str]) -> str:
    for name, color in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.new("RGB", (40, 40), color).save(folder / name)
    path = folder / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


GOOD = [
    {"image": "red.png", "question": "what color is the w20 ?", "answer": "red", "type": "color"},
    {"image": "blue.png", "question": "what color is the w21 ?", "answer": "blue", "type": "color"},
    {"image": "red.png", "question": "how many w22 ?", "answer": "2", "type": "count"},
]


def run_eval(checkpoint, data, out, *extra, methods="none,star", keep="4") -> int:
    return main(["eval", "--model", checkpoint, "--data", data, "--methods", methods, "--keep", keep,
                 "--batch-size", "2", "--max-new-tokens", "2", "--out", str(out), *extra])


def test_eval_writes_table_plot_and_per_type_results(checkpoint, tmp_path):
    data = write_data(tmp_path, GOOD)
    assert run_eval(checkpoint, data, tmp_path / "out", methods="none,star,fastervlm", keep="8,4") == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    names = [row["name"] for row in summary["settings"]]
    assert names == ["none-1.0", "star-8", "star-4", "fastervlm-8", "fastervlm-4"]
    for row in summary["settings"]:
        assert row["n"] == 3 and set(row["per_type"]) == {"color", "count"}
        assert row["tokens"][-1] == (16 if row["method"] == "none" else row["keep"])
        assert row["flops"] > 0 and row["prefill_s"] > 0
    assert summary["settings"][1]["flops"] < summary["settings"][0]["flops"]
    assert (tmp_path / "out" / "results.md").read_text().startswith("| method")
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000


def test_interrupted_eval_resumes_and_loses_nothing(checkpoint, tmp_path, monkeypatch):
    data = write_data(tmp_path, GOOD)
    run_eval(checkpoint, data, tmp_path / "full")
    monkeypatch.setattr(answers, "pack", lambda out_dir: None)  # stopped before the end: its answers are loose
    run_eval(checkpoint, data, tmp_path / "cut")
    monkeypatch.undo()
    runs = tmp_path / "cut" / "runs"
    kept_line = (runs / "star-4" / "rank0.jsonl").read_text().splitlines()[0]
    (runs / "star-4" / "rank0.jsonl").write_text(kept_line + "\n" + '{"id": "torn')
    (runs / "none-1.0" / "rank0.jsonl").unlink()
    run_eval(checkpoint, data, tmp_path / "cut")
    kept = json.loads(kept_line)
    assert answers.read(tmp_path / "cut").rows["star-4"][kept["id"]] == kept and not runs.exists()
    full = json.loads((tmp_path / "full" / "results.json").read_text())["settings"]
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())["settings"]
    for a, b in zip(full, resumed):
        assert (a["name"], a["n"], a["accuracy"], a["per_type"]) == (b["name"], b["n"], b["accuracy"], b["per_type"])


def test_a_packed_folder_resumes_with_more_questions_and_answers_none_again(checkpoint, tmp_path, monkeypatch):
    data = write_data(tmp_path, GOOD)
    out = tmp_path / "out"
    assert run_eval(checkpoint, data, out, "--limit", "2") == 0
    assert (out / answers.PACK).is_file() and not (out / "runs").exists()
    before = answers.read(out).rows
    asked, answer_batch = [], runner.answer_batch
    monkeypatch.setattr(runner, "answer_batch", lambda model, processor, records, *rest: asked.append([r.id for r in records]) or answer_batch(model, processor, records, *rest))
    assert run_eval(checkpoint, data, out) == 0
    assert asked == [["line3"], ["line3"]]  # the third question, once per setting
    after = answers.read(out).rows
    assert {name: sorted(rows) for name, rows in after.items()} == {name: ["line1", "line2", "line3"] for name in ("none-1.0", "star-4")}
    assert all(after[name][key] == row for name in before for key, row in before[name].items())  # prefill_s too: not recomputed
    assert not (out / "runs").exists()
    assert [row["n"] for row in json.loads((out / "results.json").read_text())["settings"]] == [3, 3]


def test_an_unreadable_answers_file_is_an_error_naming_it(checkpoint, tmp_path, capsys):
    data = write_data(tmp_path, GOOD)
    out = tmp_path / "out"
    assert run_eval(checkpoint, data, out) == 0
    packed = (out / answers.PACK).read_bytes()
    for broken in (packed[: len(packed) // 2], b"version https://git-lfs.github.com/spec/v1\n", gzip.compress(b"{not json\n")):
        (out / answers.PACK).write_bytes(broken)
        assert run_eval(checkpoint, data, out) == 2
        assert f"{out / answers.PACK} is not a readable answers file" in capsys.readouterr().err
        assert (out / answers.PACK).read_bytes() == broken and not (out / "runs").exists()  # nothing answered again


def test_resuming_with_other_weights_or_answer_length_is_refused(tmp_path, capsys):
    data = write_data(tmp_path, GOOD)
    out = tmp_path / "out"
    checkpoint = tiny_checkpoint(tmp_path / "model")
    assert run_eval(checkpoint, data, out) == 0
    packed = (out / answers.PACK).read_bytes()
    tiny_checkpoint(tmp_path / "model", seed=1)  # retrained in place: same path, same file sizes
    assert run_eval(checkpoint, data, out) == 2
    assert "--out" in (err := capsys.readouterr().err) and "files: {" in err
    assert run_eval(tiny_checkpoint(tmp_path / "elsewhere"), data, out) == 2
    assert "model: " in capsys.readouterr().err
    assert run_eval(checkpoint, data, out, "--max-new-tokens", "3") == 2
    assert "max_new_tokens: 2 there, 3 now" in capsys.readouterr().err
    assert (out / answers.PACK).read_bytes() == packed and not (out / "runs").exists()


def test_a_smaller_limit_summarizes_only_its_records(checkpoint, tmp_path):
    data = write_data(tmp_path, GOOD)
    assert run_eval(checkpoint, data, tmp_path / "out") == 0
    assert run_eval(checkpoint, data, tmp_path / "out", "--limit", "2") == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["n"] for row in summary["settings"]] == [2, 2]


def test_bad_records_are_skipped_and_reported_by_line(checkpoint, tmp_path, capsys):
    rows = [
        GOOD[0],
        {"image": "missing.png", "question": "what ?", "answer": "red"},
        {"image": "red.png", "question": "what ?"},
        "{not json",
        {"image": "broken.png", "question": "what ?", "answer": "red"},
    ]
    data = write_data(tmp_path, rows)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records, skipped = read_jsonl(tmp_path / "data.jsonl")
    assert [r.id for r in records] == ["line1", "line5"]
    assert skipped == [
        "data.jsonl line 2: image missing.png not found",
        "data.jsonl line 3: missing field answer",
        "data.jsonl line 4: not JSON (Expecting property name enclosed in double quotes)",
    ]
    assert run_eval(checkpoint, data, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "line 2" in err and "line 3" in err and "line 4" in err and "record line5" in err
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(row["n"] == 1 for row in summary["settings"])


def test_empty_or_missing_data_is_a_clear_error(checkpoint, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    assert run_eval(checkpoint, str(tmp_path / "empty.jsonl"), tmp_path / "out") == 2
    assert "holds no usable record" in capsys.readouterr().err
    assert run_eval(checkpoint, str(tmp_path / "nope.jsonl"), tmp_path / "out") == 2
    assert "--data" in (err := capsys.readouterr().err) and "nope.jsonl" in err
    assert run_eval(checkpoint, write_data(tmp_path, GOOD), tmp_path / "out", methods="star,bogus") == 2
    assert "method='bogus'" in capsys.readouterr().err


def test_two_processes_give_the_results_of_one(checkpoint, tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    data = write_data(tmp_path, GOOD + [dict(GOOD[0], question="what shape is the w23 ?", type="shape")])
    assert run_eval(checkpoint, data, tmp_path / "one") == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    star_cli = shutil.which("star", path=str(Path(sys.executable).parent))
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "--no-python", star_cli, "eval", "--model", checkpoint,
               "--data", data, "--methods", "none,star", "--keep", "4", "--batch-size", "2", "--max-new-tokens", "2",
               "--out", str(tmp_path / "two")]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    lines = answers.decode((tmp_path / "two" / answers.PACK).read_bytes(), answers.PACK)
    assert {line["rank"] for line in lines if line["setting"] == "star-4" and "row" in line} == {0, 1}
    one = json.loads((tmp_path / "one" / "results.json").read_text())["settings"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["settings"]
    for a, b in zip(one, two, strict=True):
        assert (a["name"], a["n"], a["accuracy"], a["per_type"], a["tokens"]) == (b["name"], b["n"], b["accuracy"], b["per_type"], b["tokens"])
        predictions = [{key: row["prediction"] for key, row in answers.read(tmp_path / run).rows[a["name"]].items()} for run in ("one", "two")]
        assert predictions[0] == predictions[1] and len(predictions[0]) == 4


def test_types_keep_only_those_questions_and_majority_is_reported(checkpoint, tmp_path):
    data = write_data(tmp_path, GOOD)
    assert run_eval(checkpoint, data, tmp_path / "out", "--types", "color", methods="none") == 0
    [row] = json.loads((tmp_path / "out" / "results.json").read_text())["settings"]
    assert row["n"] == 2 and list(row["per_type"]) == ["color"]
    assert row["per_type"]["color"]["majority"] == 0.5  # red once, blue once
    assert "Majority-answer level" in (tmp_path / "out" / "results.md").read_text()


def test_unknown_type_is_refused_before_the_model_loads(checkpoint, tmp_path, capsys):
    data = write_data(tmp_path, GOOD)
    assert run_eval(checkpoint, data, tmp_path / "out", "--types", "colour") == 2
    assert "types='colour'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_grid_sweeps_method_options_and_positions(checkpoint, tmp_path):
    data = write_data(tmp_path, GOOD)
    assert run_eval(checkpoint, data, tmp_path / "out", "--grid", "layer=1,3", "--grid", "positions=original,contiguous", methods="star") == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["settings"]
    assert [r["options"] for r in rows] == [
        {"layer": 1, "positions": "original"}, {"layer": 1, "positions": "contiguous"},
        {"layer": 3, "positions": "original"}, {"layer": 3, "positions": "contiguous"},
    ]
    assert len({r["name"] for r in rows}) == 4
    layers = {r["options"]["layer"]: r["flops"] for r in rows}
    assert layers[1] < layers[3]  # an earlier cut runs more layers on the short sequence
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert table[0].startswith("| method | options | keep |")
    assert [line.split(" | ")[1] for line in table[2:6]] == [
        "layer=1 positions=original", "layer=1 positions=contiguous", "layer=3 positions=original", "layer=3 positions=contiguous",
    ]


def test_bad_grid_is_refused_before_the_model_loads(checkpoint, tmp_path, capsys):
    data = write_data(tmp_path, GOOD)
    assert run_eval(checkpoint, data, tmp_path / "out", "--grid", "depth=1,2", methods="star") == 2
    assert "'depth'" in capsys.readouterr().err
    assert run_eval(checkpoint, data, tmp_path / "out", "--grid", "layer", methods="star") == 2
    assert "OPTION=V1,V2" in capsys.readouterr().err
    assert run_eval(checkpoint, data, tmp_path / "out", "--grid", "positions=diagonal", methods="star") == 2
    assert "positions='diagonal'" in capsys.readouterr().err


def test_eval_at_equal_time_picks_each_method_from_its_own_schedule(checkpoint, tmp_path):
    """--time with --schedules: each method's setting is the most accurate point of its own schedule (written by
    hand here, with times) within the budget; a method without a schedule is refused before any compute."""
    from transformers import AutoConfig

    from star.flops import DecoderShape
    from star.schedule import Point, Schedule, shape_key

    shape = shape_key(DecoderShape.from_config(AutoConfig.from_pretrained(checkpoint).get_text_config()), 16)
    folder = tmp_path / "schedules"
    folder.mkdir()
    for method, keeps in (("star", (8, 4)), ("pool", (9, 4)), ("random", (8, 4))):
        points = (Point(keeps[0], {}, 0.6, time=0.7, accuracy=0.9), Point(keeps[1], {}, 0.4, time=0.45, accuracy=0.8))
        Schedule(method, shape, 10.0, points, "by hand").save(folder / f"{method}.json")
    data = write_data(tmp_path, GOOD)
    common = ["eval", "--model", checkpoint, "--data", data, "--batch-size", "2", "--max-new-tokens", "2"]
    assert main([*common, "--methods", "none,star,pool,random", "--time", "0.5,0.8", "--schedules", str(folder), "--out", str(tmp_path / "out")]) == 0
    rows = {row["name"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())["settings"]}
    assert set(rows) == {"none-1.0", *(f"{m}-time{t}" for m in ("star", "pool", "random") for t in (0.5, 0.8))}
    for method, keeps in (("star", (8, 4)), ("pool", (9, 4)), ("random", (8, 4))):
        assert rows[f"{method}-time0.8"]["picked"]["keep"] == keeps[0] and rows[f"{method}-time0.5"]["picked"]["keep"] == keeps[1]
        assert rows[f"{method}-time0.5"]["tokens"][-1] == 4
    assert main([*common, "--methods", "fastv", "--time", "0.5", "--schedules", str(folder), "--out", str(tmp_path / "x")]) == 2

"""`star calibrate` on a tiny saved checkpoint: the schedule it writes, its costs, resume, and its errors."""

from __future__ import annotations

import pytest
from conftest import N_VISUAL, tiny_checkpoint
from test_eval import GOOD, write_data

import star
from star.calibrate import default_grid, runs_folder
from star.cli import main
from star.eval import answers
from star.flops import DecoderShape
from star.methods import build
from star.schedule import Schedule, flops_ratio


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def run(checkpoint, data, out, *extra) -> int:
    return main(["calibrate", "--model", checkpoint, "--data", data, "--keep", "8,2", "--grid", "layer=1,3",
                 "--batch-size", "2", "--max-new-tokens", "2", "--out", str(out), *extra])


def test_calibrate_writes_a_schedule_whose_costs_are_the_formulas(checkpoint, tmp_path, capsys):
    data = write_data(tmp_path, GOOD[:1])  # one prompt: its FLOPs ratio is exactly the formula's at its length
    out = tmp_path / "schedule.json"
    assert run(checkpoint, data, out) == 0
    schedule = Schedule.load(out)
    assert out.with_suffix(".png").stat().st_size > 0 and "The frontier" in capsys.readouterr().out
    assert [(p.keep, p.options) for p in schedule.points] == [
        (N_VISUAL, {}), (8, {"layer": 1}), (2, {"layer": 1}), (8, {"layer": 3}), (2, {"layer": 3})
    ]
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    shape = DecoderShape.from_config(model.config.get_text_config())
    for point in schedule.points[1:]:
        plan = build("star", **point.options).plan(N_VISUAL, point.keep, shape.num_layers)
        assert point.flops == pytest.approx(flops_ratio(shape, plan, schedule.text_tokens), rel=1e-9)
        assert point.n == 1 and point.time > 0 and point.interval[0] <= point.accuracy <= point.interval[1]
    answered = (runs_folder(out) / answers.PACK).read_bytes()
    assert run(checkpoint, data, out) == 0  # a rerun resumes: nothing is answered twice
    assert (runs_folder(out) / answers.PACK).read_bytes() == answered
    with star.apply(model, flops=1.0, schedule=out) as pruner:
        best = schedule.pick("flops", 1.0)
        assert pruner.keep == best.keep


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "none"], "--method 'none' has nothing to calibrate"),
        (["--grid", "layers=1,2"], "option 'layers' is not accepted by method 'star'"),
        (["--grid", "layer=9"], "layer=9 is not a decoder layer to cut at"),
        (["--split", "validation"], "--split 'validation' is given with --data"),
    ],
)
def test_bad_calibrate_arguments_fail_before_the_model_loads(checkpoint, tmp_path, capsys, extra, message):
    data = write_data(tmp_path, GOOD)
    assert run(checkpoint, data, tmp_path / "s.json", *extra) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "s.json").exists()


def test_default_grid_sweeps_stars_ratio_and_layer():
    assert default_grid("star", 30) == {"stage1_ratio": [0, 0.3, 0.5], "layer": [1, 3, 7, 15]}
    assert default_grid("fastv", 30) == {}


def test_eval_at_flops_budgets_picks_per_method_and_stays_within_each(checkpoint, tmp_path):
    import json

    data = write_data(tmp_path, GOOD[:1])  # one prompt: the budget is computed for exactly its length
    out = tmp_path / "out"
    assert main(["eval", "--model", checkpoint, "--data", data, "--methods", "none,star,fastv,fastervlm", "--flops", "0.9,0.97",
                 "--batch-size", "2", "--max-new-tokens", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["settings"]
    unpruned = rows[0]["flops"]
    assert [(r["method"], r["flops_budget"]) for r in rows[1:]] == [(m, b) for m in ("star", "fastv", "fastervlm") for b in (0.9, 0.97)]
    for row in rows[1:]:
        assert row["flops"] / unpruned <= row["flops_budget"] and row["picked"]["keep"] == row["tokens"][-1]
    assert rows[1]["picked"]["options"]["layer"] is not None  # STAR's layer was picked, not left to its default
    assert "flops 0.9: " in (out / "results.md").read_text()


def test_keep_and_flops_together_are_refused(checkpoint, tmp_path, capsys):
    data = write_data(tmp_path, GOOD)
    assert main(["eval", "--model", checkpoint, "--data", data, "--keep", "4", "--flops", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "--keep and --flops are both given" in capsys.readouterr().err
    assert main(["run", "--model", checkpoint, "--image", str(tmp_path / "red.png"), "--question", "q", "--flops", "2"]) == 2
    assert "flops='2' is not a budget" in capsys.readouterr().err


def test_eval_skips_a_flops_budget_a_method_cannot_reach_and_says_so(checkpoint, tmp_path, capsys):
    import json

    data = write_data(tmp_path, GOOD[:1])
    out = tmp_path / "out"
    assert main(["eval", "--model", checkpoint, "--data", data, "--methods", "none,pdrop,fastervlm", "--flops", "0.6",
                 "--batch-size", "2", "--max-new-tokens", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["settings"]
    assert [r["method"] for r in rows] == ["none", "fastervlm"]  # PyramidDrop cuts at layers 1, 3, 4 of 6: 0.67 at the least
    assert "skipped: pdrop-flops0.6: flops=0.6 is below what pdrop reaches on this model" in capsys.readouterr().err


def test_eval_refuses_to_resume_a_flops_budget_under_another_pick(checkpoint, tmp_path, capsys):
    """Other records, other prompt lengths: the same budget can pick another keep, and the answers of two keeps
    must not share one setting's folder."""
    import json

    (tmp_path / "short").mkdir(), (tmp_path / "long").mkdir()
    short, long = write_data(tmp_path / "short", GOOD[:1]), write_data(tmp_path / "long", GOOD[:1])
    record = json.loads(open(long).readline())
    record["question"] = " ".join(["what colour is the shape in the middle of this picture, and its border?"] * 2)
    open(long, "w").write(json.dumps(record) + "\n")
    out = tmp_path / "out"
    args = ["--methods", "fastervlm", "--flops", "0.9", "--batch-size", "2", "--max-new-tokens", "2", "--out", str(out)]
    assert main(["eval", "--model", checkpoint, "--data", short, *args]) == 0
    picked = answers.read(out).definitions["fastervlm-flops0.9"]["picked"]
    packed = (out / answers.PACK).read_bytes()
    assert main(["eval", "--model", checkpoint, "--data", long, *args]) == 2
    error = capsys.readouterr().err
    assert f"answered flops=0.9 with keep={picked['keep']}" in error and f"choose a new --out, or delete {out}" in error
    assert (out / answers.PACK).read_bytes() == packed and not (out / "runs").exists()  # nothing was added
    assert main(["eval", "--model", checkpoint, "--data", short, *args]) == 0  # the same records resume

"""`star demo`'s prefill column: not one cold call per row (which once read 8084 ms unpruned against 1203 ms pruned,
the unpruned call paying the warm-up), but the median of REPEATS timed calls of each setting after an untimed one."""

from __future__ import annotations

import types

import star.cli.demo as demo
from conftest import batch, prompt_ids, tiny_checkpoint, tiny_llava
from star.cli import main


def test_prefill_times_skip_the_cold_call_and_take_the_median(monkeypatch):
    """A fake clock that each forward call advances by a scripted duration: the first call of each setting is cold
    (8 s), the timed ones take 1, 2, 9 s (unpruned) and 0.5, 0.4, 3 s (pruned), alternating. The medians are 2 and
    0.5; timing the cold call, or averaging, gives other numbers."""
    model = tiny_llava()
    inputs = batch([prompt_ids(3, 4, seed=0)])
    durations = iter([8.0, 8.0, 1.0, 0.5, 2.0, 0.4, 9.0, 3.0])
    clock = types.SimpleNamespace(now=0.0)
    model.register_forward_hook(lambda *_: setattr(clock, "now", clock.now + next(durations)))
    monkeypatch.setattr(demo, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    unpruned, pruned = demo.prefill_times(model, inputs, [dict(method="none", keep=1.0), dict(method="star", keep=4)], repeats=3)
    assert (unpruned, pruned) == (2.0, 0.5)
    assert next(durations, None) is None  # 1 + 3 calls of each setting, no more


def test_demo_reports_the_median_of_its_repeats(tmp_path, monkeypatch, capsys):
    """The whole demo on a tiny checkpoint: each row's figures are prefill_times', called once per image on the
    unpruned and the pruned setting, and the header says how many calls they are the median of."""
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint")
    calls = []

    def fixed_times(model, inputs, pruning, repeats=demo.REPEATS):
        calls.append([kwargs["method"] for kwargs in pruning])
        return [0.0123, 0.0045]

    monkeypatch.setattr(demo, "prefill_times", fixed_times)
    assert main(["demo", "--model", checkpoint, "--keep", "4", "--out", str(tmp_path / "demo")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"| prefill ms (median of {demo.REPEATS}) |")
    rows = [line for line in lines[2:] if line.startswith("|")]
    assert len(rows) == len(calls) > len(demo.DEMO_PHOTOS)  # a scene of each question type, and the photos
    assert calls == [["none", "star"]] * len(rows)
    assert all(row.endswith("| 12 > 4 |") for row in rows), rows
    assert len(list((tmp_path / "demo").glob("*.png"))) == len(rows)

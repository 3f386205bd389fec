"""scripts/bench_vllm.py's paired table on runs written by hand: each burst is paired with the unpruned burst of
its own run, several runs pool their bursts, the interval is Student's t over them, and the efficiency is the time
saved over the FLOPs saved on average; runs of different models are not pooled; engines open together take turns.
(The script's engines need vLLM; its tables and turns do not.)"""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from star.eval.stats import mean_interval

SPEC = importlib.util.spec_from_file_location("bench_vllm", Path(__file__).resolve().parents[1] / "scripts" / "bench_vllm.py")
bench = sys.modules["bench_vllm"] = importlib.util.module_from_spec(SPEC)  # its dataclasses look their module up
SPEC.loader.exec_module(bench)


def row(method: str, keep: float, walls: list[float], flops: float) -> dict:
    """`flops`: the row's prefill FLOPs with the tower (0.75 for every setting) over the unpruned row's 1."""
    return {"mode": "offline", "max_tokens": 1, "method": method, "keep": keep, "burst_wall_s": walls,
            "decoder_flops": flops - 0.75, "tower_flops": 0.75, "selection_flops": 0.0}


def run(unpruned: list[float], pruned: list[float], flops: float) -> list[dict]:
    return [row("none", 1.0, unpruned, 1.0), row("star-vision", 0.1, pruned, flops)]


def cells(table: str) -> list[str]:
    return [c.strip() for c in table.splitlines()[-1].strip("|").split("|")]


def test_pooled_bursts_pair_within_their_run():
    first = run([100.0, 200.0, 300.0], [90.0, 190.0, 270.0], flops=0.85)
    second = run([50.0, 400.0], [45.0, 360.0], flops=0.8)  # a slower machine: its unpruned bursts differ
    ratios = [0.9, 0.95, 0.9, 0.9, 0.9]
    mean, (low, high) = mean_interval(ratios)
    saved = (3 * 0.15 + 2 * 0.2) / 5  # the FLOPs saved, per burst
    setting, each, bursts, time, flops, gain = cells(bench.paired([first, second]))[2:]
    assert setting == "star-vision 0.1" and bursts == "5"
    assert each == "0.900, 0.950, 0.900 / 0.900, 0.900"
    assert time == f"{mean:.3f} ({low:.3f}-{high:.3f})"
    assert flops == f"{1 - saved:.3f} with tower"
    assert gain == f"{(1 - mean) / saved:.2f} ({(1 - high) / saved:.2f} to {(1 - low) / saved:.2f})"


def test_one_burst_has_no_interval():
    *_, time, _, gain = cells(bench.paired([run([100.0], [90.0], flops=0.8)]))
    assert time == "0.900" and gain == "0.50"


def test_pool_refuses_runs_of_different_models(tmp_path):
    base = {"model": "m", "config": "qwen2.5-vl-7b", "decoder": "small", "decoder_shape": {"hidden_size": 896},
            "image_pixels": [1000000, 2000000], "requests": 1}
    paths = [tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"]
    for path, record in zip(paths, [base, base, {**base, "requests": 16}]):
        path.write_text(json.dumps({**record, "results": run([100.0, 200.0], [90.0, 190.0], flops=0.8)}))
    assert len(bench.pooled_runs(paths[:2])) == 2
    with pytest.raises(SystemExit, match="c.json differs from .*a.json in requests"):
        bench.pooled_runs(paths)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**base, "results": [{k: v for k, v in r.items() if k != "burst_wall_s"} for r in run([100.0], [90.0], 0.8)]}))
    with pytest.raises(SystemExit, match="old.json has no time per burst"):
        bench.pooled_runs([paths[0], old])


def test_equal_flops_interpolates_burst_by_burst():
    """A cut row halfway (in decoder FLOPs) between unpruned and star-vision: each burst's requests/s against the
    mean of theirs on the same burst."""
    unpruned, vision = row("none", 1.0, [100.0, 200.0, 400.0], 1.0), row("star-vision", 0.5, [50.0, 100.0, 100.0], 0.85)
    cut = {**row("star", 0.5, [80.0, 150.0, 200.0], 0.925), "cut": {"layer": 2}, "requests_per_s": 1.0, "ttft_s": 1.0}
    for r, rate in ((unpruned, 1.0), (vision, 2.0)):
        r.update(requests_per_s=rate, ttft_s=1 / rate)
    ratios = [(1 / c) / ((1 / u + 1 / v) / 2) for c, u, v in zip(cut["burst_wall_s"], unpruned["burst_wall_s"], vision["burst_wall_s"])]
    mean, (low, high) = mean_interval(ratios)
    setting, flops, speed, _ = cells(bench.equal_flops([unpruned, vision, cut]))[2:]
    assert (setting, flops) == ("star (two stages) 0.5", "0.70")  # decoders of 0.25, 0.10 and 0.175
    assert speed == f"0.67x; {mean:.2f}x ({low:.2f}-{high:.2f})"


def test_every_open_engine_takes_turns_on_the_same_bursts():
    """Two engines open together (the shared one with two settings, a cut engine with one): every round serves each
    setting once before any serves again, the first place rotates by one setting a round, every setting serves the
    same bursts, and the warm-up round is not timed."""
    args = SimpleNamespace(max_tokens=[1, 16], repeats=3, requests=2)
    work = bench.Workload(prompts=[], questions=[], images=[], units=[], texts=[], shape=None, tower_flops=None)
    shared = bench.Engine({}, [({"method": "none", "keep": 196}, None), ({"method": "star-vision", "keep": 39}, None)], per_request=True)
    cut = bench.Engine({}, [({"method": "star", "keep": 39}, None)], per_request=False, cut={"layer": 15}, layers=(15, 15))
    served = []

    def serve(answer, raw, setting, burst):  # each burst's wall time: its place in the run
        served.append((answer, raw["method"], burst.start))
        return {"wall_s": float(len(served)), "block_size": 32}

    rows = [row for part in bench._alternate(args, "offline", work, [(shared, serve), (cut, serve)]) for row in part]
    order = ["none", "star-vision", "star"]
    for i, answer in enumerate(args.max_tokens):
        rounds = [served[12 * i + 3 * r: 12 * i + 3 * r + 3] for r in range(args.repeats + 1)]
        for r, turns in enumerate(rounds):
            assert [method for _, method, _ in turns] == order[r % 3:] + order[:r % 3]
            assert {(a, start) for a, _, start in turns} == {(answer, (4 * i + r) * args.requests)}
    assert [(r["max_tokens"], r["method"], r["repeats"]) for r in rows] == [(a, m, 3) for a in (1, 16) for m in order]
    assert "cut" in rows[2] and "cut" not in rows[0]
    walls = {(a, m): [float(n) for n, (a2, m2, _) in enumerate(served, 1) if (a2, m2) == (a, m)] for a in (1, 16) for m in order}
    assert all(r["burst_wall_s"] == walls[(r["max_tokens"], r["method"])][1:] for r in rows)

"""The benchmark's oracle replays the measured run's kept tokens exactly, and its rows are complete."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import batch, prompt_ids
from star.api import resolve
from star.bench import Recorder, Replay, TowerClock, measure
from star.pruner import Pruner

PROMPTS = [prompt_ids(3, 6, seed=1), prompt_ids(7, 4, seed=2)]


@torch.no_grad()
@pytest.mark.parametrize("method", ["star", "pdrop", "visionzip", "pool"])
def test_oracle_replays_the_kept_tokens_and_logits(model, method):
    inputs = batch(PROMPTS)
    chosen, positions = resolve(model, method, None)  # the method's own positions (its authors'), replayed too
    recorder = Recorder(chosen)
    with Pruner(model, recorder, keep=5, positions=positions) as pruner:
        logits = model(**inputs).logits
        kept = pruner.stats.kept_patches
    with Pruner(model, Replay(recorder), keep=5, positions=positions) as oracle:
        replayed = model(**inputs).logits
        assert all(torch.equal(a, b) for a, b in zip(oracle.stats.kept_patches, kept))
    assert torch.allclose(logits, replayed, atol=1e-5)  # merged tokens (VisionZip's) too: their states replay


@torch.no_grad()
def test_measure_reports_time_memory_and_flops(model):
    inputs = batch(PROMPTS[:1])
    full = measure(model, inputs, "none", 1.0, repeats=1, warmup=0, new_tokens=2)
    pruned = measure(model, inputs, "star", 4, repeats=1, warmup=0, new_tokens=2)
    for row in (full, pruned):
        assert row["prefill_s"] > 0 and row["oracle_prefill_s"] > 0
        assert row["decode_tokens_per_s"] is None or row["decode_tokens_per_s"] > 0  # None: noise above the decode steps
    assert pruned["tokens"] == [16, 14, 4]
    for row in (full, pruned):
        assert 0 < row["tower_s"] < row["prefill_s"] and 0 < row["tower_share"] < 1 and 0 < row["unpruned_tower_share"] < 1
    assert pruned["counted_flops"] < full["counted_flops"]
    assert pruned["kv_cache_bytes"] < full["kv_cache_bytes"]


def test_tower_clock_counts_the_module_calls_and_nothing_between_them():
    class Sleeper(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x

    module = Sleeper()
    with TowerClock(module) as clock:
        module(torch.zeros(1))
        time.sleep(0.2)  # outside the module: not counted
        module(torch.zeros(1))
    assert 0.1 <= clock.seconds < 0.2
    assert not module._forward_pre_hooks and not module._forward_hooks

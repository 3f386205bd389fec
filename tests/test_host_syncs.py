"""A pruned prefill waits for the device once: to read the batch's layout (`Layout`). Nothing else reads back.

On a GPU every read back (`.item()`, `.tolist()`, `nonzero`, boolean-mask indexing, `repeat_interleave` with
counts in a tensor, `if tensor`) drains the queue, and the kernels pruning saves are paid back in idle time.
On the CPU the same reads show as operators in torch.profiler, and `.tolist()`, which dispatches no operator,
is counted where it is called (`star.bench.host_reads`). docs/results.md ("Host syncs per prefill") has every method's count.
"""

from __future__ import annotations

import pytest
import torch

import star
from conftest import batch, prompt_ids, tiny_llava
from star.bench import host_reads

METHODS = [m for m in star.methods() if m != "none"]


def test_the_counter_sees_every_kind_of_read():
    """The count is not vacuous: each way of reading back is seen."""
    x = torch.tensor([1, 0, 2])

    def reads():
        x.sum().item()
        bool(x.any())
        x.tolist()
        x[x > 0]
        x.nonzero()
        torch.repeat_interleave(x)

    calls = host_reads(reads)
    assert calls["aten::_local_scalar_dense"] >= 2  # repeat_interleave learns its size with one more
    assert calls["tolist"] == 1
    assert calls["aten::nonzero"] == 2
    assert calls["aten::repeat_interleave"] == 1


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.mark.parametrize("prompts", [1, 3], ids=["batch1", "batch3"])
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_a_pruned_prefill_reads_back_once(model, method, prompts):
    """Every method, at a batch of one and of three prompts of different lengths (rows padded, uneven cuts for
    the decoder stages): the pruned prefill makes at most one read more than the unpruned one, the layout."""
    inputs = batch([prompt_ids(5, 7, 0), prompt_ids(2, 11, 1), prompt_ids(9, 3, 2)][:prompts])
    model(**inputs)
    unpruned = host_reads(lambda: model(**inputs))
    with star.apply(model, method=method, keep=4):
        model(**inputs)
        pruned = host_reads(lambda: model(**inputs))
    assert sum(pruned.values()) <= sum(unpruned.values()) + 1, (pruned, unpruned)
    assert pruned["tolist"] == 1 and pruned["aten::nonzero"] == 0, pruned


@pytest.mark.parametrize("method", ["star", "fastervlm", "fastv"])
@torch.no_grad()
def test_pruned_decode_steps_read_back_nothing_more(model, method):
    """A whole generate(): the decode steps of a pruned prompt map their inputs into the shorter frames without
    reading anything back, so the pruned request makes at most the prefill's one read more."""
    inputs = batch([prompt_ids(5, 7, 0), prompt_ids(2, 11, 1)])
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    model.generate(**inputs, **options)
    unpruned = host_reads(lambda: model.generate(**inputs, **options))
    with star.apply(model, method=method, keep=4):
        model.generate(**inputs, **options)
        pruned = host_reads(lambda: model.generate(**inputs, **options))
    assert sum(pruned.values()) <= sum(unpruned.values()) + 1, (pruned, unpruned)

"""`star bench`: speed measured, against the unpruned model and against the oracle.

The oracle is the same model given only the kept tokens: the same hooks replay the kept sets of the run
being measured, with no scoring at all. It is the floor pruning can reach, so `prefill / oracle` is what a
method's scoring costs, and `prefill / unpruned` is what the user gets. A batch of B prompts is measured the same
way: each prompt keeps its own tokens, and throughput counts all B.
"""

from __future__ import annotations

import collections
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

import star
from star import compat
from star.api import resolve
from star.methods import DecoderView, LLMStage, Method, Plan, Selection, VisionView
from star.methods.none import NoPruning
from star.pruner import Pruner

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")  # Linux: the process's memory figures
# Operators that read a tensor back to the host, or learn a data-dependent size from the device: on a GPU each one
# waits for every kernel queued before it.
READ_BACK_OPS = (
    "aten::_local_scalar_dense",  # .item(), int(t), bool(t), float(t)
    "aten::nonzero",  # also boolean-mask indexing
    "aten::masked_select",
    "aten::repeat_interleave",  # with counts in a tensor and no output_size
    "aten::unique",
    "aten::_unique2",
    "aten::unique_consecutive",
)


@dataclass(frozen=True)
class Recorder(Method):
    """`method` itself, keeping every selection it makes, in the order it makes them: what the oracle replays."""

    name = "recorder"
    summary = "another method, its selections kept"

    method: Method
    made: list[Selection] = field(default_factory=list)

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        return self.method.plan(n_visual, keep, num_layers)

    def unit_plan(self, n_visual: int, keep: int, num_layers: int, grid: tuple[int, int] | None) -> Plan:
        return self.method.unit_plan(n_visual, keep, num_layers, grid)

    @property
    def grid_positions(self) -> bool:
        return self.method.grid_positions

    def select_vision(self, view: VisionView, k: int) -> Selection:
        self.made.append(self.method.select_vision(view, k))
        return self.made[-1]

    def select_llm(self, stage: LLMStage, view: DecoderView, k: int) -> Selection:
        self.made.append(self.method.select_llm(stage, view, k))
        return self.made[-1]


@dataclass(frozen=True)
class Replay(Method):
    """The oracle: the selections a recorded pruner's method made, returned one by one in that order, with no scoring.

    A pruner made with a fresh Replay, on the same model and prompts, calls it exactly as the recorded pruner called
    its method: the stand-in probe of `vision_refusal` at construction, then at prefill each unit group's vision
    stage (units of several sizes, images of several groups) and each decoder stage, so each call gets its own.
    """

    name = "oracle"
    summary = "the selections of a recorded run, replayed without scoring"

    recorded: Recorder
    calls: Iterator[Selection] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "calls", iter(self.recorded.made))

    def plan(self, n_visual: int, keep: int, num_layers: int) -> Plan:
        return self.recorded.plan(n_visual, keep, num_layers)

    def unit_plan(self, n_visual: int, keep: int, num_layers: int, grid: tuple[int, int] | None) -> Plan:
        return self.recorded.unit_plan(n_visual, keep, num_layers, grid)

    @property
    def grid_positions(self) -> bool:
        return self.recorded.grid_positions

    def select_vision(self, view: VisionView, k: int) -> Selection:
        return next(self.calls)

    def select_llm(self, stage: LLMStage, view: DecoderView, k: int) -> Selection:
        return next(self.calls)


def _timed(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def kv_cache_bytes(cache: DynamicCache) -> int:
    """The keys and values cached (a linear-attention layer's states have a fixed size, and no keys)."""
    attention = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    return sum(t.numel() * t.element_size() for layer in attention for t in (layer.keys, layer.values))


def new_cache(model) -> DynamicCache:
    """An empty cache for the model's prefill: laid out by its config where the decoder has linear-attention layers
    (Qwen3.5's), whose states a plain cache has no slot for, as `generate` lays it out; plain otherwise."""
    layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
    return DynamicCache(config=model.config) if "linear_attention" in layer_types else DynamicCache()


@torch.no_grad()
def measure(
    model, inputs: dict, method: str, keep: int | float, repeats: int = 5, warmup: int = 2, new_tokens: int = 16,
    positions: str | None = None, tick: Callable[[], object] = lambda: None, **options,
) -> dict:
    """Prefill time and throughput, decode tokens/s, KV-cache bytes and peak memory of one setting on one batch of
    prompts, and its prefill against its oracle's and the unpruned model's.

    The prefills of the setting, of its oracle and of the unpruned model alternate, run by run, and each ratio
    is the median of the per-run ratios: a machine that speeds up or slows down during the measurement (or
    between settings) moves all three alike, and the ratios stay honest. `tick` is called after each of the
    `calls(repeats, warmup)` model calls, for a progress bar. Peak memory is the highest during this setting's
    calls: allocated GPU memory on a GPU, the process's resident memory (weights included) on a CPU.
    """
    device = next(model.parameters()).device
    batch = inputs["input_ids"].shape[0]
    reset_peak_memory(device)
    chosen, positions = resolve(model, method, positions, **options)
    recorder = Recorder(chosen)
    with Pruner(model, recorder, keep=keep, positions=positions) as pruner:
        cache = new_cache(model)
        counted = counted_flops(lambda: model(**inputs, **compat.cache_kwargs(cache)))
        tick()
        stats = pruner.stats
    unpruned = NoPruning()
    contenders = {  # what each run prunes with (a fresh oracle each run, replaying from the start), its budget and positions
        "prefill_s": (lambda: chosen, keep, positions),
        "oracle_prefill_s": (lambda: Replay(recorder), keep, positions),
        "unpruned_prefill_s": (lambda: unpruned, 1.0, resolve(model, "none", None)[1]),  # pool's M-RoPE grids are not its
    }
    times: dict[str, list[float]] = {key: [] for key in contenders}
    tower_times: dict[str, list[float]] = {key: [] for key in contenders}
    tower = TowerClock(vision_tower(model))
    for run in range(warmup + repeats):
        for key, (make, budget, policy) in contenders.items():
            with Pruner(model, make(), keep=budget, positions=policy) as attached, tower:
                elapsed = _timed(lambda: model(**inputs, **compat.cache_kwargs(new_cache(model))))
                if key != "unpruned_prefill_s" and not all(torch.equal(a, b) for a, b in zip(attached.stats.kept_patches, stats.kept_patches)):
                    raise RuntimeError(f"{'the oracle' if key == 'oracle_prefill_s' else method} did not keep the measured run's tokens")
            tick()
            if run >= warmup:
                times[key].append(elapsed)
                tower_times[key].append(tower.seconds)
    medians = {key: statistics.median(values) for key, values in times.items()}
    medians["prefill_vs_unpruned"] = statistics.median(p / u for p, u in zip(times["prefill_s"], times["unpruned_prefill_s"]))
    medians["prefill_vs_oracle"] = statistics.median(p / o for p, o in zip(times["prefill_s"], times["oracle_prefill_s"]))
    # The vision tower's share of each prefill (the rest: the decoder, the projector and any scoring), so that a
    # comparison at equal time counts a setting that changes the tower's work (a smaller image) where it is spent.
    medians["tower_s"] = statistics.median(tower_times["prefill_s"])
    medians["tower_share"] = statistics.median(t / p for t, p in zip(tower_times["prefill_s"], times["prefill_s"]))
    medians["unpruned_tower_share"] = statistics.median(
        t / p for t, p in zip(tower_times["unpruned_prefill_s"], times["unpruned_prefill_s"])
    )
    with star.apply(model, method=method, keep=keep, positions=positions, **options):
        decode_s = decode_time(model, inputs, new_tokens, repeats, warmup, tick)
    return {
        "method": method,
        "keep": keep,
        "batch": batch,
        "tokens": stats.tokens,
        "flops": stats.flops,
        "counted_flops": counted,
        **medians,
        "prefill_prompts_per_s": batch / medians["prefill_s"],
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s if decode_s > 0 else None,
        "kv_cache_bytes": kv_cache_bytes(cache),
        "peak_memory_bytes": peak_memory_bytes(device),
    }


def vision_tower(model) -> torch.nn.Module:
    """The vision encoder of a model of any supported family (its `vision_tower`, Qwen's `visual`)."""
    inner = model.model
    tower = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
    if tower is None:
        raise ValueError(f"{type(model).__name__} has no vision_tower or visual module to time")
    return tower


class TowerClock:
    """Inside a `with` block, the seconds a module's forward calls take, together (`seconds`), the device waited
    for at each call's start and end; what runs between its calls is not counted."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> TowerClock:
        self.seconds = 0.0
        self._handles = [
            self.module.register_forward_pre_hook(lambda *_: self._begin()),
            self.module.register_forward_hook(lambda *_: self._end()),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _begin(self) -> None:
        _sync()
        self._start = time.perf_counter()

    def _end(self) -> None:
        _sync()
        self.seconds += time.perf_counter() - self._start


def calls(repeats: int, warmup: int) -> int:
    """Model calls one `measure` makes: the counted prefill, three prefills and two generate() calls a run."""
    return 1 + 5 * (warmup + repeats)


def decode_time(model, inputs: dict, new_tokens: int, repeats: int, warmup: int, tick: Callable[[], object] = lambda: None) -> float:
    """Median time of the `new_tokens - 1` decode steps of generate(), alone (all prompts of the batch together).

    Each run times generate() for one new token (prefill only) and for `new_tokens`, back to back; their
    difference is the decode steps, free of the prefill's own noise (a median at or below zero means the noise
    exceeded the decode steps: the row then reports no decode speed). Subtracting a separately measured prefill
    median instead leaves that noise in a number a tenth its size.
    """
    def generate(n: int) -> None:
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        tick()

    differences = []
    for run in range(warmup + repeats):
        prefill_only = _timed(lambda: generate(1))
        difference = _timed(lambda: generate(new_tokens)) - prefill_only
        if run >= warmup:
            differences.append(difference)
    return statistics.median(differences)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's resident high-water mark (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _CLEAR_REFS.exists():
        _CLEAR_REFS.write_text("5")


def peak_memory_bytes(device: torch.device) -> int | None:
    """The peak since `reset_peak_memory`: allocated CUDA memory, or on a CPU the process's resident high-water
    mark (VmHWM, weights and everything else included); None where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    found = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text()) if _STATUS.is_file() else None
    return int(found.group(1)) * 1024 if found else None


class _ToList(TorchFunctionMode):
    """Counts `.tolist()`, which reads a tensor back without dispatching an operator the profiler would list."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def host_reads(fn: Callable[[], object]) -> collections.Counter:
    """The reads back to the host that fn makes, by operator (and "tolist"), on any device: what would each wait
    for the device on a GPU. (On a GPU the CUDA runtime's own synchronisations count them too.)"""
    with profile(activities=[ProfilerActivity.CPU]) as prof, _ToList() as tolist:
        fn()
    reads = collections.Counter(event.name for event in prof.events() if event.name in READ_BACK_OPS)
    if tolist.calls:
        reads["tolist"] = tolist.calls
    return reads


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs of everything fn runs (vision encoder, projector, decoder, scoring), counted by PyTorch."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()

"""Latency at batch 1 and 8 on one GPU: prefill, a 16-token request, and the host syncs of one prefill.

    python scripts/gpu_latency.py --out docs/results/gpu            # LLaVA-1.5-7B's architecture, random weights
    python scripts/gpu_latency.py --model DIR --device cpu --keeps 8,4,2 --peer-keep 4 ...   # a tiny config.json

Each setting runs eager and compiled (`torch.compile(model.forward)` after the pruner is applied; "reduce-overhead",
CUDA graphs, where the device is a GPU). Times are medians of `--repeats` runs after `--warmup` (which also
compiles), synchronised with the device; `vs unpruned` divides by the unpruned row of the same mode and batch. Syncs are counted by torch.profiler over one prefill: on a GPU the CUDA runtime's
synchronisations (cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize), on a CPU the operators
that read a tensor back (tests/test_host_syncs.py). A setting that fails is reported in its row and the run goes
on; rows already measured are kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

import star
from star import synthetic
from star.bench import host_reads

CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", default="llava-1.5-7b", help="a shipped architecture (star/configs/)")
    source.add_argument("--model", type=Path, help="a folder with a config.json, instead of --config")
    parser.add_argument("--keeps", default="288,58,29", help="STAR's budgets (visual tokens per image)")
    parser.add_argument("--peer-keep", type=int, default=58, help="FasterVLM's and FastV's budget")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens of the timed request")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", default="eager,compiled", help="eager and/or compiled")
    parser.add_argument("--out", type=Path, default=Path("docs/results/gpu"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.model:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model)
    else:
        config = synthetic.shipped_config(args.config)
    model = synthetic.random_model(config, args.device, getattr(torch, args.dtype), "sdpa")
    settings = [("none", 1.0), *(("star", int(k)) for k in args.keeps.split(",")), ("fastervlm", args.peer_keep), ("fastv", args.peer_keep)]
    # Compiled, a generate() meets a shape per decode step: more graphs than dynamo's default limit of 8.
    torch._dynamo.config.recompile_limit = 64
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    modes, batches = args.modes.split(","), [int(b) for b in args.batch.split(",")]
    bar = tqdm(total=len(modes) * len(batches) * len(settings), desc="gpu_latency", unit="setting")
    for mode in modes:
        for batch in batches:
            inputs = synthetic.synthetic_inputs(model, batch)
            for method, keep in settings:
                bar.set_postfix_str(f"{mode}, batch {batch}, {method} {keep}")
                row = {"mode": mode, "batch": batch, "method": method, "keep": keep}
                try:
                    row.update(measure(model, inputs, method, keep, args, device, compiled=mode == "compiled"))
                except Exception as error:  # noqa: BLE001 - a failed setting is reported in its row, the run goes on
                    row["error"] = f"{type(error).__name__}: {error}"
                rows.append(row)
                bar.write(json.dumps(row))
                bar.update()
                (args.out / "latency.json").write_text(json.dumps(with_ratios(rows), indent=2))
    bar.close()
    table = markdown(with_ratios(rows), args)
    (args.out / "latency.md").write_text(table)
    print(table)


@torch.no_grad()
def measure(model, inputs: dict, method: str, keep, args, device: torch.device, compiled: bool) -> dict:
    """Median prefill and request times of one setting, and the syncs of one prefill.

    Compiled, the forward is compiled anew with this setting's pruner applied (a compiled graph keeps the
    hooks it was traced with), and the warm-up runs compile every shape the timed runs meet.
    """
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with star.apply(model, method=method, keep=keep) as pruner:
        if compiled:
            torch._dynamo.reset()
            model.forward = torch.compile(model.forward, mode="reduce-overhead" if device.type == "cuda" else None)
        try:
            prefill, request = [], []
            for repeat in range(args.warmup + args.repeats):
                times = timed(lambda: model(**inputs), device), timed(lambda: model.generate(**inputs, **options), device)
                if repeat >= args.warmup:
                    prefill.append(times[0])
                    request.append(times[1])
            syncs = count_syncs(lambda: model(**inputs), device)
            flagged = sync_warnings(lambda: model(**inputs)) if device.type == "cuda" else None
            tokens = pruner.stats.tokens
        finally:
            vars(model).pop("forward", None)
    return {"tokens": tokens, "prefill_ms": 1e3 * statistics.median(prefill), "request_ms": 1e3 * statistics.median(request),
            "syncs_per_prefill": syncs, "sync_debug_warnings": flagged}


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's prefill and request times over the unpruned row of its mode and batch size."""
    base = {(row["mode"], row["batch"]): row for row in rows if row["method"] == "none" and "error" not in row}
    for row in rows:
        reference = base.get((row["mode"], row["batch"]))
        if reference is not None and "error" not in row:
            row["prefill_vs_unpruned"] = row["prefill_ms"] / reference["prefill_ms"]
            row["request_vs_unpruned"] = row["request_ms"] / reference["request_ms"]
    return rows


def count_syncs(fn, device: torch.device) -> int:
    """Host syncs of one call: the CUDA runtime's synchronisations on a GPU, reads back to the host on a CPU."""
    if device.type != "cuda":
        return sum(host_reads(fn).values())
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    return sum(1 for event in prof.events() if event.name in CUDA_SYNCS)


def sync_warnings(fn) -> int:
    """The synchronising calls CUDA's sync debug mode flags in one call (the stronger form of the profiler's count:
    it names each, in the warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown(rows: list[dict], args) -> str:
    lines = [
        f"`python scripts/gpu_latency.py --{'model' if args.model else 'config'} {args.model or args.config} "
        f"--device {args.device} --dtype {args.dtype}` "
        f"({torch.cuda.get_device_name() if args.device == 'cuda' else args.device}, torch {torch.__version__}; "
        f"median of {args.repeats} after {args.warmup} warm-up; {synthetic.NOTICE})",
        "",
        "| mode | batch | method | keep | tokens | prefill ms | vs unpruned | request ms | vs unpruned | syncs / prefill "
        "| sync-debug warnings (GPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['mode']} | {row['batch']} | {row['method']} | {row['keep']} | failed: {row['error'][:120]} | | | | | | |")
            continue
        lines.append(
            f"| {row['mode']} | {row['batch']} | {row['method']} | {row['keep']} | {' / '.join(map(str, row['tokens']))} | "
            f"{row['prefill_ms']:.1f} | {row.get('prefill_vs_unpruned', float('nan')):.3f} | {row['request_ms']:.1f} | "
            f"{row.get('request_vs_unpruned', float('nan')):.3f} | {row['syncs_per_prefill']} | {'' if row['sync_debug_warnings'] is None else row['sync_debug_warnings']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
